"""KoLeoDinoConfig: the backbone plus every DINO / iBOT / KoLeo-proto model hyper-parameter."""

from __future__ import annotations

from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

SUPPORTED_BACKBONES = ("dinov2", "vit")
CENTRING_METHODS = ("ema", "sinkhorn_knopp")
KOLEO_PROTO_TARGETS = ("cls", "patch", "both")
KOLEO_PROTO_SEARCHES = ("exact", "candidates")
REFRESH_DTYPES = ("float32", "bfloat16", "auto")


class KoLeoDinoConfig(PreTrainedConfig):
    r"""Configuration of :class:`KoLeoDinoModel` and :class:`KoLeoDinoForPreTraining`.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            The ViT backbone: a `Dinov2Config` (default: ``Dinov2Config()``, ViT-B/14) or a
            `ViTConfig`, or a dict of either with its ``model_type``.
        num_prototypes (`int`, *optional*, defaults to 65536):
            K, the number of prototypes (rows of the weight-normalised last layer) of the DINO
            head. 65536 for DINO, 8192 for iBOT.
        head_hidden_size (`int`, *optional*, defaults to 2048):
            Width of the hidden layers of the head MLP.
        head_bottleneck_size (`int`, *optional*, defaults to 256):
            Output width of the head MLP; the prototypes live in this space.
        head_num_layers (`int`, *optional*, defaults to 3):
            Linear layers in the head MLP (GELU between them).
        norm_last_layer (`bool`, *optional*, defaults to `True`):
            Fix the prototype scale to 1 (logits are cosine similarities), as DINO does for ViTs.
        shared_head (`bool`, *optional*, defaults to `True`):
            Whether the iBOT patch tokens use the DINO (CLS) head. If `False`, a separate patch
            head with `num_patch_prototypes` prototypes is built.
        num_patch_prototypes (`int`, *optional*):
            K of the separate patch head; defaults to `num_prototypes`. Ignored when `shared_head`.
        student_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the student softmax.
        centring (`str`, *optional*, defaults to `"ema"`):
            Teacher centring: `"ema"` (subtract an EMA of teacher logits, DINO) or
            `"sinkhorn_knopp"` (DINOv2).
        centre_momentum (`float`, *optional*, defaults to 0.9):
            Momentum of the EMA centre, in [0, 1).
        sinkhorn_iterations (`int`, *optional*, defaults to 3):
            Sinkhorn-Knopp iterations.
        ibot_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the iBOT masked-patch loss; 0 trains plain DINO. When > 0, `forward` needs
            `masks`.
        mask_ratio_min_max (`tuple[float, float]`, *optional*, defaults to `(0.1, 0.5)`):
            Range of the fraction of patches masked in a masked global crop.
        mask_probability (`float`, *optional*, defaults to 0.5):
            Probability that a global crop is masked at all.
        koleo_proto_weight (`float`, *optional*, defaults to 0.0):
            Weight of the KoLeo-proto regulariser on the prototypes; 0 disables it.
        koleo_proto_on (`str`, *optional*, defaults to `"cls"`):
            Which prototypes KoLeo-proto spreads: `"cls"`, `"patch"` (the separate patch head,
            or the shared head) or `"both"` (mean of the two; the same as `"cls"` with a shared
            head).
        koleo_proto_search (`str`, *optional*, defaults to `"exact"`):
            How KoLeo-proto finds each prototype's nearest neighbour: `"exact"` (a blocked search
            over all K² pairs every step) or `"candidates"` (that search every
            `koleo_proto_refresh_every` steps, keeping each prototype's `koleo_proto_candidates`
            nearest; the steps between rank only those; see `hf_koleo.koleo_neighbours`).
        koleo_proto_candidates (`int`, *optional*, defaults to 16):
            Candidates kept per prototype by the `"candidates"` search.
        koleo_proto_refresh_every (`int`, *optional*, defaults to 10):
            Steps between two full searches of the `"candidates"` search.
        koleo_proto_update_every (`int`, *optional*, defaults to 0):
            With the `"candidates"` search, steps between two cheap updates of the candidate lists
            from the candidates' own candidates (K x (m + m²) distances instead of K²), between
            the full searches; 0 turns them off (on real runs they hardly raise the exact fraction).
        koleo_proto_refresh_dtype (`str`, *optional*, defaults to `"float32"`):
            Precision of that full search: `"float32"`, `"bfloat16"` (1.7x faster where the
            hardware multiplies bf16: AVX512-BF16/AMX CPUs, GPUs; 1.7-2.9x slower on CPUs without
            it), or `"auto"` (bfloat16 where the hardware multiplies it, float32 elsewhere). The
            steps between still rank in float32.
        koleo_proto_movers (`int`, *optional*, defaults to 0):
            With the `"candidates"` search, the prototypes that moved most since the last full
            search are compared with every prototype each step (a K x movers product): fewer stale
            choices, and a tighter certificate of exactness (`koleo_proto_exact`).
        koleo_proto_repair (`int`, *optional*, defaults to 0):
            With the `"candidates"` search, the prototypes whose choice is least certain get an exact
            search of their own each step (a repair x K product).
        koleo_weight (`float`, *optional*, defaults to 0.0):
            Weight of DINOv2's KoLeo regulariser on the student CLS features within a batch.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the truncated normal initialisation of the head.

    Example:

    ```python
    >>> from hf_koleo import KoLeoDinoConfig, KoLeoDinoForPreTraining
    >>> config = KoLeoDinoConfig(
    ...     backbone_config={"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 2,
    ...                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    ...     num_prototypes=128, head_hidden_size=64, head_bottleneck_size=16,
    ...     koleo_proto_weight=0.1,
    ... )
    >>> model = KoLeoDinoForPreTraining(config)
    ```
    """

    model_type = "koleo_dino"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2"),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    num_prototypes: int = 65536
    head_hidden_size: int = 2048
    head_bottleneck_size: int = 256
    head_num_layers: int = 3
    norm_last_layer: bool = True
    shared_head: bool = True
    num_patch_prototypes: int | None = None
    student_temperature: float = 0.1
    centring: str = "ema"
    centre_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    ibot_loss_weight: float = 0.0
    mask_ratio_min_max: list[float] | tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    koleo_proto_weight: float = 0.0
    koleo_proto_on: str = "cls"
    koleo_proto_search: str = "exact"
    koleo_proto_candidates: int = 16
    koleo_proto_refresh_every: int = 10
    koleo_proto_update_every: int = 0
    koleo_proto_refresh_dtype: str = "float32"
    koleo_proto_movers: int = 0
    koleo_proto_repair: int = 0
    koleo_weight: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        _require(
            "backbone_config",
            self.backbone_config,
            self.backbone_config is None or isinstance(self.backbone_config, (dict, PreTrainedConfig)),
            "a mapping of backbone settings (with its model_type) or a PreTrainedConfig",
        )
        if isinstance(self.backbone_config, dict) and "model_type" not in self.backbone_config:
            self.backbone_config = {"model_type": "dinov2", **self.backbone_config}
        try:
            super().__post_init__(**kwargs)
        except (StrictDataclassError, KeyError, TypeError) as error:
            raise ValueError(f"KoLeoDinoConfig.backbone_config is invalid: {error}") from error
        if self.num_patch_prototypes is None:
            self.num_patch_prototypes = self.num_prototypes
        mask_range = self.mask_ratio_min_max
        _require(
            "mask_ratio_min_max",
            mask_range,
            isinstance(mask_range, (list, tuple)) and all(_is_number(value) for value in mask_range),
            "two numbers 0 <= min <= max < 1",
        )
        self.mask_ratio_min_max = tuple(float(value) for value in mask_range)
        self._check_values()

    def _check_values(self) -> None:
        backbone_type = getattr(self.backbone_config, "model_type", None)
        _require(
            "backbone_config.model_type",
            backbone_type,
            backbone_type in SUPPORTED_BACKBONES,
            f"one of {SUPPORTED_BACKBONES}",
        )
        mask_range = self.mask_ratio_min_max
        rules = {
            "num_prototypes": (_is_int_at_least(2), "an integer >= 2"),
            "num_patch_prototypes": (_is_int_at_least(2), "an integer >= 2"),
            "head_hidden_size": (_is_int_at_least(1), "an integer >= 1"),
            "head_bottleneck_size": (_is_int_at_least(1), "an integer >= 1"),
            "head_num_layers": (_is_int_at_least(1), "an integer >= 1"),
            "sinkhorn_iterations": (_is_int_at_least(1), "an integer >= 1"),
            "norm_last_layer": (lambda value: isinstance(value, bool), "True or False"),
            "shared_head": (lambda value: isinstance(value, bool), "True or False"),
            "student_temperature": (lambda value: _is_number(value) and value > 0, "a number > 0"),
            "centring": (lambda value: value in CENTRING_METHODS, f"one of {CENTRING_METHODS}"),
            "centre_momentum": (lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)"),
            "ibot_loss_weight": (_is_non_negative, "a number >= 0"),
            "koleo_proto_weight": (_is_non_negative, "a number >= 0"),
            "koleo_weight": (_is_non_negative, "a number >= 0"),
            "initializer_range": (_is_non_negative, "a number >= 0"),
            "mask_probability": (lambda value: _is_number(value) and 0 <= value <= 1, "a number in [0, 1]"),
            "koleo_proto_on": (lambda value: value in KOLEO_PROTO_TARGETS, f"one of {KOLEO_PROTO_TARGETS}"),
            "koleo_proto_search": (lambda value: value in KOLEO_PROTO_SEARCHES, f"one of {KOLEO_PROTO_SEARCHES}"),
            "koleo_proto_candidates": (_is_int_at_least(1), "an integer >= 1"),
            "koleo_proto_refresh_every": (_is_int_at_least(1), "an integer >= 1"),
            "koleo_proto_update_every": (_is_int_at_least(0), "an integer >= 0"),
            "koleo_proto_refresh_dtype": (lambda value: value in REFRESH_DTYPES, f"one of {REFRESH_DTYPES}"),
            "koleo_proto_movers": (_is_int_at_least(0), "an integer >= 0"),
            "koleo_proto_repair": (_is_int_at_least(0), "an integer >= 0"),
        }
        for name, (is_valid, allowed) in rules.items():
            _require(name, getattr(self, name), is_valid(getattr(self, name)), allowed)
        _require(
            "mask_ratio_min_max",
            mask_range,
            len(mask_range) == 2 and 0 <= mask_range[0] <= mask_range[1] < 1,
            "two numbers 0 <= min <= max < 1",
        )
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that are each valid but together build something that cannot train."""
        hidden_size = getattr(self.backbone_config, "hidden_size", None)
        num_heads = getattr(self.backbone_config, "num_attention_heads", None)
        if isinstance(hidden_size, int) and isinstance(num_heads, int) and num_heads > 0 and hidden_size % num_heads:
            raise ValueError(
                f"KoLeoDinoConfig.backbone_config.hidden_size ({hidden_size}) must be divisible by "
                f"backbone_config.num_attention_heads ({num_heads})"
            )
        if not self.shared_head and self.ibot_loss_weight == 0 and self.koleo_proto_on in ("patch", "both"):
            raise ValueError(
                f"KoLeoDinoConfig.shared_head=False with ibot_loss_weight=0 and koleo_proto_on={self.koleo_proto_on!r} "
                "builds a patch head that no loss trains: set ibot_loss_weight > 0, shared_head=True or "
                "koleo_proto_on='cls'"
            )


def _is_int_at_least(minimum: int):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_non_negative(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _require(name: str, value: Any, condition: bool, allowed: str) -> None:
    if not condition:
        raise ValueError(f"KoLeoDinoConfig.{name} must be {allowed}, got {value!r}")
