"""The layout shows the architecture: imports between the repository's own modules form no
cycle, and the top-level folders depend on each other in one direction only.

    idselect  <-  server  <-  devtools  <-  benchmarks  <-  testbed  <-  tests

`idselect` (the algorithm and the vLLM plugin) and `server` (the HTTP server) are what a
deployment installs; `devtools` (launchers, tiny model builders, vLLM release layers, the media
test server, the schema fuzzer) serves everything above it; `benchmarks` measures; `testbed`
(the trained shapes VLM) uses the accuracy benchmark's helpers; `tests` may import anything.
Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("idselect", "server", "devtools", "benchmarks", "testbed", "tests")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the repository modules it imports (a `from pkg import sub` of a submodule
    counts as importing the submodule)."""
    files = {_module(p): p for top in ORDER for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                         for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in files:  # `a.b.c` where only `a.b` is ours
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "idselect.selection_batch" in graph["idselect.selection"]
    assert "idselect.vllm_plugin.compat" in graph["idselect.vllm_plugin.processing"]
    assert "testbed.spec" in graph["testbed.tower"]  # inside `if TYPE_CHECKING:` too
    assert "devtools.launch" in graph["benchmarks.serve"]  # inside a function


def test_no_module_imports_itself_through_others():
    assert _cycle(import_graph()) is None


def test_top_level_folders_depend_one_way():
    wrong = sorted(
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if ORDER.index(target.split(".")[0]) > ORDER.index(source.split(".")[0])
    )
    assert not wrong


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_python_folder_is_in_the_order_and_the_readme_layout_table():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    with_code = {Path(p).parts[0] for p in tracked if len(Path(p).parts) > 1}
    assert with_code == set(ORDER)
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `([\w.-]+)/` \|", readme, re.M))
    assert set(ORDER) <= rows, set(ORDER) - rows
    assert all((ROOT / row).is_dir() for row in rows), rows
