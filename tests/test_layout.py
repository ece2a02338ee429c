"""The repository's layout: every module's path below the source root `shared/` is its import path."""

from __future__ import annotations

import importlib.util
import pkgutil
from pathlib import Path

import selfreward

REPO = Path(__file__).resolve().parent.parent
SOURCE_ROOT = REPO / "shared"


def installed_modules() -> list[pkgutil.ModuleInfo]:
    return list(pkgutil.walk_packages(selfreward.__path__, prefix="selfreward."))


def test_the_package_is_imported_from_its_folder() -> None:
    assert Path(selfreward.__file__).resolve() == SOURCE_ROOT / "selfreward" / "__init__.py"


def test_every_module_path_is_its_import_path() -> None:
    modules = installed_modules()
    assert len(modules) > 50
    for info in modules:
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None, info.name
        expected = SOURCE_ROOT / Path(*info.name.split("."))
        expected = expected / "__init__.py" if info.ispkg else expected.with_suffix(".py")
        assert Path(spec.origin).resolve() == expected, f"{info.name} is imported from {spec.origin}"


def test_every_python_file_of_the_library_is_a_module() -> None:
    """No folder without __init__.py (a file there would not be importable by its path)."""
    names = {info.name for info in installed_modules()}
    for path in (SOURCE_ROOT / "selfreward").rglob("*.py"):
        rel = path.relative_to(SOURCE_ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        assert name == "selfreward" or name in names, f"{path} is not importable as {name}"


def test_services_hold_no_python_packages() -> None:
    """services/<name>/ are deployables (image target, README, entry point command); their code is
    the library's, so no service imports another and the library never imports a service."""
    assert not list((REPO / "services").rglob("*.py"))
    for path in (SOURCE_ROOT / "selfreward").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import services" not in text and "from services" not in text, path
