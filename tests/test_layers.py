"""The package's layer order, written down once, and checked on every import of every module (function-level
imports included): a module imports only from lower layers or from its own unit, and no two modules import
each other, directly or round a loop.

Layers, lowest first (a unit is a top-level module or a subpackage of ``vlpretrain``):

    0  errors, files        one-line user errors; atomic file writes
    1  layout_rules         pipeline schedules and layout rules (no torch), which config checks
    2  config               typed dataclasses, one source of defaults
    3  hardware, models,    device peaks; plain PyTorch modules that know nothing about parallelism;
       data                 the data pipeline (formats, the global step plan, packing, loaders)
    4  parallel             mesh, TP/SP, FSDP2, pipeline stages and schedules, the vision-aware splitter
    5  checkpoint           DCP checkpoints and resume, weight files, integrity, formats (HF LLaMA, DeepSeek-VL)
    6  eval, report         evaluation in any layout; run reports and figures
    7  train, planning      the training loop and what it drives (optimizer, metrics, preemption, profiling);
                            the layout planner (cluster, cost model fitted to published runs, search)
    8  plan, config_reference   the ``plan`` command; the generated configuration reference
    9  cli                  the command line
   10  __main__
Units on one layer do not import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

LAYERS = [
    ["errors", "files"],
    ["layout_rules"],
    ["config"],
    ["hardware", "models", "data"],
    ["parallel"],
    ["checkpoint"],
    ["eval", "report"],
    ["train", "planning"],
    ["plan", "config_reference"],
    ["cli"],
    ["__main__"],
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
PACKAGE = REPO / "vlpretrain"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every vlpretrain module ``name`` imports, anywhere in the file (``from pkg import mod`` resolves to mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                node_module = ".".join(base + ([node.module] if node.module else []))
            else:
                node_module = node.module or ""
            targets = [f"{node_module}.{a.name}" if f"{node_module}.{a.name}" in modules else node_module
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # ``import vlpretrain.data.loader as x`` and attributes of a module
                t = t.rpartition(".")[0]
            if t.startswith("vlpretrain") and t != name:
                found.add(t)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vlpretrain"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_unit_has_a_layer(graph):
    units = {_unit(m) for m in graph} - {"vlpretrain"}
    assert units <= set(RANK), f"add these to LAYERS (and the docstring): {sorted(units - set(RANK))}"


def test_imports_run_down_the_layers(graph):
    upward = []
    for module, targets in graph.items():
        src = _unit(module)
        for target in targets:
            dst = _unit(target)
            if src == dst or dst == "vlpretrain" or src == "vlpretrain":
                continue
            if RANK[dst] >= RANK[src]:
                upward.append(f"{module} -> {target} ({src}: layer {RANK[src]}, {dst}: layer {RANK[dst]})")
    assert not upward, "imports that do not run down the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function and a relative one are found (else it could not fail)."""
    pkg = tmp_path / "vlpretrain"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "x.py").write_text("def f():\n    from vlpretrain.train.trainer import train\n"
                                        "from . import y\n")
    (pkg / "data" / "y.py").write_text("")
    modules = {"vlpretrain.data.x": pkg / "data" / "x.py", "vlpretrain.data.y": pkg / "data" / "y.py",
               "vlpretrain.train.trainer": pkg / "t.py"}
    assert _imports("vlpretrain.data.x", pkg / "data" / "x.py", modules) == {"vlpretrain.train.trainer",
                                                                            "vlpretrain.data.y"}
