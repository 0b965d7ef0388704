"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (gzipped IDX, no download at run time).

60,000 training + 10,000 test grey 28x28 garments in 10 classes. The preset reads the training
files only (the t10k files are not needed); a missing or unreadable file stops with one line that
names the apt-get command and ``--data-dir``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .examples import DataError, LabelledExamples
from .user_files import load_mnist_idx

__all__ = ["FASHION_CLASSES", "FASHION_DIR", "FASHION_INSTALL", "fashion_available", "load_fashion_mnist"]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _paths(data_dir: Path, split: str) -> tuple[Path, Path]:
    """The IDX pair of ``split``, gzipped or not (Debian ships .gz; users may have extracted them)."""
    out = []
    for name in _FILES[split]:
        gz, plain = data_dir / name, data_dir / name[: -len(".gz")]
        out.append(gz if gz.exists() or not plain.exists() else plain)
    return out[0], out[1]


def fashion_available(data_dir: str | Path | None = None) -> bool:
    """True when the training IDX pair is present in ``data_dir`` (default: Debian's location)."""
    return all(p.is_file() for p in _paths(Path(data_dir or FASHION_DIR), "train"))


def load_fashion_mnist(data_dir: str | Path | None = None, split: str = "train") -> LabelledExamples:
    """Fashion-MNIST ``split`` ("train" 60,000 or "t10k" 10,000): uint8 [N, 28, 28], labels 0..9 named
    by FASHION_CLASSES, sources "fashion-<split>#i". Raises DataError (one line) when files are missing."""
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; choose train or t10k")
    directory = Path(data_dir or FASHION_DIR)
    images, labels = _paths(directory, split)
    missing = [p.name for p in (images, labels) if not p.is_file()]
    if missing:
        raise DataError(f"{directory}: Fashion-MNIST not found (missing {', '.join(missing)}); install it with "
                        f"`{FASHION_INSTALL}` (Debian/Ubuntu) or point --data-dir at a folder "
                        f"holding {_FILES[split][0]} and {_FILES[split][1]} (gzipped or not)")
    ex = load_mnist_idx(images, labels)
    if ex.images.shape[1:] != (28, 28) or len(ex.class_names) != 10:
        raise DataError(f"{images}: expected 28x28 images in 10 classes, got {ex.images.shape[1:]} and "
                        f"{len(ex.class_names)} classes; point --data-dir at the Fashion-MNIST files")
    names = tuple(FASHION_CLASSES[int(c)] for c in ex.class_names)
    return replace(ex, class_names=names, sources=tuple(f"fashion-{split}#{i}" for i in range(len(ex.labels))))
