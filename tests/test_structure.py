"""The code's shape, checked: offload_runtime/kernels/ and offload_runtime/cuda_streams/ stand
alone, nothing importable from the repository root shadows a dependency, and no module, function or
class grows past what a reader takes in at once (the team's rule: ~300, ~60, ~150 lines)."""
from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("offload_runtime", "bench")
STANDALONE = ("kernels", "cuda_streams")  # rooms inside offload_runtime that import nothing else of it
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 150
MAX_MODULE_LINES = 300  # offload_runtime/ only (bench/ scripts are read one at a time, alone)
MODULE_SIZE_ALLOWED: set[str] = set()  # no exceptions: split a module that grows past the limit


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def package_of(path: Path) -> tuple[str, ...]:
    """The package of a source file, from its folder under the repository root."""
    return path.relative_to(ROOT).with_suffix("").parts[:-1]


def from_base(node: ast.ImportFrom, package: tuple[str, ...]) -> str:
    """The module a `from X import ...` names, relative imports resolved against `package`."""
    base = package[: len(package) - node.level + 1] if node.level else ()
    return ".".join(base + ((node.module,) if node.module else ()))


def imported_modules(source: str, package: tuple[str, ...]) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against `package`)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(from_base(node, package))
    return names


def foreign_imports(source: str, package: tuple[str, ...], folder: str) -> set[str]:
    """Imports of offload_runtime modules outside offload_runtime.<folder>."""
    own = f"offload_runtime.{folder}"
    return {m for m in imported_modules(source, package)
            if m.startswith("offload_runtime") and m != own and not m.startswith(own + ".")}


