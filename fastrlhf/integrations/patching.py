"""The one patch mechanism of the integrations: rebind a library's names to fastrlhf's, and undo.

:class:`Patch` records each change before it makes it and :meth:`Patch.undo` reverts them, newest
first; :class:`PatchSlot` keeps an integration's one active patch, so patching twice does not
stack. ``patch_trl``, ``register_with_verl`` and ``patch_openrlhf`` are built on them.

Not thread-safe (no integration promises it): patch and undo from one thread, before the
patched library runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableMapping
from typing import Any, NamedTuple

__all__ = ["Change", "Patch", "PatchSlot", "in_package"]


def in_package(module_name: str, package: str) -> bool:
    """Whether ``module_name`` is ``package`` or one of its submodules (``"trl.kernels"`` of ``"trl"``)."""
    return module_name == package or module_name.startswith(package + ".")


class Change(NamedTuple):
    """One recorded change of a :class:`Patch`.

    ``kind`` ``"attr"``: attribute ``key`` of the module or class ``target``; ``"item"``: key
    ``key`` of the mapping ``target``; ``"rebind"``: every module-level name in the loaded
    modules of package ``target`` bound to ``old`` (``key``: a name for the record, or None).
    ``had``: whether ``key`` was there before (always True for ``"rebind"``).
    """

    kind: str
    target: Any
    key: Any
    old: Any
    new: Any
    had: bool


class Patch:
    """A record of changes to another library's namespaces; :meth:`undo` reverts them.

    Each change is recorded before it is made, with the exact object it replaces:

    * :meth:`set_attr`: an attribute of a module or class (read from its ``__dict__``, so a
      class's descriptor or an inherited attribute is restored as it was, not as ``getattr``
      shows it);
    * :meth:`set_item`: an entry of a dict, e.g. a registry;
    * :meth:`rebind`: an object under every name that holds it in a package's loaded modules.

    ``active`` is True until :meth:`undo`. Also a context manager: leaving a ``with`` block
    undoes, also on an exception (which propagates).
    """

    def __init__(self) -> None:
        self._changes: list[Change] = []
        self.active = True

    @property
    def changes(self) -> tuple[Change, ...]:
        """The changes not yet undone, oldest first."""
        return tuple(self._changes)

    def set_attr(self, namespace, name: str, value) -> None:
        """Set ``namespace.name = value``; undo binds the old object again (deletes the attribute
        if ``namespace`` had none of its own)."""
        own = vars(namespace)
        self._changes.append(Change("attr", namespace, name, own.get(name), value, name in own))
        setattr(namespace, name, value)

    def set_item(self, mapping: MutableMapping, key, value) -> None:
        """Set ``mapping[key] = value``; undo puts the old value back (removes ``key`` if it was absent)."""
        self._changes.append(Change("item", mapping, key, mapping.get(key), value, key in mapping))
        mapping[key] = value

    def rebind(self, old, new, package: str, name: str | None = None) -> None:
        """Bind ``new`` wherever a loaded module of ``package`` binds ``old`` (compared by identity)
        at module level. Undo binds ``old`` again wherever a module of ``package`` loaded at undo
        time binds ``new``: modules imported after the patch (which picked up ``new``) are
        restored too. ``name``: what the object is called, kept in :attr:`changes`."""
        self._changes.append(Change("rebind", package, name, old, new, True))
        _rebind(old, new, package)

    def undo(self) -> None:
        """Revert every recorded change, newest first, restoring the exact objects recorded; the
        record is then empty and ``active`` False. Calling it again, or on a patch that changed
        nothing, does nothing."""
        changes, self._changes = self._changes, []
        for change in reversed(changes):
            if change.kind == "rebind":
                _rebind(change.new, change.old, change.target)
            elif change.kind == "item":
                if change.had:
                    change.target[change.key] = change.old
                else:
                    change.target.pop(change.key, None)
            elif change.had:
                setattr(change.target, change.key, change.old)
            elif change.key in vars(change.target):
                delattr(change.target, change.key)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def _rebind(old, new, package: str) -> None:
    for module_name, module in list(sys.modules.items()):
        if module is None or not in_package(module_name, package):
            continue
        for attr, value in list(vars(module).items()):
            if value is old:
                setattr(module, attr, new)


class PatchSlot:
    """Where an integration keeps its active :class:`Patch`: one at a time.

    :meth:`get_or_make` returns the patch it made last while that is active (not undone), and
    otherwise makes, keeps and returns a new one; so a second patch call returns the first.
    """

    def __init__(self) -> None:
        self._patch: Patch | None = None

    def get(self) -> Patch | None:
        """The active patch, or None (none made yet, or undone)."""
        return self._patch if self._patch is not None and self._patch.active else None

    def get_or_make(self, make: Callable[[], Patch]) -> Patch:
        """The active patch, else ``make()`` (kept only if it returns; an exception propagates)."""
        patch = self.get()
        if patch is None:
            patch = self._patch = make()
        return patch
