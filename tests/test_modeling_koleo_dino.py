import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModel

from hf_koleo import DINOHead, KoLeoDinoForPreTraining, KoLeoDinoModel


def crops(batch=3, n_global=2, n_local=2, size=16, local_size=8):
    return torch.randn(batch, n_global, 3, size, size), torch.randn(batch, n_local, 3, local_size, local_size)


def random_masks(batch=3, n_global=2, n_patches=16):
    masks = torch.rand(batch, n_global, n_patches) < 0.4
    masks[:, :, 0] = True
    return masks


def test_forward_returns_every_loss_term_and_zero_for_disabled_terms():
    model = KoLeoDinoForPreTraining(tiny_config()).train()
    global_crops, local_crops = crops()
    output = model(global_crops, local_crops)
    for name in ("loss", "dino_loss", "ibot_loss", "koleo_proto_loss", "koleo_loss"):
        assert output[name].dim() == 0
    assert output.ibot_loss == 0 and output.koleo_proto_loss == 0 and output.koleo_loss == 0
    assert torch.allclose(output.loss, output.dino_loss)
    assert output.teacher_cls_assignments.shape == (3, 2)


def test_total_loss_is_the_weighted_sum_of_the_terms():
    config = tiny_config(ibot_loss_weight=0.5, koleo_proto_weight=0.2, koleo_weight=0.1, shared_head=False)
    model = KoLeoDinoForPreTraining(config).train()
    global_crops, local_crops = crops()
    output = model(global_crops, local_crops, masks=random_masks())
    assert all(output[name] > 0 for name in ("dino_loss", "ibot_loss", "koleo_proto_loss", "koleo_loss"))
    expected = output.dino_loss + 0.5 * output.ibot_loss + 0.2 * output.koleo_proto_loss + 0.1 * output.koleo_loss
    assert torch.allclose(output.loss, expected)


def test_teacher_receives_no_gradient_and_starts_as_a_copy_of_the_student():
    model = KoLeoDinoForPreTraining(tiny_config(ibot_loss_weight=1.0, koleo_proto_weight=0.1)).train()
    for (name, student), (_, teacher) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert torch.equal(student, teacher), name
    global_crops, local_crops = crops()
    model(global_crops, local_crops, masks=random_masks()).loss.backward()
    assert all(parameter.grad is None for parameter in model.teacher.parameters())
    assert all(parameter.grad is None for parameter in model.teacher_head.parameters())
    assert model.student_head.prototypes.grad.abs().sum() > 0
    assert model.student.backbone.embeddings.mask_token.grad.abs().sum() > 0


def test_teacher_stays_in_eval_mode_so_it_never_drops_paths():
    model = KoLeoDinoForPreTraining(tiny_config()).train()
    assert model.student.training and not model.teacher.training and not model.teacher_head.training


def test_the_teacher_is_deterministic_in_every_state_the_model_is_built_or_loaded_in(tmp_path):
    # drop path 0.5 and dropout 0.3: any teacher module left in train mode makes two calls differ.
    backbone = {**tiny_config().backbone_config.to_dict(), "drop_path_rate": 0.5, "hidden_dropout_prob": 0.3}
    fresh = KoLeoDinoForPreTraining(tiny_config(backbone_config=backbone))  # the trainer never calls train()
    fresh.save_pretrained(tmp_path / "model")
    pixels = torch.randn(4, 3, 16, 16)

    def teacher_logits(model):
        with torch.no_grad():
            return model.teacher_head(model.teacher(pixels).pooler_output)

    states = {
        "fresh": fresh,
        "train()": KoLeoDinoForPreTraining(tiny_config(backbone_config=backbone)).train(),
        "eval().train()": KoLeoDinoForPreTraining(tiny_config(backbone_config=backbone)).eval().train(),
        "from_pretrained": KoLeoDinoForPreTraining.from_pretrained(tmp_path / "model"),
        "from_pretrained().train()": KoLeoDinoForPreTraining.from_pretrained(tmp_path / "model").train(),
    }
    for name, model in states.items():
        assert torch.equal(teacher_logits(model), teacher_logits(model)), name
    assert fresh.student.training  # the student does train with drop path
    with torch.no_grad():
        assert not torch.equal(fresh.student(pixels).pooler_output, fresh.student(pixels).pooler_output)


class OperatorLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_ema_update_is_exact():
    model = KoLeoDinoForPreTraining(tiny_config())
    with torch.no_grad():
        for parameter in model.student.parameters():
            parameter.add_(torch.randn_like(parameter))
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    with OperatorLog() as log:
        model.update_teacher(0.9)
    assert [name for name in log.names if name != "aten::detach"] == ["aten::_foreach_lerp_"]  # one kernel
    for before, student, after in zip(teacher_before, model.student.parameters(), model.teacher.parameters()):
        assert torch.allclose(after, 0.9 * before + 0.1 * student, rtol=0, atol=1e-6)
    model.update_teacher(0.0)
    assert all(torch.equal(s, t) for s, t in zip(model.student.parameters(), model.teacher.parameters()))
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


def test_ema_centre_moves_towards_batch_mean_only_in_training():
    model = KoLeoDinoForPreTraining(tiny_config())
    global_crops, local_crops = crops()
    model.eval()(global_crops, local_crops)
    assert model.cls_centre.abs().sum() == 0
    buffer = model.cls_centre
    model.train()(global_crops, local_crops)
    assert model.cls_centre is buffer  # updated in place: a compiled or CUDA graph keeps reading the live buffer
    with torch.no_grad():
        teacher_logits = model.teacher_head(model.teacher(global_crops.transpose(0, 1).flatten(0, 1)).pooler_output)
    assert torch.allclose(model.cls_centre, 0.1 * teacher_logits.mean(dim=0, keepdim=True), atol=1e-6)


def test_sinkhorn_knopp_centring_runs_without_touching_the_centre():
    model = KoLeoDinoForPreTraining(tiny_config(centring="sinkhorn_knopp")).train()
    global_crops, local_crops = crops()
    output = model(global_crops, local_crops)
    assert torch.isfinite(output.loss) and model.cls_centre.abs().sum() == 0


def test_local_crops_at_another_resolution_and_globals_only():
    model = KoLeoDinoForPreTraining(tiny_config()).train()
    global_crops, _ = crops()
    for local_size in (8, 12):
        assert torch.isfinite(model(global_crops, torch.randn(3, 4, 3, local_size, local_size)).loss)
    assert torch.isfinite(model(global_crops).loss)


def test_vit_backbone_trains_with_masks_and_local_crops():
    config = tiny_config(
        backbone_config={
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 16,
            "patch_size": 4,
        },
        ibot_loss_weight=1.0,
    )
    model = KoLeoDinoForPreTraining(config).train()
    global_crops, local_crops = crops()
    output = model(global_crops, local_crops, masks=random_masks())
    output.loss.backward()
    assert output.ibot_loss > 0 and torch.isfinite(output.loss)


def test_invalid_inputs_raise_clear_errors():
    model = KoLeoDinoForPreTraining(tiny_config(ibot_loss_weight=1.0))
    global_crops, local_crops = crops()
    with pytest.raises(ValueError, match="needs masks"):
        model(global_crops, local_crops)
    with pytest.raises(ValueError, match=r"global_crops must be \(batch"):
        model(global_crops[:, 0], masks=random_masks())
    with pytest.raises(ValueError, match="at least two views"):
        model(global_crops[:, :1], masks=random_masks(n_global=1))


def test_save_and_load_round_trip_reproduces_outputs(tmp_path):
    model = KoLeoDinoForPreTraining(tiny_config(ibot_loss_weight=1.0, shared_head=False)).train()
    global_crops, local_crops = crops()
    masks = random_masks()
    model(global_crops, local_crops, masks=masks)  # moves the centres away from zero
    model.update_teacher(0.5)
    model.eval()
    expected = model(global_crops, local_crops, masks=masks)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = KoLeoDinoForPreTraining.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.cls_centre, model.cls_centre) and loaded.cls_centre.abs().sum() > 0
    actual = loaded(global_crops, local_crops, masks=masks)
    for name in ("loss", "dino_loss", "ibot_loss"):
        assert torch.allclose(actual[name], expected[name], atol=1e-6), name


def test_auto_model_loads_the_teacher_backbone_from_a_pretraining_checkpoint(tmp_path):
    model = KoLeoDinoForPreTraining(tiny_config())
    with torch.no_grad():
        for parameter in model.student.parameters():
            parameter.add_(1.0)  # student and teacher now differ
    model.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert isinstance(backbone, KoLeoDinoModel)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(backbone(pixels).pooler_output, model.teacher(pixels).pooler_output, atol=1e-6)


