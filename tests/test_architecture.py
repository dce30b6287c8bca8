"""Layering rules: the tunnel core and the relay run without Qt.

``app/core`` is shared by the headless agent and the relay, and the relay is
deployed on servers with no Qt installed, so neither may import PySide6,
shiboken6 or qasync, not even lazily inside a function. The relay serves HTTP
with h11 and websockets, so it must not pull in aiohttp either.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QT_MODULES = ("PySide6", "shiboken6", "qasync")
RELAY_FORBIDDEN = (*QT_MODULES, "aiohttp")
IMPORT_TIMEOUT_S = 60


def module_names(package: str) -> list[str]:
    """Return the dotted names of every module in ``package``, __main__ excluded."""
    folder = ROOT / package.replace(".", "/")
    names = []
    for path in sorted(folder.glob("*.py")):
        if path.stem == "__main__":
            # Importing it runs the command-line program.
            continue
        names.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    return names


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Return the absolute names of every module that ``path`` imports, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def loaded_after_import(module: str, candidates: tuple[str, ...]) -> list[str]:
    """Import ``module`` in a fresh interpreter and return which ``candidates`` got loaded."""
    script = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([name for name in {list(candidates)!r} if name in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT_S,
    )
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr}"
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


def is_forbidden(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == top or name.startswith(f"{top}.") for top in forbidden)


def test_packages_have_modules():
    assert "app.core.session" in module_names("app.core")
    assert "cloud_stub.relay" in module_names("cloud_stub")


@pytest.mark.parametrize("module", module_names("app.core"))
def test_core_import_loads_no_qt(module):
    assert loaded_after_import(module, QT_MODULES) == []


@pytest.mark.parametrize("module", module_names("cloud_stub"))
def test_relay_import_avoids_qt_aiohttp(module):
    assert loaded_after_import(module, RELAY_FORBIDDEN) == []


@pytest.mark.parametrize("path", source_files("app.core"), ids=lambda p: p.name)
def test_core_source_imports_no_qt(path):
    forbidden = sorted(n for n in imported_modules(path) if is_forbidden(n, QT_MODULES))

    assert forbidden == []


@pytest.mark.parametrize("path", source_files("cloud_stub"), ids=lambda p: p.name)
def test_relay_source_avoids_qt_aiohttp(path):
    forbidden = sorted(n for n in imported_modules(path) if is_forbidden(n, RELAY_FORBIDDEN))

    assert forbidden == []


def test_import_scan_sees_nested_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "def show():\n"
        "    from PySide6.QtWidgets import QApplication\n"
        "    import qasync as loop\n"
        "from . import sibling\n",
        encoding="utf-8",
    )

    assert imported_modules(sample) == {"os", "PySide6.QtWidgets", "qasync"}


def test_subprocess_check_sees_loaded_module():
    # json is always importable, so the check reports it as loaded.
    assert loaded_after_import("json", ("json", "PySide6")) == ["json"]
