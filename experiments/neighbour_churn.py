"""Run kind ``neighbour_churn``: how fast KoLeo-proto's nearest neighbours change over a real run.

Trains a pretraining config (``argv``) for ``steps`` steps as the trainer does (exact KoLeo-proto
search) and after every step finds each student prototype's 16 nearest others. For each lag ``L``
it reports the fraction of prototypes whose nearest neighbour now is the one of ``L`` steps before
(``same_nn@L``) and the fraction whose nearest neighbour now is among the ``m`` nearest of ``L`` steps
before (``in_top{m}@L``): what a candidate list of ``m`` refreshed every ``L`` steps finds exactly.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from hf_koleo.koleo_neighbours import nearest_candidates
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.checkpoint import TrainerState
from hf_koleo.training.optimization import apply_schedules, schedule_values
from hf_koleo.training.run_setup import build_run
from hf_koleo.training.trainer import NonFiniteGuard, train_step


def neighbour_churn(params: dict[str, Any], context=None) -> dict[str, Any]:
    """``params``: ``argv``, ``steps``, ``lags`` (default 1, 2, 5, 10, 20, 50), ``ms`` (4, 8, 16)."""
    lags, ms = params.get("lags", [1, 2, 5, 10, 20, 50]), params.get("ms", [4, 8, 16])
    argv = [*params["argv"], "--model.koleo_proto_search", "exact", "--report_to", "none"]
    arguments, model_config = parse_pretraining_args(argv)
    run = build_run(arguments, model_config, resume=False)
    state, guard = TrainerState(), NonFiniteGuard()
    steps_per_epoch = arguments.steps_per_epoch(1, run.data.dataset_size)
    total_steps = arguments.total_steps(steps_per_epoch)
    history, rows = [], []
    for step in range(params["steps"]):
        values = schedule_values(arguments, step, total_steps, steps_per_epoch, arguments.peak_lr(1))
        apply_schedules(run.optimizer, values)
        batch = run.data.next_batch(state)
        train_step(run.accelerator, run.model, run.optimizer, batch, values, step, arguments.clip_grad, guard)
        run.unwrapped.update_teacher(values.teacher_momentum)
        unit_vectors = F.normalize(run.unwrapped.student_head.prototypes.detach(), dim=1)
        candidates, _ = nearest_candidates(unit_vectors, max(ms))
        history = [*history[-max(lags) :], candidates]
        nearest, row = candidates[:, 0], {"step": step + 1, "lr": values.lr}
        for lag in lags:
            if len(history) > lag:
                before = history[-1 - lag]
                row[f"same_nn@{lag}"] = float((before[:, 0] == nearest).float().mean())
                for m in ms:
                    row[f"in_top{m}@{lag}"] = float((before[:, :m] == nearest[:, None]).any(dim=1).float().mean())
        rows.append(row)
    return {"rows": rows, "final": rows[-1]}


__all__ = ["neighbour_churn"]
