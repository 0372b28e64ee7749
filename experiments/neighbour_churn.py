"""Run kind ``neighbour_churn``: how fast KoLeo-proto's nearest neighbours change over a real run.

Trains a pretraining config (``argv``) for ``steps`` steps as the trainer does (exact KoLeo-proto
search) and after every step finds each student prototype's 16 nearest others. For each lag ``L``
it reports the fraction of prototypes whose nearest neighbour now is the one of ``L`` steps before
(``same_nn@L``) and the fraction whose nearest neighbour now is among the ``m`` nearest of ``L`` steps
before (``in_top{m}@L``): what a candidate list of ``m`` refreshed every ``L`` steps finds exactly.

With ``certify`` (a list of ``{movers, repair, update}`` settings; ``update``: the lists renewed from
the candidates' candidates every ``update`` steps between refreshes) and ``periods`` (refresh periods), it also
runs the candidate search itself beside the exact one: for each period ``P`` a
:class:`~hf_koleo.koleo_neighbours.NeighbourCandidates` of ``candidates`` (16) lists, refreshed every
``P`` steps in ``refresh_dtype``, chooses each prototype's neighbour under each setting; the record
keeps, per period and setting, the mean and lowest fraction of choices equal to the exact search,
the mean certified fraction (a guarantee: certified choices are exact) and the median time of a
choice (and of an update).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from hf_koleo.koleo_neighbours import NeighbourCandidates, nearest_candidates, neighbour_refresh
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.optimization import apply_schedules, schedule_values
from hf_koleo.training.run_setup import build_run
from hf_koleo.training.trainer import NonFiniteGuard, train_step


def neighbour_churn(params: dict[str, Any], context=None) -> dict[str, Any]:
    """``params``: ``argv``, ``steps``, ``lags`` (default 1, 2, 5, 10, 20, 50), ``ms`` (4, 8, 16);
    ``certify``, ``periods``, ``candidates``, ``refresh_dtype`` (see the module docstring)."""
    lags, ms = params.get("lags", [1, 2, 5, 10, 20, 50]), params.get("ms", [4, 8, 16])
    argv = [*params["argv"], "--model.koleo_proto_search", "exact", "--report_to", "none"]
    arguments, model_config = parse_pretraining_args(argv)
    run = build_run(arguments, model_config, resume=False)
    guard = NonFiniteGuard()
    steps_per_epoch = arguments.steps_per_epoch(1, run.data.dataset_size)
    total_steps = arguments.total_steps(steps_per_epoch)
    prototypes = run.unwrapped.student_head.prototypes
    searches = CandidateSearches(params, *prototypes.shape)
    history, rows = [], []
    unit_vectors = F.normalize(prototypes.detach(), dim=1)
    for step in range(params["steps"]):
        searches.before_step(step, unit_vectors)  # refreshed on the prototypes the step starts from
        values = schedule_values(arguments, step, total_steps, steps_per_epoch, arguments.peak_lr(1))
        apply_schedules(run.optimizer, values)
        batch = run.data.next_batch(run.state)
        train_step(run.accelerator, run.model, run.optimizer, batch, values, step, arguments.clip_grad, guard)
        run.unwrapped.update_teacher(values.teacher_momentum)
        unit_vectors = F.normalize(prototypes.detach(), dim=1)
        candidates, _ = nearest_candidates(unit_vectors, max(ms))
        searches.after_step(unit_vectors, candidates[:, 0])
        history = [*history[-max(lags) :], candidates]
        nearest, row = candidates[:, 0], {"step": step + 1, "lr": values.lr}
        for lag in lags:
            if len(history) > lag:
                before = history[-1 - lag]
                row[f"same_nn@{lag}"] = float((before[:, 0] == nearest).float().mean())
                for m in ms:
                    row[f"in_top{m}@{lag}"] = float((before[:, :m] == nearest[:, None]).any(dim=1).float().mean())
        rows.append(row)
    return {"rows": rows, "final": rows[-1], **searches.summary()}


DEFAULT_CANDIDATES, DEFAULT_REFRESH_DTYPE = 16, "bfloat16"  # of the candidate search beside the exact one


class CandidateSearches:
    """The candidate search under each refresh period and setting, beside the exact search."""

    def __init__(self, params: dict[str, Any], num_prototypes: int, dim: int) -> None:
        self.periods = params.get("periods", [])
        settings = params.get("certify", [{}])  # {}: neither movers nor repair
        self.lists = {
            "candidates": params.get("candidates", DEFAULT_CANDIDATES),
            "refresh_dtype": params.get("refresh_dtype", DEFAULT_REFRESH_DTYPE),
        }
        dtype = getattr(torch, self.lists["refresh_dtype"])
        width = self.lists["candidates"]
        self.caches = {
            (period, label(setting)): NeighbourCandidates(num_prototypes, dim, width, dtype, **_lists(setting))
            for period in self.periods
            for setting in settings
        }
        self.updates = {label(setting): setting.get("update", 0) for setting in settings}
        self.seen: dict[tuple[int, str], dict[str, list[float]]] = {
            key: {"exact": [], "certified": [], "seconds": [], "update_seconds": []} for key in self.caches
        }

    def before_step(self, step: int, unit_vectors: torch.Tensor) -> None:
        for period in self.periods:
            if step % period == 0:
                first, *others = [cache for (at, _), cache in self.caches.items() if at == period]
                first.refresh(unit_vectors)  # one search per period; the settings share its lists
                for cache in others:
                    cache.load_state_dict(first.state_dict())
        for (period, name), cache in self.caches.items():
            if neighbour_refresh(step, period, self.updates[name]) == "update":
                start = time.perf_counter()
                cache.update(unit_vectors)
                self.seen[period, name]["update_seconds"].append(time.perf_counter() - start)

    def after_step(self, unit_vectors: torch.Tensor, exact: torch.Tensor) -> None:
        for key, cache in self.caches.items():
            start = time.perf_counter()
            index, certified = cache.choose(unit_vectors)
            self.seen[key]["seconds"].append(time.perf_counter() - start)
            self.seen[key]["exact"].append(float((index == exact).float().mean()))
            self.seen[key]["certified"].append(float(certified.float().mean()))

    def summary(self) -> dict[str, Any]:
        rows = []
        for (period, name), seen in self.seen.items():
            row = {
                "period": period,
                "setting": name,
                **self.lists,
                "exact_mean": statistics.fmean(seen["exact"]),
                "exact_min": min(seen["exact"]),
                "certified_mean": statistics.fmean(seen["certified"]),
                "choose_ms": 1000 * statistics.median(seen["seconds"]),
            }
            if seen["update_seconds"]:
                row["update_ms"] = 1000 * statistics.median(seen["update_seconds"])
            rows.append(row)
        return {"candidate_search": rows} if rows else {}


def label(setting: dict[str, int]) -> str:
    name = f"movers {setting.get('movers', 0)}, repair {setting.get('repair', 0)}"
    return name + (f", update every {setting['update']}" if setting.get("update") else "")


def _lists(setting: dict[str, int]) -> dict[str, int]:
    """The setting's arguments of :class:`NeighbourCandidates` (the update period is the search's schedule)."""
    return {key: value for key, value in setting.items() if key != "update"}


__all__ = ["neighbour_churn"]