def test_gradient_checkpointing_keeps_the_loss_and_gradients():
    model = KoLeoDinoForPreTraining(tiny_config(centring="sinkhorn_knopp")).train()  # stateless centring
    global_crops, local_crops = crops()
    reference = model(global_crops, local_crops)
    reference.loss.backward()
    reference_grad = model.student_head.prototypes.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    attention_calls = []
    model.student.backbone.encoder.layer[0].attention.register_forward_hook(lambda *_: attention_calls.append(1))
    checkpointed = model(global_crops, local_crops)
    checkpointed.loss.backward()
    assert len(attention_calls) == 2 * 2  # (globals + locals) forward, then recomputed in backward
    assert torch.allclose(checkpointed.loss, reference.loss, atol=1e-6)
    assert torch.allclose(model.student_head.prototypes.grad, reference_grad, atol=1e-6)


def test_import_registers_the_auto_classes_in_a_fresh_process():
    code = "import hf_koleo, transformers; print(transformers.AutoConfig.for_model('koleo_dino').model_type)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "koleo_dino"


def test_ibot_loss_is_the_same_with_any_slot_budget_that_holds_every_masked_patch():
    model = KoLeoDinoForPreTraining(tiny_config(ibot_loss_weight=1.0, mask_ratio_min_max=(0.1, 0.9))).eval()
    global_crops, local_crops = crops()
    masks = random_masks()
    n_masked = int(masks.sum())
    default = model(global_crops, local_crops, masks=masks)
    tight = model(global_crops, local_crops, masks=masks, mask_slots=n_masked)
    loose = model(global_crops, local_crops, masks=masks, mask_slots=n_masked + 7)
    assert default.ibot_loss > 0
    assert torch.allclose(default.ibot_loss, tight.ibot_loss, atol=1e-6)
    assert torch.allclose(default.ibot_loss, loose.ibot_loss, atol=1e-6)


@pytest.mark.parametrize("centring", ["ema", "sinkhorn_knopp"])
def test_ibot_with_no_masked_patch_in_the_batch_is_harmless(centring):
    model = KoLeoDinoForPreTraining(tiny_config(ibot_loss_weight=1.0, centring=centring)).train()
    global_crops, local_crops = crops()
    no_masks = torch.zeros(3, 2, 16, dtype=torch.bool)
    output = model(global_crops, local_crops, masks=no_masks)
    output.loss.backward()
    assert output.ibot_loss == 0 and torch.isfinite(output.loss)
    assert torch.isfinite(model.patch_centre).all() and torch.equal(
        model.patch_centre, torch.zeros_like(model.patch_centre)
    )


def test_a_standalone_dino_head_is_initialised_like_the_model_heads():
    torch.manual_seed(0)
    head = DINOHead(16, 512, hidden_size=32, bottleneck_size=8)
    assert torch.isfinite(head.prototypes).all() and 0.015 < head.prototypes.std().item() < 0.025
    assert all(layer.bias.abs().sum() == 0 for layer in head.mlp if isinstance(layer, torch.nn.Linear))
    assert torch.isfinite(head(torch.randn(4, 16))).all()


def test_losses_and_centres_run_in_fp32_under_bf16_autocast(monkeypatch):
    import hf_koleo.modeling_koleo_dino as modeling

    seen = []

    def spy(name, function):
        def wrapped(*tensors, **kwargs):
            floats = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
            seen.append((name, floats, torch.is_autocast_enabled("cpu")))
            return function(*tensors, **kwargs)

        monkeypatch.setattr(modeling, name, wrapped)

    for name in ("dino_loss", "ibot_patch_loss", "centred_teacher_probs", "batch_centre"):
        spy(name, getattr(modeling, name))
    model = KoLeoDinoForPreTraining(tiny_config(ibot_loss_weight=1.0)).train()
    global_crops, local_crops = crops()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(global_crops, local_crops, random_masks())
    assert {name for name, _, _ in seen} == {"dino_loss", "ibot_patch_loss", "centred_teacher_probs", "batch_centre"}
    for name, dtypes, autocast_on in seen:
        assert dtypes and set(dtypes) == {torch.float32} and not autocast_on, name
    assert output.loss.dtype == output.dino_loss.dtype == torch.float32
