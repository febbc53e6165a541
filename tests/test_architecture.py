"""The package's shape (issues 16, 26): modules a reader can hold in mind, no import cycles (not even
through imports made for annotations only), no private names imported across modules, test files a
reader can hold in mind too. Read from the source with `ast`, nothing imported."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tomesd"
NODES = PACKAGE.parent / "comfyui"  # the ComfyUI node package, shipped beside the library
TESTS = Path(__file__).resolve().parent
MAX_LINES = 450


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def _runtime_nodes(tree):
    """Every node but those under `if TYPE_CHECKING:` (imports for annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(name: str, path: Path, annotations: bool = False):
    """(module imported, names taken from it) for every run-time import inside the package, resolved;
    with `annotations`, the imports under `if TYPE_CHECKING:` too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if annotations else _runtime_nodes(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "tomesd":
                yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tomesd":
                    yield alias.name, []


def test_no_module_is_too_long():
    paths = [(name, path) for name, path in _modules()] + [(str(p), p) for p in sorted(NODES.rglob("*.py"))]
    long = {name: n for name, path in paths if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_private_name_is_imported_across_modules():
    found = [(name, target, n) for name, path in _modules() for target, names in _imports(name, path)
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert not found, found


def test_no_test_file_is_too_long():
    long = {path.name: n for path in sorted(TESTS.glob("*.py")) if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"test files over {MAX_LINES} lines: {long}"


def test_no_import_cycle():
    assert not _cycles(annotations=False)


def test_no_import_cycle_through_annotations():
    """Imports for annotations only (`if TYPE_CHECKING:`) are edges too: a circle of them means the modules
    reach into each other's state."""
    assert not _cycles(annotations=True)


def test_the_cycle_check_sees_annotation_imports(tmp_path, monkeypatch):
    """A planted annotation-only circle between two modules is found."""
    package = tmp_path / "tomesd"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (package / "b.py").write_text("from .a import A\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert not _cycles(annotations=False) and _cycles(annotations=True) == [["tomesd.a", "tomesd.b", "tomesd.a"]]


def _cycles(annotations: bool):
    modules = dict(_modules())
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, names in _imports(name, path, annotations):
            # `from pkg import sub` imports the submodule pkg.sub
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            edges.update(subs or ([target] if target in modules else []))
        graph[name] = edges - {name}

    # a module importing its own package's __init__ (or an ancestor) is the normal Python layout, not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles
