"""The import layers of the package, checked over the source (the table below is the contract).

Every module under ``src/tracetune`` is parsed with :mod:`ast`; every import (at module level,
inside functions, under ``if TYPE_CHECKING:``) is an edge from the importing module to the
imported one. The check fails, naming the file, line and import, when

- a module imports a module of a higher layer,
- two units of the table import each other (a package cycle, even within one layer), or
- a module imports another module's private name or another package's private module
  (``_x``).

A shared helper that two layers need goes down to the lower one; an import hidden inside a
function still counts, so it cannot dodge the check.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

LOW, CORE, STAGES, PIPELINES, APPS, API = range(6)
LAYER_NAMES = {
    LOW: "low-level",
    CORE: "agent/judge",
    STAGES: "stages",
    PIPELINES: "pipelines",
    APPS: "apps",
    API: "the Python API",
}

# Unit -> layer, low to high. A module belongs to the longest entry that prefixes its name.
LAYERS: dict[str, int] = {
    # low-level: records, storage, models, tools and their sandbox, the stage runner, prompts
    "tracetune.errors": LOW,
    "tracetune.inputs": LOW,
    "tracetune.safefs": LOW,
    "tracetune.timelimit": LOW,
    "tracetune.cliflag": LOW,
    "tracetune.stageoptions": LOW,
    "tracetune.schema": LOW,
    "tracetune.store": LOW,
    "tracetune.models": LOW,
    "tracetune.tools": LOW,
    "tracetune.sandbox": LOW,
    "tracetune.runner": LOW,
    "tracetune.prompts": LOW,
    "tracetune.data": LOW,
    # the agent loop and the judges
    "tracetune.agent": CORE,
    "tracetune.judge": CORE,
    # stages: each reads datasets and writes datasets
    "tracetune.synth": STAGES,
    "tracetune.engine": STAGES,
    "tracetune.rollout": STAGES,
    "tracetune.prefs": STAGES,
    "tracetune.formats": STAGES,
    "tracetune.train": STAGES,
    "tracetune.evaluate": STAGES,
    # pipelines: chain stages (the MATRIX loop), and test support that drives them
    "tracetune.prefs.matrix": PIPELINES,
    "tracetune.testing": PIPELINES,
    # apps: the command line, the viewer, the server; `python -m` entry points
    "tracetune.cli": APPS,
    "tracetune.view": APPS,
    "tracetune.serve": APPS,
    "tracetune.train.__main__": APPS,
    # the lazy Python API in tracetune/__init__.py
    "tracetune": API,
}

# Names any layer may import from the root module: it defines them before anything else and
# imports nothing eagerly, so reading them cannot start a cycle.
ROOT_NAMES = {"__version__"}


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    source: str  # importing module, e.g. tracetune.agent.loop
    target: str  # imported module, e.g. tracetune.models.base
    names: tuple[str, ...]  # names imported from it (empty for `import x`)

    def where(self, root: Path) -> str:
        names = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.file.relative_to(root)}:{self.line}: imports {self.target}{names}"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _exists(module: str, src: Path) -> bool:
    base = src.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, src: Path, top: str) -> list[Import]:
    """Every import of a ``top`` module in the file, wherever it sits in the file."""
    source = module_name(path, src)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == top or alias.name.startswith(top + "."):
                    found.append(Import(path, node.lineno, source, alias.name, ()))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not (module == top or module.startswith(top + ".")):
                continue
            plain = []
            for alias in node.names:
                # `from pkg import submodule` imports the submodule itself
                if _exists(f"{module}.{alias.name}", src):
                    found.append(Import(path, node.lineno, source, f"{module}.{alias.name}", ()))
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                found.append(Import(path, node.lineno, source, module, tuple(plain)))
    return found


def unit_of(module: str, layers: dict[str, int]) -> str:
    best = ""
    for unit in layers:
        if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best):
            best = unit
    return best


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def check_layers(src: Path, layers: dict[str, int], top: str = "tracetune") -> list[str]:
    """Problems with the imports of the package ``top`` under ``src``, one line each."""
    problems: list[str] = []
    edges: dict[tuple[str, str], list[Import]] = {}
    for path in sorted((src / top).rglob("*.py")):
        module = module_name(path, src)
        unit = unit_of(module, layers)
        if not unit or (unit == top and module != top):  # the root's row is its own module
            problems.append(f"{path.relative_to(src)}: module {module} has no layer in the table")
            continue
        for imp in imports_of(path, src, top):
            if imp.target == top and set(imp.names) <= ROOT_NAMES:
                continue
            target_unit = unit_of(imp.target, layers)
            if not target_unit:
                problems.append(f"{imp.where(src)}, which has no layer in the table")
                continue
            # A `_module` is private to its package; a `_name` is private to its module.
            hidden = [n for n in imp.names if _private(n)]
            if _package(imp.target) != _package(module):
                hidden = [p for p in imp.target.split(".") if _private(p)] + hidden
            if hidden:
                problems.append(
                    f"{imp.where(src)}: private to another module or package "
                    f"({', '.join(hidden)}); make it public or move it"
                )
            if layers[target_unit] > layers[unit]:
                problems.append(
                    f"{imp.where(src)}: {unit} ({LAYER_NAMES.get(layers[unit])}) imports "
                    f"{target_unit} ({LAYER_NAMES.get(layers[target_unit])}), a higher layer"
                )
            if target_unit != unit:
                edges.setdefault((unit, target_unit), []).append(imp)
    problems.extend(_cycles(edges, src))
    return problems


def _cycles(edges: dict[tuple[str, str], list[Import]], src: Path) -> list[str]:
    """One line per unit cycle (strongly connected units), with the imports that close it."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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
    problems = []
    for component in components:
        cycle = _shortest_cycle(component, graph)
        hops = [edges[(x, y)][0].where(src) for x, y in zip(cycle, cycle[1:], strict=False)]
        problems.append(f"cycle {' -> '.join(cycle)}: " + "; ".join(hops))
    return problems


