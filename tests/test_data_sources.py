import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import write_fake_fashion_mnist, write_imagefolder, write_parquet, write_webdataset

from hf_koleo.data.decoded import load_decoded
from hf_koleo.data.fashion_mnist import (
    load_split,
    long_tailed_counts,
    prepare_fashion_mnist,
    read_idx,
    split_indices,
)
from hf_koleo.data.images import decode_image
from hf_koleo.data.records import ORIGIN, describe_record, iter_records
from hf_koleo.data.sources import (
    SourceConnectionError,
    count_records,
    guard_records,
    load_source,
    resolve_data_files,
)
from hf_koleo.data.stream import CanvasStream, shard_source
from hf_koleo.evaluation.features import extract_features


def first_records(dataset, n):
    return [record for _, record in zip(range(n), dataset)]


def test_embedded_demo_slice_streams_labelled_images():
    dataset = load_source("demo")
    assert count_records("demo") == 3000 and count_records("demo:test") == 1000
    record = next(iter(dataset))
    assert set(record) == {"image", "label"} and decode_image(record["image"]).size == (28, 28)


def test_parquet_file_and_folder(tmp_path):
    write_parquet(tmp_path / "shards" / "a.parquet", 5)
    write_parquet(tmp_path / "shards" / "b.parquet", 4, start_seed=100)
    assert len(first_records(load_source(str(tmp_path / "shards" / "a.parquet")), 100)) == 5
    folder = load_source(str(tmp_path / "shards"))
    assert folder.num_shards == 2 and len(first_records(folder, 100)) == 9
    assert count_records(str(tmp_path / "shards")) == 9


def test_imagefolder_gives_labels_from_folders(tmp_path):
    records = first_records(load_source(str(write_imagefolder(tmp_path / "images"))), 100)
    assert len(records) == 6 and {record["label"] for record in records} == {0, 1}
    assert all(decode_image(record["image"]) is not None for record in records)


def test_webdataset_tar_shards(tmp_path):
    write_webdataset(tmp_path / "wds" / "train-0000.tar")
    write_webdataset(tmp_path / "wds" / "train-0001.tar")
    records = first_records(load_source(str(tmp_path / "wds" / "train-*.tar")), 100)
    assert len(records) == 12 and {record["label"] for record in records} == {0, 1}
    assert decode_image(records[0]["image"]).mode == "RGB"


def test_a_truncated_png_in_a_webdataset_tar_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    tar = str(write_webdataset(tmp_path / "wds" / "train-0000.tar", n_images=6, truncated=(2,)))
    assert len(first_records(load_source(tar), 100)) == 6  # datasets no longer decodes (and raises) itself
    decoded = load_decoded(tar, 8, use_cache=False)
    assert (len(decoded), decoded.n_corrupt) == (5, 1)
    batches = [batch for _, batch in zip(range(2), CanvasStream(load_source(tar), 8, batch_size=3))]
    # samples 0, 1, (2), 3 | (4, 5: too few for a batch, dropped) 0, 1, (2), 3 of the next pass
    assert [batch["n_corrupt"] for batch in batches] == [1, 1] and batches[0]["images"].shape[0] == 3
    features = extract_features("pixels", tar, pixel_size=8, use_cache=False, progress=False)
    assert (features.cls.shape[0], features.skipped) == (5, 1)


def test_hub_ids_resolve_to_a_streamed_hub_dataset():
    assert resolve_data_files("someone/some-images") == ("someone/some-images", {"split_override": None})
    assert resolve_data_files("someone/some-images:validation")[1] == {"split_override": "validation"}


def test_only_transport_failures_while_reading_become_an_error_naming_the_source():
    def records_then(error):
        yield {"image": None}
        raise error

    dropped = ConnectionError("Server Disconnected")
    dropped.__cause__ = OSError("peer closed connection")
    with pytest.raises(SourceConnectionError, match=r"'a/b'.*\(HF_ENDPOINT\).*Server Disconnected: peer closed"):
        list(guard_records(records_then(dropped), "a/b"))
    with pytest.raises(ValueError, match="not a transport failure"):
        list(guard_records(records_then(ValueError("not a transport failure")), "a/b"))


