"""fastrlhf.integrations.patching, the patch mechanism of the TRL, verl and OpenRLHF integrations,
on fake packages: patch, patch twice, undo restores the exact objects, undo without a patch,
the context manager undoes on an exception."""

import sys
import types

import pytest

from fastrlhf.integrations.patching import Patch, PatchSlot, in_package


def _fn(name):
    def fn():
        return name

    fn.__name__ = name
    return fn


@pytest.fixture
def pkg(monkeypatch):
    """A fake package ``fakepkg`` with a submodule that imported ``fakepkg.f``, a module outside
    it that imported it too, and a class with a plain, a static and an inherited method."""
    f = _fn("f")
    root, sub, other = (types.ModuleType(n) for n in ("fakepkg", "fakepkg.sub", "fakepkg_other"))
    root.f = sub.f = other.f = f
    sub.alias = f

    class Base:
        def inherited(self):
            return "base"

    class Cls(Base):
        def method(self):
            return "method"

        @staticmethod
        def static():
            return "static"

    root.Cls = Cls
    for mod in (root, sub, other):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return types.SimpleNamespace(f=f, root=root, sub=sub, other=other, Cls=Cls, Base=Base)


def test_in_package():
    assert in_package("trl", "trl") and in_package("trl.kernels.x", "trl")
    assert not in_package("trlx", "trl") and not in_package("a.trl", "trl")


def test_set_attr_and_undo_restore_exact_objects(pkg):
    static, method = vars(pkg.Cls)["static"], vars(pkg.Cls)["method"]
    new = _fn("new")
    patch = Patch()
    patch.set_attr(pkg.root, "f", new)
    patch.set_attr(pkg.Cls, "static", new)
    patch.set_attr(pkg.Cls, "method", new)
    patch.set_attr(pkg.Cls, "inherited", new)  # not the class's own: undo deletes it
    patch.set_attr(pkg.root, "added", new)
    assert pkg.root.f is new and vars(pkg.Cls)["static"] is new and pkg.Cls.inherited is new
    assert pkg.sub.f is pkg.f  # set_attr changes one binding only
    assert [(c.kind, c.key) for c in patch.changes] == [
        ("attr", "f"), ("attr", "static"), ("attr", "method"), ("attr", "inherited"), ("attr", "added")]
    patch.undo()
    assert pkg.root.f is pkg.f
    assert vars(pkg.Cls)["static"] is static and vars(pkg.Cls)["method"] is method  # the staticmethod object
    assert "inherited" not in vars(pkg.Cls) and pkg.Cls().inherited() == "base"
    assert not hasattr(pkg.root, "added")
    assert patch.changes == () and not patch.active


def test_set_item_and_undo(pkg):
    registry = {"a": pkg.f}
    patch = Patch()
    patch.set_item(registry, "a", "x")
    patch.set_item(registry, "b", "y")
    assert registry == {"a": "x", "b": "y"}
    patch.undo()
    assert registry == {"a": pkg.f} and registry["a"] is pkg.f


def test_rebind_covers_the_package_and_modules_imported_later(pkg, monkeypatch):
    new = _fn("new")
    patch = Patch()
    patch.rebind(pkg.f, new, "fakepkg", "f")
    assert pkg.root.f is new and pkg.sub.f is new and pkg.sub.alias is new
    assert pkg.other.f is pkg.f  # not in the package
    later = types.ModuleType("fakepkg.later")
    later.f = new  # imported after the patch: it picked up the drop-in
    monkeypatch.setitem(sys.modules, "fakepkg.later", later)
    assert patch.changes[0][:5] == ("rebind", "fakepkg", "f", pkg.f, new)
    patch.undo()
    assert pkg.root.f is pkg.f and pkg.sub.f is pkg.f and pkg.sub.alias is pkg.f and later.f is pkg.f


def test_undo_is_newest_first(pkg):
    patch = Patch()
    patch.set_attr(pkg.root, "f", "first")
    patch.set_attr(pkg.root, "f", "second")
    patch.undo()
    assert pkg.root.f is pkg.f


def test_undo_twice_and_without_patch_do_nothing(pkg):
    Patch().undo()  # nothing recorded
    patch = Patch()
    patch.set_attr(pkg.root, "f", "new")
    patch.undo()
    pkg.root.f = "set by someone else"
    patch.undo()  # a second undo changes nothing
    assert pkg.root.f == "set by someone else" and not patch.active


def test_context_manager_undoes_on_exception(pkg):
    registry = {}
    with pytest.raises(RuntimeError, match="boom"), Patch() as patch:
        patch.set_attr(pkg.root, "f", "new")
        patch.set_item(registry, "k", "v")
        patch.rebind(pkg.f, "new", "fakepkg")
        raise RuntimeError("boom")
    assert pkg.root.f is pkg.f and pkg.sub.f is pkg.f and registry == {} and not patch.active


def test_slot_patching_twice_returns_the_active_patch():
    slot = PatchSlot()
    assert slot.get() is None
    made = []

    def make():
        made.append(Patch())
        return made[-1]

    first = slot.get_or_make(make)
    assert slot.get_or_make(make) is first and slot.get() is first and len(made) == 1
    first.undo()
    assert slot.get() is None
    second = slot.get_or_make(make)
    assert second is not first and len(made) == 2


def test_slot_keeps_nothing_when_make_raises():
    slot = PatchSlot()

    def fail():
        raise ImportError("not installed")

    with pytest.raises(ImportError, match="not installed"):
        slot.get_or_make(fail)
    assert slot.get() is None
