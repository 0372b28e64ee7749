"""KoLeoDinoModel (feature backbone) and KoLeoDinoForPreTraining (student, EMA teacher, heads, losses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Model, PreTrainedModel, ViTModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_koleo_dino import KoLeoDinoConfig
from .koleo_neighbours import NeighbourCandidates, koleo_proto_with_candidates
from .losses import (
    batch_centre,
    centred_teacher_probs,
    dino_loss,
    ema_centre,
    ibot_patch_loss,
    koleo_loss,
    koleo_proto_loss,
    masked_patch_slots,
    max_masked_patches,
    sinkhorn_knopp,
    without_autocast,
)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normalised linear layer without bias (the prototypes).

    ``(n, in_features) -> (n, num_prototypes)`` logits. With ``norm_last_layer`` the prototype
    scale is frozen at 1, so the logits are cosine similarities between the normalised
    bottleneck embedding and the normalised prototypes.
    """

    def __init__(
        self,
        in_features: int,
        num_prototypes: int,
        hidden_size: int = 2048,
        bottleneck_size: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__()
        widths = [in_features] + [hidden_size] * (num_layers - 1) + [bottleneck_size]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if index < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # Weight normalisation by hand (direction ``prototypes``, magnitude ``prototype_scale``)
        # keeps plain parameter names in checkpoints and lets diagnostics read the prototypes.
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_size))
        self.prototype_scale = nn.Parameter(torch.ones(num_prototypes, 1), requires_grad=not norm_last_layer)
        if init_std is not None:  # None: the owner initialises (KoLeoDinoForPreTraining's post_init)
            self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Truncated-normal weights and prototypes (std ``std``), zero biases, unit prototype scale:
        ready to train on its own (``KoLeoDinoForPreTraining`` initialises it the same way)."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                init.trunc_normal_(module.weight, mean=0.0, std=std)
                init.zeros_(module.bias)
        init.trunc_normal_(self.prototypes, mean=0.0, std=std)
        init.ones_(self.prototype_scale)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """``(n, in_features) -> (n, bottleneck_size)`` L2-normalised embeddings."""
        return F.normalize(self.mlp(features), p=2, dim=-1)

    def prototype_vectors(self) -> torch.Tensor:
        """``(num_prototypes, bottleneck_size)`` prototype directions (not normalised)."""
        return self.prototypes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.prototype_scale * F.normalize(self.prototypes, p=2, dim=-1)
        return F.linear(self.embed(features), weight)


def build_backbone(backbone_config) -> PreTrainedModel:
    """A stock transformers ViT: ``Dinov2Model`` or ``ViTModel`` (with a mask token, no pooler)."""
    if backbone_config.model_type == "dinov2":
        return Dinov2Model(backbone_config)
    return ViTModel(backbone_config, add_pooling_layer=False, use_mask_token=True)


class KoLeoDinoPreTrainedModel(PreTrainedModel):
    config_class = KoLeoDinoConfig
    config: KoLeoDinoConfig
    base_model_prefix = "teacher"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Dinov2Layer", "ViTLayer", "DINOHead"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DINOHead):
            init.trunc_normal_(module.prototypes, mean=0.0, std=std)
            init.ones_(module.prototype_scale)
        elif isinstance(module, KoLeoDinoForPreTraining):
            init.zeros_(module.cls_centre)
            init.zeros_(module.patch_centre)


