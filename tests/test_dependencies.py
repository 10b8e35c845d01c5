"""Dependencies point one way (README, TEAM rules): the CLI layer → train / eval / export; train → distill;
every package → model, data, errors, fileio, figures; the model knows nothing of data, training, eval or export;
export takes a checkpoint and knows nothing of training or eval. Read from every module's imports with
`ast` (imports inside functions included), so a wrong edge fails here, naming the file and line. Private
names (`_x`) are not imported across packages, benchmarks included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"alignkd": ROOT / "alignkd", "alignkd.export": ROOT / "export"}
BASE = {"errors", "fileio", "figures"}
PACKAGES = {p.name for p in SOURCES["alignkd"].iterdir() if (p / "__init__.py").is_file()} | {"export"}
# importer layer -> the layers it may import (besides its own)
ALLOWED = {
    "cli": {"train", "eval", "export", "model", "data", "errors", "fileio", "figures"},
    "train": {"distill", "model", "data", "errors", "fileio", "figures"},
    "distill": {"model", "data", "errors", "fileio", "figures"},
    "eval": {"model", "data", "errors", "fileio", "figures"},
    "export": {"model", "data", "errors", "fileio", "figures"},
    "data": {"model", "errors", "fileio", "figures"},
    "model": {"errors", "fileio", "figures"},
    "fileio": {"errors"},
    "figures": set(),
    "errors": set(),
    "package": set(),
}
EVERYONE = {"package"}  # `from alignkd import __version__`


def _module_name(path: Path) -> str:
    for package, folder in SOURCES.items():
        if path.is_relative_to(folder):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return path.stem  # a benchmark script


def _layer(module: str) -> str:
    """alignkd.<package>... → the package; alignkd.errors / alignkd.fileio → themselves; `alignkd` itself
    (its version) → package; every other top-level module (cli, demo, ...) is the CLI layer, which
    combines the packages."""
    parts = module.split(".")
    if parts == ["alignkd"]:
        return "package"
    return parts[1] if parts[1] in PACKAGES | BASE else "cli"


def _imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import of an alignkd module in `path` (named `module`)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "alignkd"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "alignkd":
                out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def wrong_edges(path: Path, module: str) -> list[str]:
    mine = _layer(module)
    return [f"{path.name}:{line} imports {target} ({mine} → {_layer(target)})"
            for line, target, _ in _imports(path, module) if _layer(target) not in ALLOWED[mine] | EVERYONE | {mine}]


def private_imports(path: Path, module: str) -> list[str]:
    return [f"{path.name}:{line} imports {name} from {target}" for line, target, names in _imports(path, module)
            for name in names if name.startswith("_") and not name.startswith("__")
            and target.split(".")[:2] != module.split(".")[:2]]


PACKAGE_FILES = sorted(p for folder in SOURCES.values() for p in folder.rglob("*.py"))
ALL_FILES = PACKAGE_FILES + sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    assert wrong_edges(path, _module_name(path)) == []


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_from_another_package(path):
    assert private_imports(path, _module_name(path)) == []


def test_the_checker_finds_wrong_edges_and_private_names(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import torch\nfrom ..train.recipe import train\n\ndef g():\n    from alignkd.data import image\n")
    assert wrong_edges(f, "alignkd.model.x") == ["x.py:2 imports alignkd.train.recipe (model → train)",
                                                 "x.py:5 imports alignkd.data (model → data)"]
    assert wrong_edges(f, "alignkd.demo") == []  # the CLI layer may
    f.write_text("from alignkd.eval import runner\nfrom . import base\nfrom .. import __version__\n")
    assert wrong_edges(f, "alignkd.export.x") == ["x.py:1 imports alignkd.eval (export → eval)"]
    f.write_text("from alignkd.train.recipe import _micro_step, micro_step\nfrom .recipe import _cosine\n")
    assert private_imports(f, "train_step") == ["x.py:1 imports _micro_step from alignkd.train.recipe"]
    assert private_imports(f, "alignkd.train.x") == []
