"""Imports go one way: the library core <- lightning_modules <- hf_dashkv.apps, and export/push need no Lightning."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the top-level modules it must never import (apps and recipes sit above the library; training too)
FORBIDDEN = {
    "hf_dashkv": ("hf_dashkv.apps", "lightning_modules"),
    "lightning_modules": ("hf_dashkv.apps",),
}


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved against its package (``from . import x`` too)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        if path.is_relative_to(REPO / "hf_dashkv" / "apps"):
            continue
        for name in imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_the_library_and_training_never_import_what_sits_above_them(package):
    assert violations(package) == []


def test_the_layering_check_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    # the check itself must be able to fail: plant one forbidden import of each kind in a copy of the layout
    core = tmp_path / "hf_dashkv" / "selectors"
    core.mkdir(parents=True)
    (tmp_path / "hf_dashkv" / "apps").mkdir()
    (tmp_path / "hf_dashkv" / "apps" / "cli.py").write_text("import lightning_modules\n")  # allowed: apps
    (core / "hash.py").write_text("from ..apps import cli\nfrom ..apps.models import load_model\n")
    (tmp_path / "lightning_modules").mkdir()
    (tmp_path / "lightning_modules" / "data.py").write_text("import hf_dashkv.apps.corpora\nimport hf_dashkv.hub\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("hf_dashkv") == [
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps",
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps.cli",
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps.models",
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps.models.load_model",
    ]
    assert violations("lightning_modules") == ["lightning_modules/data.py imports hf_dashkv.apps.corpora"]


def test_export_and_push_import_without_lightning():
    # `dashkv export` / `dashkv push` read a checkpoint and upload a folder: Lightning must not be needed for that
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
            "import hf_dashkv.hub, hf_dashkv.apps.cli\n"
            "hf_dashkv.apps.cli.build_parser().parse_args(['push', 'folder', 'me/repo'])\n"
            "assert not any(name.split('.')[0] in ('lightning', 'lightning_modules') and sys.modules[name] is not None\n"
            "               for name in sys.modules), 'Lightning got imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
