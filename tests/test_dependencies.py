"""setup.cfg's dependency floors: each one at least the release that brought the API we rely on.

Offline and fast: it reads setup.cfg, compares versions and inspects what is installed.
"""

import configparser
import importlib
import importlib.metadata
import inspect
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"

# (package, oldest release that works, what needs it). The floors were found by installing each
# release into a fresh venv and running the test suite; the release below each one fails as noted.
MINIMUM_VERSIONS = [
    ("torch", "2.6", "transformers 5.20 treats torch < 2.6 as absent (AutoModel raises ImportError)"),
    ("transformers", "5.20", "transformers.configuration_utils.SubConfigSpec (5.19: ImportError on import)"),
    ("transformers", "5.20", "PreTrainedConfig dataclass fields, transformers.initialization"),
    ("accelerate", "1.1", "transformers 5.20's ACCELERATE_MIN_VERSION; older ones it ignores"),
    ("datasets", "5.1", "split_dataset_by_node(..., strategy=) in data/stream.py (5.0.1: TypeError)"),
    ("huggingface_hub", "1.31", "required by transformers 5.20 and datasets 5.1; huggingface_hub.errors"),
    ("safetensors", "0.8", "required by transformers 5.20"),
    ("pillow", "9.4", "PIL.Image.ExifTags in datasets' image decoding (9.3: AttributeError)"),
    ("pillow", "9.1", "PIL.Image.Resampling in data/augment.py"),
    ("tqdm", "4.66.3", "required by datasets 5.1"),
]

# Releases that must stay installable: the GPU machine's torch.
MUST_ALLOW = [("torch", "2.11.0")]

# The test suite's own needs, in the dev extra.
DEV_MINIMUM_VERSIONS = [
    ("transformers", "5.23", "activation_checkpointing_enable in tests/test_modeling_koleo_dino.py"),
]

# Each API named above, checked in the installed release.
APIS = [
    ("transformers.configuration_utils", "SubConfigSpec"),
    ("transformers", "PreTrainedConfig"),
    ("transformers.initialization", "trunc_normal_"),
    ("huggingface_hub.errors", "StrictDataclassError"),
    ("PIL.Image", "ExifTags"),
    ("PIL.Image", "Resampling"),
    ("torch.accelerator", "is_available"),
]


def _requirements(option: str, section: str = "options") -> dict[str, Requirement]:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    lines = [line.strip() for line in parser[section][option].splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_every_direct_dependency_has_a_floor():
    unfloored = [
        str(requirement) for requirement in _requirements("install_requires").values() if not _floor(requirement)
    ]
    assert unfloored == []


@pytest.mark.parametrize(("package", "minimum", "reason"), MINIMUM_VERSIONS)
def test_floor_is_at_least_the_release_that_brought_what_we_use(package, minimum, reason):
    requirement = _requirements("install_requires")[canonicalize_name(package)]
    floor = _floor(requirement)
    assert floor is not None and floor >= Version(minimum), f"{requirement}: needs >= {minimum} for {reason}"


@pytest.mark.parametrize(("package", "minimum", "reason"), DEV_MINIMUM_VERSIONS)
def test_dev_extra_floor_covers_what_the_tests_use(package, minimum, reason):
    requirement = _requirements("dev", "options.extras_require")[canonicalize_name(package)]
    floor = _floor(requirement)
    assert floor is not None and floor >= Version(minimum), f"{requirement}: needs >= {minimum} for {reason}"


@pytest.mark.parametrize(("package", "version"), MUST_ALLOW)
def test_known_good_releases_stay_allowed(package, version):
    requirement = _requirements("install_requires")[canonicalize_name(package)]
    assert requirement.specifier.contains(version, prereleases=True), f"{requirement} excludes {version}"


def test_installed_versions_satisfy_the_floors():
    unmet = []
    for name, requirement in _requirements("install_requires").items():
        installed = importlib.metadata.version(name)
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{requirement} (installed {installed})")
    assert unmet == []


@pytest.mark.parametrize(("module", "attribute"), APIS)
def test_the_apis_behind_the_floors_exist(module, attribute):
    assert hasattr(importlib.import_module(module), attribute)


def test_split_dataset_by_node_takes_a_strategy():
    from datasets.distributed import split_dataset_by_node

    assert "strategy" in inspect.signature(split_dataset_by_node).parameters
