import logging

import pytest
import torch
from conftest import TINY_RUN
from data_fixtures import write_parquet

from hf_koleo.data.decoded import load_decoded
from hf_koleo.data.resident import ResidentBatches
from hf_koleo.data.sources import load_source
from hf_koleo.data.stream import CanvasStream, advance_position, shard_source, usable_workers
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.trainer import pretrain


def sharded_folder(root, n_shards=4, per_shard=6, corrupt=()):
    for shard in range(n_shards):
        write_parquet(root / f"part-{shard}.parquet", per_shard, corrupt=corrupt, start_seed=100 * shard)
    return root


def make_stream(path, batch_size=3, position=(0, 0), buffer=0, rank=0, world_size=1, **kwargs):
    source = shard_source(load_source(str(path)), rank=rank, world_size=world_size, strategy="examples")
    return CanvasStream(source, 8, batch_size, seed=3, position=position, shuffle_buffer=buffer, **kwargs)


def take(stream, n, num_workers=0):
    """The first ``n`` batches, each with the ``position`` the trainer would save after it."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    batches, position = [], list(stream.position)
    for _, batch in zip(range(n), loader):
        position = advance_position(position, batch, max(1, num_workers))
        batches.append({**batch, "position": position})
    return batches


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


def test_undecodable_records_are_replaced_by_the_next_ones_so_every_batch_is_full(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 12, corrupt=(2, 5, 7))
    batches = take(make_stream(path, batch_size=4), 3)  # 9 good records: 2 batches, the tail dropped, then pass 2
    assert [batch["images"].shape[0] for batch in batches] == [4, 4, 4]
    assert [batch["n_corrupt"] for batch in batches] == [1, 2, 1]  # records 0-4 | 5-10 | (11 dropped) 0-4
    assert [batch["position"] for batch in batches] == [[0, 1, 5], [0, 2, 11], [0, 3, 17]]
    good = image_ids(take(make_stream(write_parquet(tmp_path / "good.parquet", 12), batch_size=4), 3))
    assert image_ids(batches[:2]) == [good[index] for index in (0, 1, 3, 4, 6, 8, 9, 10)]
    assert image_ids(batches[2:]) == image_ids(batches[:1])  # a new pass starts from the first record


def test_resuming_mid_stream_with_undecodable_records_equals_a_straight_run(tmp_path):
    root = sharded_folder(tmp_path / "data", n_shards=4, per_shard=7, corrupt=(1, 4, 5))
    for workers in (0, 2):
        straight = take(make_stream(root, buffer=4), 12, num_workers=workers)  # 16 good records: passes cross
        assert {batch["images"].shape[0] for batch in straight} == {3}
        for stop in (2, 5, 8):
            assert len(straight[stop]["position"]) == 2 + max(1, workers)
            resumed = take(make_stream(root, buffer=4, position=straight[stop]["position"]), 3, num_workers=workers)
            assert image_ids(straight[stop + 1 : stop + 4]) == image_ids(resumed)
            for expected, actual in zip(straight[stop + 1 :], resumed):
                assert torch.equal(expected["keys"], actual["keys"]) and expected["n_corrupt"] == actual["n_corrupt"]
                assert expected["position"] == actual["position"]


def test_an_old_two_number_position_still_resumes_by_whole_batches(tmp_path):
    root = sharded_folder(tmp_path / "data")
    straight = take(make_stream(root, buffer=4), 10, num_workers=2)
    resumed = take(make_stream(root, buffer=4, position=[0, 7]), 3, num_workers=2)
    assert image_ids(straight[7:]) == image_ids(resumed) and resumed[-1]["position"] == [0, 10]


def test_undecodable_records_are_named_one_line_each_then_counted(tmp_path, caplog):
    path = write_parquet(tmp_path / "bad.parquet", 60, corrupt=tuple(range(2, 60, 2)))
    caplog.set_level(logging.WARNING)
    take(make_stream(path, batch_size=4, name="bad-source"), 7)  # 56 records: 28 undecodable
    lines = [record.getMessage() for record in caplog.records]
    named = [line for line in lines if "skipping undecodable" in line]
    assert len(named) == 5 and len(lines) == 8, lines
    assert named[0] == (
        f"data source 'bad-source': skipping undecodable {path} row 2: not an image format PIL can read"
    )
    assert "row 4: not an image" in named[1] and "BytesIO" not in caplog.text
    assert [line.split(": ")[1] for line in lines[6:]] == [
        f"{count} undecodable records skipped so far (latest" for count in (10, 20)
    ]


def test_a_source_with_no_decodable_record_stops_with_an_error_naming_it(tmp_path):
    path = write_parquet(tmp_path / "garbage.parquet", 8, corrupt=tuple(range(8)))
    with pytest.raises(ValueError, match=r"garbage.parquet': all 8 of its records .*could not be decoded.*row 7"):
        take(make_stream(path, batch_size=4, name=str(path)), 100)
    long = write_parquet(tmp_path / "long.parquet", 40, corrupt=tuple(range(40)))
    with pytest.raises(ValueError, match=r"'long': 12 records in a row could not be decoded as images \(latest: "):
        take(make_stream(long, batch_size=4, name="long", max_corrupt_batches=3), 100)


def test_two_processes_split_the_records(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 16)
    single = image_ids(take(make_stream(path, batch_size=4), 4))
    halves = [image_ids(take(make_stream(path, batch_size=2, rank=rank, world_size=2), 4)) for rank in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and set(halves[0]) | set(halves[1]) == set(single)


def test_workers_are_limited_to_the_number_of_shards(tmp_path):
    root = sharded_folder(tmp_path / "data", n_shards=2)
    assert usable_workers(load_source(str(root)), 8) == 2 and usable_workers(load_source(str(root)), 1) == 1


def test_source_smaller_than_a_batch_is_a_clear_error(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 5)
    with pytest.raises(ValueError, match=r"^data source 'five' has fewer records \(5\) than one batch \(8\)"):
        take(make_stream(path, batch_size=8, name="five"), 1)
    resident = load_decoded(str(path), 8, use_cache=False)
    with pytest.raises(ValueError, match=r"^data source '.*data.parquet' has fewer images \(5\) than one global batch"):
        ResidentBatches(resident, augmentation=None, batch_size=8)
    path = write_parquet(tmp_path / "half.parquet", 10, corrupt=(0, 1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"'half' has only 5 decodable records of 10 .* fewer than one batch \(8\)"):
        take(make_stream(path, batch_size=8, name="half"), 1)


def test_pretraining_on_a_stream_with_undecodable_records_sees_steps_times_batch_images(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", 40, corrupt=(1, 6, 9, 30))
    extra = ["--in_memory", "no", "--data", str(path), "--output_dir", str(tmp_path / "run")]
    summary = pretrain(*parse_pretraining_args([*TINY_RUN, *extra]))
    assert summary["steps"] == 4 and summary["images_seen"] == 16 and summary["corrupt_records"] == 3
