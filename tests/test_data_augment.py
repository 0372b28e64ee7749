import numpy as np
import pytest
import torch

from hf_koleo.data.augment import (
    BLUR_SIGMA,
    CROP_ATTEMPTS,
    GRAYSCALE,
    IDENTITY_PARAMETERS,
    SOLARIZE,
    MultiCropAugmentation,
    MultiCropConfig,
    crop_and_resize,
    random_resized_boxes,
)
from hf_koleo.data.counter_rng import hash32, sample_keys, uniforms
from hf_koleo.data.masking import MaskSettings, block_masks

IDENTITY = list(IDENTITY_PARAMETERS)


def small_config(**overrides):
    settings = dict(
        global_crops_size=16, local_crops_size=8, local_crops_number=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    settings.update(overrides)
    return MultiCropConfig(**settings)


def random_canvases(n=4, size=20, extent=(20, 14)):
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (n, 3, size, size), dtype=np.uint8))
    return images, torch.tensor([extent] * n)


def test_counter_rng_is_a_pure_function_of_key_and_draw():
    keys = sample_keys(3, 1, torch.arange(6))
    assert keys.unique().numel() == 6 and keys.min() >= 0 and keys.max() < 2**32
    first = uniforms(keys, 5, "global_crops")
    assert first.shape == (6, 5) and (first >= 0).all() and (first < 1).all()
    assert torch.equal(first[2:4], uniforms(keys[2:4], 5, "global_crops"))  # independent of the batch
    assert not torch.equal(first, uniforms(keys, 5, "local_crops"))
    assert not torch.equal(keys, sample_keys(3, 2, torch.arange(6)))  # epochs differ
    assert torch.equal(hash32(torch.tensor([0, 1, 2**32 - 1])), hash32(torch.tensor([0, 1, 2**32 - 1])))


def test_counter_rng_uniforms_are_uniform():
    draws = uniforms(sample_keys(0, 0, torch.arange(2000)), 50, "masks").flatten()
    assert abs(draws.mean().item() - 0.5) < 0.01 and abs(draws.var().item() - 1 / 12) < 0.005
    histogram = torch.histc(draws, bins=10, min=0, max=1) / draws.numel()
    assert (histogram - 0.1).abs().max() < 0.01


def test_views_have_the_multi_crop_shapes_and_are_normalised():
    images, extents = random_canvases()
    views = MultiCropAugmentation(small_config())(images, extents, sample_keys(0, 0, torch.arange(4)))
    assert views["global_crops"].shape == (4, 2, 3, 16, 16) and views["global_crops"].dtype == torch.float32
    assert views["local_crops"].shape == (4, 3, 3, 8, 8)
    assert views["global_crops"].min() >= -1 - 1e-5 and views["global_crops"].max() <= 1 + 1e-5


def test_views_depend_only_on_the_image_key_not_the_batch():
    augmentation = MultiCropAugmentation(small_config())
    images, extents = random_canvases()
    keys = sample_keys(1, 0, torch.arange(4))
    whole = augmentation(images, extents, keys)
    part = augmentation(images[1:3], extents[1:3], keys[1:3])
    assert torch.allclose(whole["global_crops"][1:3], part["global_crops"], atol=1e-6)
    other = augmentation(images, extents, sample_keys(2, 0, torch.arange(4)))
    assert not torch.allclose(whole["global_crops"], other["global_crops"])


def test_first_global_crop_always_blurred_never_solarised_by_default():
    augmentation = MultiCropAugmentation(small_config())
    draws = uniforms(sample_keys(0, 0, torch.arange(500)), 18, "global_crops").reshape(500, 2, 9)
    rows = augmentation.photometric_parameters(draws, (0, 1))
    assert rows.shape == (500, 2, 7)
    assert (rows[:, 0, BLUR_SIGMA] > 0).all() and (rows[:, 0, SOLARIZE] == 0).all()
    assert (rows[:, 1, SOLARIZE] == 1).any() and (rows[:, 1, BLUR_SIGMA] == 0).any()
    assert 0.1 < rows[..., GRAYSCALE].mean() < 0.3


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


