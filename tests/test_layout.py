"""The layout rules of the package, checked over the registry and the source tree so that a method added later
follows them without anyone remembering to."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hf_kd
from hf_kd.distillers.base import _REGISTRY, FAMILIES

PACKAGE = Path(hf_kd.__file__).parent
# Files that hold the plain losses of a family (several registry names each); every other method has its own file.
FAMILY_FILES = {"logit": "logit", "representation": "representation", "relation": "relation"}
BUILT_IN = sorted(name for name, cls in _REGISTRY.items() if cls.__module__.startswith("hf_kd."))


def module_file(cls: type) -> str:
    return cls.__module__.rsplit(".", 1)[-1]


def test_the_registry_has_every_built_in_method():
    assert len(BUILT_IN) >= 25


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_method_is_found_from_its_registry_name(name):
    """``name`` lives in ``distillers/<name>.py``, or in its family's file of plain losses, or beside a registered
    parent class whose file it is (``p2p`` in ``mutual.py``)."""
    cls = _REGISTRY[name]
    where = module_file(cls)
    assert (PACKAGE / "distillers" / f"{where}.py").is_file()
    parents = {base.name for base in cls.__mro__[1:] if base.__dict__.get("name") and base.__module__ == cls.__module__}
    assert where == name or FAMILY_FILES.get(cls.family) == where or where in parents, (
        f"{name!r} is defined in distillers/{where}.py: move it to distillers/{name}.py"
    )


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_method_has_a_family(name):
    assert _REGISTRY[name].family in FAMILIES


def test_family_files_hold_only_their_family():
    for name in BUILT_IN:
        cls = _REGISTRY[name]
        where = module_file(cls)
        if where in FAMILY_FILES.values() and where != name:
            assert FAMILY_FILES[cls.family] == where, f"{name!r} ({cls.family}) sits in {where}.py"


def imports(path: Path) -> list[ast.ImportFrom]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)]


def test_architecture_imports_nothing_from_the_package():
    found = [node.module for node in imports(PACKAGE / "architecture.py")
             if node.level > 0 or (node.module or "").startswith("hf_kd")]
    assert found == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_private_names_of_another(path):
    private = [alias.name for node in imports(path) for alias in node.names
               if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert private == [], f"{path.name} imports {private}: make them public in the module they belong to"


PUBLIC_API = {
    "DistillationArguments", "DistillationCallback", "DistillationTrainer", "Distiller", "FeatureSpec", "ModelView",
    "ProgressiveLayerCallback", "ProgressiveLayers", "Requirements", "Schedule", "build_distiller",
    "cache_teacher_outputs", "distill_chain", "list_distillers", "load_atsc_student", "make_self_teacher",
    "register_distiller", "PromptCompletionCollator", "tokenize_prompts",
}


def test_the_public_api_is_small_and_stable():
    assert set(hf_kd.__all__) == PUBLIC_API
    assert all(hasattr(hf_kd, name) for name in hf_kd.__all__)


def test_the_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    assert hf_kd.__version__ == version("hf-kd")


def test_every_built_in_class_is_importable_from_hf_kd_distillers():
    import hf_kd.distillers as distillers

    exported = {getattr(distillers, name) for name in distillers.__all__}
    assert {_REGISTRY[name] for name in BUILT_IN} <= exported
