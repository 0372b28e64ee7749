"""Real Fashion-MNIST from Debian's dataset-fashion-mnist (installed by .ci/run)."""

import json
import os

import numpy as np
import pytest

from hf_koleo.data.fashion_mnist import RAW_DIR, load_split, split_indices
from hf_koleo.data.images import decode_image
from hf_koleo.data.sources import count_records, load_source

if not RAW_DIR.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{RAW_DIR} is missing: .ci/run must apt-get install dataset-fashion-mnist", pytrace=False)
    pytest.skip("dataset-fashion-mnist is not installed", allow_module_level=True)


def test_builtin_test_split_is_prepared_from_the_debian_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path))
    assert count_records("fashion_mnist:test") == 10000
    metadata = json.loads((tmp_path / "fashion_mnist" / "test" / "metadata.json").read_text())
    assert metadata["class_counts"] == [1000] * 10
    record = next(iter(load_source("fashion_mnist:test")))
    assert decode_image(record["image"]).size == (28, 28) and 0 <= record["label"] < 10


def test_validation_split_holds_out_1000_training_images_per_class():
    _, labels = load_split("train")
    held_out, rest = split_indices("val", labels), split_indices("fit", labels)
    assert len(held_out) == 10000 and len(rest) == 50000
    assert np.bincount(labels[held_out]).tolist() == [1000] * 10
    assert np.intersect1d(held_out, rest).size == 0
