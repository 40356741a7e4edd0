"""Imports go one way: the library core <- lightning_modules <- hf_dashkv.apps, and export/push need no Lightning."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    (core / "hash.py").write_text("from ..apps import cli\nfrom ..apps.demo import passkey_prompt\n")
    (tmp_path / "lightning_modules").mkdir()
    (tmp_path / "lightning_modules" / "data.py").write_text("import hf_dashkv.apps.probe\nimport hf_dashkv.hub\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("hf_dashkv") == [
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps",
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps.cli",
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps.demo",
        "hf_dashkv/selectors/hash.py imports hf_dashkv.apps.demo.passkey_prompt",
    ]
    assert violations("lightning_modules") == ["lightning_modules/data.py imports hf_dashkv.apps.probe"]


def test_export_and_push_run_without_lightning(tmp_path):
    # `dashkv export` / `dashkv push` read a checkpoint and upload a folder: Lightning must not be needed for that
    from dataclasses import asdict

    from hf_dashkv import DecodePolicy, EncoderConfig, HashEncoders
    from tests.tiny import CONFIGS

    encoders = HashEncoders.random(CONFIGS["llama-gqa"](), EncoderConfig(bits=16, query_hidden=0))
    torch.save({"dashkv": {"layout": asdict(encoders.layout), "encoder_config": encoders.config.to_dict(),
                           "policy": DecodePolicy().to_dict()},
                "state_dict": {f"encoders.{name}": value for name, value in encoders.state_dict().items()},
                "hyper_parameters": {"model": "tiny"}}, tmp_path / "last.ckpt")
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
            "from hf_dashkv.apps.cli import main\n"
            f"main(['export', {str(tmp_path / 'last.ckpt')!r}, {str(tmp_path / 'out')!r}])\n"
            "import hf_dashkv.hub  # what `dashkv push` runs\n"
            "loaded = [name for name, module in sys.modules.items() if module is not None\n"
            "          and name.split('.')[0] in ('lightning', 'lightning_modules')]\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    exported = HashEncoders.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(exported[name], value) for name, value in encoders.state_dict().items())
