"""Labelled examples (images or texts) and the label operations the pipeline applies to them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PrecomputeError

__all__ = [
    "DataError",
    "LabelledExamples",
    "flip_labels",
    "select_classes",
    "split_train_test",
    "stratified_split_indices",
    "subsample_per_class",
]


class DataError(PrecomputeError, ValueError):
    """Bad input data. The message is one line: what is wrong, where (file/path), and how to fix it."""


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no single truth value
class LabelledExamples:
    """N labelled examples of one modality.

    labels:      int64 [N], values in 0..C-1, indexing ``class_names``.
    class_names: C names.
    sources:     N short provenance strings ("digits#17", "bbc/tech/012.txt", "train.csv:row 5").
    images:      uint8 [N, H, W] (grayscale) or [N, H, W, 3] (RGB), or None; in memory, or a
                 read-only ``np.memmap`` (``load_npy_images``) for sets larger than memory.
    texts:       N strings, or None. Exactly one of ``images`` / ``texts`` is set.
    """

    labels: np.ndarray
    class_names: tuple[str, ...]
    sources: tuple[str, ...]
    images: np.ndarray | None = None
    texts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise DataError(f"labels must be 1-D, got shape {labels.shape}; pass one label per example")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got dtype {labels.dtype}; map class names to ids first")
        # Normalised in place so every consumer can rely on int64 labels and tuple fields.
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        n = labels.shape[0]
        n_classes = len(self.class_names)
        if n_classes == 0:
            raise DataError("class_names is empty; pass at least one class name")
        if len(set(self.class_names)) != n_classes:
            raise DataError(f"class_names has duplicates: {', '.join(self.class_names)}; make names unique")
        if len(self.sources) != n:
            raise DataError(f"{len(self.sources)} sources for {n} labels; pass one source per example")
        if n and (self.labels.min() < 0 or self.labels.max() >= n_classes):
            bad = int(self.labels[(self.labels < 0) | (self.labels >= n_classes)][0])
            raise DataError(f"label {bad} is out of range 0..{n_classes - 1} for {n_classes} class names")
        if (self.images is None) == (self.texts is None):
            raise DataError("set exactly one of images / texts")
        if self.images is not None:
            # a memory map stays one (the pipeline then streams it from disk)
            images = self.images if isinstance(self.images, np.memmap) else np.asarray(self.images)
            if images.dtype != np.uint8:
                raise DataError(f"images must be uint8, got {images.dtype}; scale to 0..255 and cast")
            if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
                raise DataError(f"images must be [N,H,W] or [N,H,W,3], got shape {images.shape}")
            if images.shape[0] != n:
                raise DataError(f"{images.shape[0]} images for {n} labels; pass one label per image")
            object.__setattr__(self, "images", images)
        else:
            texts = tuple(self.texts)  # type: ignore[arg-type]
            if len(texts) != n:
                raise DataError(f"{len(texts)} texts for {n} labels; pass one label per text")
            if not all(isinstance(t, str) for t in texts):
                raise DataError("texts must all be str")
            object.__setattr__(self, "texts", texts)

    @property
    def modality(self) -> str:
        """"image" or "text"."""
        return "image" if self.images is not None else "text"

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledExamples:
        """The examples at ``indices`` (int positions, or a bool mask of length N), same class_names."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(f"bool mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise DataError(f"subset index out of range for {len(self)} examples")
        return LabelledExamples(
            labels=self.labels[idx],
            class_names=self.class_names,
            sources=tuple(self.sources[i] for i in idx),
            images=None if self.images is None else self.images[idx],
            texts=None if self.texts is None else tuple(self.texts[i] for i in idx),
        )


def _resolve_class(ex: LabelledExamples, cls: str | int, where: str) -> int:
    known = ", ".join(ex.class_names)
    if isinstance(cls, str):
        if cls in ex.class_names:
            return ex.class_names.index(cls)
        # A digit string is a name first ("5" in digits), an id only if no class has that name.
        if cls.strip().isdigit() and int(cls) < ex.n_classes:
            return int(cls)
    elif isinstance(cls, (int, np.integer)) and not isinstance(cls, bool):
        if 0 <= int(cls) < ex.n_classes:
            return int(cls)
    raise DataError(f"unknown class {cls!r} in {where}; known: {known}")