def _shortest_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest closed path through the units of a strongly connected component."""
    best: list[str] = []
    for start in component:
        paths = {start: [start]}
        frontier = [start]
        found: list[str] = []
        while frontier and not found:
            nxt_frontier = []
            for node in frontier:
                for nxt in sorted(graph[node] & set(component)):
                    if nxt == start:
                        found = [*paths[node], start]
                        break
                    if nxt not in paths:
                        paths[nxt] = [*paths[node], nxt]
                        nxt_frontier.append(nxt)
                if found:
                    break
            frontier = nxt_frontier
        if found and (not best or len(found) < len(best)):
            best = found
    return best


# -- the package itself ----------------------------------------------------------------------
def test_every_import_follows_the_layer_table() -> None:
    problems = check_layers(SRC, LAYERS)
    assert not problems, "import layer violations:\n" + "\n".join(problems)


def test_every_top_level_package_and_module_has_a_layer() -> None:
    root = SRC / "tracetune"
    names = {p.stem for p in root.iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    names |= {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert {f"tracetune.{n}" for n in names} <= set(LAYERS)


def test_the_architecture_page_names_every_package_and_only_real_paths() -> None:
    page = (SRC.parent / "docs" / "architecture.md").read_text()
    quoted = set(re.findall(r"`([^`\s]+)`", page))
    for unit in LAYERS:
        name = unit.removeprefix("tracetune.").replace(".", "/")
        if unit != "tracetune" and not unit.endswith("__main__"):
            assert {name, f"{name}/", f"{name}.py"} & quoted, f"docs/architecture.md: {name}"
    paths = [q for q in quoted if q.endswith((".py", "/")) and not q.startswith("tests/")]
    bases = (SRC / "tracetune", SRC, SRC.parent)  # the package, src/, the repository
    missing = [q for q in paths if not any((base / q).exists() for base in bases)]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


# -- the checker catches what it should (on a small planted tree) -----------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for directory in [tmp_path / "pkg", *(tmp_path / "pkg").rglob("*")]:
        if directory.is_dir() and not (directory / "__init__.py").exists():
            (directory / "__init__.py").write_text("")
    return tmp_path


PLANTED = {"pkg.low": 0, "pkg.low2": 0, "pkg.mid": 1, "pkg.high": 2, "pkg": 3}


def test_a_clean_planted_tree_passes(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "low/a.py": "X = 1\n",
            "low/_b.py": "from pkg.low.a import X\n",  # private within its own package: fine
            "mid/m.py": "from pkg.low import a\n",
            "high/h.py": "import pkg.mid.m\nfrom pkg import __version__\n",
        },
    )
    assert check_layers(src, PLANTED, top="pkg") == []


def test_an_upward_import_inside_a_function_is_caught(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "low/a.py": "def f():\n    from pkg.high.h import g\n    return g\n",
            "high/h.py": "def g():\n    return 1\n",
        },
    )
    problems = check_layers(src, PLANTED, top="pkg")
    assert len(problems) == 1
    assert "pkg/low/a.py:2: imports pkg.high.h" in problems[0]
    assert "a higher layer" in problems[0]


def test_an_upward_import_under_type_checking_and_relative_is_caught(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "low/a.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from pkg.mid import m
            """,
            "low/c.py": "from ..mid.m import Y\n",
            "mid/m.py": "Y = 2\n",
        },
    )
    problems = check_layers(src, PLANTED, top="pkg")
    assert any(p.startswith("pkg/low/a.py:4: imports pkg.mid.m") for p in problems), problems
    assert any(p.startswith("pkg/low/c.py:1: imports pkg.mid.m (Y)") for p in problems), problems