def oversized(path: Path) -> list[str]:
    """'file:line name (n lines)' for every function over MAX_FUNCTION_LINES and class over MAX_CLASS_LINES."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef)
                 else MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
        if limit is not None and node.end_lineno - node.lineno + 1 > limit:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


@pytest.mark.parametrize("folder", STANDALONE)
def test_standalone_folders_import_nothing_of_offload_runtime(folder):
    """kernels/ and cuda_streams/ live inside offload_runtime but must not depend on it (the layout's rule)."""
    files = _files(f"offload_runtime/{folder}")
    assert files
    for path in files:
        bad = foreign_imports(path.read_text(), package_of(path), folder)
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_import_check_catches_a_violation():
    """Sabotage: a relative import reaching out of kernels/, and an absolute one, are both caught."""
    package = package_of(ROOT / "offload_runtime" / "kernels" / "probe.py")
    assert foreign_imports("from ..caches import FullCache\nfrom .sdpa import x\n", package, "kernels") == \
        {"offload_runtime.caches"}
    assert foreign_imports("import offload_runtime.model\nimport torch\n", package, "kernels") == \
        {"offload_runtime.model"}


def root_importables(root: Path) -> set[str]:
    """Names `import NAME` finds in `root` when it is on sys.path: packages (a folder with an
    __init__.py), namespace folders and modules (NAME.py)."""
    names = {p.stem for p in root.glob("*.py")}
    names |= {p.name for p in root.iterdir() if p.is_dir() and p.name.isidentifier()}
    return names


def shadowed_dependencies(root: Path, installed: dict[str, list[str]]) -> dict[str, list[str]]:
    """{name: distributions} for every top-level module of an installed distribution that an
    importable of `root` would hide (pytest's pythonpath and `python -m` put the root first)."""
    ours = {"offload_runtime"}  # our own distribution, installed in editable mode
    return {name: installed[name] for name in sorted(root_importables(root) & set(installed))
            if name not in ours}


def test_no_folder_shadows_an_installed_distribution():
    """transformers 5.25 imports Hugging Face's `kernels`; our old top-level kernels/ hid it."""
    installed = importlib.metadata.packages_distributions()
    assert "torch" in installed  # the map is real (it is what a shadowing would hide)
    clashes = shadowed_dependencies(ROOT, installed)
    assert not clashes, f"folders or modules at the repository root hide installed distributions: {clashes}"


def test_shadow_check_catches_a_clash(tmp_path):
    """Sabotage: a repository with a kernels/ package and a torch.py beside it is reported."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "torch.py").write_text("")
    (tmp_path / "docs").mkdir()
    installed = {"kernels": ["kernels"], "torch": ["torch"], "yaml": ["PyYAML"]}
    assert shadowed_dependencies(tmp_path, installed) == {"kernels": ["kernels"], "torch": ["torch"]}
    real = importlib.metadata.packages_distributions()  # and with the real map: torch is installed
    assert shadowed_dependencies(tmp_path, real)["torch"] == real["torch"]


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run (those under `if TYPE_CHECKING:` only help the type checker)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at the top or inside functions), from the sources."""
    def name(p: Path) -> str:
        parts = p.relative_to(root).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name(p): p for p in (root / package).rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        here = tuple((mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]).split("."))
        found = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
                continue
            base = from_base(node, here)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        graph[mod] = {m for m in found if m in mods and m != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every strongly connected group of more than one module."""
    order, low, stack, on, found, counter = {}, {}, [], set(), [], iter(range(len(graph)))

    def visit(v: str) -> None:
        order[v] = low[v] = next(counter)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in order:
            visit(v)
    return found


def test_no_import_circle():
    """Two modules that import each other (even lazily) cannot be read or changed one at a time."""
    graph = import_graph(ROOT, "offload_runtime")
    assert len(graph) > 30 and "offload_runtime.session" in graph["offload_runtime.run"] | {
        m for deps in graph.values() for m in deps}
    assert not cycles(graph), f"import circles: {cycles(graph)}"


def test_cycle_check_catches_a_circle(tmp_path):
    """Sabotage: a lazy import closing a circle through a package's __init__ is found; a TYPE_CHECKING one is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import helper\n")
    (pkg / "sub" / "__init__.py").write_text("from .helper import x\n")
    (pkg / "sub" / "helper.py").write_text("def x():\n    from .. import a\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "c.py").write_text("from . import b\n")
    found = cycles(import_graph(tmp_path, "pkg"))
    assert found == [["pkg.a", "pkg.sub.helper"]], found  # (from .sub import helper: the module)


def test_no_oversized_function_or_class():
    found = [hit for path in _files(*SOURCES) for hit in oversized(path)]
    assert not found, "split these:\n" + "\n".join(found)


def test_size_check_catches_a_long_function(tmp_path):
    """Sabotage: a 70-line function and a 160-line class are reported."""
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(55))
    src = tmp_path / "long.py"
    src.write_text(f"def long():\n{body}\n\n\nclass Big:\n{methods}\n")
    hits = oversized_outside_root(src)
    assert any("long (" in h for h in hits) and any("Big (" in h for h in hits)


def oversized_outside_root(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return oversized(path)
    finally:
        ROOT = saved


def oversized_modules(root: Path, package: str, allowed: set[str] = frozenset()) -> list[str]:
    """'path (n lines)' for every module of `package` over MAX_MODULE_LINES, but those in `allowed`."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        name = path.relative_to(root).as_posix()
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES and name not in allowed:
            found.append(f"{name} ({n} lines)")
    return found


def test_no_module_over_300_lines():
    """A module holds one job; past ~300 lines it holds several (split it along them)."""
    assert len(_files("offload_runtime")) > 30  # the walk finds the package
    found = oversized_modules(ROOT, "offload_runtime", MODULE_SIZE_ALLOWED)
    assert not found, "split these modules along their jobs:\n" + "\n".join(found)


def test_module_size_check_catches_a_long_module(tmp_path):
    """Sabotage: a 301-line module (also in a subpackage) is reported, a 300-line one and an allowed one are not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (pkg / "sub" / "deep.py").write_text("y = 2\n" * (MAX_MODULE_LINES + 1))
    (pkg / "fits.py").write_text("z = 3\n" * MAX_MODULE_LINES)
    (pkg / "allowed.py").write_text("w = 4\n" * 500)
    found = oversized_modules(tmp_path, "pkg", {"pkg/allowed.py"})
    assert found == [f"pkg/long.py ({MAX_MODULE_LINES + 1} lines)", f"pkg/sub/deep.py ({MAX_MODULE_LINES + 1} lines)"]