def select_classes(
    ex: LabelledExamples, classes: Sequence[str | int], *, where: str = "the dataset"
) -> LabelledExamples:
    """Keep only ``classes`` (names or integer ids), relabelled 0..k-1 in the given order.

    ``where`` names the dataset in error messages (e.g. a path).
    """
    if isinstance(classes, str):
        classes = [classes]  # one name, not a sequence of characters
    if len(classes) == 0:
        raise DataError(f"no classes selected from {where}; pick at least one of: {', '.join(ex.class_names)}")
    ids = [_resolve_class(ex, c, where) for c in classes]
    if len(set(ids)) != len(ids):
        dup = next(ex.class_names[i] for i in ids if ids.count(i) > 1)
        raise DataError(f"class {dup!r} selected twice from {where}; list each class once")
    counts = np.bincount(ex.labels, minlength=ex.n_classes)
    for i in ids:
        if counts[i] == 0:
            raise DataError(f"class {ex.class_names[i]!r} has no examples in {where}; pick classes that occur")
    old_to_new = np.full(ex.n_classes, -1, dtype=np.int64)
    old_to_new[ids] = np.arange(len(ids))
    keep = np.flatnonzero(old_to_new[ex.labels] >= 0)
    sub = ex if len(keep) == len(ex) else ex.subset(keep)     # no copy (memory-mapped images stay on disk)
    return LabelledExamples(
        labels=old_to_new[sub.labels],
        class_names=tuple(ex.class_names[i] for i in ids),
        sources=sub.sources,
        images=sub.images,
        texts=sub.texts,
    )


def stratified_split_indices(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 index arrays (train, test), the test part holding ~test_fraction of every class.

    A class with >= 2 examples always gets at least one in each part; a singleton class goes to train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * idx.size))
        if idx.size >= 2:
            n_test = min(max(n_test, 1), idx.size - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    empty = np.empty(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
    )


def split_train_test(
    ex: LabelledExamples, test_fraction: float, seed: int
) -> tuple[LabelledExamples, LabelledExamples]:
    """Stratified (train, test) split, deterministic for a seed; original order kept within each part."""
    train_idx, test_idx = stratified_split_indices(ex.labels, test_fraction, seed)
    return ex.subset(train_idx), ex.subset(test_idx)


def flip_labels(
    labels: np.ndarray, rate: float, n_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly round(rate * N) labels, each to a uniformly chosen different class.

    Returns (new_labels int64 [N], flipped bool [N]); ``labels`` is not modified.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"flip rate must be in [0, 1], got {rate}")
    n_flip = int(round(rate * labels.size))
    new = labels.copy()
    flipped = np.zeros(labels.size, dtype=bool)
    if n_flip == 0:
        return new, flipped
    if n_classes < 2:
        raise DataError(f"cannot flip labels with {n_classes} class; need at least 2 classes")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"labels out of range 0..{n_classes - 1}; pass the right n_classes")
    rng = np.random.default_rng(seed)
    idx = rng.choice(labels.size, size=n_flip, replace=False)
    # An offset in 1..C-1 modulo C is uniform over the C-1 other classes and never zero.
    offset = rng.integers(1, n_classes, size=n_flip)
    new[idx] = (labels[idx] + offset) % n_classes
    flipped[idx] = True
    return new, flipped


def subsample_per_class(ex: LabelledExamples, max_per_class: int, seed: int) -> LabelledExamples:
    """At most ``max_per_class`` random examples of each class, deterministic for a seed, order kept."""
    if max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1, got {max_per_class}")
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for c in range(ex.n_classes):
        idx = np.flatnonzero(ex.labels == c)
        if idx.size > max_per_class:
            idx = rng.choice(idx, size=max_per_class, replace=False)
        keep.append(idx)
    return ex.subset(np.sort(np.concatenate(keep)))
