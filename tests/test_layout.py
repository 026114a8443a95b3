"""The shape of the package: no import circle (imports inside functions included), the core never imports the
tools wing, and the run script and the trainer library stay readable (train.py ≤ 400 lines; no function of
the trainer, checkpoint or evaluation code over 80 lines)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "atst_jax"
# The command entries at the package's top only hand over to the tools wing.
ENTRIES = {"atst_jax.plan", "atst_jax.sweep", "atst_jax.scaling", "atst_jax.bench"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, at any depth of the file."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from atst_jax import x" imports the module atst_jax.x where there is one.
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        # A package's __init__ is imported with any of its modules; that edge is not a circle of the code.
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_core_never_imports_a_tool():
    graph = _graph()
    tools = {m for m in graph if m.startswith("atst_jax.tools")}
    offenders = {
        m: sorted(graph[m] & tools) for m in graph if m not in tools and m not in ENTRIES and graph[m] & tools
    }
    assert not offenders, offenders


def test_the_trainer_reads_in_one_sitting():
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= 400
    files = [PACKAGE / f for f in ("train.py", "trainer.py", "metrics.py", "checkpoint.py", "config.py")]
    files += sorted((PACKAGE / "eval").glob("*.py"))
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.name} {lines} lines")
    assert not long, long
