"""Name a data source with one string and get a streamed ``datasets.IterableDataset``.

Accepted names:

* built-ins: ``demo`` / ``demo:train`` / ``demo:test`` (the Fashion-MNIST slice shipped in the
  package), ``fashion_mnist:train``, ``fashion_mnist:test``, ``fashion_mnist:val`` (10,000 training
  images held out, 1,000 per class) and ``fashion_mnist:fit`` (the other 50,000), each optionally
  long-tailed with ``_lt<R>`` (imbalance ratio R, e.g. ``train_lt100``), prepared from Debian's IDX files into
  ``$HF_KOLEO_CACHE`` (default ``~/.cache/hf_koleo``) on first use;
* a local parquet file or a folder of parquet shards;
* a local image folder (``imagefolder`` layout: one sub-folder per class);
* webdataset tar shards: a ``.tar`` file or a glob such as ``shards/train-*.tar``;
* anything else is a Hub dataset id (``owner/name``, optionally ``owner/name:split``), streamed.

Every source comes back with an ``image`` column left undecoded (``{"bytes", "path"}``; decoding
happens later so a corrupt record is skipped, not fatal) and, where the source has one, ``label``.

A Hub dataset is read through ``HF_ENDPOINT``; a dropped connection is retried by huggingface_hub
(each request, with backoff) and ``datasets`` (each read, ``STREAMING_READ_MAX_RETRIES`` times).
When those retries run out, opening (:func:`load_source`) or reading (:func:`guard_records`) the
source raises :class:`SourceConnectionError`, naming the source and the endpoint.

Bad files are named: :func:`load_source` refuses a local ``.tar`` that is not a tar archive, a
parquet file it cannot read, a source whose parquet files are all empty and an image column of
another type (ints, strings) with a ``ValueError``, and warns about a tar shard that looks
truncated (:mod:`records` names the file and record of each record read).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow as pa

from .fashion_mnist import prepare_fashion_mnist

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED = {
    "demo": "fashion_mnist_demo_train",
    "demo:train": "fashion_mnist_demo_train",
    "demo:test": "fashion_mnist_demo_test",
}
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "fine_label")
_FASHION_MNIST = re.compile(r"^fashion_mnist:(train|test|fit|val)(?:_lt(\d+(?:\.\d+)?))?$")


class SourceConnectionError(ConnectionError):
    """A streamed data source could not be opened or read any further: the connection kept failing."""


def _transport_failure(error: BaseException) -> bool:
    """Whether ``error`` is the network failing (after the libraries' retries), not a bad request."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code >= 500
    return isinstance(error, (ConnectionError, TimeoutError, httpx.TransportError))


@contextlib.contextmanager
def connection_errors_name_the_source(name: str) -> Iterator[None]:
    """Re-raise a transport failure inside the block as a :class:`SourceConnectionError` naming ``name``."""
    try:
        yield
    except SourceConnectionError:
        raise
    except Exception as error:
        if not _transport_failure(error):
            raise
        cause = " ".join(str(error).split()) or type(error).__name__
        if error.__cause__ is not None:  # datasets' "Server Disconnected" hides the transport's own message
            cause = f"{cause}: {' '.join(str(error.__cause__).split())}"
        raise SourceConnectionError(
            f"data source {name!r}: the connection to the Hub at {datasets.config.HF_ENDPOINT} (HF_ENDPOINT) "
            f"kept failing ({type(error).__name__}: {cause}) after huggingface_hub's and datasets' retries; "
            "check the network or HF_ENDPOINT, then continue with --resume"
        ) from error


def guard_records(records: Iterable[dict], name: str) -> Iterator[dict]:
    """``records`` of the source ``name``, a transport failure raised as :class:`SourceConnectionError`."""
    with connection_errors_name_the_source(name):
        yield from records


def cache_dir() -> Path:
    return Path(os.environ.get("HF_KOLEO_CACHE", Path.home() / ".cache" / "hf_koleo"))


def fashion_mnist_dir(name: str) -> Path:
    """Folder of prepared parquet shards for a ``fashion_mnist:...`` name (prepared if missing)."""
    match = _FASHION_MNIST.match(name)
    if match is None:
        raise ValueError(
            f"unknown Fashion-MNIST source {name!r}: use fashion_mnist:train, :test, :fit or :val, optionally + _lt<R>"
        )
    split, ratio = match.group(1), match.group(2)
    target = cache_dir() / "fashion_mnist" / (split if ratio is None else f"{split}_lt{ratio}")
    if not (target / "metadata.json").exists():
        # Prepare into a temporary folder and rename, so an interrupted run never leaves half a dataset.
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        prepare_fashion_mnist(staging, split, imbalance_ratio=float(ratio) if ratio else None)
        if not (target / "metadata.json").exists():
            os.replace(staging, target)
    return target


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DATA_FILE_SUFFIXES = (".parquet", ".tar", ".arrow", ".csv", ".json", ".jsonl", ".zip", ".gz")


def looks_like_path(name: str) -> bool:
    """Whether a source name that is not on disk was meant as a local path rather than a Hub id.

    ``./x``, ``/x``, ``~/x``, ``a/b/c``, a data-file suffix, or a first component that is a local
    folder (``data/train`` when ``data/`` exists) are paths; ``owner/name[:split]`` is a Hub id.
    """
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    stem = name.partition(":")[0]
    if stem.lower().endswith(DATA_FILE_SUFFIXES + IMAGE_SUFFIXES):
        return True
    first = stem.split("/")[0]
    return "/" in stem and Path(first).is_dir()


def resolve_data_files(name: str) -> tuple[str, dict]:
    """``(builder, load_dataset keyword arguments)`` for a source name (no I/O but file globbing)."""
    if name in EMBEDDED:
        return "parquet", {"data_files": sorted(str(p) for p in (EMBEDDED_DIR / EMBEDDED[name]).glob("*.parquet"))}
    if name.startswith("fashion_mnist:"):
        return "parquet", {"data_files": sorted(str(p) for p in fashion_mnist_dir(name).glob("*.parquet"))}
    path = Path(name).expanduser()
    if any(character in name for character in "*?[") or name.endswith(".tar"):
        files = sorted(glob.glob(str(path)))
        if not files:
            raise FileNotFoundError(f"data source {name!r} matches no files")
        builder = "webdataset" if files[0].endswith(".tar") else "parquet"
        return builder, {"data_files": files}
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"data source {name!r}: a single file must be .parquet or .tar")
        return "parquet", {"data_files": [str(path)]}
    if path.is_dir():
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            return "parquet", {"data_files": parquet}
        tars = sorted(str(p) for p in path.rglob("*.tar"))
        if tars:
            return "webdataset", {"data_files": tars}
        return "imagefolder", {"data_dir": str(path)}
    if looks_like_path(name):
        raise FileNotFoundError(
            f"data source {name!r} does not exist: no such file or folder {str(path.absolute())!r} "
            "(a Hub dataset id is owner/name[:split])"
        )
    hub_id, _, split = name.partition(":")
    return hub_id, {"split_override": split or None}


