"""Resource guards: refuse, before any data is loaded, a run that would exhaust memory or time.

``check_resources(config)`` estimates the model size from the configuration and from the headers of
the user's files (one image header, an IDX header or a .npy header; no pixel data is read):

- parameters P of the embedding Linear(d_in, hidden) + heads, against ``ModelConfig.max_params``
  (``--max-params``): 4000x4000 images give P = 256 million, i.e. gigabytes per gradient;
- the exact solver's dense P x P Hessian, against ``EXACT_MAX_PARAMS`` (use cg above it);
- one scoring chunk's per-example gradients (chunk x P floats), against ``MAX_CHUNK_BYTES``;
- validation by retraining: its dense preconditioner (``retraining.MAX_DENSE_PARAMS``), and the
  number of leave-one-out retrainings, against ``MAX_RETRAININGS``.

Each refusal is a ``ResourceLimitError`` whose one-line message says how to fix it. Files that
cannot be peeked at are left to the loaders, which report them precisely.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from .config import FASHION_PRESETS, RunConfig
from .errors import PrecomputeError

EXACT_MAX_PARAMS = 20_000          # dense float64 Hessian: 3.2 GB, eigendecomposition minutes
MAX_RETRAININGS = 20_000           # leave-one-out retrainings of the validation step
MAX_CHUNK_BYTES = 4 * 10 ** 9      # per-example gradients of one scoring chunk (float64)


class ResourceLimitError(PrecomputeError, ValueError):
    """A run would need more memory or time than a set limit; the message says how to fix it."""


def _image_size(spec: str) -> tuple[int, str] | None:
    """(features per example, description) of a custom image source, from headers only."""
    if "," in spec:
        images = Path(spec.split(",", 1)[0].strip())
        if images.suffix.lower() == ".npy":
            shape = np.load(images, mmap_mode="r", allow_pickle=False).shape
            return int(np.prod(shape[1:])), f"{images}: images of shape {'x'.join(map(str, shape[1:]))}"
        opener = gzip.open if images.suffix.lower() == ".gz" else open
        with opener(images, "rb") as fh:
            head = fh.read(16)
        _, rows, cols = struct.unpack(">III", head[4:16])
        return rows * cols, f"{images}: {rows}x{cols} images"
    root = Path(spec)
    if not root.is_dir():
        return None
    from PIL import Image

    from .data.user_files import IMAGE_SUFFIXES

    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                with Image.open(path) as im:          # reads the header, not the pixels
                    (w, h), channels = im.size, 1 if im.mode in ("1", "L", "LA", "I", "F") or \
                        im.mode.startswith("I;") else 3
                return w * h * channels, f"{path}: {w}x{h} images"
    return None


def input_features(config: RunConfig) -> tuple[int, str] | None:
    """(d_in, where it comes from) for the configured data, or None when unknown before loading."""
    data = config.data
    if data.preset == "digits":
        return 64, "the digits preset"
    if data.preset == "news":
        return config.model.vocabulary, f"--vocabulary {config.model.vocabulary}"
    sizes = []
    for spec in (data.pretrain_data, data.finetune_data):
        if not spec:
            continue
        if Path(spec).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
            return config.model.vocabulary, f"--vocabulary {config.model.vocabulary}"
        try:
            size = _image_size(spec)
        except Exception:       # noqa: BLE001 (unreadable, or a decompression bomb: the loader reports it)
            size = None
        if size:
            sizes.append(size)
    return max(sizes) if sizes else None


def stage_params(config: RunConfig, d_in: int) -> int:
    """Parameters of the larger stage, embedding Linear(d_in, hidden) + its head. Unknown class
    counts (custom data without class lists) count as 2, so the estimate never exceeds the truth."""
    classes = {"digits": (5, 5), "news": (3, 2)}.get(
        config.data.preset, (len(config.data.pretrain_classes) or 2, len(config.data.finetune_classes) or 2))
    h = config.model.hidden
    return d_in * h + h + (h + 1) * max(classes)


def model_size(config: RunConfig) -> tuple[int, str] | None:
    """(parameters of the larger stage, what sets them), or None when unknown before loading. The
    fashion CNN's size follows --channels / --hidden (``models.fashion_cnn_params``)."""
    if config.data.preset in FASHION_PRESETS:
        from .models import fashion_cnn_params

        model = config.model
        return (fashion_cnn_params(model.hidden, tuple(model.channels)),
                f"--channels {','.join(map(str, model.channels))} --hidden {model.hidden}")
    found = input_features(config)
    return (stage_params(config, found[0]), found[1]) if found else None


def check_resources(config: RunConfig) -> None:
    """Raise ResourceLimitError if the run would exceed a limit (see the module docstring)."""
    from .retraining import MAX_DENSE_PARAMS

    found = model_size(config)
    if found:
        p, where = found
        limit = config.model.max_params
        if p > limit:
            raise ResourceLimitError(
                f"{where} give a model of about {p:,} parameters (limit {limit:,}"
                + (f"): lower --channels / --hidden" if config.data.preset in FASHION_PRESETS else
                   f"; --hidden {config.model.hidden}): resize the images or lower --vocabulary / --hidden")
                + f", or pass --max-params {p} to lift the limit")
        solvers = {config.influence.pretrain_solver.name, config.influence.finetune_solver.name}
        if "exact" in solvers and p > EXACT_MAX_PARAMS:
            gb = p * p * 8 / 1e9
            raise ResourceLimitError(
                f"--solver exact needs a dense Hessian of {p:,}^2 entries ({gb:,.1f} GB) for this model; "
                f"use --solver cg or auto (exact is meant for at most {EXACT_MAX_PARAMS:,} parameters)")
        chunk_bytes = config.influence.chunk_size * p * 8
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise ResourceLimitError(
                f"--chunk-size {config.influence.chunk_size} holds {chunk_bytes / 1e9:,.1f} GB of per-example "
                f"gradients for a model of about {p:,} parameters; use --chunk-size "
                f"{max(1, MAX_CHUNK_BYTES // (p * 8))} or less")
        if config.validate and p > MAX_DENSE_PARAMS and config.data.preset not in FASHION_PRESETS:   # CNN: low-rank path
            raise ResourceLimitError(
                f"validation by retraining handles at most {MAX_DENSE_PARAMS:,} parameters per stage and "
                f"this model has about {p:,} ({where}, --hidden {config.model.hidden}); pass --no-validate, "
                "or lower --hidden")
    if config.validate:
        v = config.validation
        n = min(v.n_test_points, len(config.test_ids) or config.n_test_points) * 3 * v.k * \
            len(config.influence.scenarios)
        if n > MAX_RETRAININGS:
            raise ResourceLimitError(
                f"--k {v.k} with --val-points {v.n_test_points} asks for {n:,} leave-one-out retrainings "
                f"(limit {MAX_RETRAININGS:,}); lower --k or --val-points, or pass --no-validate")
