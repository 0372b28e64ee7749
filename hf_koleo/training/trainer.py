"""The pretraining loop, read top to bottom: batch -> forward -> backward -> step -> EMA -> log -> checkpoint."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..backbone_export import build_image_processor, export_backbone
from ..configuration_koleo_dino import KoLeoDinoConfig
from ..koleo_neighbours import neighbour_refresh
from ..prototypes import prototype_metrics, prototype_report
from .arguments import PretrainingArguments
from .checkpoint import TrainerState, list_checkpoints, save_checkpoint
from .collapse_alarm import CollapseAlarm
from .interrupt import AFTER_THE_LOOP, StopRequest, exit_code, stop_on_signals
from .lock import locks_output_dir
from .optimization import (
    ScheduleValues,
    apply_schedules,
    schedule_values,
    skip_update_if,
)
from .pipeline import Pipeline
from .run_outputs import append_metrics, claim_output_dir, cut_metrics, read_metrics
from .run_setup import build_run, make_accelerator
from .summary import prototype_line

logger = logging.getLogger(__name__)
LOSS_TERMS = (
    "loss",
    "dino_loss",
    "ibot_loss",
    "koleo_proto_loss",
    "koleo_loss",
    "koleo_proto_exact",
    "teacher_entropy",
)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; a diagnostic checkpoint was saved first."""


class NonFiniteGuard:
    """Counts non-finite steps on the device and remembers which images the first offending batch
    held; read only when logging.

    Views are a pure function of the seed, the epoch and each image's key, so the guard keeps the
    batch's small per-image tensors (``CAPTURED``: a stream's view keys, a resident source's rows,
    labels) and, on the host, the data position after each batch since the last logging step; the
    views themselves are cut again when a diagnostic is saved (:meth:`Pipeline.replay`), not copied
    at every step. Batches are counted one by one (micro-batches too), so the position found is the
    offending batch's own.
    """

    CAPTURED = ("keys", "indices", "labels")

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.first_step: torch.Tensor | None = None
        self.first_batch: torch.Tensor | None = None  # which observed batch: a key of ``positions``
        self.gradient_norm: torch.Tensor | None = None
        self.batch: dict[str, torch.Tensor] = {}
        self.observed = 0
        self.positions: dict[int, tuple[int, list[int]]] = {}  # batch number -> (step, position after it)

    def observe(self, step: int, loss: torch.Tensor, gradient_norm: torch.Tensor | None, batch: dict) -> None:
        bad = ~torch.isfinite(loss.detach())
        if gradient_norm is not None:
            bad = bad | ~torch.isfinite(gradient_norm)
            self.gradient_norm = gradient_norm.detach()
        if self.count is None:
            self.count = torch.zeros((), dtype=torch.long, device=loss.device)
            self.first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.first_batch = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.gradient_norm = torch.zeros((), device=loss.device) if gradient_norm is None else self.gradient_norm
        first = bad & (self.count == 0)
        self.count += bad.long()
        self.first_step = torch.where(first, step, self.first_step)
        self.first_batch = torch.where(first, self.observed, self.first_batch)
        if "position" in batch:  # host data
            self.positions[self.observed] = (step, list(batch["position"]))
        self.observed += 1
        for key in self.CAPTURED:
            value = batch.get(key)
            if not torch.is_tensor(value) or value.device != loss.device:
                continue
            kept = self.batch.get(key)
            self.batch[key] = value.detach().clone() if kept is None else torch.where(first, value.detach(), kept)

    def new_window(self) -> None:
        """A logging step found every batch finite: forget their positions but the last (the next
        batch's starting point)."""
        last = max(self.positions, default=None)
        self.positions = {} if last is None else {last: self.positions[last]}

    def offending_batch(self) -> dict[str, Any] | None:
        """This process's first non-finite batch: its step and the data positions before and after
        it, or None when this process saw none (a sync: call it only when stopping)."""
        number = -1 if self.first_batch is None else int(self.first_batch)
        if number < 0:
            return None
        step, after = self.positions.get(number, (int(self.first_step), None))
        before = self.positions.get(number - 1, (None, None))[1]
        return {"step": step, "position_before": before, "position_after": after}

    def first_step_everywhere(self, accelerator) -> int:
        """The earliest non-finite step over all processes (a sync: call it only when stopping)."""
        steps = accelerator.gather(torch.where(self.first_step >= 0, self.first_step, 2**62).reshape(1))
        return int(steps.min())


