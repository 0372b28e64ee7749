import pytest
import torch
from data_fixtures import write_parquet

from hf_koleo.data.augment import MultiCropAugmentation, MultiCropConfig
from hf_koleo.data.sources import load_source
from hf_koleo.data.stream import MaskSettings, MultiCropStream, shard_source

AUGMENTATION = MultiCropAugmentation(MultiCropConfig(global_crops_size=8, local_crops_size=4, local_crops_number=2))


def make_stream(path, batch_size=4, position=(0, 0), buffer=8, rank=0, world_size=1, masking=None):
    source = shard_source(load_source(str(path)), rank=rank, world_size=world_size, strategy="examples")
    return MultiCropStream(
        source, AUGMENTATION, batch_size, seed=3, masking=masking, position=position, shuffle_buffer=buffer
    )


def take(stream, n, num_workers=0):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [batch for _, batch in zip(range(n), loader)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert list(a["position"]) == list(b["position"])
        assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["local_params"], b["local_params"])


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 24)
    assert_same_batches(take(make_stream(path), 8), take(make_stream(path), 8, num_workers=2))


def test_batch_layout_and_masks(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 8)
    batch = take(make_stream(path, masking=MaskSettings(grid_size=2, probability=1.0, ratio_range=(0.5, 0.5))), 1)[0]
    assert batch["global_crops"].shape == (4, 2, 3, 8, 8) and batch["local_crops"].shape == (4, 2, 3, 4, 4)
    assert batch["masks"].shape == (4, 2, 4) and batch["masks"].any(dim=-1).all()
    assert batch["labels"].tolist() != [-1] * 4


def test_resuming_from_a_position_continues_the_stream_exactly(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 20)
    straight = take(make_stream(path), 9)  # crosses two epoch boundaries (5 batches per epoch)
    resumed = take(make_stream(path, position=straight[2]["position"]), 6)
    assert_same_batches(straight[3:], resumed)
    assert [list(batch["position"]) for batch in straight[3:6]] == [[0, 4], [0, 5], [1, 1]]


def test_epochs_reshuffle(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 8)
    epoch0, epoch1 = take(make_stream(path, batch_size=8), 2)
    assert list(epoch0["position"]) == [0, 1] and list(epoch1["position"]) == [1, 1]
    assert not torch.equal(epoch0["labels"], epoch1["labels"]) or not torch.equal(
        epoch0["global_crops"], epoch1["global_crops"]
    )


def test_corrupt_records_are_skipped_and_counted(tmp_path, caplog):
    path = write_parquet(tmp_path / "data.parquet", 12, corrupt=(2, 5, 7))
    batches = take(make_stream(path, buffer=0), 3)
    assert sum(batch["n_corrupt"] for batch in batches) == 3
    assert sum(batch["global_crops"].shape[0] for batch in batches) == 9
    assert "undecodable" in caplog.text


def test_all_corrupt_batch_is_empty_not_fatal(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 8, corrupt=(0, 1, 2, 3))
    first, second = take(make_stream(path, buffer=0), 2)
    assert first["n_corrupt"] == 4 and "global_crops" not in first
    assert second["global_crops"].shape[0] == 4


def test_two_processes_split_one_global_batch(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 16)
    single = take(make_stream(path, batch_size=4, buffer=0), 1)[0]
    halves = [take(make_stream(path, batch_size=2, rank=rank, world_size=2, buffer=0), 1)[0] for rank in (0, 1)]
    merged = torch.cat([half["global_crops"] for half in halves])
    assert sorted(map(bytes, merged.flatten(1).numpy())) == sorted(
        map(bytes, single["global_crops"].flatten(1).numpy())
    )


def test_source_smaller_than_a_batch_is_a_clear_error(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 3)
    with pytest.raises(ValueError, match="fewer records"):
        take(make_stream(path, batch_size=4), 1)