@pytest.mark.parametrize("name", ["./missing_dir", "/no/such/path/here", "data/*.parquet"])
def test_missing_local_paths_raise_file_not_found(name):
    with pytest.raises(FileNotFoundError, match="data source"):
        load_source(name)


def test_read_idx_and_truncation_error(tmp_path):
    raw = write_fake_fashion_mnist(tmp_path / "raw")
    images = read_idx(raw / "train-images-idx3-ubyte.gz")
    assert images.shape == (200, 28, 28)
    (tmp_path / "bad.idx").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "bad.idx")


def test_long_tailed_profile_is_exponential():
    counts = long_tailed_counts(5000, 10, 100)
    assert counts[0] == 5000 and counts[-1] == 50
    assert all(a > b for a, b in zip(counts, counts[1:]))


def test_prepare_long_tailed_records_counts(tmp_path):
    raw = write_fake_fashion_mnist(tmp_path / "raw", n_per_class=20)
    output = prepare_fashion_mnist(tmp_path / "lt", "train", imbalance_ratio=10, n_shards=2, raw_dir=raw)
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["class_counts"] == long_tailed_counts(20, 10, 10)
    assert "MIT" in metadata["license"]
    assert count_records(str(output)) == sum(metadata["class_counts"])


def test_fit_and_val_split_train_without_overlap_and_val_is_balanced(tmp_path, monkeypatch):
    raw = write_fake_fashion_mnist(tmp_path / "raw", n_per_class=8)
    monkeypatch.setattr("hf_koleo.data.fashion_mnist.VALIDATION_PER_CLASS", 3)
    fit = json.loads((prepare_fashion_mnist(tmp_path / "fit", "fit", raw_dir=raw) / "metadata.json").read_text())
    val = json.loads((prepare_fashion_mnist(tmp_path / "val", "val", raw_dir=raw) / "metadata.json").read_text())
    assert val["class_counts"] == [3] * 10 and fit["class_counts"] == [5] * 10
    images, labels = load_split("train", raw)
    held_out, rest = split_indices("val", labels), split_indices("fit", labels)
    assert len(set(held_out) | set(rest)) == len(labels) and not set(held_out) & set(rest)
    fit_lt = prepare_fashion_mnist(tmp_path / "fit_lt", "fit", imbalance_ratio=5, raw_dir=raw)
    assert json.loads((fit_lt / "metadata.json").read_text())["class_counts"] == long_tailed_counts(5, 10, 5)
    with pytest.raises(ValueError, match="split must be one of"):
        prepare_fashion_mnist(tmp_path / "bad", "validation", raw_dir=raw)


def test_builtin_fashion_mnist_is_prepared_into_the_cache(tmp_path, monkeypatch):
    raw = write_fake_fashion_mnist(tmp_path / "raw", n_per_class=5)
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("hf_koleo.data.fashion_mnist.RAW_DIR", raw)
    monkeypatch.setattr(
        "hf_koleo.data.sources.prepare_fashion_mnist",
        lambda output, split, imbalance_ratio=None: prepare_fashion_mnist(output, split, imbalance_ratio, raw_dir=raw),
    )
    assert count_records("fashion_mnist:test") == 50
    assert (tmp_path / "cache" / "fashion_mnist" / "test" / "metadata.json").exists()
    assert count_records("fashion_mnist:train_lt5") == sum(long_tailed_counts(5, 10, 5))


def test_missing_fashion_mnist_files_explain_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KOLEO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        "hf_koleo.data.sources.prepare_fashion_mnist",
        lambda output, split, imbalance_ratio=None: prepare_fashion_mnist(output, split, raw_dir=tmp_path / "none"),
    )
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_source("fashion_mnist:train")


