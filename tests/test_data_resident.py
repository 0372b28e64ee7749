import pytest
import torch
from data_fixtures import write_parquet
from PIL import Image

import hf_koleo.data.decoded as decoded_module
from hf_koleo.data.augment import MultiCropAugmentation, MultiCropConfig
from hf_koleo.data.decoded import load_decoded, to_canvas
from hf_koleo.data.masking import MaskSettings
from hf_koleo.data.resident import ResidentBatches

AUGMENTATION = MultiCropAugmentation(MultiCropConfig(global_crops_size=8, local_crops_size=4, local_crops_number=2))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))


def batches(decoded, n, batch_size=4, position=(0, 0), rank=0, world_size=1, masking=None):
    stream = ResidentBatches(decoded, AUGMENTATION, batch_size, 5, masking, position, rank, world_size)
    return [stream.next_batch() for _ in range(n)]


def test_canvas_keeps_the_aspect_ratio_and_never_upscales():
    wide = Image.new("RGB", (40, 20), (10, 20, 30))
    canvas, extent = to_canvas(wide, 16)
    assert canvas.shape == (3, 16, 16) and extent == (8, 16)
    assert (canvas[:, :8, :16] > 0).all() and (canvas[:, 8:] == 0).all()
    small, extent = to_canvas(Image.new("RGB", (5, 7), (1, 1, 1)), 16)
    assert extent == (7, 5) and (small[:, :7, :5] == 1).all()


def test_decoding_skips_and_counts_corrupt_records_and_caches_the_result(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "data.parquet", 10, corrupt=(3, 8))
    decoded = load_decoded(str(path), 16)
    assert len(decoded) == 8 and decoded.n_corrupt == 2
    assert decoded.images.shape == (8, 3, 16, 16) and decoded.images.dtype == torch.uint8
    assert decoded.extents.tolist() == [[16, 16]] * 8 and decoded.labels.tolist() == [0, 1, 2, 1, 2, 0, 1, 0]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of loading the cache")

    monkeypatch.setattr(decoded_module, "decode_records", no_decoding)
    again = load_decoded(str(path), 16)
    assert torch.equal(again.images, decoded.images) and again.n_corrupt == 2
    with pytest.raises(AssertionError, match="decoded again"):
        load_decoded(str(path), 8)  # another canvas size is another cache entry


def test_canvases_are_no_larger_than_the_largest_image(tmp_path):
    # 20 px images for 224 px crops: 20 px canvases (125x less memory than 224 px ones), the same pixels.
    path = write_parquet(tmp_path / "data.parquet", 6)
    small, large = load_decoded(str(path), 224), load_decoded(str(path), 20)
    assert small.images.shape == (6, 3, 20, 20) and torch.equal(small.images, large.images)
    assert torch.equal(small.extents, large.extents)


def test_a_changed_or_damaged_cache_is_rebuilt(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 6)
    first = load_decoded(str(path), 8)
    for cached in (tmp_path / "cache" / "decoded").glob("*.safetensors"):
        cached.write_bytes(b"truncated")
    assert torch.equal(load_decoded(str(path), 8).images, first.images)
    write_parquet(path, 6, start_seed=50)  # new content, new modification time and size
    assert not torch.equal(load_decoded(str(path), 8).images, first.images)


def test_a_source_with_no_decodable_image_is_an_error_naming_it(tmp_path):
    path = write_parquet(tmp_path / "broken.parquet", 5, corrupt=tuple(range(5)))
    with pytest.raises(ValueError, match=r"broken.parquet.*none of its 5 records"):
        load_decoded(str(path), 8)


def test_every_image_once_per_epoch_in_a_new_order(tmp_path):
    decoded = load_decoded(str(write_parquet(tmp_path / "data.parquet", 10)), 8)
    out = batches(decoded, 4, batch_size=4)  # 2 batches per epoch (the last 2 images dropped)
    assert [batch["position"] for batch in out] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    epoch0 = torch.cat([out[0]["indices"], out[1]["indices"]])
    epoch1 = torch.cat([out[2]["indices"], out[3]["indices"]])
    assert len(set(epoch0.tolist())) == 8 and not torch.equal(epoch0, epoch1)
    assert out[0]["global_crops"].shape == (4, 2, 3, 8, 8) and out[0]["local_crops"].shape == (4, 2, 3, 4, 4)
    assert torch.equal(out[0]["labels"], decoded.labels[out[0]["indices"]])


def test_resuming_from_a_position_gives_the_same_batches(tmp_path):
    decoded = load_decoded(str(write_parquet(tmp_path / "data.parquet", 12)), 8)
    masking = MaskSettings(grid_size=2, ratio_range=(0.5, 0.5), probability=1.0)
    straight = batches(decoded, 7, masking=masking)
    resumed = batches(decoded, 3, position=straight[3]["position"], masking=masking)
    for a, b in zip(straight[4:], resumed):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["global_crops"], b["global_crops"])
        assert torch.equal(a["masks"], b["masks"]) and a["masks"].any(-1).all()


def test_two_processes_see_the_images_and_views_of_one_global_batch(tmp_path):
    decoded = load_decoded(str(write_parquet(tmp_path / "data.parquet", 16)), 8)
    single = batches(decoded, 2, batch_size=8)
    halves = [batches(decoded, 2, batch_size=4, rank=rank, world_size=2) for rank in (0, 1)]
    for step in range(2):
        for key in ("indices", "global_crops", "local_crops"):
            merged = torch.cat([halves[0][step][key], halves[1][step][key]])
            assert torch.equal(merged, single[step][key]), key


def test_too_few_images_for_one_global_batch_is_a_clear_error(tmp_path):
    decoded = load_decoded(str(write_parquet(tmp_path / "data.parquet", 6)), 8)
    with pytest.raises(ValueError, match="fewer images"):
        batches(decoded, 1, batch_size=4, world_size=2)