class KoLeoDinoModel(KoLeoDinoPreTrainedModel):
    """The feature backbone: ``pixel_values (n, C, H, W)`` -> tokens and the CLS feature.

    ``KoLeoDinoModel.from_pretrained`` on a :class:`KoLeoDinoForPreTraining` checkpoint loads the
    teacher backbone (the one DINO-family methods evaluate).
    """

    # A pretraining checkpoint also holds the student, the heads and the centres: expected, not reported.
    _keys_to_ignore_on_load_unexpected = [
        r"^student\.",
        r"^(student|teacher)_(patch_)?head\.",
        r"_centre$",
        r"^koleo_neighbours\.",
    ]

    def __init__(self, config: KoLeoDinoConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """
        Args:
            pixel_values: ``(n, C, H, W)``; any size divisible by the patch size (position
                embeddings are interpolated).
            bool_masked_pos: ``(n, n_patches)`` bool, patches replaced by the mask token.

        Returns:
            ``last_hidden_state`` ``(n, 1 + n_patches, hidden)`` and ``pooler_output`` (the CLS
            token) ``(n, hidden)``.
        """
        if self.config.backbone_config.model_type == "vit":
            kwargs["interpolate_pos_encoding"] = True
        outputs = self.backbone(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=outputs.last_hidden_state[:, 0],
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@dataclass
class KoLeoDinoPreTrainingOutput(ModelOutput):
    """Output of :class:`KoLeoDinoForPreTraining`; every loss is a scalar tensor, 0 when off.

    Args:
        loss: the weighted total that is back-propagated.
        dino_loss: CLS cross-entropy between teacher global views and the other student views.
        ibot_loss: masked-patch cross-entropy (unweighted).
        koleo_proto_loss: KoLeo-proto on the student prototypes (unweighted).
        koleo_loss: DINOv2 KoLeo on student CLS features (unweighted).
        koleo_proto_exact: fraction of prototypes whose KoLeo-proto neighbour is certified the exact
            nearest (1 for the exact search; see :mod:`hf_koleo.koleo_neighbours`).
        teacher_cls_assignments: ``(batch, n_global)`` arg-max prototype of each teacher view.
        teacher_entropy: mean entropy (nats) of the teacher CLS distributions.
    """

    loss: torch.FloatTensor | None = None
    dino_loss: torch.FloatTensor | None = None
    ibot_loss: torch.FloatTensor | None = None
    koleo_proto_loss: torch.FloatTensor | None = None
    koleo_loss: torch.FloatTensor | None = None
    koleo_proto_exact: torch.FloatTensor | None = None
    teacher_cls_assignments: torch.LongTensor | None = None
    teacher_entropy: torch.FloatTensor | None = None


def _views_first(crops: torch.Tensor) -> torch.Tensor:
    """``(batch, n_views, ...) -> (n_views * batch, ...)``, view-major."""
    return crops.transpose(0, 1).reshape(-1, *crops.shape[2:])


def _gather_slots(tokens: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """``(n, 1 + n_patches, D)`` tokens, ``(n_slots,)`` flat patch indices -> ``(n_slots, D)`` patch tokens."""
    patches = tokens[:, 1:].reshape(-1, tokens.shape[-1])
    return patches.index_select(0, slot_index)


def _batch_first(rows: torch.Tensor, n_views: int) -> torch.Tensor:
    """``(n_views * batch, K) -> (batch, n_views, K)``; inverse of :func:`_views_first`."""
    return rows.reshape(n_views, -1, rows.shape[-1]).transpose(0, 1)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter, in place
    (one foreach kernel for all of them: ``teacher += (1 - momentum) * (student - teacher)``); the
    modules must have the same parameters in the same order."""
    teacher_parameters = list(teacher.parameters())
    student_parameters = [parameter.detach() for parameter in student.parameters()]
    torch._foreach_lerp_(teacher_parameters, student_parameters, 1.0 - momentum)


class KoLeoDinoForPreTraining(KoLeoDinoPreTrainedModel):
    """Student and EMA teacher (backbone + DINO head + optional patch head) with the DINO-family losses.

    The teacher never receives gradients and stays in eval mode (no drop path); it moves only
    through :meth:`update_teacher`. The centre buffers live here and are saved with the model.
    """

    def __init__(self, config: KoLeoDinoConfig) -> None:
        super().__init__(config)
        self.student = KoLeoDinoModel(config)
        self.student_head = self._build_head(config.num_prototypes)
        self.student_patch_head = None if config.shared_head else self._build_head(config.num_patch_prototypes)
        self.teacher = KoLeoDinoModel(config)
        self.teacher_head = self._build_head(config.num_prototypes)
        self.teacher_patch_head = None if config.shared_head else self._build_head(config.num_patch_prototypes)
        self.register_buffer("cls_centre", torch.zeros(1, config.num_prototypes))
        self.register_buffer("patch_centre", torch.zeros(1, config.num_patch_prototypes))
        self.koleo_neighbours = None
        if config.koleo_proto_weight > 0 and config.koleo_proto_search == "candidates":
            self.koleo_neighbours = nn.ModuleList(
                NeighbourCandidates.from_config(config, *head.prototypes.shape) for head in self._koleo_proto_heads()
            )
        for parameter in self._branch_modules("teacher").parameters():
            parameter.requires_grad_(False)
        self._freeze_unused_student_parameters()
        self.post_init()

    def _freeze_unused_student_parameters(self) -> None:
        """Parameters no loss reaches get no gradient (DDP would otherwise wait for them)."""
        if self.config.ibot_loss_weight > 0:
            return
        mask_token = getattr(self.student.backbone.embeddings, "mask_token", None)
        if mask_token is not None:
            mask_token.requires_grad_(False)
        if self.student_patch_head is not None and self.config.koleo_proto_on == "cls":
            self.student_patch_head.requires_grad_(False)

    def _build_head(self, num_prototypes: int) -> DINOHead:
        config = self.config
        return DINOHead(
            config.backbone_config.hidden_size,
            num_prototypes,
            config.head_hidden_size,
            config.head_bottleneck_size,
            config.head_num_layers,
            config.norm_last_layer,
            init_std=None,  # post_init initialises every head (with config.initializer_range)
        )

    def branch(self, name: str) -> tuple[KoLeoDinoModel, DINOHead, DINOHead | None]:
        """``(backbone, head, separate patch head or None)`` of the ``"student"`` or the ``"teacher"``."""
        if name == "student":
            return self.student, self.student_head, self.student_patch_head
        if name == "teacher":
            return self.teacher, self.teacher_head, self.teacher_patch_head
        raise ValueError(f"branch must be 'student' or 'teacher', got {name!r}")

    def _branch_modules(self, name: str) -> nn.ModuleList:
        return nn.ModuleList([module for module in self.branch(name) if module is not None])

    def post_init(self) -> None:
        super().post_init()
        if not any(parameter.is_meta for parameter in self.parameters()):
            self.copy_student_to_teacher()
        # A module starts in train mode: without this a fresh model's teacher would run drop path and
        # dropout until someone called train() or eval() (the trainer never does).
        self.train(self.training)

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        """Make the teacher an exact copy of the student (DINO's initialisation)."""
        self._branch_modules("teacher").load_state_dict(self._branch_modules("student").state_dict())

    def train(self, mode: bool = True) -> KoLeoDinoForPreTraining:
        super().train(mode)
        self._branch_modules("teacher").eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step: ``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
        ema_update_(self._branch_modules("teacher"), self._branch_modules("student"), momentum)

    def prototype_heads(self, branch: str = "teacher") -> dict[str, DINOHead]:
        """``{"cls": head}`` plus ``"patch"`` when the patch head is separate."""
        _, head, patch_head = self.branch(branch)
        return {"cls": head} if patch_head is None else {"cls": head, "patch": patch_head}

    @torch.no_grad()
    def head_embeddings(self, pixel_values: torch.Tensor, branch: str = "teacher") -> torch.Tensor:
        """``(n, C, H, W) -> (n, head_bottleneck_size)`` normalised CLS embeddings in prototype space."""
        backbone, head, _ = self.branch(branch)
        return head.embed(backbone(pixel_values).pooler_output)

    def _teacher_probs(
        self,
        teacher_logits: torch.Tensor,
        centre: torch.Tensor,
        teacher_temperature: float | torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Centred, sharpened teacher distributions; ``valid`` ``(n,)`` marks the rows that count.

        ``centre`` is the head's EMA centre buffer; in training it is updated in place (the same
        tensor every step: a compiled graph or a CUDA graph keeps reading the live buffer).
        """
        if self.config.centring == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temperature, self.config.sinkhorn_iterations, valid)
        probs = centred_teacher_probs(teacher_logits, centre, teacher_temperature)
        if self.training:
            mean, count = batch_centre(teacher_logits, valid)
            centre.copy_(ema_centre(centre, mean, self.config.centre_momentum, count))
        return probs

    def patch_head(self, branch: str = "teacher") -> DINOHead:
        """The head of the iBOT patch tokens: the separate patch head, or the shared DINO head."""
        _, head, patch_head = self.branch(branch)
        return head if patch_head is None else patch_head

    def _check_inputs(self, global_crops, local_crops, masks) -> None:
        if global_crops.dim() != 5:
            raise ValueError(f"global_crops must be (batch, n_global, C, H, W), got shape {tuple(global_crops.shape)}")
        batch, n_global = global_crops.shape[:2]
        if local_crops is not None and (local_crops.dim() != 5 or local_crops.shape[0] != batch):
            raise ValueError(
                f"local_crops must be (batch={batch}, n_local, C, h, w), got shape {tuple(local_crops.shape)}"
            )
        n_local = 0 if local_crops is None else local_crops.shape[1]
        if n_global + n_local < 2 or n_global < 1:
            raise ValueError("DINO needs at least two views: 2 global crops, or 1 global plus local crops")
        if self.config.ibot_loss_weight > 0 and masks is None:
            raise ValueError("ibot_loss_weight > 0 needs masks (batch, n_global, n_patches)")
        if masks is not None and masks.shape[:2] != (batch, n_global):
            raise ValueError(f"masks must be (batch={batch}, n_global={n_global}, n_patches), got {tuple(masks.shape)}")
        if self.config.koleo_weight > 0 and batch < 2:
            raise ValueError("koleo_weight > 0 needs a batch of at least 2 images")

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        teacher_temperature: float | torch.Tensor = 0.04,
        mask_slots: int | None = None,
        refresh_neighbours: str | bool = True,
    ) -> KoLeoDinoPreTrainingOutput:
        """One DINO / iBOT / KoLeo-proto loss evaluation.

        Args:
            global_crops: ``(batch, n_global, C, H, W)``, seen by teacher and student.
            local_crops: ``(batch, n_local, C, h, w)``, student only; any resolution divisible by
                the patch size.
            masks: ``(batch, n_global, n_patches)`` bool; masked patches of the student's global
                crops (iBOT). The teacher always sees the unmasked crops.
            teacher_temperature: sharpening temperature of the teacher (warmed up by the trainer), a
                float or a 0-d tensor on the model's device. Under ``torch.compile`` pass the tensor:
                a float is a constant of the graph, so a new value recompiles it (and, once dynamo
                makes it dynamic, arrives as a host tensor, which turns CUDA graphs off).
            mask_slots: masked patch tokens the iBOT heads process for the whole batch (a static
                shape); default: every crop's maximum, ``ceil(mask_ratio_min_max[1] * n_patches)``.
                The data pipeline passes a tighter bound (``MaskSettings.slot_budget``).
            refresh_neighbours: with ``koleo_proto_search="candidates"``, ``"full"`` (or ``True``) redoes
                the exact neighbour search this step, ``"update"`` renews the candidate lists from the
                candidates' candidates, ``"none"`` (or ``False``) keeps them; the trainer asks as
                :func:`hf_koleo.koleo_neighbours.neighbour_refresh` says.
        """
        self._check_inputs(global_crops, local_crops, masks)
        config = self.config
        n_global = global_crops.shape[1]
        global_views = _views_first(global_crops)
        view_masks = None if masks is None else _views_first(masks).bool()
        zero = global_crops.new_zeros((), dtype=torch.float32)
        use_ibot = config.ibot_loss_weight > 0
        # The losses, the centres and the arg-max run in fp32 even under bf16 autocast: the heads' logits
        # are cast up and autocast is off around everything computed from them (a bf16 matrix product
        # would quantise a loss near ln K to steps of 0.0625 and break arg-max ties by index).
        fp32 = without_autocast(global_crops.device)

        if use_ibot:
            # A fixed number of patch slots (static shapes, no host sync); empty slots weigh 0.
            if mask_slots is None:
                mask_slots = view_masks.shape[0] * max_masked_patches(view_masks.shape[1], config.mask_ratio_min_max[1])
            slot_index, slot_weights = masked_patch_slots(view_masks, mask_slots)
            slot_valid = slot_weights > 0

        with torch.no_grad():
            teacher_tokens = self.teacher(global_views).last_hidden_state
            teacher_cls_logits = self.teacher_head(teacher_tokens[:, 0]).float()
            with fp32:
                teacher_cls_probs = self._teacher_probs(teacher_cls_logits, self.cls_centre, teacher_temperature)
            if use_ibot:
                teacher_patch_logits = self.patch_head("teacher")(_gather_slots(teacher_tokens, slot_index)).float()
                with fp32:
                    teacher_patch_probs = self._teacher_probs(
                        teacher_patch_logits, self.patch_centre, teacher_temperature, slot_valid
                    )

        student_globals = self.student(global_views, bool_masked_pos=view_masks if use_ibot else None)
        student_cls = student_globals.pooler_output
        if local_crops is not None and local_crops.shape[1] > 0:
            student_cls = torch.cat([student_cls, self.student(_views_first(local_crops)).pooler_output])
        n_student = student_cls.shape[0] // global_crops.shape[0]
        student_cls_logits = self.student_head(student_cls).float()
        with fp32:
            loss_dino = dino_loss(
                _batch_first(student_cls_logits, n_student),
                _batch_first(teacher_cls_probs, n_global),
                config.student_temperature,
            )

        loss_ibot = zero
        if use_ibot:
            student_patch_logits = self.patch_head("student")(
                _gather_slots(student_globals.last_hidden_state, slot_index)
            ).float()
            with fp32:
                loss_ibot = ibot_patch_loss(
                    student_patch_logits, teacher_patch_probs, slot_weights, config.student_temperature
                )

        loss_koleo_proto, koleo_proto_exact = zero, zero + 1.0
        if config.koleo_proto_weight > 0:
            losses, exact = [], []
            for index, head in enumerate(self._koleo_proto_heads()):
                loss, certified = self._koleo_proto(head, index, refresh_neighbours)
                losses.append(loss)
                exact.append(certified)
            loss_koleo_proto, koleo_proto_exact = torch.stack(losses).mean(), torch.stack(exact).mean()

        loss_koleo = zero
        if config.koleo_weight > 0:
            global_cls = student_globals.pooler_output.reshape(n_global, -1, student_cls.shape[-1])
            loss_koleo = torch.stack([koleo_loss(view_cls) for view_cls in global_cls]).sum()

        loss = (
            loss_dino
            + config.ibot_loss_weight * loss_ibot
            + config.koleo_proto_weight * loss_koleo_proto
            + config.koleo_weight * loss_koleo
        )
        teacher_entropy = -(teacher_cls_probs * teacher_cls_probs.clamp(min=1e-30).log()).sum(-1).mean()
        return KoLeoDinoPreTrainingOutput(
            loss=loss,
            dino_loss=loss_dino,
            ibot_loss=loss_ibot,
            koleo_proto_loss=loss_koleo_proto,
            koleo_loss=loss_koleo,
            koleo_proto_exact=koleo_proto_exact,
            teacher_cls_assignments=teacher_cls_logits.argmax(dim=-1).reshape(n_global, -1).t(),
            teacher_entropy=teacher_entropy,
        )

    def _koleo_proto(self, head: DINOHead, index: int, refresh: str | bool) -> tuple[torch.Tensor, torch.Tensor]:
        """KoLeo-proto on one head's prototypes, and the fraction of certified-exact neighbours."""
        if self.koleo_neighbours is None:
            return koleo_proto_loss(head.prototypes), head.prototypes.new_ones((), dtype=torch.float32)
        return koleo_proto_with_candidates(head.prototypes, self.koleo_neighbours[index], refresh)

    def _koleo_proto_heads(self) -> list[DINOHead]:
        patch_head = self.patch_head("student")
        heads = {
            "cls": [self.student_head],
            "patch": [patch_head],
            "both": [self.student_head] if patch_head is self.student_head else [self.student_head, patch_head],
        }
        return heads[self.config.koleo_proto_on]
