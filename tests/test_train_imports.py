"""aios_train's modules depend on each other one way: the graph of their relative imports, function-local ones
included (a cycle hidden inside a function is still a cycle), has no cycle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "aios_train"


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def test_no_import_cycles():
    graph = {p.stem: imports_of(p) for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2 or m not in graph:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        state[m] = 1
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "lora" not in graph["evaluate"] and graph["evaluate"] <= {"schedule"}  # metrics stay a leaf
