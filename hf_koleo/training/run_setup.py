"""A run's set-up, built the way pretraining builds it: the Accelerator; the model and optimiser,
prepared (and compiled when asked); the state a ``--resume`` restores; the data path positioned
there. Experiments and benchmarks build their runs here too, so nothing rebuilds it on the side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from ..configuration_koleo_dino import KoLeoDinoConfig
from ..modeling_koleo_dino import KoLeoDinoForPreTraining
from .arguments import PretrainingArguments
from .checkpoint import TrainerState, load_resume_checkpoint
from .launch import needs_cpu_backend
from .optimization import build_optimizer
from .pipeline import Pipeline, build_pipeline


def _trackers(report_to: str) -> list[str] | None:
    return {"none": None, "all": ["tensorboard", "trackio"]}.get(report_to, [report_to])


def make_accelerator(arguments: PretrainingArguments, trackers: bool = True) -> Accelerator:
    """The run's Accelerator: CPU processes over gloo when there is no accelerator, the run's mixed
    precision and gradient accumulation, its trackers writing into ``output_dir`` (``trackers``)."""
    return Accelerator(
        cpu=needs_cpu_backend(),
        gradient_accumulation_steps=arguments.gradient_accumulation_steps,
        mixed_precision=arguments.mixed_precision or None,
        log_with=_trackers(arguments.report_to) if trackers else None,
        project_dir=str(arguments.output_dir) if trackers else None,
    )


@dataclass
class TrainingRun:
    """What the loop runs on."""

    accelerator: Accelerator
    model: Any  # prepared (DDP-wrapped with several processes)
    optimizer: Any  # prepared
    data: Pipeline
    state: TrainerState
    resume_from: Path | None = None

    @property
    def unwrapped(self) -> KoLeoDinoForPreTraining:
        return self.accelerator.unwrap_model(self.model)


def build_run(
    arguments: PretrainingArguments,
    model_config: KoLeoDinoConfig,
    accelerator: Accelerator | None = None,
    resume: bool = True,
) -> TrainingRun:
    """Seed, model, optimiser (prepared), the checkpoint ``arguments.resume`` asks for (``resume``),
    the data path at the restored position, ``torch.compile`` when ``arguments.compile``."""
    accelerator = accelerator or make_accelerator(arguments, trackers=False)
    set_seed(arguments.seed)
    model = KoLeoDinoForPreTraining(model_config)
    optimizer = build_optimizer(model, arguments.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    state, resume_from = TrainerState(), None
    if resume:
        state, resume_from = load_resume_checkpoint(accelerator, arguments.output_dir, arguments.resume, model_config)
    data = build_pipeline(arguments, model_config, accelerator, tuple(state.position))
    run = TrainingRun(accelerator, model, optimizer, data, state, resume_from)
    if arguments.compile:
        compile_model(run.unwrapped, arguments.compile_mode, arguments.compile_scope)
    return run


def compile_model(model: KoLeoDinoForPreTraining, mode: str = "default", scope: str = "backbones") -> None:
    """``torch.compile`` in place (parameter names and checkpoints unchanged); the first steps pay the
    compilation. ``scope="backbones"``: the student and teacher backbones; ``"model"``: the whole
    forward (backbones, heads, DINO / iBOT / KoLeo-proto losses trace as one graph). The optimiser
    step (fused) and the EMA (foreach) stay eager."""
    if scope == "model":
        model.compile(mode=mode)
    else:
        model.student.compile(mode=mode)
        model.teacher.compile(mode=mode)


__all__ = ["TrainingRun", "build_run", "compile_model", "make_accelerator"]
