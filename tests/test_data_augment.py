import numpy as np
import pytest
import torch
from PIL import Image

from hf_koleo.data.augment import (
    BLUR_SIGMA,
    GRAYSCALE,
    IDENTITY_PARAMETERS,
    N_PHOTOMETRIC,
    SOLARIZE,
    MultiCropAugmentation,
    MultiCropConfig,
    random_resized_crop_box,
)
from hf_koleo.data.masking import block_mask, sample_crop_masks

IDENTITY = list(IDENTITY_PARAMETERS)


def small_config(**overrides):
    settings = dict(
        global_crops_size=16, local_crops_size=8, local_crops_number=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    settings.update(overrides)
    return MultiCropConfig(**settings)


def random_image(size=(28, 20), mode="RGB"):
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode).convert("RGB")


def test_sample_gives_two_global_and_n_local_crops_with_parameters():
    views = MultiCropAugmentation(small_config()).sample(random_image(), torch.Generator().manual_seed(0))
    assert views["global_crops"].shape == (2, 3, 16, 16) and views["global_crops"].dtype == torch.uint8
    assert views["local_crops"].shape == (3, 3, 8, 8)
    assert views["global_params"].shape == (2, N_PHOTOMETRIC) and views["local_params"].shape == (3, N_PHOTOMETRIC)


def test_same_seed_same_views_different_seed_different_views():
    augmentation = MultiCropAugmentation(small_config())
    first = augmentation.sample(random_image(), torch.Generator().manual_seed(1))
    again = augmentation.sample(random_image(), torch.Generator().manual_seed(1))
    other = augmentation.sample(random_image(), torch.Generator().manual_seed(2))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["global_crops"], other["global_crops"])


def test_first_global_crop_always_blurred_never_solarised_by_default():
    augmentation = MultiCropAugmentation(small_config())
    rows = torch.stack(
        [augmentation.sample(random_image(), torch.Generator().manual_seed(s))["global_params"] for s in range(50)]
    )
    assert (rows[:, 0, BLUR_SIGMA] > 0).all() and (rows[:, 0, SOLARIZE] == 0).all()
    assert (rows[:, 1, SOLARIZE] == 1).any()


def test_identity_parameters_only_normalise():
    augmentation = MultiCropAugmentation(small_config())
    crops = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    output = augmentation.photometric(crops, torch.tensor([IDENTITY] * 4))
    assert torch.allclose(output, (crops.float() / 255 - 0.5) / 0.5, atol=1e-5)


def test_grayscale_makes_channels_equal_and_solarise_inverts_bright_pixels():
    augmentation = MultiCropAugmentation(small_config(image_mean=[0.0] * 3, image_std=[1.0] * 3))
    crops = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    parameters = torch.tensor([IDENTITY, IDENTITY])
    parameters[0, GRAYSCALE] = 1.0
    parameters[1, SOLARIZE] = 1.0
    output = augmentation.photometric(crops, parameters)
    assert torch.allclose(output[0, 0], output[0, 1]) and torch.allclose(output[0, 1], output[0, 2])
    original = crops[1].float() / 255
    assert torch.allclose(output[1], torch.where(original >= 0.5, 1 - original, original), atol=1e-6)


def test_blur_smooths_but_keeps_a_constant_image_constant():
    augmentation = MultiCropAugmentation(small_config(image_mean=[0.0] * 3, image_std=[1.0] * 3))
    parameters = torch.tensor([IDENTITY, IDENTITY])
    parameters[:, BLUR_SIGMA] = 1.5
    noise = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    constant = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    output = augmentation.photometric(torch.cat([noise, constant]), parameters)
    assert output[0].std() < (noise.float() / 255).std() / 2
    assert torch.allclose(output[1], torch.full_like(output[1], 100 / 255), atol=1e-5)


def test_random_resized_crop_stays_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, width, height = random_resized_crop_box(28, 20, [0.05, 1.0], [0.75, 1.333], generator)
        assert 0 <= left and left + width <= 28 and 0 <= top and top + height <= 20


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("global_crops_scale", [0.5, 0.2]),
        ("local_crops_scale", [0.1, 1.5]),
        ("blur_probability", [1.0, 0.5]),
        ("jitter_probability", 2.0),
        ("image_std", [0.0, 1.0, 1.0]),
        ("local_crops_number", -1),
    ],
)
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MultiCropAugmentation(small_config(**{field: value}))


def test_block_mask_masks_at_most_the_requested_patches_in_blocks():
    generator = torch.Generator().manual_seed(0)
    for n_masked in (0, 5, 20, 40):
        mask = block_mask(8, 8, n_masked, generator)
        assert mask.shape == (8, 8) and int(mask.sum()) <= n_masked
        assert int(mask.sum()) >= 0.5 * n_masked


def test_crop_masks_follow_the_probability():
    generator = torch.Generator().manual_seed(0)
    never = sample_crop_masks(2, 4, 4, (0.1, 0.5), 0.0, generator)
    always = sample_crop_masks(2, 4, 4, (0.5, 0.5), 1.0, generator)
    assert never.shape == (2, 16) and not never.any()
    assert (always.sum(dim=1) > 0).all()
