"""The house's rules, held: no import circle among vitlab's modules (function-local imports counted, so
nothing reaches up), no function in lib/ over 60 lines, and the command line's modules free of torch."""
import ast
from pathlib import Path

LIB = Path(__file__).parents[1] / "lib" / "vitlab"
MODULES = {p.stem: ast.parse(p.read_text()) for p in LIB.glob("*.py")}
TORCH_FREE = {"errors", "settings", "config", "fmt", "machine", "runs", "runner", "__main__"}


def _imports(tree: ast.Module) -> set[str]:
    """vitlab modules a module imports, anywhere in it (`from . import x`, `from .x import y`)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out & set(MODULES)


def _top_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_one_that_imports_it_back():
    graph = {m: _imports(t) for m, t in MODULES.items()}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import circle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_no_function_in_lib_is_over_60_lines():
    long = [f"{m}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for m, t in MODULES.items() for n in ast.walk(t)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_the_front_doors_modules_import_no_torch_at_their_top():
    heavy = {m: _top_level_imports(MODULES[m]) & {"torch", "transformers", "torchvision", "pandas", "numpy"}
             for m in TORCH_FREE}
    assert not any(heavy.values()), heavy  # what they import inside functions is timed by test_settings' CLI test
