"""Pretraining from a Hub dataset id, against the loopback Hub (tests/hub_server.py): every process
is a real subprocess with ``HF_ENDPOINT`` pointing at the server and its caches in ``tmp_path``."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import free_port
from data_fixtures import write_parquet
from hub_server import add_dataset, start_hub_server
from test_training import ROOT, TINY_RUN, student_parameters

from hf_koleo.data.sources import load_source
from hf_koleo.data.stream import CanvasStream
from hf_koleo.training.checkpoint import list_checkpoints

DATASET = "tester/tiny-images"
SHARDS = [f"data/train-{index:05d}-of-00002.parquet" for index in range(2)]

# Runs a script (argv[1], with the rest of argv) with small retry budgets: huggingface_hub retries a
# request once, datasets a read twice, without waiting (the defaults take minutes to give up).
SMALL_RETRY_BUDGET = """
import functools, runpy, sys
import datasets
import huggingface_hub.hf_file_system as hf_file_system

datasets.config.STREAMING_READ_MAX_RETRIES = 2
datasets.config.STREAMING_READ_RETRY_INTERVAL = 0
datasets.config.STREAMING_OPEN_MAX_RETRIES = 2
datasets.config.STREAMING_OPEN_RETRY_INTERVAL = 0
hf_file_system.http_backoff = functools.partial(
    hf_file_system.http_backoff, max_retries=1, base_wait_time=0.1, max_wait_time=0.1
)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Opens the source, says so, waits for a line on stdin (the test cuts the connections then), reads
# 12 batches of 4 (one pass over the 48 records) through CanvasStream and prints their images' bytes.
READ_STREAM = """
import hashlib, json, sys
from hf_koleo.data.sources import load_source
from hf_koleo.data.stream import CanvasStream

source = load_source(sys.argv[1])
print("opened", source.num_shards, flush=True)
sys.stdin.readline()
stream = CanvasStream(source, 8, batch_size=4, name=sys.argv[1])
batches = [batch for _, batch in zip(range(12), stream)]
print(json.dumps([hashlib.sha1(bytes(image.numpy())).hexdigest() for batch in batches for image in batch["images"]]))
"""


def serve_dataset(tmp_path, monkeypatch):
    """The loopback Hub serving DATASET (two parquet shards of 24 images) and an environment that uses it."""
    server, state, endpoint = start_hub_server()
    files = {
        name: write_parquet(tmp_path / "shards" / f"{index}.parquet", 24, start_seed=100 * index).read_bytes()
        for index, name in enumerate(SHARDS)
    }
    add_dataset(state, DATASET, files)
    for variable in [name for name in os.environ if name.startswith("HF_")]:
        monkeypatch.delenv(variable)  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE included: this test is online
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "koleo_cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return server, state, endpoint


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    server, state, endpoint = serve_dataset(tmp_path, monkeypatch)
    yield state, endpoint
    server.shutdown()


def local_digests(tmp_path) -> list[str]:
    """READ_STREAM's output for the same shards read from the local folder."""
    stream = CanvasStream(load_source(str(tmp_path / "shards")), 8, batch_size=4)
    batches = [batch for _, batch in zip(range(12), stream)]
    return [hashlib.sha1(bytes(image.numpy())).hexdigest() for batch in batches for image in batch["images"]]


def parquet_downloads(state) -> list[str]:
    return [path.rsplit("/", 1)[-1] for method, path, _ in state.requests if method == "GET" and ".parquet" in path]


