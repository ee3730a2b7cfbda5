"""The package's structure, as rules a test can hold: one registry of op families that every
reader uses, the same launcher entry points on every backend, one numbering of the kernels'
codes (Python, Triton, C), no import cycles, no module reaching into another's private names."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import fastrlhf
from fastrlhf import registry
from fastrlhf.ops import policy_spec
from fastrlhf.reference import advantages as ref_advantages
from fastrlhf.reference import kl as ref_kl
from fastrlhf.reference import policy_loss as ref_policy_loss

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastrlhf"


# ------------------------------------------------------------------------------ registry
def test_every_public_op_belongs_to_one_family():
    registered = [op for f in registry.FAMILIES for op in f.ops]
    assert len(registered) == len(set(registered))
    assert all(f.ops for f in registry.FAMILIES)
    ops = {n for n in fastrlhf.__all__ if inspect.isfunction(getattr(fastrlhf, n))
           and getattr(fastrlhf, n).__module__.startswith("fastrlhf.ops.")}
    assert ops == set(registered) | {"policy_loss_options"}  # the spec's question, not an op
    assert set(registry.family("policy_loss").ops) == {"aggregate", "policy_loss", "ppo_policy_loss", "ppo_value_loss"}


def test_readers_take_the_families_from_the_registry():
    from bench.core import FAMILIES as BENCH_FAMILIES
    from fastrlhf.cuda import dispatch_table

    assert BENCH_FAMILIES == registry.family_names()
    assert dispatch_table.FAMILIES == registry.family_names("cuda")
    for name in registry.family_names():
        assert (ROOT / "bench" / "families" / f"{name}.py").is_file(), name
        assert (PACKAGE / "ops" / f"{name}.py").is_file() and (PACKAGE / "reference" / f"{name}.py").is_file()
    with pytest.raises(KeyError, match="no op family 'ppo'; families: logprobs"):
        registry.family("ppo")


def _launchers(module) -> dict:
    return {n: f for n, f in vars(module).items()
            if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__}


@pytest.mark.parametrize("family", registry.family_names())
def test_backends_expose_the_triton_entry_points(family):
    """Every launcher of the torch and cuda backends is one of Triton's, its parameters Triton's in
    order (a backend may lack a feature's trailing parameters, e.g. cuda's packed ``cu_seqlens``)."""
    pytest.importorskip("triton")
    fam = registry.family(family)
    triton = _launchers(importlib.import_module(fam.backends["triton"]))
    for backend, path in fam.backends.items():
        for name, fn in _launchers(importlib.import_module(path)).items():
            assert name in triton, f"{path}.{name} is not a launcher of {fam.backends['triton']}"
            mine = list(inspect.signature(fn).parameters)
            theirs = [p for p in inspect.signature(triton[name]).parameters if p in mine]
            assert mine == theirs, f"{backend} {name}{tuple(mine)} vs triton {tuple(theirs)}"


# ------------------------------------------------------------------------------ numbering
def _c_enum(name: str) -> dict[str, int]:
    body = re.search(rf"enum {name} \{{([^}}]*)\}}", (ROOT / "kernels" / "launchers.cuh").read_text()).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


def test_c_enums_number_the_python_tables():
    assert _c_enum("fastrlhf_kl_code") == {f"FASTRLHF_{c.upper()}": i for i, c in enumerate(ref_kl.CODES)}
    assert _c_enum("fastrlhf_group_method") == {f"FASTRLHF_{m.upper()}": i
                                                 for i, m in enumerate(ref_advantages.METHODS)}


def test_triton_policy_loss_numbers_every_spec_name():
    """The kernel modes are the public modes but bypass_mode (it runs as vanilla or gpg), GSPO's
    sequence gradient and the value loss; the correction tables number the spec's names."""
    kernels = pytest.importorskip("fastrlhf.triton.policy_loss")
    modes = {policy_spec.kernel_mode(m, {**policy_spec.resolve_options(m, {"dro_beta": 1.0} if m == "dro" else {}),
                                         "gradient": g})[0]
             for m in ref_policy_loss.MODES for g in ("token", "sequence")}
    assert set(kernels.KERNEL_MODES) == modes | {"value"}
    assert kernels._LEVELS.keys() == {None, *ref_policy_loss.IS_LEVELS}
    assert kernels._IS_MODES.keys() == set(ref_policy_loss.IS_MODES)
    assert kernels._STATS.keys() == set(ref_policy_loss.IS_STATS)


# ------------------------------------------------------------------------------ imports
def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str]]:
    """``(module, imported name)`` of every import in ``path``, function-level ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, "") if full in modules else (base, alias.name))
        elif isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in out if m in modules]


def test_no_import_cycles():
    modules = _modules()
    edges = {m: {t for t, _ in _imports(m, p, modules)} - {m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a cycle of the code
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and modules[m].name == "__init__.py")}
             for m, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = trail[trail.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = []
    for m, path in modules.items():
        aliases = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        aliases[alias.asname or alias.name] = target
                    elif alias.name.startswith("_") and node.module in modules and node.module != m:
                        bad.append(f"{m} imports {node.module}.{alias.name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{m} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad


def test_kernel_and_reference_layers_import_no_dispatcher():
    """Launchers and the oracle stand below the ops: they import neither ``fastrlhf.backend`` nor
    ``fastrlhf.ops``; the reference imports no backend either."""
    modules = _modules()
    for m, path in modules.items():
        layer = m.split(".")[1] if m.count(".") else ""
        targets = {t for t, _ in _imports(m, path, modules)}
        if layer in ("triton", "cuda", "eager", "reference"):
            assert not {t for t in targets if t == "fastrlhf.backend" or t.startswith("fastrlhf.ops")}, m
        if layer == "reference":
            assert not {t for t in targets if t.split(".")[1:2] in (["triton"], ["cuda"], ["eager"])}, m
