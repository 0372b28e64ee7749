"""The library's layers run one way, and ``import hf_koleo`` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_koleo"

# Each module of hf_koleo/ on its layer (a sub-package's entry covers its modules); a module may import
# from its own layer or a lower one, never a higher one. A new module must be placed here.
LAYERS = {
    "hf_koleo.configuration_koleo_dino": 0,  # model: configuration, model, losses, stock backbone export
    "hf_koleo.modeling_koleo_dino": 0,
    "hf_koleo.losses": 0,
    "hf_koleo.koleo_neighbours": 0,
    "hf_koleo.backbone_export": 0,
    "hf_koleo.prototypes": 1,  # collapse diagnostics
    "hf_koleo": 1,  # the public names: model + diagnostics
    "hf_koleo.data": 2,
    "hf_koleo.training": 3,
    "hf_koleo.evaluation": 3,
    "hf_koleo.hub": 4,  # export, cards, push; the scripts' error helper
    "hf_koleo.model_card": 4,
    "hf_koleo.cli": 4,
    "hf_koleo.console": 4,  # the scripts' console set-up
}
LIGHT_IMPORT_FORBIDS = ("matplotlib", "lightly", "experiments")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The layer of ``module``: its own entry in :data:`LAYERS`, else its nearest package's."""
    name = module
    while name not in LAYERS:
        if "." not in name:
            raise KeyError(f"{module} has no layer in LAYERS")
        name = name.rsplit(".", 1)[0]
    return LAYERS[name]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, relative imports made absolute."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            # ``from . import x`` / ``from .data import sources``: x may be a module of its own
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                relative = Path(*candidate.split("."))
                if (PACKAGE.parent / relative).with_suffix(".py").exists() or (PACKAGE.parent / relative).is_dir():
                    names.add(candidate)
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_layer_table_knows_every_module():
    for path in MODULES:
        layer(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_library_modules_import_only_from_their_layer_or_below(path):
    module = module_name(path)
    imports = imported_modules(path)
    assert not [name for name in imports if name.split(".")[0] == "experiments"], f"{module} imports experiments"
    upward = sorted(name for name in imports if name.split(".")[0] == "hf_koleo" and layer(name) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports from higher layers: {upward}"


def test_the_import_parser_sees_lazy_and_relative_imports():
    # hub.py imports model_card inside a function, relatively; the check must see it.
    assert "hf_koleo.model_card" in imported_modules(PACKAGE / "hub.py")
    assert "hf_koleo.data.sources" in imported_modules(PACKAGE / "evaluation" / "features.py")


def test_import_hf_koleo_pulls_in_no_plotting_peer_or_experiment_module():
    code = (
        "import sys, hf_koleo, hf_koleo.hub, hf_koleo.evaluation, hf_koleo.training.trainer\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({LIGHT_IMPORT_FORBIDS!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
