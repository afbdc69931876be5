"""Imports run one way (STYLE.md): evaluation and analysis never import the training loop or the layers above."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "idaa"

# layer -> the packages it must never import (directly or inside a function)
FORBIDDEN = {
    "evaluate": ("idaa.train", "idaa.experiments", "idaa.cli"),
    "analysis": ("idaa.train", "idaa.experiments", "idaa.cli"),
    "train": ("idaa.experiments", "idaa.cli"),
    "experiments": ("idaa.cli",),
}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, f"no modules under {layer}/"
    above = tuple(f"{name}." for name in FORBIDDEN[layer])  # "idaa.train." matches idaa.train.x, not idaa.trainer
    wrong = [f"{path.name} imports {name}" for path in files for name in sorted(imported_modules(path))
             if f"{name}.".startswith(above)]
    assert not wrong, f"{layer}/ reaches upwards: {wrong}"


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from idaa.train.run_dir import atomic_torch_save\n    import idaa.cli\n")
    assert {"idaa.train.run_dir", "idaa.cli"} <= imported_modules(module)
