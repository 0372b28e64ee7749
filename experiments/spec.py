"""An experiment spec: one YAML file says what runs, how each is run, and how they are reported.

Every study and benchmark of this project is a spec in ``configs/experiments/``, one schema::

    title: what the experiment asks                 # shown by `plan`
    kind: pretrain_eval                             # the run kind (experiments.registry.RUN_KINDS)
    report: gpu_study                               # the report (experiments.registry.REPORTS)
    records: docs/study_gpu/runs                    # one JSON record per finished run (kept in git)
    work_dir: outputs/study_gpu                     # run folders and checkpoints (never committed)
    report_dir: docs                                # where the report writes
    outputs: {markdown: results_gpu.md}             # the report's file names (optional)
    targets: {knn: 84.6}                            # the report's verdict thresholds (optional)
    base_files: {pretrain: ../fashion_mnist_gpu.yaml}   # parameters read from a file (beside the spec)
    base: {...}                                     # every run's parameters
    choices:                                        # axes whose values name parameter overlays
      method: {baseline: {...}, koleo_proto: {...}}
    axes: {K: pretrain.model.num_prototypes, seed: pretrain.seed}   # axes that set one parameter
    name: "{dataset}-K{K}-{method}-seed{seed}"      # a run's name, from its axis values
    reserve_seconds: 60                             # a run starts only with more than this left
    fresh_process: false                            # each run in a new process (peak-memory measurements)
    stages:                                         # in order; a run named twice runs once
      - name: main
        grid: {seed: [0], dataset: [fashion_mnist], K: [16384], method: [baseline, koleo_proto]}
        params: {...}                               # this stage's overlay (optional)
        kind: ...                                   # another run kind for this stage (optional)
        run_name: "pixels-{dataset}"                # another name template for this stage (optional)
    quick: {...}                                    # merged over all of the above by --quick (tests, CI)

A run's parameters are ``base`` < the stage's ``params`` < each axis in grid order (a choice's
overlay, or the value set at the axis's dotted path). The grid's first axis varies slowest. A
run's *digest* hashes its kind and parameters: a record made with other parameters is *stale*.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REQUIRED = ("kind", "stages")
KNOWN = frozenset(
    "title kind report records work_dir report_dir outputs base_files base choices axes name reserve_seconds"
    " fresh_process stages quick notes targets".split()
)


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, nested mappings merged key by key (both left unchanged)."""
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def set_dotted(params: dict[str, Any], path: str, value: Any) -> None:
    """``params["a"]["b"] = value`` for ``path`` ``"a.b"`` (missing mappings are created)."""
    *parents, leaf = path.split(".")
    for key in parents:
        params = params.setdefault(key, {})
    params[leaf] = copy.deepcopy(value)


def digest(kind: str, params: dict[str, Any]) -> str:
    """A short hash of a run's kind and parameters (key order does not matter)."""
    text = json.dumps([kind, params], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: its name, stage, axis values, kind and parameters."""

    name: str
    stage: str
    kind: str
    axes: dict[str, Any]
    params: dict[str, Any]
    reserve_seconds: float = 0.0

    @property
    def digest(self) -> str:
        return digest(self.kind, self.params)


@dataclass
class Spec:
    """A loaded spec: its settings (the YAML, ``quick`` merged when asked) and its runs in order."""

    path: Path
    settings: dict[str, Any]
    runs: list[RunSpec] = field(default_factory=list)
    quick: bool = False

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def report(self) -> str | None:
        return self.settings.get("report")

    def folder(self, key: str, default: str) -> Path:
        """A folder the spec names (``records``, ``work_dir``, ``report_dir``), relative to the working directory."""
        return Path(self.settings.get(key) or default)

    def run(self, name: str) -> RunSpec:
        for run in self.runs:
            if run.name == name:
                return run
        raise ValueError(f"{self.path}: no run named {name!r}; runs: {[run.name for run in self.runs][:8]} ...")


def load_spec(path: str | Path, quick: bool = False) -> Spec:
    """Read a spec (``quick`` merges its ``quick:`` section over the rest) and expand its runs.

    Raises:
        FileNotFoundError: the spec or a file it names is missing.
        ValueError: an unknown key, a missing required key, a stage naming an unknown choice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment spec {path} not found")
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: an experiment spec is a mapping, got {type(settings).__name__}")
    unknown = sorted(set(settings) - KNOWN)
    missing = [key for key in REQUIRED if key not in settings]
    if unknown or missing:
        raise ValueError(f"{path}: " + "; ".join(
            ([f"unknown key(s) {unknown} (known: {sorted(KNOWN)})"] if unknown else [])
            + ([f"missing key(s) {missing}"] if missing else [])
        ))  # fmt: skip
    overlay = settings.pop("quick", None) or {}
    if quick:
        settings = merge_settings(settings, overlay)
    base = {}
    for key, name in (settings.get("base_files") or {}).items():
        file = path.parent / name
        if not file.is_file():
            raise FileNotFoundError(f"{path}: base_files.{key} {name!r} not found beside it ({file})")
        set_dotted(base, key, yaml.safe_load(file.read_text()) or {})
    settings["base"] = merge_settings(base, settings.get("base") or {})
    return Spec(path, settings, expand(settings, str(path)), quick)


def expand(settings: dict[str, Any], source: str = "spec") -> list[RunSpec]:
    """Every run of every stage, in stage order then grid order; a name already planned is skipped."""
    choices, axes = settings.get("choices") or {}, settings.get("axes") or {}
    runs: dict[str, RunSpec] = {}
    for stage in settings["stages"]:
        grid = stage.get("grid") or {}
        for axis, values in grid.items():
            if axis not in choices and axis not in axes:
                raise ValueError(f"{source}: stage {stage['name']!r} has axis {axis!r}, in neither choices nor axes")
            if not isinstance(values, list):
                raise ValueError(f"{source}: stage {stage['name']!r} axis {axis!r} must list its values")
            unknown = [value for value in values if axis in choices and value not in choices[axis]]
            if unknown:
                raise ValueError(
                    f"{source}: stage {stage['name']!r} names unknown {axis} {unknown}; known: {list(choices[axis])}"
                )
        stage_base = merge_settings(settings["base"], stage.get("params") or {})
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            params = stage_base
            for axis, value in point.items():
                if axis in choices:
                    params = merge_settings(params, choices[axis][value] or {})
                else:
                    params = copy.deepcopy(params)
                    set_dotted(params, axes[axis], value)
            run = RunSpec(
                name=run_name(stage.get("run_name", settings.get("name")), stage["name"], point),
                stage=stage["name"],
                kind=stage.get("kind", settings["kind"]),
                axes=point,
                params=params,
                reserve_seconds=float(stage.get("reserve_seconds", settings.get("reserve_seconds", 0))),
            )
            runs.setdefault(run.name, run)
    return list(runs.values())


def run_name(template: str | None, stage: str, point: dict[str, Any]) -> str:
    """The template with each ``{axis}`` replaced by its value (default: the stage then every value)."""
    if not template:
        return "-".join([stage, *(f"{value}" for value in point.values())])
    name = template.replace("{stage}", stage)
    for axis, value in point.items():
        name = name.replace("{" + axis + "}", f"{value}")
    return name


__all__ = ["RunSpec", "Spec", "digest", "expand", "load_spec", "merge_settings", "run_name", "set_dotted"]
