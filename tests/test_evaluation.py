import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import run_script
from transformers import Dinov2Config, Dinov2Model

import hf_koleo.evaluation.features as features_module
from hf_koleo.backbone_export import build_image_processor
from hf_koleo.evaluation import (
    FeatureSet,
    check_result_path,
    classification_metrics,
    default_device,
    evaluate_backbone,
    extract_features,
    few_shot_protocol,
    knn_protocol,
    linear_protocol,
    weighted_knn_predict,
)
from hf_koleo.evaluation.linear import DEFAULT_SWEEP, train_linear_classifiers

ROOT = Path(__file__).resolve().parents[1]


def clusters(n_per_class=30, n_classes=3, dim=8, spread=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=generator) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return FeatureSet(points, points + 0.01, labels)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def colour_dataset(path: Path, n_per_class=10, seed=0) -> str:
    """Three classes of noisy 12x12 images: bright left half, bright top half, bright diagonal."""
    generator = np.random.default_rng(seed)
    rows, columns = np.mgrid[:12, :12]
    patterns = [columns < 6, rows < 6, np.abs(rows - columns) < 3]
    images, labels = [], []
    for label, pattern in enumerate(patterns):
        for _ in range(n_per_class):
            pixels = np.clip(40 + 170 * pattern + generator.normal(0, 15, (12, 12)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


def test_weighted_knn_matches_a_hand_computed_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    predictions = weighted_knn_predict(train, labels, torch.tensor([[1.0, 0.05]]), k_values=(1, 3), temperature=0.07)
    assert predictions[1].tolist() == [0]
    # k=3: class 0 gets exp(cos(q, t0)/T), class 1 gets exp(cos(q, t1)/T) + exp(cos(q, t2)/T)
    query = torch.nn.functional.normalize(torch.tensor([1.0, 0.05]), dim=0)
    cosines = torch.nn.functional.normalize(train, dim=1) @ query
    votes = [float((cosines[0] / 0.07).exp()), float((cosines[1:] / 0.07).exp().sum())]
    assert predictions[3].tolist() == [int(np.argmax(votes))]


def test_separable_clusters_give_perfect_knn_linear_and_few_shot():
    train, test = clusters(seed=0), clusters(seed=0, n_per_class=10)
    test = FeatureSet(test.cls + 0.01, test.patch_mean, test.labels)
    assert all(row["accuracy"] == 100.0 for row in knn_protocol(train, test, k_values=(10, 20))["by_k"].values())
    linear = linear_protocol(train, test, epochs=30)
    assert linear["test"]["accuracy"] == 100.0 and linear["test"]["balanced_accuracy"] == 100.0
    assert len(linear["sweep"]) == 9 and linear["chosen"]
    few = few_shot_protocol(train, test, shots=(1, 5), n_draws=3, epochs=30)
    assert few["by_shots"]["5"]["accuracy_mean"] == 100.0 and few["by_shots"]["1"]["accuracy_std"] >= 0


def _adamw_cosine_reference(features, labels, num_classes, setting, epochs, batch_size, seed):
    """The probe as torch.optim.AdamW + CosineAnnealingLR train it, one setting at a time."""
    generator = torch.Generator().manual_seed(seed)
    classifier = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0, 0.01, generator=generator)
        classifier.bias.zero_()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=setting.lr, weight_decay=setting.weight_decay)
    steps = epochs * -(-len(labels) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(classifier(features[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return classifier


def test_a_sweep_trained_together_equals_each_setting_trained_alone_with_torch_adamw():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (300,))
    features = torch.randn(300, 12) + torch.nn.functional.one_hot(labels, 12).float()
    sweep = DEFAULT_SWEEP[::2]
    together = train_linear_classifiers(features, labels, 5, sweep, epochs=4, batch_size=64, seed=3)
    for setting, classifier in zip(sweep, together):
        alone = _adamw_cosine_reference(features, labels, 5, setting, epochs=4, batch_size=64, seed=3)
        assert torch.allclose(classifier.weight, alone.weight, atol=1e-6), setting
        assert torch.allclose(classifier.bias, alone.bias, atol=1e-6), setting


def test_balanced_accuracy_weighs_classes_equally():
    labels = torch.tensor([0] * 90 + [1] * 10)
    predictions = torch.zeros(100, dtype=torch.long)  # always the head class
    metrics = classification_metrics(predictions, labels, use_evaluate=False)
    assert metrics["accuracy"] == pytest.approx(90.0) and metrics["balanced_accuracy"] == pytest.approx(50.0)
    assert metrics["per_class_accuracy"] == {0: 100.0, 1: 0.0}


def test_pixel_baseline_separates_brightness_classes(tmp_path, cache):
    train = colour_dataset(tmp_path / "train.parquet", seed=0)
    test = colour_dataset(tmp_path / "test.parquet", seed=1)
    result = evaluate_backbone("knn", "pixels", train, test)
    assert result["feature_dim"]["cls"] == 12 * 12 * 3
    assert result["protocols"]["knn"]["by_k"]["10"]["accuracy"] == 100.0
    entry = result["model_index"][0]
    assert entry["metric_name"] == "kNN top-1 (k=20)" and entry["task_type"] == "image-classification"


def save_tiny_backbone(folder: Path) -> str:
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=12, patch_size=4)
    Dinov2Model(config).save_pretrained(folder)
    build_image_processor("dinov2", 12, [0.5] * 3, [0.5] * 3).save_pretrained(folder)
    return str(folder)


def test_features_are_cached_and_reused(tmp_path, cache, monkeypatch):
    model = save_tiny_backbone(tmp_path / "backbone")
    data = colour_dataset(tmp_path / "train.parquet")
    first = extract_features(model, data, batch_size=7, progress=False)
    assert first.cls.shape == (30, 16) and first.probe_features().shape == (30, 32)
    assert len(list((cache / "features").glob("*.safetensors"))) == 1
    monkeypatch.setattr(features_module, "_load_backbone", lambda *a: pytest.fail("the model was run again"))
    second = extract_features(model, data, batch_size=7, progress=False)
    assert torch.equal(first.cls, second.cls) and torch.equal(first.labels, second.labels)
    limited = extract_features("pixels", data, limit=5, progress=False)
    assert limited.cls.shape[0] == 5


def test_evaluate_script_writes_one_json_with_the_setup(tmp_path, cache):
    model = save_tiny_backbone(tmp_path / "backbone")
    train = colour_dataset(tmp_path / "train.parquet", seed=0)
    test = colour_dataset(tmp_path / "test.parquet", seed=1)
    output = tmp_path / "result.json"
    command = [
        sys.executable,
        str(ROOT / "scripts" / "evaluate.py"),
        "all",
        "--model",
        model,
        "--train-data",
        train,
        "--test-data",
        test,
        "--output",
        str(output),
    ]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={"HF_KOLEO_CACHE": str(cache), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(output.read_text())
    assert set(result["protocols"]) == {"knn", "linear", "fewshot"}
    assert result["data"]["n_train"] == 30 and result["seed"] == 0
    assert {entry["metric_name"] for entry in result["model_index"]} >= {"kNN top-1 (k=20)", "linear probe top-1"}
    assert "linear probe top-1" in completed.stdout


def test_unknown_protocol_and_missing_processor_are_clear_errors(tmp_path, cache):
    data = colour_dataset(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_backbone("svm", "pixels", data, data)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=12, patch_size=4)
    Dinov2Model(config).save_pretrained(tmp_path / "no_processor")
    with pytest.raises(ValueError, match="no image processor"):
        extract_features(str(tmp_path / "no_processor"), data, progress=False)


def test_the_evaluate_library_is_found_even_behind_a_script_named_evaluate(tmp_path, monkeypatch):
    from hf_koleo.evaluation.metrics import _import_evaluate_library

    (tmp_path / "evaluate.py").write_text("NOT_THE_LIBRARY = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evaluate", raising=False)
    assert hasattr(_import_evaluate_library(), "load")


def test_pickle_only_models_are_refused_unless_allowed(tmp_path, cache):
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=12, patch_size=4)
    folder = tmp_path / "pickled"
    model = Dinov2Model(config)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    build_image_processor("dinov2", 12, [0.5] * 3, [0.5] * 3).save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    data = colour_dataset(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="only pickle weights .*--allow-pickle"):
        evaluate_backbone("knn", str(folder), data, data)
    assert not (cache / "features").exists()  # refused before any feature was computed
    features = extract_features(str(folder), data, limit=4, progress=False, allow_pickle=True)
    assert features.cls.shape == (4, 16)


@pytest.mark.parametrize("model", ["/tmp/hf_koleo_no_such_model", "./no_such_backbone", "outputs/run/backbone"])
def test_a_model_path_that_does_not_exist_is_named_not_taken_for_a_repo_id(model, tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = colour_dataset(tmp_path / "train.parquet")
    with pytest.raises(FileNotFoundError, match=f"model '{model}' does not exist: no such folder"):
        evaluate_backbone("knn", model, data, data)


def test_a_result_path_that_is_a_folder_is_refused_before_any_work(tmp_path, cache, capsys, monkeypatch):
    with pytest.raises(ValueError, match="is a folder: give the result file to write"):
        check_result_path(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_result_path(tmp_path / "file" / "result.json")
    assert check_result_path(tmp_path / "new" / "result.json") == tmp_path / "new" / "result.json"

    import hf_koleo.evaluation

    monkeypatch.setattr(hf_koleo.evaluation, "evaluate_backbone", lambda *a: pytest.fail("features were computed"))
    arguments = ["knn", "--model", "pixels", "--train-data", "demo", "--test-data", "demo:test"]
    assert run_script("evaluate", *arguments, "--output", str(tmp_path), monkeypatch=monkeypatch) == 2
    assert capsys.readouterr().err.startswith(f"evaluate.py: error: --output {tmp_path} is a folder")


def test_the_device_defaults_to_the_accelerator_when_one_is_present(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert default_device() == "cuda"
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert default_device() == "cpu"
