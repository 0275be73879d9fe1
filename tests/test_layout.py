"""The package's layout: no import cycles between its modules (each module's imports, including
those inside functions, form a graph without cycles), and the rooms depend on each other in one
direction only."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minicnn"


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """{module: {minicnn modules it imports}}, every import statement anywhere in the file."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        # a module inside package P imports P's __init__ first anyway: not an edge of its own
        graph[name] = {m for m in found if m in modules and m != name
                       and not name.startswith(m + ".")}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_module_imports_itself_through_others():
    graph = _imports()
    assert "minicnn.nn.layers" in graph and "minicnn.reference.conv" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_maths_imports_nothing_above_it():
    """reference/ needs only the backend; ops/ the backend and the worker threads."""
    graph = _imports()
    for module, imported in graph.items():
        if module.startswith("minicnn.reference"):
            assert all(m == "minicnn" or m.startswith(("minicnn.reference", "minicnn.backend")) for m in imported), module
        if module.startswith("minicnn.ops"):
            assert all(m in ("minicnn", "minicnn.parallel") or m.startswith(("minicnn.ops", "minicnn.backend", "minicnn.parallel.workers"))
                       for m in imported), (module, imported)