@locks_output_dir
def pretrain(arguments: PretrainingArguments, model_config: KoLeoDinoConfig) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary with the final prototype report.

    Ends with a checkpoint in ``output_dir/checkpoints``, the exported stock backbone in
    ``output_dir/backbone`` and ``output_dir/prototype_report.json``. Stopped early by
    ``--max_time`` or by SIGTERM / SIGINT (see :mod:`.interrupt`), it ends with a checkpoint and a
    summary whose ``stopped`` says why (``exit_code`` 128 + the signal's number for a signal).
    """
    invocation_start = time.perf_counter()  # --max_time counts from here (setup and decoding included)
    accelerator = make_accelerator(arguments)
    # Signals are ours once the process group exists: a process waiting in it for a failed peer keeps
    # the default SIGTERM, so the launcher's stop ends it at once.
    with stop_on_signals() as stop:
        return _train(accelerator, arguments, model_config, stop, invocation_start)


def _train(
    accelerator: Accelerator,
    arguments: PretrainingArguments,
    model_config: KoLeoDinoConfig,
    stop: StopRequest,
    invocation_start: float,
) -> dict[str, Any]:
    """The run: set-up, the loop (batch -> forward -> backward -> step -> EMA -> log -> checkpoint), the end."""
    # ---- Set-up: the output folder, model, optimiser, the resumed state, the data, the schedules ----
    output_dir = Path(arguments.output_dir)
    # Before any process writes: a fresh run never mixes with an earlier run's outputs.
    claim_output_dir(output_dir, arguments.resume, arguments.overwrite_output_dir, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    run = build_run(arguments, model_config, accelerator)
    model, optimizer, unwrapped, data, state = run.model, run.optimizer, run.unwrapped, run.data, run.state
    resume_from = run.resume_from
    if resume_from is not None and accelerator.is_main_process:
        logger.info("resumed from %s at step %d", resume_from, state.step)
    if arguments.resume and accelerator.is_main_process:
        cut_metrics(output_dir, state.step)  # the killed run's rows past its checkpoint go
    global_batch = arguments.global_batch_size(accelerator.num_processes)
    if resume_from is not None and accelerator.is_main_process:
        _warn_if_batch_changed(state, arguments, accelerator.num_processes, data)
    state.global_batch_size, state.per_device_batch_size = global_batch, arguments.per_device_batch_size
    steps_per_epoch = arguments.steps_per_epoch(accelerator.num_processes, data.dataset_size)
    total_steps = arguments.total_steps(steps_per_epoch)
    proto_interval = arguments.proto_interval(steps_per_epoch)
    peak_lr = arguments.peak_lr(accelerator.num_processes)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("hf_koleo", config=_tracker_config(arguments, model_config))

    progress = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        desc="pretraining",
        dynamic_ncols=True,
    )
    image_processor = build_image_processor(
        model_config.backbone_config.model_type, arguments.global_crops_size, arguments.image_mean, arguments.image_std
    )
    assignment_counts = torch.zeros(model_config.num_prototypes, device=accelerator.device, dtype=torch.long)
    guard = NonFiniteGuard()
    alarm = CollapseAlarm.from_arguments(arguments, model_config.num_prototypes)
    if arguments.resume and accelerator.is_main_process:
        alarm.restore(read_metrics(output_dir))  # earlier alarms, and the unique count to compare with
    warmup_steps = arguments.warmup_epochs * steps_per_epoch
    window_start, window_images = time.perf_counter(), 0
    run_start = (window_start, state.images_seen)  # the summary's img/s: this session's steps only
    output = None
    # ---- Train: batch -> forward -> backward -> step -> EMA -> log -> checkpoint ----
    stop.deferring = True  # from here a signal stops the loop at a step boundary, with a checkpoint
    stop_reason = None
    # The step below never reads a device value on the host: the GPU runs ahead until logging.
    for step in range(state.step, total_steps):
        values = schedule_values(arguments, step, total_steps, steps_per_epoch, peak_lr)
        apply_schedules(optimizer, values)
        for _ in range(arguments.gradient_accumulation_steps):
            batch = data.next_batch(state)
            output = train_step(accelerator, model, optimizer, batch, values, step, arguments.clip_grad, guard)
            assignments = output.teacher_cls_assignments.flatten()
            assignment_counts.index_add_(0, assignments, torch.ones_like(assignments))
            images = batch["global_crops"].shape[0] * accelerator.num_processes
            state.images_seen += images
            window_images += images
        unwrapped.update_teacher(values.teacher_momentum)
        state.step = step + 1
        progress.update(1)

        saving = state.step % arguments.save_every == 0 or state.step == total_steps
        logging_step = state.step % arguments.log_every == 0
        if logging_step or saving:
            # Sync point: the loss terms and the non-finite count, one reduce every log_every steps.
            elapsed = time.perf_counter() - window_start
            metrics = _loss_metrics(accelerator, output, guard, state.corrupt_records)
            if metrics["nonfinite_steps"] > 0:
                _stop_non_finite(accelerator, guard, state, arguments, model_config, data, metrics)
            guard.new_window()
            metrics.update(
                asdict(values),
                images_per_second=window_images / max(elapsed, 1e-9),
                epoch=_epoch(state, data),
            )
            _log(accelerator, output_dir, metrics, state.step)
            if accelerator.is_main_process:
                _raise(output_dir, alarm.check_loss(state.step, metrics["dino_loss"], state.step > warmup_steps))
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_second']:.1f}")
            window_start, window_images = time.perf_counter(), 0
        if state.step % proto_interval == 0 or state.step == total_steps:
            counts = accelerator.reduce(assignment_counts, reduction="sum")
            if accelerator.is_main_process:
                metrics = {**prototype_metrics(unwrapped, counts, arguments.proto_eps), "epoch": _epoch(state, data)}
                _log(accelerator, output_dir, metrics, state.step)
                logger.info(prototype_line(state.step, metrics, model_config.num_prototypes, arguments.proto_eps))
                _raise(output_dir, alarm.check_prototypes(state.step, metrics))
                logger.debug("step %d prototypes: %s", state.step, json.dumps(metrics))
            assignment_counts.zero_()
        if state.step < total_steps:
            stop_reason = _stop_reason(accelerator, stop, invocation_start, arguments.max_time, logging_step)
        if saving or stop_reason:
            checkpoint = save_checkpoint(
                accelerator,
                output_dir,
                state,
                model_config,
                arguments.keep_last,
                image_processor=image_processor,
                run_arguments=asdict(arguments),
            )
            if accelerator.is_main_process:
                logger.info("step %d: checkpoint %s", state.step, checkpoint)
        if stop_reason:
            cause = f"--max_time {arguments.max_time:g}s reached" if stop_reason == "max_time" else stop_reason
            if accelerator.is_main_process:
                logger.warning(
                    "%s at step %d of %d: checkpoint saved; --resume latest goes on", cause, state.step, total_steps
                )
            break
    # ---- The end: export the backbone and the report, or say where a stopped run stands ----
    stop.deferring, stop.outside = False, AFTER_THE_LOOP
    progress.close()
    if stop_reason:  # no export, no final report yet
        summary = _stopped_summary(accelerator, output_dir, state, run_start, total_steps, stop_reason)
    else:
        summary = _finish(accelerator, unwrapped, arguments, data, state, run_start)
    if accelerator.is_main_process:
        summary["collapse_alarms"] = alarm.alarms
    _end(accelerator)
    return summary


def _end(accelerator: Accelerator) -> None:
    """Every process leaves together, then the process group goes.

    The pause works around a deadlock in torch's ``ProcessGroupGloo`` destructor (seen here about once
    in ten 2-process CPU runs, stacks taken with py-spy): when this function's caller drops the DDP
    model, its reducer destroys the process group, which joins gloo's worker thread while holding the
    GIL; if that thread is still releasing the last collective's work (its tensors' Python
    references need the GIL), neither goes on. Sleeping after the barrier hands the GIL to the
    worker thread so it finishes that release first.
    """
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)
    accelerator.end_training()


def train_step(
    accelerator: Accelerator,
    model,
    optimizer,
    batch: dict[str, Any],
    values: ScheduleValues,
    step: int,
    clip_grad: float,
    guard: NonFiniteGuard,
):
    """Forward, backward, clip, optimiser step for one (micro-)batch; never reads a device value on the host.

    A NaN/inf gradient makes the fused optimiser skip the update on the device; ``guard`` counts
    it and keeps the batch, for the check every ``log_every`` steps.
    """
    config = accelerator.unwrap_model(model).config
    # host arithmetic: no sync
    refresh = neighbour_refresh(step, config.koleo_proto_refresh_every, config.koleo_proto_update_every)
    crops = batch["global_crops"]
    # A 0-d device tensor, made by a fill kernel (no host-to-device copy): a compiled forward takes it
    # as an input, so the temperature's warm-up neither recompiles it nor hands it a host scalar.
    temperature = torch.full((), values.teacher_temperature, device=crops.device)
    with accelerator.accumulate(model):
        output = model(
            crops,
            batch.get("local_crops"),
            batch.get("masks"),
            teacher_temperature=temperature,
            mask_slots=batch.get("mask_slots"),
            refresh_neighbours=refresh,
        )
        accelerator.backward(output.loss)
        gradient_norm = None
        if accelerator.sync_gradients:
            gradient_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
            skip_update_if(accelerator, optimizer, ~torch.isfinite(gradient_norm))
        guard.observe(step, output.loss, gradient_norm, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return output


def _raise(output_dir: Path, alarms: list[dict[str, Any]]) -> None:
    """Collapse alarms: one warning line each, and a row in ``metrics.jsonl`` (main process)."""
    for alarm in alarms:
        logger.warning("collapse alarm, %s", alarm["message"])
        append_metrics(output_dir, alarm["step"], {f"collapse_alarm/{key}": value for key, value in alarm.items()})


def _log(accelerator: Accelerator, output_dir: Path, metrics: dict[str, Any], step: int) -> None:
    """To the trackers, and (main process) one JSON line per call in ``output_dir/metrics.jsonl``."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        append_metrics(output_dir, step, metrics)


