"""Fashion-MNIST (Debian's ``dataset-fashion-mnist`` IDX files) as parquet shards, optionally long-tailed.

Besides the official ``train`` and ``test`` splits, ``val`` holds out ``VALIDATION_PER_CLASS`` random
training images of every class (seed ``VALIDATION_SEED``) and ``fit`` is the rest of ``train``, so
hyper-parameters can be chosen without touching the test split.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

RAW_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
RAW_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLITS = ("train", "test", "fit", "val")  # fit + val = train, disjoint
VALIDATION_PER_CLASS = 1000
VALIDATION_SEED = 0
LICENSE_NOTE = (
    "Fashion-MNIST, Copyright (c) 2017 Zalando SE, MIT licence "
    "(https://github.com/zalandoresearch/fashion-mnist/blob/master/LICENSE)."
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file into a uint8 array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    n_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims)
    if body.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: expected {math.prod(shape)} values, found {body.size}")
    return body.reshape(shape)


def load_split(split: str, raw_dir: str | os.PathLike = RAW_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 28, 28) uint8, labels (n,) uint8)`` of ``"train"`` or ``"test"``."""
    if split not in RAW_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(RAW_FILES)}, got {split!r}")
    image_file, label_file = (Path(raw_dir) / name for name in RAW_FILES[split])
    for path in (image_file, label_file):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: install Debian's Fashion-MNIST with `apt-get install -y dataset-fashion-mnist` "
                "or pass raw_dir"
            )
    images, labels = read_idx(image_file), read_idx(label_file)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    return images, labels


def long_tailed_counts(max_count: int, n_classes: int, imbalance_ratio: float) -> list[int]:
    """Exponential profile: class ``c`` keeps ``max_count * imbalance_ratio ** (-c / (n_classes - 1))``."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    return [max(1, int(max_count * imbalance_ratio ** (-c / (n_classes - 1)))) for c in range(n_classes)]


def long_tailed_indices(labels: np.ndarray, imbalance_ratio: float, seed: int = 0) -> np.ndarray:
    """Indices of a long-tailed subset: class 0 keeps everything, the last class ``1/imbalance_ratio``."""
    classes = np.unique(labels)
    max_count = int(min(np.sum(labels == c) for c in classes))
    counts = long_tailed_counts(max_count, len(classes), imbalance_ratio)
    generator = np.random.default_rng(seed)
    chosen = [generator.permutation(np.flatnonzero(labels == c))[:count] for c, count in zip(classes, counts)]
    return np.sort(np.concatenate(chosen))


def balanced_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of ``per_class`` random examples of every class."""
    generator = np.random.default_rng(seed)
    chosen = [generator.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def split_indices(split: str, labels: np.ndarray) -> np.ndarray:
    """Indices into the raw ``train`` (``fit``, ``val``) or ``test`` split of the named split."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {list(SPLITS)}, got {split!r}")
    if split in ("train", "test"):
        return np.arange(len(labels))
    held_out = balanced_indices(labels, VALIDATION_PER_CLASS, VALIDATION_SEED)
    return held_out if split == "val" else np.setdiff1d(np.arange(len(labels)), held_out)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_parquet_shards(
    images: np.ndarray,
    labels: np.ndarray,
    output_dir: str | os.PathLike,
    n_shards: int = 1,
    metadata: dict | None = None,
) -> Path:
    """Write PNG-encoded images with ClassLabel labels as ``train-0000i-of-0000n.parquet`` shards.

    ``metadata.json`` beside the shards records the per-class counts, the licence and ``metadata``.
    """
    import datasets

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png_bytes(pixels), "path": None} for pixels in images], "label": labels.tolist()},
        features=features,
    )
    for index in range(n_shards):
        shard = table.shard(num_shards=n_shards, index=index, contiguous=True)
        shard.to_parquet(str(output_dir / f"data-{index:05d}-of-{n_shards:05d}.parquet"))
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
    info = {
        "n_images": len(labels),
        "class_names": list(CLASS_NAMES),
        "class_counts": counts,
        "license": LICENSE_NOTE,
        **(metadata or {}),
    }
    (output_dir / "metadata.json").write_text(json.dumps(info, indent=2))
    return output_dir


def prepare_fashion_mnist(
    output_dir: str | os.PathLike,
    split: str = "train",
    imbalance_ratio: float | None = None,
    per_class: int | None = None,
    n_shards: int = 4,
    seed: int = 0,
    raw_dir: str | os.PathLike = RAW_DIR,
) -> Path:
    """Convert a Fashion-MNIST split to parquet shards.

    Args:
        output_dir: where the shards and ``metadata.json`` go.
        split: ``"train"``, ``"test"``, ``"val"`` (held out from train) or ``"fit"`` (train minus val).
        imbalance_ratio: if set, keep a long-tailed subset (exponential profile, largest/smallest
            class = ``imbalance_ratio``).
        per_class: if set, keep a balanced subset of this many images per class.
        n_shards: parquet files to write (more shards = more DataLoader workers can stream).
        seed: subsampling seed.
        raw_dir: folder holding the IDX ``.gz`` files.
    """
    if imbalance_ratio is not None and per_class is not None:
        raise ValueError("choose imbalance_ratio or per_class, not both")
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {list(SPLITS)}, got {split!r}")
    images, labels = load_split("test" if split == "test" else "train", raw_dir)
    indices = split_indices(split, labels)
    if imbalance_ratio is not None:
        indices = indices[long_tailed_indices(labels[indices], imbalance_ratio, seed)]
    elif per_class is not None:
        indices = indices[balanced_indices(labels[indices], per_class, seed)]
    metadata = {
        "source": f"fashion_mnist:{split}",
        "imbalance_ratio": imbalance_ratio,
        "per_class": per_class,
        "seed": seed,
    }
    return write_parquet_shards(images[indices], labels[indices], output_dir, n_shards, metadata)