def test_a_cycle_within_one_layer_is_caught(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "low/a.py": "from pkg.low2.b import B\nA = 1\n",
            "low2/b.py": "B = 1\ndef f():\n    from pkg.low.a import A\n    return A\n",
        },
    )
    problems = check_layers(src, PLANTED, top="pkg")
    assert len(problems) == 1
    assert problems[0].startswith("cycle pkg.low -> pkg.low2 -> pkg.low: ")
    assert "pkg/low/a.py:1" in problems[0] and "pkg/low2/b.py:3" in problems[0]


def test_a_longer_cycle_is_named_hop_by_hop(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "a/x.py": "from pkg.b.y import Y\nX = 1\n",
            "b/y.py": "from pkg.c.z import Z\nY = 1\n",
            "c/z.py": "import pkg.a.x\nZ = 1\n",
        },
    )
    problems = check_layers(src, {"pkg.a": 0, "pkg.b": 0, "pkg.c": 0, "pkg": 1}, top="pkg")
    assert problems == [
        "cycle pkg.a -> pkg.b -> pkg.c -> pkg.a: pkg/a/x.py:1: imports pkg.b.y (Y); "
        "pkg/b/y.py:1: imports pkg.c.z (Z); pkg/c/z.py:1: imports pkg.a.x"
    ]


def test_private_names_and_modules_of_another_package_are_caught(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "low/a.py": "def _helper():\n    return 1\n",
            "low/_fs.py": "Z = 1\n",
            "mid/m.py": "from pkg.low.a import _helper\nfrom pkg.low import _fs\n",
        },
    )
    problems = check_layers(src, PLANTED, top="pkg")
    assert len(problems) == 2
    assert "pkg/mid/m.py:1: imports pkg.low.a (_helper): private" in problems[0]
    assert "pkg/mid/m.py:2: imports pkg.low._fs: private" in problems[1]


def test_a_private_name_of_a_sibling_module_is_caught(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "low/a.py": "def _helper():\n    return 1\n",
            "low/_impl.py": "Z = 1\n",
            "low/b.py": "from pkg.low._impl import Z\nfrom pkg.low.a import _helper\n",
        },
    )
    problems = check_layers(src, PLANTED, top="pkg")
    assert len(problems) == 1  # the package's own private module is fine
    assert "pkg/low/b.py:2: imports pkg.low.a (_helper): private" in problems[0]


def test_a_module_missing_from_the_table_is_reported(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"other/x.py": "X = 1\n", "loose.py": "Y = 1\n"})
    for table in ({"pkg.low": 0}, PLANTED):  # the root's own row does not cover them
        problems = check_layers(src, table, top="pkg")
        assert any("module pkg.other.x has no layer" in p for p in problems), problems
        assert any("module pkg.loose has no layer" in p for p in problems), problems


def test_only_the_version_is_readable_from_the_root_by_every_layer(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"low/a.py": "from pkg import __version__\n"})
    assert check_layers(src, PLANTED, top="pkg") == []
    src = _tree(tmp_path, {"low/a.py": "from pkg import __version__, Agent\n"})
    problems = check_layers(src, PLANTED, top="pkg")
    assert len(problems) == 1 and "imports pkg (__version__, Agent)" in problems[0]
