"""Run kind ``side_by_side``: pretraining runs that differ in one setting, trained at the same time on
one accelerator for as many epochs as a time limit allows, each scored with kNN@20.

Made for a short device window (``configs/experiments/gpu_window.yaml``): the speed is not known
before the machine is, so a probe trains every method together for ``probe_steps`` steps, the
slowest measured img/s sizes the epochs that fit ``seconds`` (minus the probe, minus
``evaluation_seconds``), and the methods then train together again, each in its own process with
``--max_time`` as a safety net (a run it cuts is scored from its last checkpoint and says so).
Training them together gives every method the same machine at the same moment.

Parameters::

    pretrain: {...}                 # the settings every method starts from (run keys, model keys under model:)
    methods: {name: {...}, ...}     # each method's overrides of pretrain
    dataset: {train: SOURCE, test: SOURCE}
    seconds: 330                    # for the whole run (capped by the budget left)
    probe_steps: 40
    max_epochs: 100
    evaluation_seconds: 60          # kept back for extracting features and kNN
    evaluation: {device: auto, batch_size, limit_train, limit_test}
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from hf_koleo.data.sources import count_records
from hf_koleo.hub import export_checkpoint
from hf_koleo.training.checkpoint import list_checkpoints
from hf_koleo.training.run_outputs import read_metrics

from .loop_benchmark_report import render_records
from .markdown import left_out_lines, markdown_table, report_outputs
from .pretrain_eval import evaluate_run, evaluation_settings, training_history
from .runner import RunContext
from .spec import merge_settings

ROOT = Path(__file__).resolve().parents[1]


def _settings(params: dict[str, Any], method: str, output_dir: Path, **overrides) -> dict[str, Any]:
    """The pretraining settings of ``method``: ``pretrain`` with the method's overrides, in ``output_dir``."""
    settings = merge_settings(params["pretrain"], params["methods"][method])
    settings.update(data=params["dataset"]["train"], output_dir=str(output_dir), overwrite_output_dir=True)
    return {**settings, **overrides}


def train_together(params: dict[str, Any], folder: Path, **overrides) -> None:
    """``scripts/pretrain.py`` for every method at once, each in its own process and ``folder/<method>``,
    with the ``overrides`` of its settings."""
    folder.mkdir(parents=True, exist_ok=True)
    methods = params["methods"]
    # This checkout's hf_koleo, whatever is installed (a device machine has no install at all); the
    # host's cores shared out, so the processes' CPU work does not oversubscribe them.
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(methods)))),
    }
    processes = {}
    for name in methods:
        config_path = folder / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(_settings(params, name, folder / name, **overrides), sort_keys=False))
        log = open(folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
        command = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(config_path)]
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        processes[name] = (process, log)
    codes = {}
    for name, (process, log) in processes.items():
        codes[name] = process.wait()
        log.close()
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        tails = {name: (folder / f"{name}.log").read_text()[-600:] for name in failed}
        raise RuntimeError(f"pretraining failed: exit codes {failed}; log tails {tails}")


def _images_per_second(run_dir: Path) -> float:
    """The logged img/s after the first window (which includes start-up), median over the windows."""
    rates = [row["images_per_second"] for row in read_metrics(run_dir) if "images_per_second" in row]
    rates = rates[1:] or rates
    return float(statistics.median_low(rates)) if rates else float("nan")


def _backbone(run_dir: Path) -> tuple[Path, bool]:
    """The run's exported backbone, or one exported from its last checkpoint when ``--max_time`` cut it."""
    if (run_dir / "backbone" / "config.json").exists():
        return run_dir / "backbone", False
    return export_checkpoint(list_checkpoints(run_dir)[-1], run_dir / "backbone"), True


def side_by_side(params: dict[str, Any], context: RunContext) -> dict[str, Any]:
    started = time.perf_counter()
    seconds = min(params.get("seconds", math.inf), context.seconds_left)
    methods = list(params["methods"])
    probe_steps = params.get("probe_steps", 40)
    probe = context.work_dir / "probe"
    train_together(params, probe, epochs=0, max_steps=probe_steps)
    speeds = {name: _images_per_second(probe / name) for name in methods}
    if not all(speed > 0 for speed in speeds.values()):  # NaN: no window logged after the first
        raise ValueError(f"the probe logged no speed in {probe_steps} steps: set probe_steps above 2 x log_every")
    dataset_size = count_records(params["dataset"]["train"])
    # What a run costs besides its steps (start-up, data, checkpoint, export), as the probe paid it.
    images = probe_steps * _settings(params, methods[0], probe)["per_device_batch_size"]
    overhead = max(0.0, time.perf_counter() - started - images / min(speeds.values()))
    train_seconds = seconds - (time.perf_counter() - started) - overhead - params.get("evaluation_seconds", 60)
    epochs = max(1, min(params.get("max_epochs", 100), math.floor(min(speeds.values()) * train_seconds / dataset_size)))
    runs = context.work_dir / "runs"
    train_together(params, runs, epochs=epochs, max_steps=0, max_time=max(train_seconds, 1.0))
    evaluation = {**evaluation_settings(params), "protocols": ["knn"]}
    results = {}
    for name in methods:
        run_dir = runs / name
        backbone, cut = _backbone(run_dir)
        report_path = run_dir / "prototype_report.json"
        if not report_path.exists():  # a cut run: the report its exported checkpoint carries
            report_path = backbone / "prototype_report.json"
        outputs = training_history(run_dir, json.loads(report_path.read_text()) if report_path.exists() else {})
        results[name] = {
            "images_per_second": _images_per_second(run_dir),
            "cut_by_max_time": cut,
            "epochs_reached": max((row["epoch"] for row in outputs["prototype_history"]), default=0.0),
            **outputs,
            "evaluation": evaluate_run(str(backbone), params["dataset"], evaluation),
        }
    return {
        "probe_images_per_second": speeds,
        "probe_overhead_seconds": overhead,
        "dataset_size": dataset_size,
        "epochs": epochs,
        "train_seconds_planned": train_seconds,
        "seconds": time.perf_counter() - started,
        "runs": results,
    }