def test_random_resized_boxes_stay_inside_the_image_and_follow_the_scale():
    draws = uniforms(sample_keys(0, 0, torch.arange(2000)), 4 * CROP_ATTEMPTS, "global_crops")
    extents = torch.tensor([[20, 28]] * 2000)
    left, top, width, height = random_resized_boxes(draws, extents, [0.05, 1.0], [0.75, 1.333]).unbind(1)
    assert (left >= 0).all() and (left + width <= 28).all() and (top >= 0).all() and (top + height <= 20).all()
    assert (width >= 1).all() and (height >= 1).all()
    area = width * height / (20 * 28)
    assert area.min() < 0.1 and area.max() > 0.9


def test_random_resized_boxes_fall_back_to_a_centred_crop():
    never_fits = torch.full((1, 4 * CROP_ATTEMPTS), 0.999)  # aspect 4/3 of the whole area: too wide
    box = random_resized_boxes(never_fits, torch.tensor([[10, 10]]), [1.0, 1.0], [4 / 3, 4 / 3])
    assert box.tolist() == [[0.0, 1.0, 10.0, 8.0]]


def test_crop_and_resize_of_the_whole_extent_is_the_image_and_flip_mirrors_it():
    image = torch.rand(1, 3, 8, 8)
    whole = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]]])
    crops = crop_and_resize(image, whole, torch.tensor([[False, True]]), 8)
    assert torch.allclose(crops[0, 0], image[0], atol=1e-5)
    assert torch.allclose(crops[0, 1], image[0].flip(-1), atol=1e-5)
    quarter = crop_and_resize(image, torch.tensor([[[4.0, 0.0, 4.0, 4.0]]]), torch.tensor([[False]]), 4)
    assert torch.allclose(quarter[0, 0], image[0, :, :4, 4:], atol=1e-5)  # no resizing: the pixels themselves


def test_crops_never_see_the_canvas_padding():
    images = torch.zeros(8, 3, 16, 16, dtype=torch.uint8)
    images[:, :, :10, :6] = 200  # a 10 x 6 image on a 16 x 16 canvas
    augmentation = MultiCropAugmentation(
        small_config(
            image_mean=[0.0] * 3,
            image_std=[1.0] * 3,
            jitter_probability=0.0,
            grayscale_probability=0.0,
            solarize_probability=[0.0, 0.0, 0.0],
            blur_probability=[0.0, 0.0, 0.0],
        )
    )
    views = augmentation(images, torch.tensor([[10, 6]] * 8), sample_keys(0, 0, torch.arange(8)))
    assert torch.allclose(views["global_crops"], torch.full_like(views["global_crops"], 200 / 255), atol=1e-5)
    assert torch.allclose(views["local_crops"], torch.full_like(views["local_crops"], 200 / 255), atol=1e-5)


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


def test_block_masks_follow_probability_and_ratio_and_never_exceed_the_slots():
    keys = sample_keys(0, 0, torch.arange(500))
    masks = block_masks(keys, 2, 8, (0.1, 0.5), 0.5)
    assert masks.shape == (500, 2, 64) and masks.dtype == torch.bool
    counts = masks.sum(-1).float()
    assert 0.4 < (counts > 0).float().mean() < 0.6
    assert counts.max() <= 32 and counts[counts > 0].min() >= 4
    assert 0.15 < counts[counts > 0].mean() / 64 < 0.32  # about the mean ratio 0.3 (blocks rarely fill exactly)
    assert torch.equal(masks[10:20], block_masks(keys[10:20], 2, 8, (0.1, 0.5), 0.5))


def test_block_masks_are_rectangles():
    masks = block_masks(sample_keys(0, 0, torch.arange(50)), 1, 8, (0.05, 0.06), 1.0, min_block_patches=4)
    grids = masks.reshape(50, 8, 8)
    for grid in grids:
        rows, columns = grid.nonzero(as_tuple=True)
        if len(rows):  # a single block: its bounding box is full
            assert grid[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1].all()


def test_mask_settings_mask_every_crop_when_probability_is_one():
    masks = MaskSettings(grid_size=4, ratio_range=(0.5, 0.5), probability=1.0).masks(sample_keys(0, 0, torch.arange(6)))
    assert masks.shape == (6, 2, 16) and (masks.sum(-1) > 0).all() and (masks.sum(-1) <= 8).all()
