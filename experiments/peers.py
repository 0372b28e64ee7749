"""Side-by-side timings against peers, run alternately in one process so a machine's drift weighs on both:
our full training step against one built from lightly's DINO loss and head, and the exported backbone
against a stock ``Dinov2Model``. The lightly step needs ``pip install --no-deps lightly``; a torchvision
stub stands in where torchvision cannot import beside the CPU torch wheel.
"""

from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.machinery
import statistics
import sys
from typing import Any
from unittest import mock

import torch

from experiments.timing import alternate


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Satisfies lightly's package-level torchvision imports, which the DINO loss and head never use.

    PyPI's torchvision cannot import beside this project's CPU torch wheel.
    """

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__, module.__name__ = [], spec, spec.name
        return module

    def exec_module(self, module) -> None:
        pass


def import_lightly_dino():
    """``(DINOLoss, DINOProjectionHead, update_momentum)`` from lightly (``pip install --no-deps lightly``)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken beside the CPU wheel: stub it
        for name in [key for key in sys.modules if key.startswith("torchvision")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionStub())
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    return DINOLoss, DINOProjectionHead, update_momentum


def _step_settings(model_config) -> dict:
    return dict(
        hidden=model_config.backbone_config.hidden_size,
        K=model_config.num_prototypes,
        head_hidden=model_config.head_hidden_size,
        bottleneck=model_config.head_bottleneck_size,
    )


def _make_ours(model_config, device: torch.device, compile: bool = False):
    from hf_koleo.modeling_koleo_dino import KoLeoDinoForPreTraining
    from hf_koleo.training.run_setup import compile_model

    model = KoLeoDinoForPreTraining(model_config).train().to(device)
    if compile:
        compile_model(model, scope="model")  # what --compile true --compile_scope model trains with
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step(global_crops, local_crops):
        output = model(global_crops, local_crops, teacher_temperature=0.04)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        model.update_teacher(0.996)
        return output.loss

    return step


def _make_lightly(model_config, device: torch.device, compile: bool = False):
    from transformers import Dinov2Model

    DINOLoss, DINOProjectionHead, update_momentum = import_lightly_dino()
    settings = _step_settings(model_config)
    student_backbone = Dinov2Model(model_config.backbone_config).train()
    head_sizes = (settings["hidden"], settings["head_hidden"], settings["bottleneck"], settings["K"])
    student_head, teacher_head = DINOProjectionHead(*head_sizes), DINOProjectionHead(*head_sizes).eval()
    teacher_head.load_state_dict(student_head.state_dict())  # weight_norm modules cannot be deep-copied
    teacher_backbone = copy.deepcopy(student_backbone).eval()
    for module in (student_backbone, student_head, teacher_backbone, teacher_head):
        module.to(device)
    for parameter in [*teacher_backbone.parameters(), *teacher_head.parameters()]:
        parameter.requires_grad_(False)
    criterion = DINOLoss(output_dim=settings["K"], warmup_teacher_temp_epochs=0).to(device)
    if compile:  # every module the step calls, as a user of lightly would compile them
        for module in (student_backbone, student_head, teacher_backbone, teacher_head, criterion):
            module.compile()
    parameters = [p for p in [*student_backbone.parameters(), *student_head.parameters()] if p.requires_grad]
    # The same optimiser as ours, so the comparison is about the model and loss code.
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True)

    def step(global_crops, local_crops):
        globals_list = list(global_crops.unbind(1))
        locals_list = list(local_crops.unbind(1))
        with torch.no_grad():  # the teacher batched over both global views, as ours is
            teacher_out = list(teacher_head(teacher_backbone(torch.cat(globals_list)).pooler_output).chunk(2))
        student_globals = student_backbone(torch.cat(globals_list)).pooler_output
        student_locals = student_backbone(torch.cat(locals_list)).pooler_output
        n_views = len(globals_list) + len(locals_list)
        student_out = list(student_head(torch.cat([student_globals, student_locals])).chunk(n_views))
        loss = criterion(teacher_out, student_out, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_momentum(student_backbone, teacher_backbone, 0.996)
        update_momentum(student_head, teacher_head, 0.996)
        return loss

    return step


def peer_steps(model_config, batch, global_size, local_size, n_local, device, compile=False):
    """``{"ours": step, "lightly": step}``, each a call of one training step on the same random crops."""
    torch.manual_seed(0)
    global_crops = torch.randn(batch, 2, 3, global_size, global_size, device=device)
    local_crops = torch.randn(batch, n_local, 3, local_size, local_size, device=device)
    steps = {"ours": _make_ours(model_config, device, compile), "lightly": _make_lightly(model_config, device, compile)}
    return {name: functools.partial(step, global_crops, local_crops) for name, step in steps.items()}


def compare_training_steps(
    model_config,
    batch: int,
    global_size: int,
    local_size: int,
    n_local: int,
    rounds: int = 5,
    warmup: int = 2,
    device: str | torch.device | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Our full DINO step vs a step built from lightly's DINOLoss/DINOProjectionHead, alternately.

    Same backbone (a stock ``Dinov2Model`` of ``model_config.backbone_config``), same head sizes,
    same crops, same fused AdamW, both teachers batched over the two global views; iBOT and KoLeo
    terms off so both compute the same DINO objective. On ``device`` (default: the GPU when there is
    one); every timing waits for the device. Returns img/s of each and the median per-round ratio
    (ours / lightly). ``compile``: both steps ``torch.compile``d (ours as one graph, lightly's
    modules each), the warm-up paying the compilation.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = peer_steps(model_config, batch, global_size, local_size, n_local, device, compile)
    seconds = alternate(steps, rounds, warmup, device)
    ratios = [lightly / ours for ours, lightly in zip(seconds["ours"], seconds["lightly"])]
    return {
        "batch": batch,
        **_step_settings(model_config),
        "n_local": n_local,
        "device": str(device),
        "compiled": compile,
        "ours_images_per_second": batch / statistics.median(seconds["ours"]),
        "lightly_images_per_second": batch / statistics.median(seconds["lightly"]),
        "speedup_median": statistics.median(ratios),
        "rounds": rounds,
        "seconds": seconds,
    }


def compare_feature_extraction(backbone_dir: str, batch: int = 64, rounds: int = 5) -> dict[str, Any]:
    """img/s of the exported backbone (loaded with ``AutoModel``) vs a stock ``Dinov2Model`` of its config."""
    from transformers import AutoConfig, AutoModel, Dinov2Model

    exported = AutoModel.from_pretrained(backbone_dir).eval()
    stock = Dinov2Model(AutoConfig.from_pretrained(backbone_dir)).eval()
    size = exported.config.image_size
    pixels = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        calls = {"exported": lambda: exported(pixel_values=pixels), "stock": lambda: stock(pixel_values=pixels)}
        seconds = alternate(calls, rounds, 1, torch.device("cpu"))
    return {
        "batch": batch,
        "image_size": size,
        "exported_images_per_second": batch / statistics.median(seconds["exported"]),
        "stock_images_per_second": batch / statistics.median(seconds["stock"]),
        "ratio": statistics.median(seconds["stock"]) / statistics.median(seconds["exported"]),
        "seconds": seconds,
    }
