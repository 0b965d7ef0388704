"""Loaders for users' own data: an image folder, MNIST-format IDX files, a pair of .npy arrays, a
CSV/JSONL text table.

Every check happens here, before any training, and fails with a one-line DataError that names the
offending file and says how to fix it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .examples import DataError, LabelledExamples

__all__ = ["IMAGE_SUFFIXES", "load_image_folder", "load_mnist_idx", "load_npy_images", "load_text_table"]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


def _one_line(err: BaseException) -> str:
    """The exception as a single line, so messages stay one line."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def _require_two_classes(where: Path | str, class_names: tuple[str, ...], what: str) -> None:
    if len(class_names) < 2:
        found = f"only {class_names[0]!r}" if class_names else "none"
        raise DataError(f"{where}: found 1 class ({found}); a classifier needs at least 2 {what}")


# ---------------------------------------------------------------------------------------------
# Image folder


def _is_gray(im: Image.Image) -> bool:
    if im.mode in _GRAY_MODES:
        return True
    if im.mode in ("P", "PA"):
        # A palette image is grayscale only if every colour it uses is.
        rgb = np.asarray(im.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _to_uint8(im: Image.Image, gray: bool) -> np.ndarray:
    """uint8 [H, W] if ``gray`` else [H, W, 3]."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # PIL's own conversion to "L" clips 16-bit values to 255; rescale instead.
        arr = np.asarray(im, dtype=np.float64)
        if arr.max(initial=0.0) > 255.0:
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return arr if gray else np.repeat(arr[..., None], 3, axis=-1)
    return np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)


def load_image_folder(root: str | Path) -> LabelledExamples:
    """Images in ``root/<class>/*.png|jpg|jpeg|bmp|gif``; class names are the subfolder names, sorted.

    images: uint8 [N, H, W] if every image is grayscale, else [N, H, W, 3] RGB (alpha dropped, the first
    frame of an animated GIF). sources: "<class>/<file name>". All images must have one size.
    """
    root = Path(root)
    layout = f"put images in {root}/<class name>/*.png, one subfolder per class"
    if not root.exists():
        raise DataError(f"{root}: no such folder; {layout}")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; {layout}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders; {layout}")

    loaded: list[tuple[Path, Image.Image]] = []
    labels: list[int] = []
    for label, folder in enumerate(class_dirs):
        # Hidden files skipped: macOS archives carry "._x.png" metadata files that are not images.
        files = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "add images or delete the folder")
        for path in files:
            try:
                with Image.open(path) as im:
                    im.load()  # open() only reads the header; decoding is where broken files fail
                    loaded.append((path, im.copy()))
            # Broken files surface as any of these, depending on the format plugin.
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
                raise DataError(f"{path}: cannot read image ({_one_line(err)}); "
                                "remove or replace the file") from None
            labels.append(label)
    class_names = tuple(p.name for p in class_dirs)
    _require_two_classes(root, class_names, "class folders")

    sizes = Counter(im.size for _, im in loaded)
    if len(sizes) > 1:
        common = sizes.most_common(1)[0][0]
        ok_file = next(p for p, im in loaded if im.size == common)
        odd_file, odd_im = next((p, im) for p, im in loaded if im.size != common)
        w, h = common
        raise DataError(
            f"{root}: images have different sizes: {ok_file} is {h}x{w}, {odd_file} is "
            f"{odd_im.size[1]}x{odd_im.size[0]} (height x width); "
            f"resize all images to one size, e.g. {h}x{w}"
        )

    gray = all(_is_gray(im) for _, im in loaded)
    images = np.stack([_to_uint8(im, gray) for _, im in loaded])
    return LabelledExamples(
        labels=np.asarray(labels, dtype=np.int64),
        class_names=class_names,
        sources=tuple(f"{p.parent.name}/{p.name}" for p, _ in loaded),
        images=images,
    )


# ---------------------------------------------------------------------------------------------
# MNIST-format IDX files


def _read_maybe_gzip(path: Path, kind: str) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: no such file; pass the IDX {kind} file (e.g. train-{kind}-idx?-ubyte.gz)")
    if not path.is_file():
        raise DataError(f"{path}: not a file; pass the IDX {kind} file")
    raw = path.read_bytes()
    # Detected by content, not suffix: extracted files keep ".gz" names and vice versa often enough.
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt gzip data ({_one_line(err)}); re-download the file") from None
    return raw


def _idx_header(path: Path, data: bytes, expected_magic: int, n_dims: int, kind: str) -> tuple[int, ...]:
    header_len = 4 + 4 * n_dims
    # Magic first: a swapped images/labels pair should say so, not report a short header.
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX file; "
                        "re-download or re-extract the file")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        swapped = {_IDX_IMAGES_MAGIC: "an IDX images file", _IDX_LABELS_MAGIC: "an IDX labels file"}.get(magic)
        hint = (f"it looks like {swapped}; check the order of the images and labels paths" if swapped
                else "it is not an MNIST-format IDX file")
        raise DataError(f"{path}: bad magic number {magic} (expected {expected_magic} for IDX {kind}); {hint}")
    if len(data) < header_len:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the {header_len}-byte IDX "
                        "header; re-download or re-extract the file")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(n_dims))
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) < expected:
        raise DataError(f"{path}: truncated: header says {'x'.join(map(str, dims))} ({expected} bytes) but "
                        f"the file has {len(data)}; re-download or re-extract the file")
    if len(data) > expected:
        raise DataError(f"{path}: {len(data) - expected} unexpected bytes after the "
                        f"{'x'.join(map(str, dims))} {kind} the header announces; check it is an IDX {kind} file")
    return dims


def load_mnist_idx(images_path: str | Path, labels_path: str | Path) -> LabelledExamples:
    """MNIST-format IDX files (optionally gzipped): images uint8 [N, rows, cols] and their labels.

    class_names are the distinct label values as strings in numeric order ("0".."9" for MNIST); labels
    index into them. sources: "<images file name>#i".
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    img_data = _read_maybe_gzip(images_path, "images")
    lab_data = _read_maybe_gzip(labels_path, "labels")
    n, rows, cols = _idx_header(images_path, img_data, _IDX_IMAGES_MAGIC, 3, "images")
    (m,) = _idx_header(labels_path, lab_data, _IDX_LABELS_MAGIC, 1, "labels")
    if n != m:
        raise DataError(f"{images_path} has {n} images but {labels_path} has {m} labels; "
                        "pass the labels file that belongs to these images")
    if n == 0:
        raise DataError(f"{images_path}: contains no images; pass a non-empty IDX images file")
    images = np.frombuffer(img_data, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()
    raw_labels = np.frombuffer(lab_data, dtype=np.uint8, offset=8).astype(np.int64)
    values, labels = np.unique(raw_labels, return_inverse=True)
    class_names = tuple(str(v) for v in values)
    _require_two_classes(labels_path, class_names, "label values")
    return LabelledExamples(
        labels=labels.astype(np.int64),
        class_names=class_names,
        sources=tuple(f"{images_path.name}#{i}" for i in range(n)),
        images=images,
    )


def load_npy_images(images_path: str | Path, labels_path: str | Path) -> LabelledExamples:
    """Images uint8 [N, H, W] or [N, H, W, 3] and integer labels [N] as two .npy files.

    The images stay on disk: they are opened as a read-only memory map, so a pretraining set larger
    than memory streams through training and scoring (``precompute.streaming``). Labels are read
    into memory. class_names are the distinct label values in numeric order, as for IDX files;
    sources: "<images file name>#i".
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    arrays = []
    for path, kind in ((images_path, "images"), (labels_path, "labels")):
        if not path.is_file():
            raise DataError(f"{path}: no such {kind} file; give IMAGES.npy,LABELS.npy")
        try:
            arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: not a numeric .npy array ({_one_line(err)}); save it with numpy.save") from err
    images, raw = arrays
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise DataError(f"{images_path}: holds {images.dtype} {images.shape}; expected uint8 [N, H, W] or "
                        "[N, H, W, 3] (scale to 0..255 and cast)")
    if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
        raise DataError(f"{labels_path}: holds {raw.dtype} {raw.shape}; expected integer labels [N]")
    if len(raw) != len(images):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(raw)} labels; "
                        "pass the labels file that belongs to these images")
    if len(images) == 0:
        raise DataError(f"{images_path}: contains no images; pass a non-empty array")
    values, labels = np.unique(np.asarray(raw), return_inverse=True)
    class_names = tuple(str(v) for v in values)
    _require_two_classes(labels_path, class_names, "label values")
    return LabelledExamples(labels=labels.astype(np.int64), class_names=class_names,
                            sources=tuple(f"{images_path.name}#{i}" for i in range(len(images))), images=images)


# ---------------------------------------------------------------------------------------------
# Text tables (CSV / TSV / JSON lines)

_TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: file is empty; add a header line and one row per example")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start} (line {line}); "
                        "re-save the file as UTF-8") from None
    return text.removeprefix("\ufeff")  # spreadsheet exports often start with a BOM


def _unknown_column(path: Path, column: str, columns: list[str], flag: str) -> DataError:
    return DataError(f"{path}: no column {column!r}; columns are: {', '.join(columns)}; pass {flag}")


def _csv_records(path: Path, text: str, text_column: str, label_column: str
                 ) -> Iterator[tuple[str, object, object]]:
    """(where, text, label) per data row; ``where`` is "row K" (K-th data row, 1-based)."""
    # strict: a stray or unclosed quote is an error here, not a silently merged row.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                        strict=True)
    try:
        header: list[str] | None = None
        k = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
                    if col not in header:
                        raise _unknown_column(path, col, header, flag)
                ti, li = header.index(text_column), header.index(label_column)
                continue
            k += 1
            yield (f"row {k}", row[ti] if ti < len(row) else None, row[li] if li < len(row) else None)
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({err}); "
                        "check the quotes on or before that line") from None


def _json_records(path: Path, text: str, text_column: str, label_column: str
                  ) -> Iterator[tuple[str, object, object]]:
    """(where, text, label) per object; ``where`` is "line L" (JSON lines) or "item K" (a JSON array)."""
    items: list[tuple[str, object]]
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg}); fix the syntax") from None
        items = [(f"item {k}", obj) for k, obj in enumerate(array, start=1)]
    else:
        items = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {line_no}: invalid JSON ({err.msg} at column {err.colno}); "
                                "write one JSON object per line") from None
    for i, (where, obj) in enumerate(items):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: {where}: expected a JSON object like "
                            f'{{"{text_column}": ..., "{label_column}": ...}}, got {type(obj).__name__}')
        for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if col not in obj:
                if i == 0:  # first object missing it: most likely the wrong column name
                    raise _unknown_column(path, col, [str(key) for key in obj], flag)
                raise DataError(f"{path}: {where}: no {col!r} field; give every object a {col!r}")
        yield where, obj[text_column], obj[label_column]


def _sorted_class_names(values: set[str]) -> tuple[str, ...]:
    # Integer labels sort numerically ("2" before "10"); anything else alphabetically.
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


def load_text_table(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> LabelledExamples:
    """Texts and string labels from a .csv/.tsv (header row) or .jsonl/.json (one object per line).

    class_names: the distinct labels sorted (numerically if all are integers); texts are stripped.
    sources: "<file name>:row K" (CSV, K-th data row) or "<file name>:line L" (JSON lines).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; pass a .csv or .jsonl file with "
                        f"{text_column!r} and {label_column!r} columns")
    if not path.is_file():
        raise DataError(f"{path}: not a file; pass a .csv or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in _TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                        f"use one of {', '.join(_TABLE_SUFFIXES)}")
    content = _decode_utf8(path)
    records = (_csv_records if suffix in (".csv", ".tsv") else _json_records)(
        path, content, text_column, label_column)

    texts: list[str] = []
    label_strs: list[str] = []
    sources: list[str] = []
    for where, text, label in records:
        text = "" if text is None else str(text).strip()
        label = "" if label is None else str(label).strip()
        if not text:
            raise DataError(f"{path}: {where}: empty text in column {text_column!r}; fill it in or delete the row")
        if not label:
            raise DataError(f"{path}: {where}: empty label in column {label_column!r}; fill it in or delete the row")
        texts.append(text)
        label_strs.append(label)
        sources.append(f"{path.name}:{where}")
    if not texts:
        raise DataError(f"{path}: no rows with data (empty table); add one row per example")
    class_names = _sorted_class_names(set(label_strs))
    _require_two_classes(path, class_names, f"distinct values in column {label_column!r}")
    index = {name: i for i, name in enumerate(class_names)}
    return LabelledExamples(
        labels=np.asarray([index[s] for s in label_strs], dtype=np.int64),
        class_names=class_names,
        sources=tuple(sources),
        texts=tuple(texts),
    )