def test_records_are_tagged_with_their_file_and_row(tmp_path):
    first = str(write_parquet(tmp_path / "shards" / "a.parquet", 5))
    second = str(write_parquet(tmp_path / "shards" / "b.parquet", 4, start_seed=100))
    source = load_source(str(tmp_path / "shards"))
    records = list(iter_records(source, "shards"))
    assert [record[ORIGIN] for record in records] == [(first, row) for row in range(5)] + [
        (second, row) for row in range(4)
    ]
    assert [record["image"] for record in records] == [record["image"] for record in source]
    assert describe_record(records[6]) == f"{second} row 1"
    split = list(iter_records(shard_source(source, rank=1, world_size=2, strategy="examples"), "shards"))
    assert [record[ORIGIN] for record in split] == [(first, 1), (first, 3), (second, 1), (second, 3)]
    tar = str(write_webdataset(tmp_path / "wds" / "train-0000.tar", n_images=3))
    assert describe_record(list(iter_records(load_source(tar), tar))[2]) == f"{tar} member sample0002.png"


def test_a_text_file_named_tar_is_an_error_naming_it(tmp_path):
    (tmp_path / "notes.tar").write_text("these are notes, not a tar archive\n" * 20)
    with pytest.raises(
        ValueError, match=r"notes.tar': .*notes.tar is not a tar archive \(invalid header in its first block\)$"
    ):
        load_source(str(tmp_path / "notes.tar"))


def test_a_tar_shard_cut_short_is_warned_about_by_name(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    whole = write_webdataset(tmp_path / "wds" / "train-0000.tar", n_images=6).read_bytes()
    write_webdataset(tmp_path / "wds" / "train-0001.tar", n_images=6)
    cut = tmp_path / "wds" / "train-0000.tar"
    for size, n_records in ((2048 * 3, 3), (2048 * 3 + 700, 3)):  # after sample 2 / inside sample 3's image
        cut.write_bytes(whole[:size])
        caplog.clear()
        records = list(iter_records(load_source(str(tmp_path / "wds")), "wds"))
        assert len(records) == n_records + 6
        assert f"webdataset shard {cut} looks truncated" in caplog.text
    assert f"tar shard {cut} ends early or is damaged after 3 records (unexpected end of data)" in caplog.text


def test_an_image_column_of_ints_or_strings_is_an_error_saying_so(tmp_path):
    pq.write_table(pa.table({"image": [1, 2, 3], "label": [0, 1, 0]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"img": ["a.png", "b.png"]}), tmp_path / "strings.parquet")
    with pytest.raises(ValueError, match=r"'.*ints.parquet': its image column 'image' holds int64 values; expected "):
        load_source(str(tmp_path / "ints.parquet"))
    with pytest.raises(ValueError, match=r"image column 'img' holds string values; expected encoded images"):
        load_decoded(str(tmp_path / "strings.parquet"), 8, use_cache=False)


def test_empty_and_unreadable_parquet_files_are_named(tmp_path, caplog):
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")  # one 0-row group
    with pytest.raises(ValueError, match=r"its parquet file .*empty.parquet is empty \(0 rows\)"):
        load_source(str(tmp_path / "empty.parquet"))
    write_parquet(tmp_path / "folder" / "a.parquet", 0)
    write_parquet(tmp_path / "folder" / "b.parquet", 3)
    assert len(first_records(load_source(str(tmp_path / "folder")), 100)) == 3
    assert "leaving out 1 empty parquet file(s)" in caplog.text and "a.parquet" in caplog.text
    (tmp_path / "folder" / "c.parquet").write_text("not parquet")
    for read in (count_records, load_source):
        with pytest.raises(ValueError, match=r"c.parquet is not a readable parquet file"):
            read(str(tmp_path / "folder"))
