import pytest
from conftest import TINY_BACKBONE, tiny_config
from transformers import AutoConfig, Dinov2Config, ViTConfig

from hf_koleo import KoLeoDinoConfig


def test_defaults_follow_dino():
    config = KoLeoDinoConfig()
    assert isinstance(config.backbone_config, Dinov2Config)
    assert (config.head_hidden_size, config.head_bottleneck_size, config.head_num_layers) == (2048, 256, 3)
    assert config.num_prototypes == config.num_patch_prototypes == 65536
    assert config.student_temperature == 0.1
    assert (config.centring, config.centre_momentum) == ("ema", 0.9)
    assert config.koleo_proto_weight == 0.0 and config.koleo_weight == 0.0


def test_vit_backbone_accepted_as_config_or_dict():
    assert isinstance(KoLeoDinoConfig(backbone_config=ViTConfig()).backbone_config, ViTConfig)
    assert isinstance(KoLeoDinoConfig(backbone_config={"model_type": "vit"}).backbone_config, ViTConfig)


def test_round_trip_through_auto_config(tmp_path):
    config = tiny_config(koleo_proto_weight=0.1, shared_head=False, num_patch_prototypes=32)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, KoLeoDinoConfig)
    assert loaded.num_patch_prototypes == 32
    assert loaded.backbone_config.hidden_size == TINY_BACKBONE["hidden_size"]
    assert loaded.mask_ratio_min_max == (0.1, 0.5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_prototypes", 1, "num_prototypes must be an integer >= 2"),
        ("num_prototypes", 8.0, "num_prototypes must be an integer"),
        ("head_num_layers", 0, "head_num_layers must be an integer >= 1"),
        ("student_temperature", 0.0, "student_temperature must be a number > 0"),
        ("centring", "softmax", "centring must be one of"),
        ("centre_momentum", 1.0, r"centre_momentum must be a number in \[0, 1\)"),
        ("ibot_loss_weight", -1.0, "ibot_loss_weight must be a number >= 0"),
        ("koleo_proto_weight", float("nan"), "koleo_proto_weight must be a number >= 0"),
        ("koleo_proto_on", "prototypes", "koleo_proto_on must be one of"),
        ("mask_ratio_min_max", (0.5, 0.1), "mask_ratio_min_max"),
        ("mask_probability", 1.5, "mask_probability"),
        ("norm_last_layer", "yes", "norm_last_layer must be True or False"),
        ("backbone_config", {"model_type": "bert"}, "backbone_config.model_type must be one of"),
        ("backbone_config", {"model_type": "dinov2", "hidden_size": "wide"}, "backbone_config is invalid"),
        ("backbone_config", 5, "backbone_config must be a mapping .* got 5"),
        ("backbone_config", [1, 2], "backbone_config must be a mapping"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


@pytest.mark.parametrize("model_type", ["dinov2", "vit"])
def test_hidden_size_not_divisible_by_the_heads_is_rejected(model_type):
    backbone = {**TINY_BACKBONE, "model_type": model_type, "hidden_size": 30, "num_attention_heads": 4}
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be divisible by .*num_attention_heads \(4\)"):
        tiny_config(backbone_config=backbone)


@pytest.mark.parametrize("koleo_proto_on", ["patch", "both"])
def test_a_separate_patch_head_that_no_loss_trains_is_rejected(koleo_proto_on):
    with pytest.raises(ValueError, match="shared_head=False with ibot_loss_weight=0 .* patch head that no loss trains"):
        tiny_config(shared_head=False, ibot_loss_weight=0.0, koleo_proto_weight=0.1, koleo_proto_on=koleo_proto_on)
    tiny_config(shared_head=False, ibot_loss_weight=1.0, koleo_proto_weight=0.1, koleo_proto_on=koleo_proto_on)
    tiny_config(shared_head=True, ibot_loss_weight=0.0, koleo_proto_weight=0.1, koleo_proto_on=koleo_proto_on)
