"""Run hyper-parameters (everything that is not saved with the model), loaded from YAML + CLI.

A YAML config holds these keys at the top level and the :class:`KoLeoDinoConfig` arguments
under ``model:``. Command-line ``--key value`` pairs override the YAML; ``--model.key value``
(dotted, e.g. ``--model.backbone_config.hidden_size 64``) overrides model keys. Unknown keys are
rejected with the list of valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configuration_koleo_dino import KoLeoDinoConfig
from ..data.augment import MultiCropConfig
from ..prototypes import TRACKED_EPS

TRACKERS = ("tensorboard", "trackio", "none", "all")
LOG_LEVELS = ("debug", "info", "warning", "error")
PRECISIONS = ("no", "fp16", "bf16")
IN_MEMORY = ("auto", "yes", "no")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("backbones", "model")


@dataclass
class PretrainingArguments(MultiCropConfig):
    """Everything about a pretraining run except the model (see :class:`KoLeoDinoConfig`)."""

    data: str = field(default="demo", metadata={"help": "Data source: built-in name, local path or Hub id."})
    output_dir: str = field(default="outputs/run", metadata={"help": "Checkpoints, logs and the exported backbone."})
    max_steps: int = field(default=0, metadata={"help": "Optimisation steps; 0 = derive from epochs."})
    epochs: float = field(default=0.0, metadata={"help": "Passes over the data (needs a known dataset size)."})
    dataset_size: int = field(default=0, metadata={"help": "Images in the source; 0 = read it from parquet metadata."})
    per_device_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    base_lr: float = field(default=5e-4, metadata={"help": "Peak lr = base_lr * global_batch / 256."})
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0
    teacher_temperature_start: float = 0.04
    teacher_temperature: float = 0.07
    teacher_temperature_warmup_epochs: float = 30.0
    freeze_last_layer_epochs: float = 1.0
    clip_grad: float = field(default=3.0, metadata={"help": "Max gradient norm; 0 disables clipping."})
    mixed_precision: str = field(default="", metadata={"help": "no, fp16 or bf16; empty = accelerate's setting."})
    seed: int = 0
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers decoding a streamed source."})
    in_memory: str = field(
        default="auto",
        metadata={
            "help": "auto: decode a local source once and keep it on the accelerator when it fits "
            "in_memory_budget_gb, else stream; yes: always; no: always stream."
        },
    )
    in_memory_budget_gb: float = field(default=4.0, metadata={"help": "Largest decoded source kept in memory."})
    canvas_size: int = field(
        default=0, metadata={"help": "Longest side images are decoded to (never upscaled); 0 = global_crops_size."}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the student and teacher backbones."})
    compile_mode: str = field(
        default="default",
        metadata={"help": "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, ..."},
    )
    compile_scope: str = field(
        default="backbones",
        metadata={"help": "What --compile compiles: backbones, or model (backbones, heads and losses in one graph)."},
    )
    shuffle_buffer: int = 1000
    split_strategy: str = field(default="auto", metadata={"help": "datasets split_dataset_by_node strategy."})
    log_every: int = 10
    proto_every: int = 100
    proto_every_epochs: float = field(
        default=0.0, metadata={"help": "Prototype statistics every this many epochs; > 0 overrides proto_every."}
    )
    proto_eps: list[float] = field(default_factory=lambda: list(TRACKED_EPS))
    collapse_alarm_used: float = field(
        default=0.0001,
        metadata={
            "help": "Warn when the teacher's arg-max uses fewer than this share of the prototypes (or only one); "
            "0 = off. Healthy CPU runs used as few as 3 of 16,384 (0.018 %)."
        },
    )
    collapse_alarm_unique_drop: float = field(
        default=0.1,
        metadata={"help": "Warn when unique prototypes fall by more than this share between statistics steps."},
    )
    collapse_alarm_loss_margin: float = field(
        default=0.01,
        metadata={"help": "Warn when the DINO loss is within this many nats of ln K after the warm-up; 0 = off."},
    )
    save_every: int = 500
    keep_last: int = 2
    resume: str = field(default="", metadata={"help": "'latest' or a checkpoint folder; empty starts fresh."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start fresh in an output_dir that holds an earlier run's outputs, removing them "
            "(without it such a folder is refused unless --resume)."
        },
    )
    max_time: float = field(
        default=0.0,
        metadata={
            "help": "Seconds this invocation may train (checked every log_every steps): then it saves a "
            "checkpoint and stops, and --resume latest goes on. 0 = no limit."
        },
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, trackio, all or none."})
    log_level: str = field(
        default="info",
        metadata={"help": "Console: info (progress, one line per statistics step and checkpoint), debug, warning."},
    )
    report_images: int = field(default=512, metadata={"help": "Images embedded for the final prototype report."})

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid value."""
        self.check_augmentation()
        positive = (
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "proto_every",
            "save_every",
            "keep_last",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "max_steps",
            "epochs",
            "dataset_size",
            "base_lr",
            "min_lr",
            "warmup_epochs",
            "weight_decay",
            "weight_decay_end",
            "teacher_temperature_warmup_epochs",
            "freeze_last_layer_epochs",
            "clip_grad",
            "num_workers",
            "in_memory_budget_gb",
            "canvas_size",
            "shuffle_buffer",
            "report_images",
            "proto_every_epochs",
            "max_time",
            "collapse_alarm_loss_margin",
        )
        for name in non_negative:
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("collapse_alarm_used", "collapse_alarm_unique_drop"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a share in [0, 1], got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs == 0:
            raise ValueError("set max_steps or epochs (both are 0)")
        for name in ("teacher_momentum", "teacher_momentum_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("teacher_temperature_start", "teacher_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.report_to not in TRACKERS:
            raise ValueError(f"report_to must be one of {TRACKERS}, got {self.report_to!r}")
        if self.mixed_precision not in ("", *PRECISIONS):
            raise ValueError(f"mixed_precision must be one of {PRECISIONS} (or empty), got {self.mixed_precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile and self.compile_mode == "reduce-overhead" and self.gradient_accumulation_steps > 1:
            raise ValueError(
                "compile_mode reduce-overhead (CUDA graphs) cannot accumulate gradients: each replay overwrites "
                "the graph's outputs the next micro-batch adds to; set gradient_accumulation_steps 1 or "
                "compile_mode default"
            )
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {self.compile_scope!r}")
        if self.in_memory not in IN_MEMORY:
            raise ValueError(f"in_memory must be one of {IN_MEMORY}, got {self.in_memory!r}")
        if self.split_strategy not in ("auto", "shards", "examples"):
            raise ValueError(f"split_strategy must be auto, shards or examples, got {self.split_strategy!r}")

    def global_batch_size(self, num_processes: int) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps * num_processes

    def peak_lr(self, num_processes: int) -> float:
        return self.base_lr * self.global_batch_size(num_processes) / 256

    def steps_per_epoch(self, num_processes: int, dataset_size: int) -> float:
        return dataset_size / self.global_batch_size(num_processes) if dataset_size else 0.0

    def proto_interval(self, steps_per_epoch: float) -> int:
        """Steps between prototype statistics: ``proto_every_epochs`` epochs when set, else ``proto_every``."""
        if not self.proto_every_epochs:
            return self.proto_every
        if not steps_per_epoch:
            raise ValueError("proto_every_epochs needs the dataset size: set dataset_size (or use proto_every)")
        return max(1, round(self.proto_every_epochs * steps_per_epoch))

    def total_steps(self, steps_per_epoch: float) -> int:
        if self.max_steps:
            return self.max_steps
        if not steps_per_epoch:
            raise ValueError("epochs needs the dataset size: set dataset_size (or use max_steps)")
        return max(1, math.ceil(self.epochs * steps_per_epoch))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, option: str) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
        if not isinstance(tree, dict):
            raise ValueError(f"{option}: {name} is not a mapping")
    tree[leaf] = value


def parse_overrides(argv: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--key value ...`` / ``--model.a.b value`` as a settings mapping, the shape a YAML config has.

    A run key keeps its words as given (one word: a string; several: a list; none: ``True``, a
    flag; ``--resume`` alone means ``latest``), typed later by its field; a model key's value is
    read as YAML (``--model.num_prototypes 4096`` is an int).
    """
    overrides: dict[str, Any] = {}
    index, argv = 0, list(argv)
    while index < len(argv):
        option = argv[index]
        if not option.startswith("--") or option == "--":
            raise ValueError(f"unexpected argument {option!r}: options are --key value (model keys: --model.key value)")
        values = []
        index += 1
        while index < len(argv) and not argv[index].startswith("--"):
            values.append(argv[index])
            index += 1
        name = option[2:]
        if name.startswith("model."):
            if len(values) != 1:
                raise ValueError(f"{option} needs one value")
            _set_dotted(overrides.setdefault("model", {}), name[len("model.") :], yaml.safe_load(values[0]), option)
        elif not values:
            overrides[name] = "latest" if name == "resume" else True
        else:
            overrides[name] = values[0] if len(values) == 1 else values
    return overrides


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _typed(name: str, kind: Any, value: Any) -> Any:
    """``value`` (from YAML, typed, or from the command line, words) as field ``name`` of type ``kind``."""

    def invalid(what: str) -> ValueError:
        return ValueError(f"argument --{name}: invalid {what} value: {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise invalid("bool")
    if kind in (int, float):
        if isinstance(value, bool):
            raise invalid(kind.__name__)
        try:
            number = kind(value) if isinstance(value, str) else value
        except ValueError:
            raise invalid(kind.__name__) from None
        if kind is int and not (isinstance(number, int) or (isinstance(number, float) and number.is_integer())):
            raise invalid("int")
        if not isinstance(number, (int, float)):
            raise invalid(kind.__name__)
        return kind(number)
    if kind is str:
        if isinstance(value, bool):  # YAML reads an unquoted no / yes / off as a bool
            raise ValueError(f"argument --{name}: expected a string, got {value!r} (quote it in YAML: '{value}')")
        if isinstance(value, (list, dict)):
            raise invalid("str")
        return "" if value is None else str(value)
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_typed(name, item, element) for element in items]
    return value


def build_arguments(settings: dict[str, Any], source: str = "settings", check: bool = True) -> PretrainingArguments:
    """``PretrainingArguments`` from a mapping of run keys, each value typed by its field (and checked)."""
    hints = typing.get_type_hints(PretrainingArguments)
    valid = sorted(hints)
    unknown = sorted(str(key) for key in settings if key not in hints)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; valid keys: {valid} (model keys go under model:)")
    arguments = PretrainingArguments(**{key: _typed(key, hints[key], value) for key, value in settings.items()})
    if check:
        arguments.check()
    return arguments


def usage() -> str:
    """What ``--help`` prints: every run key with its type, default and meaning."""
    hints = typing.get_type_hints(PretrainingArguments)
    lines = ["options (YAML keys of --config, or --key value; model keys: model: / --model.key value):"]
    for item in dataclasses.fields(PretrainingArguments):
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        hint = hints[item.name]
        kind = str(hint) if typing.get_args(hint) else hint.__name__
        help_text = item.metadata.get("help", "")
        lines.append(f"  --{item.name} {kind} (default {default!r}) {help_text}".rstrip())
    return "\n".join(lines)


def _config_fields(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def build_model_config(settings: dict[str, Any]) -> KoLeoDinoConfig:
    """``KoLeoDinoConfig(**settings)``, rejecting keys that neither it nor its backbone define."""
    unknown = set(settings) - _config_fields(KoLeoDinoConfig)
    if unknown:
        raise ValueError(f"unknown model keys {sorted(unknown)}; valid keys: {sorted(_config_fields(KoLeoDinoConfig))}")
    config = KoLeoDinoConfig(**settings)
    backbone_settings = settings.get("backbone_config") or {}
    if isinstance(backbone_settings, dict):
        allowed = _config_fields(type(config.backbone_config)) | {"model_type"}
        unknown = set(backbone_settings) - allowed
        if unknown:
            raise ValueError(f"unknown model.backbone_config keys {sorted(unknown)}; valid keys: {sorted(allowed)}")
    return config


def _check_output_dir(output_dir: str) -> None:
    """Refuse, before any work, an ``--output_dir`` that cannot be a folder this run writes in."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file; give a folder for the run's outputs")
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise PermissionError(f"--output_dir {output_dir} {what}")


def load_config_file(config_path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``config_path``; a missing, binary or malformed file raises naming the file."""
    path = Path(config_path)
    if path.is_dir():
        raise IsADirectoryError(f"config file {config_path} is a folder; --config needs a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {config_path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"config file {config_path} is not a UTF-8 text (YAML) file: {error.reason} at byte {error.start}"
        ) from None
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config file {config_path} is not valid YAML{where}: {problem}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(
            f"config file {config_path} must hold a mapping of keys to values, got {type(settings).__name__}"
        )
    return settings


def parse_pretraining_args(argv: list[str]) -> tuple[PretrainingArguments, KoLeoDinoConfig]:
    """``--config file.yaml`` plus ``--key value`` / ``--model.key value`` overrides (``--help``: the keys)."""
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(usage())
        raise SystemExit(0)
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
            raise ValueError("--config needs a YAML file")
        config_path = argv[index + 1]
        del argv[index : index + 2]
    settings = load_config_file(config_path) if config_path is not None else {}
    return arguments_from_settings(settings, argv, source=f"config file {config_path}" if config_path else "settings")


def arguments_from_settings(
    settings: dict[str, Any], argv: list[str] | tuple[str, ...] = (), source: str = "settings"
) -> tuple[PretrainingArguments, KoLeoDinoConfig]:
    """Run arguments and model config from a mapping (what a YAML config holds) plus CLI-style overrides.

    The one path from settings to a run, shared by the command line, the experiments and the tests:
    the mapping (run keys at the top level, :class:`KoLeoDinoConfig` keys under ``model``), the
    overrides of ``argv`` merged into it as data (:func:`parse_overrides`), then the dataclasses.
    Unknown keys and bad values raise ``ValueError`` naming them.
    """
    model_settings = settings.get("model")
    if model_settings is not None and not isinstance(model_settings, dict):
        raise ValueError(f"{source}: model must be a mapping of KoLeoDinoConfig keys, got {model_settings!r}")
    run_settings = {key: value for key, value in settings.items() if key != "model"}
    build_arguments(run_settings, source, check=False)  # the file's own keys and values, named with the file
    merged = _merge(copy.deepcopy(settings), parse_overrides(argv))
    model_settings = merged.pop("model", None) or {}
    arguments = build_arguments(merged, "command line" if argv else source)
    _check_output_dir(arguments.output_dir)
    return arguments, build_model_config(model_settings)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` laid over ``base`` in place, mappings merged key by key."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base