def _warn_if_batch_changed(state: TrainerState, arguments: PretrainingArguments, world: int, data) -> None:
    """A resumed run with another batch or number of processes than its checkpoint's: say what that
    does to the data position and the learning rate (main process)."""
    saved_world = state.saved_num_processes or world
    # Images per data batch over all processes, then and now (a checkpoint from before the
    # per-device batch was saved knew only the step's global batch).
    then = state.per_device_batch_size * saved_world or state.global_batch_size
    if not then and state.step:
        then = state.images_seen // (state.step * arguments.gradient_accumulation_steps)
    now = arguments.per_device_batch_size * world
    global_then, global_now = state.global_batch_size or then, arguments.global_batch_size(world)
    if (not then or then == now) and saved_world == world and global_then in (0, global_now):
        return
    epoch, batch_index = state.position[:2]
    if then == now and saved_world == world:
        effect = "the data position is unaffected (the same images per data batch)"
    elif not data.resident and saved_world != world:
        effect = (
            f"the stream's shards are dealt out to {world} processes, {saved_world} in the checkpoint's run, so "
            f"each process goes on after batch {batch_index} of its new share: some records of this pass are "
            "seen twice, others skipped"
        )
    elif data.exact_position(state.position):  # the stream counts each worker's records: exact
        effect = "the stream goes on after the records the checkpoint's run had read"
    else:
        at_then, at_now = batch_index * then, batch_index * now
        gap = f"{at_now - at_then:,} images are skipped" if at_now > at_then else f"{at_then - at_now:,} are seen twice"
        effect = (
            f"the data position ({'epoch' if data.resident else 'pass'} {epoch}, batch {batch_index}) counts batches, "
            f"so this run goes on at image {at_now:,} of the {'epoch' if data.resident else 'stream'} where the "
            f"checkpoint's run stopped at image {at_then:,} ({gap})"
        )
    logger.warning(
        "--resume: the global batch is %d images per step, the checkpoint's run used %d: %s; the learning "
        "rate follows the new batch (peak lr = base_lr x batch / 256)",
        global_now,
        global_then,
        effect,
    )


