"""The package's shape: no import cycle inside deepzero_kernels/, and no function over 80 lines
without a reason (a ``Length:`` line in its docstring, or a ``# Length:`` comment above it)."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "deepzero_kernels"
MAX_LINES = 80


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set) -> set:
    """Package modules ``name`` imports anywhere in its body (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if node.module and base in known:  # ``from . import x`` imports x, not the package
                out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    out.discard(name)
    return out


def test_no_import_cycle():
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_import_walk_sees_a_cycle(tmp_path, monkeypatch):
    """The walker itself: two modules importing each other are reported."""
    pkg = tmp_path / "deepzero_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


def _says_why(node, source_lines) -> bool:
    """A ``Length:`` line in the docstring, or a ``# Length:`` comment right above the function
    (for Triton kernels, whose body the compiler reads)."""
    doc = ast.get_docstring(node) or ""
    if any(line.strip().startswith("Length:") for line in doc.splitlines()):
        return True
    i = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 2
    while i >= 0 and source_lines[i].strip().startswith("#"):
        if source_lines[i].strip().startswith("# Length:"):
            return True
        i -= 1
    return False


def test_functions_are_short_or_say_why():
    long = []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and not _says_why(node, text.splitlines()):
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 80 lines without a 'Length:' reason in their docstring:\n" + "\n".join(long)
