import pytest
import torch
from data_fixtures import write_parquet

from hf_koleo.data.sources import load_source
from hf_koleo.data.stream import CanvasStream, shard_source, usable_workers


def sharded_folder(root, n_shards=4, per_shard=6, corrupt=()):
    for shard in range(n_shards):
        write_parquet(root / f"part-{shard}.parquet", per_shard, corrupt=corrupt, start_seed=100 * shard)
    return root


def make_stream(path, batch_size=3, position=(0, 0), buffer=0, rank=0, world_size=1, **kwargs):
    source = shard_source(load_source(str(path)), rank=rank, world_size=world_size, strategy="examples")
    return CanvasStream(source, 8, batch_size, seed=3, position=position, shuffle_buffer=buffer, **kwargs)


def take(stream, n, num_workers=0):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [batch for _, batch in zip(range(n), loader)]


def image_ids(batches):
    """Each canvas's bytes: identifies the record it came from."""
    return [bytes(image.numpy()) for batch in batches for image in batch["images"]]


def test_each_worker_reads_its_own_shards_and_every_record_once_per_pass(tmp_path):
    root = sharded_folder(tmp_path / "data")
    batches = take(make_stream(root), 8, num_workers=2)  # 24 records = 8 batches of 3: one pass
    assert batches[0]["images"].shape == (3, 3, 8, 8) and batches[0]["images"].dtype == torch.uint8
    assert batches[0]["extents"].shape == (3, 2) and batches[0]["keys"].shape == (3,)
    ids = image_ids(batches)
    single = image_ids(take(make_stream(root), 8))
    assert len(set(ids)) == 24 and set(ids) == set(single)
    assert [list(batch["position"]) for batch in batches] == [[0, index + 1] for index in range(8)]


def test_resuming_from_a_position_continues_the_stream_exactly(tmp_path):
    root = sharded_folder(tmp_path / "data")
    for workers in (0, 2):
        straight = take(make_stream(root, buffer=4), 11, num_workers=workers)  # crosses a pass boundary
        resumed = take(make_stream(root, buffer=4, position=straight[4]["position"]), 6, num_workers=workers)
        assert image_ids(straight[5:]) == image_ids(resumed)
        assert all(torch.equal(a["keys"], b["keys"]) for a, b in zip(straight[5:], resumed))


def test_passes_reshuffle_and_draw_new_keys(tmp_path):
    root = sharded_folder(tmp_path / "data", n_shards=1, per_shard=6)
    first, second = take(make_stream(root, batch_size=6, buffer=6), 2)
    assert sorted(image_ids([first])) == sorted(image_ids([second]))
    assert not torch.equal(first["keys"].sort().values, second["keys"].sort().values)


def test_corrupt_records_are_skipped_and_counted(tmp_path, caplog):
    path = write_parquet(tmp_path / "data.parquet", 12, corrupt=(2, 5, 7))
    batches = take(make_stream(path, batch_size=4), 3)
    assert sum(batch["n_corrupt"] for batch in batches) == 3
    assert sum(batch["images"].shape[0] for batch in batches) == 9
    assert "undecodable" in caplog.text


def test_a_source_with_no_decodable_record_stops_with_an_error_naming_it(tmp_path):
    path = write_parquet(tmp_path / "garbage.parquet", 8, corrupt=tuple(range(8)))
    with pytest.raises(ValueError, match=r"garbage.parquet.*could not be decoded"):
        take(make_stream(path, batch_size=4, name=str(path), max_corrupt_batches=3), 100)


def test_two_processes_split_the_records(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 16)
    single = image_ids(take(make_stream(path, batch_size=4), 4))
    halves = [image_ids(take(make_stream(path, batch_size=2, rank=rank, world_size=2), 4)) for rank in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and set(halves[0]) | set(halves[1]) == set(single)


def test_workers_are_limited_to_the_number_of_shards(tmp_path):
    root = sharded_folder(tmp_path / "data", n_shards=2)
    assert usable_workers(load_source(str(root)), 8) == 2 and usable_workers(load_source(str(root)), 1) == 1


def test_source_smaller_than_a_batch_is_a_clear_error(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 3)
    with pytest.raises(ValueError, match="fewer records"):
        take(make_stream(path, batch_size=4), 1)
