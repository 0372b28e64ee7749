"""The study's --quick mode end to end (real Fashion-MNIST test split for the long-tailed slice)."""

import json
import os
from pathlib import Path

import pytest

from experiments.study import VARIANTS, load_study_config, run_study
from hf_koleo.data.fashion_mnist import RAW_DIR

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "study_koleo_proto.yaml"


@pytest.mark.skipif(not RAW_DIR.exists() and not os.environ.get("CI"), reason="dataset-fashion-mnist not installed")
def test_quick_study_runs_the_whole_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    config = load_study_config(CONFIG, quick=True)
    assert config["run"]["max_steps"] == 4 and config["evaluation"]["limit_train"] == 400
    results = run_study(config, tmp_path / "study")
    assert results["chosen_weight"] in config["sweep"]["weights"]
    for dataset in config["datasets"]:
        runs = results["runs"][dataset]
        assert set(runs) == set(VARIANTS)
        assert runs["baseline"][0]["weight"] == 0.0 and runs["koleo_proto"][0]["weight"] > 0
        for key in ("teacher_unique", "used", "marginal_entropy", "knn_top1", "linear_balanced", "shot5"):
            assert key in runs["baseline"][0]
        assert (tmp_path / "study" / f"unique_prototypes_{dataset}.png").stat().st_size > 0
    assert "| kNN balanced accuracy |" in (tmp_path / "study" / "results.md").read_text()
    assert json.loads((tmp_path / "study" / "results.json").read_text())["pixels"]
