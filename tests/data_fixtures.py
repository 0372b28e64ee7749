"""Small on-disk data sources for tests."""

import gzip
import io
import tarfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from hf_koleo.data.fashion_mnist import RAW_FILES


def png_bytes(seed: int, size=(20, 20), mode="L") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, n_images: int, corrupt: tuple[int, ...] = (), start_seed: int = 0) -> Path:
    images = []
    for index in range(n_images):
        data = png_bytes(start_seed + index, mode=("L", "RGBA", "P", "RGB")[index % 4])
        if index in corrupt:
            data = data[: len(data) // 3] if index % 2 else b"garbage"
        images.append({"bytes": data, "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    table = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n_images)]}, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(path))
    return path


def write_imagefolder(root: Path, per_class: int = 3) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            (root / label / f"{index}.png").write_bytes(png_bytes(index + 10 * len(label), mode="RGB"))
    return root


def write_webdataset(path: Path, n_images: int = 6, truncated: tuple[int, ...] = ()) -> Path:
    """``n_images`` PNG + ``.cls`` samples; the PNGs of the samples in ``truncated`` lose their second half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for index in range(n_images):
            image = png_bytes(index)
            if index in truncated:
                image = image[: len(image) // 2]
            for suffix, payload in ((".png", image), (".cls", str(index % 2).encode())):
                info = tarfile.TarInfo(f"sample{index:04d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return path


def write_fake_fashion_mnist(raw_dir: Path, n_per_class: int = 20) -> Path:
    """IDX files shaped like Fashion-MNIST's (10 classes, 28x28) with random pixels."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for image_name, label_name in RAW_FILES.values():
        labels = np.repeat(np.arange(10, dtype=np.uint8), n_per_class)
        images = generator.integers(0, 255, (len(labels), 28, 28), dtype=np.uint8)
        header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
        (raw_dir / image_name).write_bytes(gzip.compress(header + images.tobytes()))
        header = bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big")
        (raw_dir / label_name).write_bytes(gzip.compress(header + labels.tobytes()))
    return raw_dir