def _loss_metrics(accelerator, output, guard: NonFiniteGuard, corrupt_records: int) -> dict[str, float]:
    """Loss terms (mean over processes), the gradient norm, the non-finite step count and the corrupt
    records skipped (sums over processes): one reduce."""
    world = accelerator.num_processes
    terms = [output[name].detach().float() for name in LOSS_TERMS]
    counts = torch.tensor(float(corrupt_records), device=accelerator.device)
    terms += [guard.gradient_norm.float(), guard.count.float() * world, counts * world]
    values = accelerator.reduce(torch.stack(terms), reduction="mean").tolist()
    names = (*LOSS_TERMS, "gradient_norm", "nonfinite_steps", "corrupt_records")
    metrics = {name: float(value) for name, value in zip(names, values)}
    metrics["corrupt_records"] = round(metrics["corrupt_records"])
    return metrics


def _stop_non_finite(accelerator, guard: NonFiniteGuard, state, arguments, model_config, data, metrics) -> None:
    """Save a diagnostic checkpoint (model, optimiser, the first offending batch: its images' keys and
    rows, and its views where the data path can cut them again) and stop."""
    first_step = guard.first_step_everywhere(accelerator)
    path = save_checkpoint(
        accelerator,
        arguments.output_dir,
        state,
        model_config,
        arguments.keep_last,
        name=f"diagnostic-nonfinite-step-{first_step:08d}",
    )
    offending = guard.offending_batch()
    if accelerator.is_main_process and offending is not None and guard.batch:
        from safetensors.torch import save_file

        batch = {**guard.batch, **data.replay(guard.batch, offending["position_after"])}
        save_file({key: value.contiguous().cpu() for key, value in batch.items()}, str(path / "batch.safetensors"))
        (path / "batch.json").write_text(json.dumps(offending))
    terms = {name: metrics[name] for name in LOSS_TERMS}
    raise NonFiniteLossError(
        f"the loss became non-finite at step {first_step} ({int(metrics['nonfinite_steps'])} non-finite steps "
        f"by step {state.step}; last terms {terms}). Non-finite updates were skipped, so the model in {path} "
        "is finite; the optimiser and the first offending batch (batch.safetensors, batch.json) are saved "
        "beside it. Lower base_lr, raise clip_grad, or use bf16 instead of fp16."
    )


