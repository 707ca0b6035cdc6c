"""The code's shape, checked: kernels/ and cuda_streams/ stand alone, and no function or class
grows past what a reader takes in at once (the team's rule: ~60 lines, ~150 lines)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("offload_runtime", "kernels", "cuda_streams", "bench")
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 150


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def package_of(path: Path) -> tuple[str, ...]:
    """The installed package of a source file: kernels/ and cuda_streams/ install inside offload_runtime."""
    parts = path.relative_to(ROOT).with_suffix("").parts[:-1]
    return ("offload_runtime",) + parts if parts[:1] in (("kernels",), ("cuda_streams",)) else parts


def imported_modules(source: str, package: tuple[str, ...]) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against `package`)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            names.add(".".join(base + ((node.module,) if node.module else ())))
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


@pytest.mark.parametrize("folder", ["kernels", "cuda_streams"])
def test_standalone_folders_import_nothing_of_offload_runtime(folder):
    """kernels/ and cuda_streams/ install inside offload_runtime but must not depend on it (the layout's rule)."""
    files = _files(folder)
    assert files
    for path in files:
        bad = foreign_imports(path.read_text(), package_of(path), folder)
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_import_check_catches_a_violation():
    """Sabotage: a relative import reaching out of kernels/, and an absolute one, are both caught."""
    package = package_of(ROOT / "kernels" / "probe.py")
    assert foreign_imports("from ..caches import FullCache\nfrom .sdpa import x\n", package, "kernels") == \
        {"offload_runtime.caches"}
    assert foreign_imports("import offload_runtime.model\nimport torch\n", package, "kernels") == \
        {"offload_runtime.model"}


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