def count_records(name: str) -> int | None:
    """Number of records of a local source when it is cheap to know (parquet metadata, file count)."""
    try:
        builder, kwargs = resolve_data_files(name)
    except (FileNotFoundError, ValueError):
        return None
    if builder == "parquet":
        return sum(parquet_rows(path, name) for path in kwargs["data_files"])
    if builder == "imagefolder":
        return sum(1 for path in Path(kwargs["data_dir"]).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    return None


def parquet_rows(path: str, name: str) -> int:
    """Rows of a local parquet file, from its footer; a ValueError naming it when it is not parquet."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"data source {name!r}: {path} is not a readable parquet file ({error})") from error


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: datasets reads compressed tars too


def tar_problem(path: str, name: str) -> str | None:
    """Why the local tar shard ``path`` looks truncated (None when it looks whole); reads 1.5 KiB.

    Raises:
        ValueError: naming the file, when it is not a tar archive at all.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        header = file.read(tarfile.BLOCKSIZE)
        if header.startswith(_COMPRESSED):
            return None
        try:
            tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
        except tarfile.EOFHeaderError:
            pass  # an empty archive: it holds no records, which the stream reports
        except tarfile.HeaderError as error:
            raise ValueError(
                f"data source {name!r}: {path} is not a tar archive ({error} in its first block)"
            ) from error
        if size % tarfile.BLOCKSIZE:
            return f"its size, {size} bytes, is not a whole number of 512-byte tar blocks"
        file.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
        if file.read().count(0) != min(size, 2 * tarfile.BLOCKSIZE):
            return "it does not end with the two empty blocks that close a tar archive"
    return None


def check_local_files(builder: str, kwargs: dict, name: str) -> dict:
    """``kwargs`` without the empty parquet files of ``data_files`` (warned about), after checking them;
    for webdataset shards of which the first looks truncated, with the ``features`` of a whole one
    (``datasets`` infers them from the first samples of the first shard, and would fail there).

    Raises:
        ValueError: naming the file, when a parquet file cannot be read, every parquet file is empty,
            or a ``.tar`` is not a tar archive.
    """
    files = kwargs.get("data_files") or []
    if builder == "parquet" and files:
        rows = {path: parquet_rows(path, name) for path in files}
        empty = [path for path in files if rows[path] == 0]
        if len(empty) == len(files):
            what = (
                f"its parquet file {files[0]} is" if len(files) == 1 else f"all {len(files)} of its parquet files are"
            )
            raise ValueError(f"data source {name!r}: {what} empty (0 rows)")
        if empty:
            logger.warning(
                "data source %r: leaving out %d empty parquet file(s): %s", name, len(empty), ", ".join(empty)
            )
            kwargs = {**kwargs, "data_files": [path for path in files if rows[path]]}
    if builder == "webdataset":
        truncated = []
        for path in files:
            problem = tar_problem(path, name)
            if problem:
                truncated.append(path)
                logger.warning(
                    "data source %r: webdataset shard %s looks truncated (%s): the samples after the cut are missing",
                    name,
                    path,
                    problem,
                )
        whole = [path for path in files if path not in truncated]
        if files and files[0] in truncated and whole:
            features = datasets.load_dataset("webdataset", data_files=whole[:1], split="train", streaming=True).features
            kwargs = {**kwargs, "features": features}
    return kwargs


def load_source(name: str, split: str = "train", streaming: bool = True) -> datasets.IterableDataset:
    """Open a data source by name (see the module docstring) as a streamed dataset.

    Returns:
        An ``IterableDataset`` (or ``Dataset`` when ``streaming=False``) with columns ``image``
        (undecoded) and, if the source has labels, ``label``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a data source must be a non-empty string, got {name!r}")
    builder, kwargs = resolve_data_files(name)
    split = kwargs.pop("split_override", None) or split
    if builder in ("parquet", "webdataset", "imagefolder"):
        split = "train"  # local files always load as one "train" split
    kwargs = check_local_files(builder, kwargs, name)
    try:
        with connection_errors_name_the_source(name):
            dataset = datasets.load_dataset(builder, split=split, streaming=streaming, **kwargs)
    except tarfile.TarError as error:  # a Hub shard: the local ones were checked above
        raise ValueError(f"data source {name!r}: a shard is not a readable tar archive ({error})") from error
    return standardise_columns(dataset, name)


def standardise_columns(dataset, name: str = "dataset"):
    """Rename the image / label columns to ``image`` / ``label``, keep only those, never decode."""
    features = dataset.features or {}
    columns = list(features) if features else list(dataset.column_names or [])
    image_column = next((c for c in columns if isinstance(features.get(c), datasets.Image)), None)
    image_column = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_column is None:
        raise ValueError(f"data source {name!r} has no image column; columns are {columns}")
    check_image_feature(features.get(image_column), image_column, name)
    label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
    if isinstance(features.get(image_column), datasets.Image):
        # Before any rename: ``rename_columns`` is a ``map`` that decodes its input with the features
        # it sees, so a cast afterwards would come too late (one truncated PNG in a webdataset tar
        # raised inside ``datasets`` instead of being skipped and counted).
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    keep = {image_column: "image", **({label_column: "label"} if label_column else {})}
    dataset = dataset.select_columns(list(keep))
    renames = {old: new for old, new in keep.items() if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    return dataset


def check_image_feature(feature, column: str, name: str) -> None:
    """Refuse an image column whose declared type cannot hold encoded images (ints, strings, lists).

    Raises:
        ValueError: naming the column, the type it holds and what is expected.
    """
    if feature is None or isinstance(feature, datasets.Image):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return
    if isinstance(feature, dict) and "bytes" in feature:
        return  # {"bytes", "path"} structs, as datasets stores images
    kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
    raise ValueError(
        f"data source {name!r}: its image column {column!r} holds {kind} values; expected encoded images "
        "(a datasets Image feature, binary bytes, or {'bytes', 'path'} structs)"
    )