TEACHER = "prototypes/teacher_cls/"


def _method_row(name: str, run: dict[str, Any], epochs: int, num_prototypes: int | None) -> dict[str, str]:
    """The method's cells of the pair's table, by column."""
    if run["cut_by_max_time"]:
        epochs = f"{run.get('epochs_reached', 0):.1f} of {epochs} (cut)"
    history = run["prototype_history"]
    unique = [row[f"{TEACHER}unique@0.025"] for row in history]
    last = history[-1] if history else {}
    knn = run["evaluation"]
    share = f" ({100 * unique[-1] / num_prototypes:.1f} %)" if unique and num_prototypes else ""
    return {
        "method": name,
        "epochs": f"{epochs}",
        "img/s": f"{run['images_per_second']:,.0f}",
        "unique@0.025 at the end": f"{unique[-1]:,}{share}" if unique else "-",
        "lowest": f"{min(unique):,}" if unique else "-",
        "used": f"{last.get(TEACHER + 'used', float('nan')):,.0f}",
        "NN median": f"{last.get(TEACHER + 'nn_distance_q0.5', float('nan')):.3f}",
        "kNN@20 top-1 / bal.": f"{knn['knn_top1']:.1f} / {knn['knn_balanced']:.1f}",  # percent
    }


def render_pair(record: dict[str, Any]) -> list[str]:
    """One side-by-side record: a row per method, then unique prototypes per epoch (a line if it failed)."""
    if record["status"] != "done":
        return [f"{record['name']}: failed: {record['error']}", ""]
    result, params = record["result"], record["params"]
    num_prototypes = params["pretrain"].get("model", {}).get("num_prototypes")
    rows = [_method_row(name, run, result["epochs"], num_prototypes) for name, run in result["runs"].items()]
    return [
        f"### {record['name']} on {record['environment']['device']}",
        "",
        f"Probe (together, {params.get('probe_steps', 40)} steps): "
        + ", ".join(f"{name} {speed:,.0f} img/s" for name, speed in result["probe_images_per_second"].items())
        + f"; {result['epochs']} epoch(s) of {result['dataset_size']:,} images planned in "
        f"{result['train_seconds_planned']:.0f} s; the whole run took {result['seconds']:.0f} s.",
        "",
        *markdown_table(list(rows[0]), [list(row.values()) for row in rows]),
        "",
        "The teacher's prototypes per logged epoch: unique at eps 0.025 / 0.1, nearest-neighbour distance "
        "q0.01 / median (merging shows there first), prototypes its arg-max used:",
        "",
        *markdown_table(*_epoch_table(result["runs"])),
        "",
    ]


def _epoch_table(runs: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows of epochs, three columns per method (the methods side by side, as they trained)."""
    header = ["epoch"]
    for name in runs:
        header += [f"{name} unique@0.025 / 0.1", f"{name} NN q0.01 / median", f"{name} used"]
    rows = []
    for logged in itertools.zip_longest(*(run["prototype_history"] for run in runs.values())):
        cells = [f"{logged[0]['epoch']:.2f}" if logged[0] is not None else "-"]
        for row in logged:
            if not row:
                cells += ["-"] * 3
                continue
            cells += [
                f"{row[TEACHER + 'unique@0.025']:,} / {row[TEACHER + 'unique@0.1']:,}",
                f"{row[TEACHER + 'nn_distance_q0.01']:.3f} / {row[TEACHER + 'nn_distance_q0.5']:.3f}",
                f"{row.get(TEACHER + 'used', float('nan')):,.0f}",
            ]
        rows.append(cells)
    return header, rows


def write_report(spec, records: list[dict[str, Any]], left_out: dict[str, str], report_dir: Path) -> list[Path]:
    """The window's report: each side-by-side pair, then the loop benchmark's rows (``outputs.markdown``)."""
    path = report_dir / report_outputs(spec, report_dir)["markdown"]
    lines = [f"# {spec.settings.get('title', spec.name)}", ""]
    for record in records:
        if record["kind"] == "side_by_side":
            lines += render_pair(record)
    loops = [record for record in records if record["kind"] != "side_by_side"]
    if loops:
        lines += render_records(loops).splitlines()
    lines += left_out_lines(left_out)
    path.write_text("\n".join(lines) + "\n")
    return [path]


__all__ = ["render_pair", "side_by_side", "train_together", "write_report"]
