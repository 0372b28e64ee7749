import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from data_fixtures import write_parquet
from hub_server import start_hub_server
from test_cli import run_script
from test_training import run

import hf_koleo.model_card
from hf_koleo import KoLeoDinoForPreTraining
from hf_koleo.hub import HubUnreachableError, load_pretraining_model, prepare_upload_folder, push_folder
from hf_koleo.model_card import build_model_card, hub_dataset_id
from hf_koleo.training.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    data = write_parquet(folder / "train.parquet", 32)
    run(data, folder / "out")
    return list_checkpoints(folder / "out")[-1]


@pytest.fixture()
def hub():
    server, state, endpoint = start_hub_server()
    yield state, endpoint
    server.shutdown()


def clean_environment(tmp_path: Path, **extra) -> dict:
    """No hf_koleo on the path, a private HF cache, offline except for our loopback endpoint."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHONPATH"))}
    environment.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return environment


STOCK_LOAD = """
import json, sys, torch
assert "hf_koleo" not in sys.modules
from transformers import AutoModel, pipeline
model_id, pixels_file, revision = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModel.from_pretrained(model_id, revision=revision).eval()
pixels = torch.load(pixels_file)
with torch.no_grad():
    features = model(pixel_values=pixels).pooler_output
extractor = pipeline("image-feature-extraction", model=model_id, revision=revision)
from PIL import Image
tokens = extractor(Image.new("RGB", (20, 20), (10, 200, 30)))
assert "hf_koleo" not in sys.modules, "hf_koleo was imported"
print(json.dumps({"type": type(model).__name__, "features": features.tolist(), "tokens": len(tokens[0])}))
"""


def stock_load(model_id: str, pixels: torch.Tensor, tmp_path: Path, revision="main", **environment) -> dict:
    pixels_file = tmp_path / "pixels.pt"
    torch.save(pixels, pixels_file)
    command = [sys.executable, "-c", STOCK_LOAD, model_id, str(pixels_file), revision]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=clean_environment(tmp_path, **environment)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def push_script(
    checkpoint: Path, tmp_path: Path, extra: list[str], returncode: int = 0, **environment
) -> subprocess.CompletedProcess:
    """Run scripts/push_to_hub.py for ``checkpoint`` to tester/koleo-tiny in a clean environment."""
    command = [
        sys.executable,
        str(ROOT / "scripts" / "push_to_hub.py"),
        "--checkpoint",
        str(checkpoint),
        "--repo-id",
        "tester/koleo-tiny",
        *extra,
    ]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**clean_environment(tmp_path, **environment), "PYTHONPATH": str(ROOT)},
        timeout=300,  # a hang fails the test instead of the suite
    )
    assert completed.returncode == returncode, completed.stderr[-3000:]
    return completed


def teacher_features(checkpoint: Path, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return KoLeoDinoForPreTraining.from_pretrained(checkpoint).teacher(pixels).pooler_output


# One model-index entry of an evaluation result file, as scripts/evaluate.py writes it.
KNN_ENTRY = {
    "task_type": "image-classification",
    "dataset_type": "demo",
    "dataset_name": "demo:test",
    "metric_type": "accuracy",
    "metric_name": "kNN top-1 (k=20)",
    "metric_value": 71.5,
}


def test_export_loads_with_stock_transformers_in_a_fresh_process(trained, tmp_path):
    folder = prepare_upload_folder(trained, tmp_path / "export", str(tmp_path / "export"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dinov2" and config["architectures"] == ["Dinov2Model"]
    assert (folder / "preprocessor_config.json").exists() and not list(folder.glob("*.bin"))
    pixels = torch.randn(2, 3, 8, 8)
    loaded = stock_load(str(folder), pixels, tmp_path)
    assert loaded["type"] == "Dinov2Model" and loaded["tokens"] == 1 + 4
    assert torch.allclose(torch.tensor(loaded["features"]), teacher_features(trained, pixels), atol=1e-5)


def test_card_has_valid_metadata_model_index_plot_and_runnable_snippet(trained, tmp_path):
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"model": "x", "model_index": [KNN_ENTRY]}))
    folder = prepare_upload_folder(trained, tmp_path / "export", str(tmp_path / "export"), [evaluation])
    text = (folder / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-feature-extraction"
    assert {"self-supervised", "dino", "ibot", "koleo-proto"} <= set(metadata["tags"])
    result = metadata["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == 71.5 and result["dataset"]["name"] == "demo:test"
    assert (folder / "prototype_collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0.025 |" in text and "prototype_collapse.png" in text
    snippet = text.split("```python\n")[1].split("```")[0]
    completed = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, env=clean_environment(tmp_path)
    )
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_push_then_from_pretrained_round_trip_through_a_loopback_hub(trained, tmp_path, hub):
    state, endpoint = hub
    push_script(
        trained,
        tmp_path,
        ["--private", "--revision", "experiment", "--commit-message", "first push"],
        HF_ENDPOINT=endpoint,
        HF_TOKEN="hf_secret_token",
    )
    repo = state.repos["tester/koleo-tiny"]
    assert repo["private"] and repo["branches"]["experiment"]["summary"] == "first push"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(
        repo["branches"]["experiment"]["files"]
    )
    assert all(auth == "Bearer hf_secret_token" for method, path, auth in state.requests if method == "POST")
    assert repo["branches"]["main"]["files"] == {}  # the push went to the branch only
    pixels = torch.randn(1, 3, 8, 8)
    loaded = stock_load(
        "tester/koleo-tiny", pixels, tmp_path, "experiment", HF_ENDPOINT=endpoint, HF_TOKEN="hf_secret_token"
    )
    assert torch.allclose(torch.tensor(loaded["features"]), teacher_features(trained, pixels), atol=1e-5)


def test_dry_run_writes_the_upload_folder_and_contacts_nobody(trained, tmp_path, hub):
    state, endpoint = hub
    preview = tmp_path / "preview"
    completed = push_script(
        trained, tmp_path, ["--dry-run", str(preview), "--include-pretraining-model"], HF_ENDPOINT=endpoint
    )
    assert "dry run" in completed.stdout and state.requests == []
    assert (preview / "README.md").exists() and (preview / "pretraining" / "modeling_koleo_dino.py").exists()
    assert "tester/koleo-tiny" in (preview / "README.md").read_text()


def test_pretraining_model_loads_with_trust_remote_code_without_hf_koleo(trained, tmp_path):
    folder = prepare_upload_folder(trained, tmp_path / "export", "x", include_pretraining_model=True)
    code = (
        "import sys; from transformers import AutoModelForPreTraining; "
        f"m = AutoModelForPreTraining.from_pretrained({str(folder / 'pretraining')!r}, trust_remote_code=True); "
        "assert 'hf_koleo' not in sys.modules; print(type(m).__name__, m.config.num_prototypes)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=clean_environment(tmp_path)
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["KoLeoDinoForPreTraining", "32"]


def test_pickle_checkpoints_are_refused_unless_allowed(trained, tmp_path):
    model = KoLeoDinoForPreTraining.from_pretrained(trained)
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_pretraining_model(tmp_path / "pickled")
    assert isinstance(load_pretraining_model(tmp_path / "pickled", allow_pickle=True), KoLeoDinoForPreTraining)


def test_an_earlier_checkpoint_gets_its_own_prototype_report(trained, tmp_path):
    earlier = list_checkpoints(trained.parent.parent)[0]
    assert earlier != trained
    latest_report = json.loads(
        (prepare_upload_folder(trained, tmp_path / "latest", "x") / "prototype_report.json").read_text()
    )
    assert "utilisation" in latest_report["teacher/cls"]  # the run's final report, made with images
    folder = prepare_upload_folder(earlier, tmp_path / "earlier", "x")
    report = json.loads((folder / "prototype_report.json").read_text())
    assert "utilisation" not in report["teacher/cls"]
    expected = KoLeoDinoForPreTraining.from_pretrained(earlier).teacher_head.prototypes
    from hf_koleo import nearest_neighbour_distances

    assert report["teacher/cls"]["nn_distance_mean"] == pytest.approx(
        float(nearest_neighbour_distances(expected).double().mean())
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("relation", ["is", "is inside", "contains"])
def test_export_refuses_an_output_overlapping_the_checkpoint_before_writing(trained, tmp_path, relation):
    run_dir = trained.parent.parent
    output = {"is": trained, "is inside": trained / "export", "contains": run_dir}[relation]
    before = files_of(run_dir)
    with pytest.raises(ValueError, match=f"{relation} the checkpoint folder"):
        prepare_upload_folder(trained, output, "x")
    assert files_of(run_dir) == before


def test_dry_run_into_the_checkpoint_is_one_line_and_leaves_it_resumable(trained, capsys, monkeypatch):
    before = files_of(trained)
    arguments = ["--checkpoint", str(trained), "--repo-id", "tester/x", "--dry-run", str(trained)]
    assert run_script("push_to_hub", *arguments, monkeypatch=monkeypatch) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "push_to_hub.py: error: --dry-run" in stderr and "is the checkpoint" in stderr
    assert files_of(trained) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "is not valid JSON"),
        ('{"model": "x"}', "is not a scripts/evaluate.py result"),
        ('{"model": "x", "model_index": [{"metric_value": 1.0}]}', "a model_index entry lacks"),
    ],
    ids=["missing", "not_json", "no_model_index", "incomplete_entry"],
)
def test_bad_eval_results_name_the_file_and_leave_no_export(trained, tmp_path, content, message):
    evaluation = tmp_path / "eval.json"
    if content is not None:
        evaluation.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(f"evaluation results file {evaluation}")):
        prepare_upload_folder(trained, tmp_path / "export", "x", [evaluation])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        prepare_upload_folder(trained, tmp_path / "export", "x", [evaluation])
    assert sorted(path.name for path in tmp_path.iterdir()) == ([] if content is None else ["eval.json"])


def test_a_failure_mid_export_leaves_neither_the_output_nor_the_staging_folder(trained, tmp_path, monkeypatch):
    def card_fails(*args, **kwargs):
        raise OSError("disk full while writing README.md")

    monkeypatch.setattr(hf_koleo.model_card, "build_model_card", card_fails)
    with pytest.raises(OSError, match="disk full"):
        prepare_upload_folder(trained, tmp_path / "export", "x")
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_a_previous_export_but_refuses_a_folder_with_other_files(trained, tmp_path):
    output = tmp_path / "export"
    prepare_upload_folder(trained, output, "x")
    (output / "README.md").write_text("a stale card")
    prepare_upload_folder(trained, output, "x")
    assert "a stale card" not in (output / "README.md").read_text()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files that are not an export \\(notes.txt\\)"):
        prepare_upload_folder(trained, output, "x")
    assert (output / "notes.txt").read_text() == "mine" and sorted(path.name for path in tmp_path.iterdir()) == [
        "export"
    ]


def card_metadata(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_card_links_only_to_what_exists_and_names_hub_dataset_ids(trained, tmp_path, monkeypatch):
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"model": "x", "model_index": [KNN_ENTRY]}))
    monkeypatch.setattr(hf_koleo.model_card, "package_project_url", lambda: None)
    folder = prepare_upload_folder(trained, tmp_path / "export", "x", [evaluation])
    text = (folder / "README.md").read_text()
    assert "github.com/hf-koleo" not in text and "[hf_koleo](" not in text and "using\nhf_koleo." in text
    metadata = card_metadata(folder)
    assert "datasets" not in metadata  # trained on a local parquet file: not on the Hub
    assert metadata["model-index"][0]["results"][0]["dataset"]["type"] == "zalando-datasets/fashion_mnist"
    build_model_card(folder, "x", run_arguments={"data": "demo"}, project_url="https://example.org/hf_koleo")
    assert "[hf_koleo](https://example.org/hf_koleo)" in (folder / "README.md").read_text()
    assert card_metadata(folder)["datasets"] == ["zalando-datasets/fashion_mnist"]


@pytest.mark.parametrize(
    ("source", "dataset_id"),
    [
        ("demo", "zalando-datasets/fashion_mnist"),
        ("demo:test", "zalando-datasets/fashion_mnist"),
        ("fashion_mnist:train_lt100", "zalando-datasets/fashion_mnist"),
        ("someone/some-images:validation", "someone/some-images"),
        ("/data/train.parquet", None),
        ("shards/train-*.tar", None),
        ("./images", None),
    ],
)
def test_hub_dataset_ids_of_data_sources(source, dataset_id):
    assert hub_dataset_id(source) == dataset_id


def silent_endpoint() -> tuple[socket.socket, str]:
    """A loopback endpoint that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def refused_endpoint() -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def test_a_silent_hub_times_out_with_an_error_naming_the_endpoint(tmp_path):
    from huggingface_hub import get_session

    (tmp_path / "config.json").write_text("{}")
    listener, endpoint = silent_endpoint()
    timeout_before = get_session().timeout
    with listener, pytest.raises(HubUnreachableError, match=rf"Hub at {re.escape(endpoint)} \(HF_ENDPOINT\) did not"):
        push_folder(tmp_path, "tester/x", timeout=0.3, endpoint=endpoint)
    assert get_session().timeout == timeout_before  # the shared client is left as it was


def test_a_refused_connection_is_an_error_naming_the_endpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    endpoint = refused_endpoint()
    with pytest.raises(HubUnreachableError, match=rf"cannot reach the Hub at {re.escape(endpoint)} \(HF_ENDPOINT\)"):
        push_folder(tmp_path, "tester/x", timeout=5, endpoint=endpoint)


def test_push_script_to_a_silent_hub_ends_with_one_line_instead_of_hanging(trained, tmp_path):
    listener, endpoint = silent_endpoint()
    with listener:
        completed = push_script(trained, tmp_path, ["--timeout", "1"], returncode=2, HF_ENDPOINT=endpoint)
    assert completed.stderr.strip().splitlines()[-1] == (
        f"push_to_hub.py: error: the Hub at {endpoint} (HF_ENDPOINT) did not answer within 1 s (ReadTimeout); "
        "check the endpoint or raise --timeout"
    )
    assert "Traceback" not in completed.stderr
