"""Imports go one way: each gptlab module imports only from its own layer or the layers below,
and no chain of imports comes back to where it started (docs/architecture.md lists the layers).

Every `import gptlab...` / `from gptlab... import ...` counts, at module level or inside a function:
a late import hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

DOCS = SRC.parent / "docs" / "architecture.md"
MAX_LINES = 450  # a module longer than this does more than one job: split it by responsibility


def read_layers(markdown: str) -> list[tuple[str, tuple[str, ...]]]:
    """The layers of the numbered list under "## The layers", top to bottom: `N. **name**: ...`,
    each with the `gptlab...` names in backticks of its item (which may span several lines).
    A module's layer is that of its longest listed prefix (a package stands for its modules)."""
    section = markdown.split("## The layers", 1)[1].split("\n## ", 1)[0]
    layers: list[tuple[str, list[str]]] = []
    for line in section.splitlines():
        item = re.match(r"\d+\. \*\*(.+?)\*\*:", line)
        if item:
            layers.append((item.group(1), []))
        elif not (layers and line.startswith("   ")):  # an item's continuation lines are indented
            if layers and line.strip():
                break
            continue
        layers[-1][1].extend(re.findall(r"`(gptlab(?:\.\w+)*)`", line))
    return [(name, tuple(modules)) for name, modules in layers]


LAYERS = read_layers(DOCS.read_text(encoding="utf-8"))


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The modules of `modules` that `tree` imports. `from a import b` imports a.b when that is a
    module, else a (b is then a name defined in a)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return found


def import_graph(src: Path, package: str = "gptlab") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (itself left out)."""
    paths = {module_name(path, src): path for path in sorted((src / package).rglob("*.py"))}
    modules = set(paths)
    return {
        name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
        for name, path in paths.items()
    }


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]]) -> int | None:
    """The index of the module's layer (0 = top), or None when no layer lists it."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    return sorted(
        f"{module} ({layers[layer_of(module, layers)][0]}) imports {target} ({layers[layer_of(target, layers)][0]})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target, layers) < layer_of(module, layers)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


# ---- the checker on made-up graphs ----------------------------------------------------------------
TOY_LAYERS = [("top", ("pkg.cli",)), ("middle", ("pkg.train",)), ("bottom", ("pkg.base",))]


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_checker_finds_an_upward_import_inside_a_function(tmp_path):
    src = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "cli.py": "from pkg.train import fit\n",
            "train/__init__.py": "from pkg.train.loop import fit\n",
            "train/loop.py": "import os\nfrom pkg import base\n\ndef fit():\n    from pkg.cli import main\n",
            "base.py": "import pkg.base\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert graph["pkg.train.loop"] == {"pkg.base", "pkg.cli"}
    assert graph["pkg.base"] == set()  # importing oneself is no edge
    assert upward_imports(graph, TOY_LAYERS) == ["pkg.train.loop (middle) imports pkg.cli (top)"]
    assert cycles(graph) == [["pkg.cli", "pkg.train", "pkg.train.loop"]]


def test_checker_passes_a_graph_that_only_goes_down(tmp_path):
    src = write_package(
        tmp_path,
        {
            "cli.py": "from pkg.train import fit\nimport pkg.base\n",
            "train.py": "from pkg.base import x\n",
            "base.py": "",
        },
    )
    graph = import_graph(src, "pkg")
    assert upward_imports(graph, TOY_LAYERS) == []
    assert cycles(graph) == []


def test_checker_finds_a_cycle_within_one_layer():
    graph = {"pkg.cli": {"pkg.cli.a"}, "pkg.cli.a": {"pkg.cli.b"}, "pkg.cli.b": {"pkg.cli"}, "pkg.base": set()}
    assert upward_imports(graph, TOY_LAYERS) == []
    assert cycles(graph) == [["pkg.cli", "pkg.cli.a", "pkg.cli.b"]]


# ---- gptlab itself ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC)


def test_the_layers_are_read_from_the_docs():
    names = [name for name, _ in LAYERS]
    assert names == [
        "cli", "serve, interop", "training", "generation", "data, models, tokenizers", "config, files, device",
    ]  # fmt: skip
    assert all(modules for _, modules in LAYERS)
    assert ("gptlab.cli" in LAYERS[0][1]) and ("gptlab.generation",) == LAYERS[3][1]


def test_reading_layers_from_markdown():
    text = """# x

## The layers

Intro.

1. **top**: `pkg.cli` (wiring; not `other`), `pkg.main`,
   `pkg.more`.
2. **bottom**: `pkg.base`.

When a module needs ... `pkg.not_a_layer`.

## Next
"""
    assert read_layers(text.replace("pkg.", "gptlab.")) == [
        ("top", ("gptlab.cli", "gptlab.main", "gptlab.more")),
        ("bottom", ("gptlab.base",)),
    ]


def test_every_module_has_a_layer(graph):
    assert [module for module in sorted(graph) if layer_of(module, LAYERS) is None] == []


def test_no_module_imports_from_a_higher_layer(graph):
    assert upward_imports(graph, LAYERS) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_the_ignore_index_is_defined_once():
    """-100 (the label the loss skips) is written once, as models/fused_loss.py's IGNORE_INDEX."""
    literals = sorted(
        f"{path.relative_to(SRC)}:{node.lineno}"
        for path in (SRC / "gptlab").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and node.operand.value == 100
    )
    assert len(literals) == 1 and literals[0].startswith("gptlab/models/fused_loss.py:")


def test_no_subcommand_imports_the_command_line_package(graph):
    """cli/__init__.py wires the subcommands together; a subcommand importing it back would close a circle."""
    importers = sorted(module for module, targets in graph.items() if "gptlab.cli" in targets)
    assert importers == ["gptlab.__main__"]


def test_no_module_is_over_the_line_limit():
    lengths = {
        str(path.relative_to(SRC)): len(path.read_text(encoding="utf-8").splitlines())
        for path in (SRC / "gptlab").rglob("*.py")
    }
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
