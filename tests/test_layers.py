"""DESIGN.md's layering: building blocks and methods never import experiments, report, bench or cli."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "optfm"
LOWER = ["data", "models", "training", "diffusion", "privacy", "pretraining", "unlearning",
         "alignment", "contrastive", "attention"]
UPPER = ("optfm.experiments", "optfm.report", "optfm.bench", "optfm.cli")


@pytest.mark.parametrize("pkg", LOWER)
def test_lower_layers_do_not_import_upper_layers(pkg):
    for path in (SRC / pkg).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith(UPPER), f"{path.relative_to(SRC)} imports {n}"


def test_no_torch_load_without_weights_only():
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True, path