def pretrain(output_dir, *extra, wrapper: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, *([wrapper] if wrapper else []), str(ROOT / "scripts" / "pretrain.py"), *TINY_RUN]
    command += ["--data", DATASET, "--output_dir", str(output_dir), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def read_stream(tmp_path, state, cut_downloads: int = 0) -> subprocess.CompletedProcess:
    """READ_STREAM in a child; after it opened the source, the next ``cut_downloads`` downloads drop."""
    (tmp_path / "budget.py").write_text(SMALL_RETRY_BUDGET)
    (tmp_path / "read_stream.py").write_text(READ_STREAM)
    command = [sys.executable, str(tmp_path / "budget.py"), str(tmp_path / "read_stream.py"), DATASET]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["opened", "2"], child.stderr.read()[-3000:]
        state.cut_downloads = cut_downloads
        stdout, stderr = child.communicate("go\n", timeout=60)  # a hang fails here
    finally:
        child.kill()
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


def test_the_loopback_hub_answers_tree_paths_info_and_ranged_downloads(hub):
    from huggingface_hub import HfApi, get_session

    state, endpoint = hub
    api = HfApi(endpoint=endpoint)
    assert [entry.path for entry in api.list_repo_tree(DATASET, repo_type="dataset")] == ["data"]
    files = api.list_repo_tree(DATASET, repo_type="dataset", recursive=True)
    assert [entry.path for entry in files] == ["data", *SHARDS]
    (info,) = api.get_paths_info(DATASET, [SHARDS[1]], repo_type="dataset")
    payload = state.datasets[DATASET]["branches"]["main"]["files"][SHARDS[1]]
    assert info.size == len(payload)
    response = get_session().get(
        f"{endpoint}/datasets/{DATASET}/resolve/main/{SHARDS[1]}", headers={"Range": "bytes=4-9"}
    )
    assert response.status_code == 206 and response.content == payload[4:10]


def test_a_hub_dataset_streams_each_record_once_per_pass_from_its_parquet_shards(tmp_path, hub):
    state, _ = hub
    result = read_stream(tmp_path, state)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = json.loads(result.stdout)
    assert len(set(digests)) == 48 and digests == local_digests(tmp_path)
    assert sorted(set(parquet_downloads(state))) == [name.rsplit("/", 1)[-1] for name in SHARDS]


def test_a_connection_dropped_mid_download_is_retried_and_the_stream_goes_on(tmp_path, hub):
    state, _ = hub
    result = read_stream(tmp_path, state, cut_downloads=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == local_digests(tmp_path)
    assert "peer closed connection" in result.stderr and state.cut_downloads == 0


def test_a_connection_that_keeps_dropping_stops_with_an_error_naming_the_dataset(tmp_path, hub):
    state, endpoint = hub
    result = read_stream(tmp_path, state, cut_downloads=10**6)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("hf_koleo.data.sources.SourceConnectionError: data source 'tester/tiny-images'"), error
    assert f"the Hub at {endpoint} (HF_ENDPOINT) kept failing" in error and "--resume" in error


def test_pretraining_from_a_hub_id_resumed_mid_epoch_equals_a_straight_run(tmp_path, hub):
    straight = pretrain(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert straight.stdout.startswith("pretraining done: 4 steps, 16 images seen")
    # The run as a kill after its step-2 checkpoint leaves it (mid-epoch: 48 records, 4 per step).
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "checkpoint-00000002",
        tmp_path / "resumed" / "checkpoints" / "checkpoint-00000002",
    )
    resumed = pretrain(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-00000002 at step 2" in resumed.stderr
    expected = student_parameters(list_checkpoints(tmp_path / "straight")[-1])
    actual = student_parameters(list_checkpoints(tmp_path / "resumed")[-1])
    assert all(expected[key].equal(actual[key]) for key in expected)


def test_pretraining_from_a_hub_id_split_across_two_processes(tmp_path, hub):
    state, _ = hub
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(free_port())),
        *(str(ROOT / "scripts" / "pretrain.py"), *TINY_RUN, "--data", DATASET),
        *("--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--save_every", "2"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretraining done: 2 steps, 16 images seen" in result.stdout  # 2 processes x 4 images x 2 steps
    state_file = list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json"
    assert json.loads(state_file.read_text())["position"] == [0, 2]
    assert sorted(set(parquet_downloads(state))) == [name.rsplit("/", 1)[-1] for name in SHARDS]