def _tracker_config(arguments: PretrainingArguments, model_config: KoLeoDinoConfig) -> dict[str, Any]:
    flat = {key: value for key, value in asdict(arguments).items() if isinstance(value, (int, float, str, bool))}
    model_values = model_config.to_dict()
    flat.update(
        {f"model.{key}": value for key, value in model_values.items() if isinstance(value, (int, float, str, bool))}
    )
    return flat


def _epoch(state: TrainerState, data: Pipeline) -> float:
    """Epochs so far: images seen over the source's size (the pass counter when the size is unknown)."""
    return state.images_seen / data.dataset_size if data.dataset_size else float(state.position[0])


def _stop_reason(
    accelerator: Accelerator, stop: StopRequest, started: float, max_time: float, logging_step: bool
) -> str | None:
    """Why the run stops after this step: ``"max_time"``, a signal's name (``"SIGTERM"``), or None.

    ``--max_time`` is checked on ``log_every`` steps, by the main process's clock. One process stops
    at the first step after a signal; several agree on ``log_every`` steps (a small gather, beside
    the loss reduce already there), so they all stop at the same step.
    """
    expired = max_time > 0 and logging_step and time.perf_counter() - started >= max_time
    if accelerator.num_processes == 1:
        return stop.name or ("max_time" if expired else None)
    if not logging_step:
        return None
    flags = torch.tensor([[int(expired and accelerator.is_main_process), stop.signum or 0]], device=accelerator.device)
    any_expired, signum = accelerator.gather(flags).amax(dim=0).tolist()  # sync point: log steps only
    if signum:
        return signal.Signals(signum).name
    return "max_time" if any_expired else None


def _session_figures(state: TrainerState, run_start: tuple[float, int]) -> dict[str, Any]:
    started, images_before = run_start
    return {
        "steps": state.step,
        "images_seen": state.images_seen,
        "images_per_second": (state.images_seen - images_before) / max(time.perf_counter() - started, 1e-9),
    }


def _last_checkpoint(output_dir: Path) -> str | None:
    checkpoints = list_checkpoints(output_dir)
    return str(checkpoints[-1]) if checkpoints else None


def _stopped_summary(accelerator, output_dir: Path, state, run_start, total_steps: int, reason: str) -> dict[str, Any]:
    """The summary of a run that ``--max_time`` or a signal stopped: where it is and where its checkpoint is."""
    summary = {**_session_figures(state, run_start), "total_steps": total_steps, "stopped": reason}
    if reason != "max_time":
        summary["exit_code"] = exit_code(signal.Signals[reason])
    if accelerator.is_main_process:
        summary["checkpoint"] = _last_checkpoint(output_dir)
    return summary


def _finish(
    accelerator, model, arguments, data: Pipeline, state: TrainerState, run_start: tuple[float, int]
) -> dict[str, Any]:
    """Export the backbone and the prototype report; the run's summary (see ``training.summary``)."""
    corrupt = data.corrupt_records(state, accelerator)
    summary: dict[str, Any] = {**_session_figures(state, run_start), "corrupt_records": corrupt}
    if not accelerator.is_main_process:
        return summary
    output_dir = Path(arguments.output_dir)
    summary["checkpoint"] = _last_checkpoint(output_dir)
    backbone_dir = export_backbone(
        model, output_dir / "backbone", arguments.global_crops_size, arguments.image_mean, arguments.image_std
    )
    pixel_values = data.report_images(arguments.report_images)
    model.eval()
    report = prototype_report(model, pixel_values=pixel_values, eps=0.025)
    model.train()
    report_path = output_dir / "prototype_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    summary.update(backbone=str(backbone_dir), report_path=str(report_path), prototype_report=report)
    return summary


__all__ = ["NonFiniteGuard", "NonFiniteLossError", "ScheduleValues", "pretrain", "train_step"]
