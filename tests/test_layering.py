"""The package's import layering (docs/design.md, "Code layout"), read from the source with ast:
each unit imports only the units listed for it, no module import cycle exists, and no module of
the library is over 400 lines."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "solopo_mcore"

BASE = {"errors", "log", "processes", "platform", "compat", "roles", "rank_status"}
"""Leaf modules every unit may use: errors, console lines, processes, device/backend and
megatron-core version differences, and the segment roles."""

ALLOWED = {
    "errors": {"processes", "rank_status"},
    "rank_status": set(),
    "log": set(),
    "processes": set(),
    "platform": {"processes"},
    "compat": set(),
    "roles": set(),
    "config": BASE | {"storage.paths"},
    "storage": BASE,
    "parallel": BASE | {"config"},
    "models": BASE | {"config", "parallel"},
    "losses": {"config", "roles"},
    "data": BASE | {"storage", "parallel", "models"},
    "convert": BASE | {"config", "models", "parallel", "storage", "stack", "profiling.memory"},
    "stack": BASE | {"config", "models", "parallel", "convert.hf_io", "convert.tables"},
    "training": BASE | {"config", "storage", "parallel", "models", "losses", "data", "stack",
                        "profiling.flops", "profiling.memory"},
    "ref_logprobs": BASE | {"config", "storage", "parallel", "losses", "data", "stack",
                            "training"},
    "profiling": BASE | {"config", "parallel", "models", "losses", "data", "stack", "training"},
    "evaluation": BASE | {"config", "storage", "parallel", "convert", "training.curves",
                          "data.heldout"},
}
"""What each unit (a subpackage or a top-level module) may import. ``pkg.mod`` allows that one
module of another unit only: ``stack`` loads and exports HF weights through convert's tables,
``training`` reports FLOPs/MFU and memory through profiling's measurement functions (and
``convert`` its peak memory),
``evaluation`` reads training curves and the held-out split, and config validation keeps outputs apart from inputs
with the one check every entry point uses."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict:
    """``{module: {imported solopo_mcore module, ...}}``, function-level imports included."""
    out = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
                targets += [f"{node.module}.{a.name}" for a in node.names]  # from pkg import mod
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            out[name].update(t for t in targets if t.startswith("solopo_mcore."))
    modules = set(out) | {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in out.get(m, ()) if t in modules and t != m} for m in modules}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "solopo_mcore"


def test_each_unit_imports_only_what_its_layer_allows():
    wrong = []
    for module, targets in sorted(_imports().items()):
        unit = _unit(module)
        if unit == "solopo_mcore":
            continue  # the package's own __init__
        assert unit in ALLOWED, f"{module}: unit {unit!r} has no row in ALLOWED"
        for target in sorted(targets):
            target_unit = _unit(target)
            if target_unit in (unit, "solopo_mcore"):
                continue
            inner = ".".join(target.split(".")[1:3])
            if target_unit not in ALLOWED[unit] and inner not in ALLOWED[unit]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layering:\n  " + "\n  ".join(wrong)


def test_no_module_import_cycle():
    graph = _imports()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    # a package __init__ that re-exports its own modules is not a cycle
    cycles = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_library_modules_stay_small():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines (split them along their sections): {long}"
