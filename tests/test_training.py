import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ACCELERATE_CPU, ROOT, TINY_RUN, free_port
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

from hf_koleo import KoLeoDinoForPreTraining
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.checkpoint import list_checkpoints
from hf_koleo.training.optimization import cosine_schedule, linear_warmup
from hf_koleo.training.summary import format_summary
from hf_koleo.training.trainer import NonFiniteLossError, pretrain


def run(data_path, output_dir, *extra):
    arguments, model_config = parse_pretraining_args(
        [*TINY_RUN, "--data", str(data_path), "--output_dir", str(output_dir), *extra]
    )
    return pretrain(arguments, model_config)


def student_parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {key: value for key, value in load_file(str(checkpoint / "model.safetensors")).items()}


def test_schedules_warm_up_then_follow_a_cosine():
    assert cosine_schedule(0, 100, 1.0, 0.0, warmup_steps=10) == 0.0
    assert cosine_schedule(5, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_schedule(10, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_schedule(99, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.0)
    assert cosine_schedule(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055) and linear_warmup(40, 30, 0.04, 0.07) == 0.07


def test_the_last_layer_is_frozen_by_its_learning_rate_while_the_rest_trains():
    from conftest import tiny_config

    from hf_koleo.training.optimization import ScheduleValues, apply_schedules, build_optimizer

    torch.manual_seed(0)
    model = KoLeoDinoForPreTraining(tiny_config()).train()
    optimizer = build_optimizer(model, weight_decay=0.04)
    frozen = {id(head.prototypes) for head in model.prototype_heads("student").values()}
    for group in optimizer.param_groups:  # the last layer sits in groups of its own
        assert group["is_last_layer"] == any(id(parameter) in frozen for parameter in group["params"])
    last_layer = [
        parameter for group in optimizer.param_groups if group["is_last_layer"] for parameter in group["params"]
    ]
    assert {id(parameter) for parameter in last_layer} >= frozen

    def step(last_layer_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        before = (
            model.student_head.prototypes.detach().clone(),
            model.student.backbone.embeddings.cls_token.detach().clone(),
        )
        apply_schedules(optimizer, ScheduleValues(1e-2, 0.04, 0.996, 0.04, last_layer_lr))
        pixels = torch.randn(4, 2, 3, 16, 16)
        model(pixels, teacher_temperature=0.04).loss.backward()
        assert model.student_head.prototypes.grad is not None  # nothing touches the gradients
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return before

    prototypes, cls_token = step(last_layer_lr=0.0)
    assert torch.equal(model.student_head.prototypes, prototypes)  # frozen: lr 0, and no weight decay either
    assert not torch.equal(model.student.backbone.embeddings.cls_token, cls_token)
    prototypes, _ = step(last_layer_lr=1e-2)
    assert not torch.equal(model.student_head.prototypes, prototypes)


def test_yaml_config_with_cli_overrides_and_unknown_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "max_steps: 10\nbase_lr: 0.1\nmodel:\n  num_prototypes: 64\n"
        "  backbone_config:\n    hidden_size: 32\n    num_attention_heads: 4\n"
    )
    arguments, model_config = parse_pretraining_args(
        ["--config", str(config), "--base_lr", "0.2", "--model.num_prototypes", "128"]
    )
    assert (arguments.max_steps, arguments.base_lr) == (10, 0.2)
    assert model_config.num_prototypes == 128 and model_config.backbone_config.hidden_size == 32
    config.write_text("max_steps: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\).*learning_rate"):
        parse_pretraining_args(["--config", str(config)])
    with pytest.raises(ValueError, match="unknown model keys"):
        parse_pretraining_args(["--max_steps", "1", "--model.prototypes", "3"])
    with pytest.raises(ValueError, match="set max_steps or epochs"):
        parse_pretraining_args([])


@pytest.mark.parametrize(
    "name",
    [
        "demo",
        "fashion_mnist",
        "fashion_mnist_cpu",
        "fashion_mnist_cpu_16_tokens",
        "fashion_mnist_cpu_hidden_128",
        "fashion_mnist_fast",
        "fashion_mnist_gpu",
        "fashion_mnist_lt",
        "vits16_in1k",
        "vitb16_inat18",
    ],
)
def test_shipped_configs_parse(name):
    arguments, model_config = parse_pretraining_args(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    assert arguments.data and model_config.num_prototypes >= 2


@pytest.mark.parametrize("name", ["cpu", "gpus_bf16"])
def test_shipped_accelerate_configs_load_and_leave_nothing_to_default(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(ROOT / "configs" / "accelerate" / f"{name}.yaml")
    # the values accelerate launch would otherwise fill in with its "values were not passed" warning
    assert config.num_processes >= 1 and config.num_machines == 1 and config.mixed_precision in ("no", "bf16")
    assert config.dynamo_config == {} and config.use_cpu == (name == "cpu")


def test_run_ends_with_checkpoint_backbone_and_report(data_path, tmp_path):
    summary = run(data_path, tmp_path / "run")
    assert summary["steps"] == 4 and summary["images_seen"] == 16
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["checkpoint-00000002", "checkpoint-00000004"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    logged = {key for line in lines for key in line}
    assert {
        "dino_loss",
        "ibot_loss",
        "koleo_proto_loss",
        "lr",
        "weight_decay",
        "teacher_momentum",
        "teacher_temperature",
        "images_per_second",
        "prototypes/teacher_cls/unique@0.025",
        "prototypes/teacher_cls/used",
        *(f"prototypes/student_cls/nn_distance_q{q}" for q in (0.01, 0.1, 0.5, 0.9)),
    } <= logged
    report = json.loads((tmp_path / "run" / "prototype_report.json").read_text())
    assert report["teacher/cls"]["num_prototypes"] == 32 and "utilisation" in report["teacher/cls"]
    backbone = AutoModel.from_pretrained(tmp_path / "run" / "backbone")
    assert type(backbone).__name__ == "Dinov2Model"
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    checkpoint_model = KoLeoDinoForPreTraining.from_pretrained(checkpoint)
    checkpoint_backbone = AutoModel.from_pretrained(checkpoint)  # KoLeoDinoModel: the teacher backbone
    assert AutoImageProcessor.from_pretrained(checkpoint).crop_size == {"height": 8, "width": 8}
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = checkpoint_model.teacher(pixels).pooler_output
        assert torch.allclose(backbone(pixels).pooler_output, expected, atol=1e-5)
        assert torch.allclose(checkpoint_backbone(pixels).pooler_output, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("path", "extra", "position"),
    [
        ("resident", (), [0, 4]),
        ("streamed", ("--in_memory", "no", "--num_workers", "2"), [0, 4]),
        # KoLeo-proto's candidate lists are saved: the resumed run ranks the lists the killed run had
        ("candidates", ("--model.koleo_proto_search", "candidates", "--model.koleo_proto_refresh_every", "3"), [0, 4]),
    ],
)
def test_resume_gives_the_same_parameters_as_a_straight_run(data_path, tmp_path, monkeypatch, path, extra, position):
    run(data_path, tmp_path / "straight", *extra)
    import hf_koleo.training.trainer as trainer

    original_save = trainer.save_checkpoint

    def save_then_die(*args, **kwargs):
        original_save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the step-2 checkpoint")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(data_path, tmp_path / "resumed", *extra)
    monkeypatch.undo()
    run(data_path, tmp_path / "resumed", "--resume", *extra)
    straight = student_parameters(list_checkpoints(tmp_path / "straight")[-1])
    resumed = student_parameters(list_checkpoints(tmp_path / "resumed")[-1])
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    state = json.loads((list_checkpoints(tmp_path / "resumed")[-1] / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["position"] == position


def test_max_time_stops_with_a_checkpoint_and_resume_finishes_as_a_straight_run(data_path, tmp_path):
    straight_summary = run(data_path, tmp_path / "straight", "--save_every", "100")
    stopped = run(data_path, tmp_path / "chunked", "--save_every", "100", "--max_time", "1e-9")
    assert stopped["stopped"] == "max_time" and stopped["steps"] == 1 and stopped["total_steps"] == 4
    assert Path(stopped["checkpoint"]).name == "checkpoint-00000001"
    assert "stopped by --max_time at step 1 of 4" in format_summary(stopped)
    assert not (tmp_path / "chunked" / "backbone").exists()  # exported only when the run is done
    assert not (tmp_path / "chunked" / "prototype_report.json").exists()
    finished = run(data_path, tmp_path / "chunked", "--save_every", "100", "--resume", "latest")
    assert finished["steps"] == straight_summary["steps"] == 4 and "stopped" not in finished
    straight = student_parameters(list_checkpoints(tmp_path / "straight")[-1])
    chunked = student_parameters(list_checkpoints(tmp_path / "chunked")[-1])
    for key in straight:
        assert torch.equal(straight[key], chunked[key]), key


def test_proto_every_epochs_logs_prototype_statistics_per_epoch(data_path, tmp_path):
    # 12 steps of 4 images over the 48 images: half an epoch every 6 steps.
    run(data_path, tmp_path / "run", "--max_steps", "12", "--save_every", "100", "--proto_every_epochs", "0.5")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    proto_rows = [row for row in rows if "prototypes/teacher_cls/unique@0.025" in row]
    assert [(row["step"], row["epoch"]) for row in proto_rows] == [(6, 0.5), (12, 1.0)]
    with pytest.raises(ValueError, match="proto_every_epochs needs the dataset size"):
        parse_pretraining_args(["--max_steps", "2", "--proto_every_epochs", "1"])[0].proto_interval(0.0)


def test_interrupted_save_leaves_the_latest_checkpoint_readable(data_path, tmp_path, monkeypatch):
    from accelerate import Accelerator

    original_save_state = Accelerator.save_state

    def crash_on_second_save(self, output_dir, **kwargs):
        if "00000004" in str(output_dir):
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt("killed during save")
        return original_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(data_path, tmp_path / "run")
    monkeypatch.undo()
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["checkpoint-00000002"]
    KoLeoDinoForPreTraining.from_pretrained(list_checkpoints(tmp_path / "run")[-1])
    summary = run(data_path, tmp_path / "run", "--resume")
    assert summary["steps"] == 4


def test_non_finite_loss_stops_with_a_diagnostic_checkpoint(data_path, tmp_path, monkeypatch):
    original_forward = KoLeoDinoForPreTraining.forward
    calls = []

    def poisoned_forward(self, *args, **kwargs):
        output = original_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(KoLeoDinoForPreTraining, "forward", poisoned_forward)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 2"):
        run(data_path, tmp_path / "run")
    diagnostic = tmp_path / "run" / "checkpoints" / "diagnostic-nonfinite-step-00000002"
    assert (diagnostic / "model.safetensors").exists() and (diagnostic / "batch.safetensors").exists()
    saved = load_file(str(diagnostic / "batch.safetensors"))  # the views cut again from the kept rows
    assert saved["global_crops"].shape == (4, 2, 3, 8, 8) and saved["indices"].shape == (4,)
    saved_at = {"step": 2, "position_before": [0, 2], "position_after": [0, 3]}
    assert json.loads((diagnostic / "batch.json").read_text()) == saved_at


def launch(data_path, output_dir, num_processes, batch_size, *extra):
    command = [
        sys.executable,
        *ACCELERATE_CPU,
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
        str(ROOT / "scripts" / "pretrain.py"),
        *TINY_RUN,
        "--data",
        str(data_path),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "1",
        "--per_device_batch_size",
        str(batch_size),
        "--split_strategy",
        "examples",
        *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return student_parameters(list_checkpoints(output_dir)[-1]), result.stdout


def test_one_step_on_two_cpu_processes_equals_one_process_at_the_same_global_batch(data_path, tmp_path):
    single, _ = launch(data_path, tmp_path / "one", num_processes=1, batch_size=8)
    double, _ = launch(data_path, tmp_path / "two", num_processes=2, batch_size=4)
    for key in single:
        assert torch.allclose(single[key], double[key], atol=1e-5, rtol=1e-4), key
    assert not torch.equal(single["student_head.prototypes"], single["teacher_head.prototypes"])


def test_max_time_stops_every_process_at_the_same_step(data_path, tmp_path):
    # The main process's clock decides (broadcast at the log step), so no process waits for another.
    _, stdout = launch(data_path, tmp_path / "run", 2, 4, "--max_steps", "3", "--max_time", "1e-9")
    assert "pretraining stopped by --max_time at step 1 of 3" in stdout
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["checkpoint-00000001"]


def test_accelerate_cpu_launch_without_mpirun_is_detected():
    from hf_koleo.training.launch import requested_cpu_processes

    single_started = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}
    launcher = ["accelerate", "launch", "--cpu", "--num_processes", "2", "scripts/pretrain.py"]
    assert requested_cpu_processes(single_started, launcher) == 2
    assert requested_cpu_processes(single_started, ["accelerate", "launch", "--num_processes=3", "x.py"]) == 3
    assert requested_cpu_processes({**single_started, "WORLD_SIZE": "2"}, launcher) == 1
    assert requested_cpu_processes({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "x"}, launcher) == 1


@pytest.mark.parametrize(
    ("scope", "expected"),
    [("backbones", ["KoLeoDinoModel", "KoLeoDinoModel"]), ("model", ["KoLeoDinoForPreTraining"])],
)
def test_compile_option_compiles_in_place_and_keeps_checkpoints_loadable(
    data_path, tmp_path, monkeypatch, scope, expected
):
    compiled = []
    original_compile = torch.nn.Module.compile

    def eager_compile(self, *args, mode=None, **kwargs):  # dynamo traces the real forward; no C++ build in CI
        compiled.append((type(self).__name__, mode))
        return original_compile(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    summary = run(
        data_path, tmp_path / "compiled", "--compile", "true", "--compile_mode", "reduce-overhead", "--compile_scope",
        scope, "--max_steps", "2", "--save_every", "2",
    )  # fmt: skip
    assert compiled == [(name, "reduce-overhead") for name in expected] and summary["steps"] == 2
    checkpoint = list_checkpoints(tmp_path / "compiled")[-1]
    assert "student.backbone.embeddings.cls_token" in student_parameters(checkpoint)  # names unchanged
    KoLeoDinoForPreTraining.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        parse_pretraining_args(["--max_steps", "1", "--compile", "true", "--compile_mode", "fast"])
    with pytest.raises(ValueError, match="compile_scope must be one of"):
        parse_pretraining_args(["--max_steps", "1", "--compile", "true", "--compile_scope", "heads"])
    with pytest.raises(ValueError, match="reduce-overhead .*cannot accumulate gradients"):
        parse_pretraining_args(
            ["--max_steps", "1", "--compile", "true", "--compile_mode", "reduce-overhead"]
            + ["--gradient_accumulation_steps", "2"]
        )


def test_two_processes_resume_a_stream_exactly_each_from_its_own_position(tmp_path):
    # Shards 0 and 2 (rank 0's) hold an undecodable record, 1 and 3 (rank 1's) none: the two
    # processes stand at different places in their shards, and each must go on from its own.
    from data_fixtures import write_parquet

    for shard in range(4):
        write_parquet(tmp_path / "data" / f"part-{shard}.parquet", 12, corrupt=(1,) if shard % 2 == 0 else ())
    stream = ["--in_memory", "no", "--num_workers", "1", "--split_strategy", "shards", "--max_steps", "4"]
    straight, _ = launch(tmp_path / "data", tmp_path / "straight", 2, 2, *stream)
    launch(tmp_path / "data", tmp_path / "run", 2, 2, *stream, "--max_time", "1e-9", "--log_every", "2")
    state = json.loads((list_checkpoints(tmp_path / "run")[-1] / "trainer_state.json").read_text())
    positions = [entry["position"] for entry in state["per_process"]]
    assert state["step"] == 2 and len(positions) == 2 and positions[0] != positions[1]
    resumed, _ = launch(tmp_path / "data", tmp_path / "run", 2, 2, *stream, "--resume", "latest")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
