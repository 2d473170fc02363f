"""Imports go one way: each gptlab module imports only from its own layer or the layers below,
and no chain of imports comes back to where it started (docs/architecture.md lists the layers).

Every `import gptlab...` / `from gptlab... import ...` counts, at module level or inside a function:
a late import hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Top to bottom. A module's layer is that of its longest listed prefix (a package stands for its
# modules unless one is listed on its own).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "cli",
        (
            "gptlab",  # the package's __init__: the public API, re-exporting from every layer
            "gptlab.__main__",
            "gptlab.cli",
            "gptlab.cli_common",
            "gptlab.seq2seq.cli",
            "gptlab.serve",  # the package's __init__ re-exports `gptlab serve`'s command
            "gptlab.serve.cli_commands",
            "gptlab.interop.cli_commands",
            "gptlab.multiple_choice_cli",
            "gptlab.chat_cli",
            "gptlab.plot",
        ),
    ),
    (
        "serve, interop",
        (
            "gptlab.serve.app",
            "gptlab.serve.chat_api",
            "gptlab.serve.chat_schemas",
            "gptlab.serve.guard",
            "gptlab.serve.prompts",
            "gptlab.serve.runner",
            "gptlab.serve.schemas",
            "gptlab.interop",
        ),
    ),  # fmt: skip
    ("training", ("gptlab.training", "gptlab.presets")),
    ("generation", ("gptlab.generation", "gptlab.sampling", "gptlab.text_stream", "gptlab.seq2seq")),
    ("data, models, tokenizers", ("gptlab.data", "gptlab.models", "gptlab.tokenizers")),
    (
        "config, files, device",
        ("gptlab.config", "gptlab.files", "gptlab.device", "gptlab.errors", "gptlab.host_memory"),
    ),  # fmt: skip
]


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


def test_every_module_has_a_layer(graph):
    assert [module for module in sorted(graph) if layer_of(module, LAYERS) is None] == []


def test_no_module_imports_from_a_higher_layer(graph):
    assert upward_imports(graph, LAYERS) == []


def test_no_import_cycles(graph):
    assert cycles(graph) == []
