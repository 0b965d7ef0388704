"""Model inputs from examples: scaled image tensors and a deterministic, serialisable tf-idf vectoriser."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .examples import DataError

__all__ = ["STOP_WORDS", "TextVectorizer", "image_features"]


def image_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] or [N, H, W, 3] -> float32 [N, C, H, W] in [0, 1] (C = 1 or 3), channels first."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}; load them with precompute.data loaders")
    if images.ndim == 3:
        out = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] == 3:
        out = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"images must be [N,H,W] or [N,H,W,3], got shape {images.shape}")
    return np.ascontiguousarray(out, dtype=np.float32) / np.float32(255.0)


# Common English function words plus contraction stems; tokens shorter than 3 letters are dropped anyway.
STOP_WORDS: frozenset[str] = frozenset("""
    about above across after again against all almost also although always among and another any
    anyone anything are aren't around because been before being below between both but came can
    can't cannot could couldn't did didn't does doesn't doing don't done down during each either
    else enough even ever every few for from further get gets getting got had hadn't has hasn't have
    haven't having he'd he'll he's her here here's hers herself him himself his how how's however
    i'd i'll i'm i've into isn't it's its itself just let's many may might more most much must
    mustn't myself neither never nor not now off often once one only onto other others ought our
    ours ourselves out over own per quite rather really said same say says shall shan't she she'd
    she'll she's should shouldn't since some such than that that's the their theirs them
    themselves then there there's these they they'd they'll they're they've this those though
    through thus too toward towards under until upon very via was wasn't we'd we'll we're we've
    well were weren't what what's whatever when when's where where's whether which while who who's
    whom whose why why's will with within without won't would wouldn't yet you you'd you'll you're
    you've your yours yourself yourselves already yes
""".split())

_TOKEN_RE = re.compile(r"[a-z][a-z']+")
_MIN_TOKEN_LEN = 3


class TextVectorizer:
    """Bag-of-words tf-idf over a vocabulary chosen by document frequency.

    Tokens: lowercase ASCII words (accents folded), regex ``[a-z][a-z']+``, a trailing possessive
    "'s" and stray apostrophes removed, at least 3 letters, not in STOP_WORDS.
    Vocabulary: words in >= min_df texts, ranked by document frequency (desc), ties by word; at most
    max_features. idf = ln((1 + n_docs) / (1 + df)) + 1. Features: (1 + ln tf) * idf, each row scaled
    to unit L2 norm (a text with no vocabulary word is an all-zero row).
    """

    def __init__(self) -> None:
        self.vocabulary: tuple[str, ...] = ()
        self.idf: np.ndarray = np.zeros(0, dtype=np.float64)  # float64 [V]
        self.n_docs: int = 0
        self._index: dict[str, int] = {}

    @staticmethod
    def tokens(text: str) -> list[str]:
        """The text's tokens in order, with repeats (fit or not; filtering needs no vocabulary)."""
        # NFKD then ASCII folds "café" to "cafe" instead of cutting the word at the accent.
        folded = unicodedata.normalize("NFKD", text.replace("\u2019", "'")).encode("ascii", "ignore")
        out: list[str] = []
        for tok in _TOKEN_RE.findall(folded.decode("ascii").lower()):
            tok = tok.strip("'")
            if tok in STOP_WORDS:  # before the "'s" cut, so "let's" does not become "let"
                continue
            if tok.endswith("'s"):
                tok = tok[:-2]
            if len(tok) >= _MIN_TOKEN_LEN and tok not in STOP_WORDS:
                out.append(tok)
        return out

    def fit(self, texts: Iterable[str], max_features: int = 1000, min_df: int = 2) -> TextVectorizer:
        """Choose the vocabulary and idf from ``texts``; returns self."""
        if max_features < 1 or min_df < 1:
            raise DataError(f"max_features and min_df must be >= 1, got {max_features} and {min_df}")
        df: Counter[str] = Counter()
        n_docs = 0
        for text in texts:
            df.update(set(self.tokens(text)))
            n_docs += 1
        ranked = sorted((w for w, c in df.items() if c >= min_df), key=lambda w: (-df[w], w))[:max_features]
        if not ranked:
            raise DataError(f"no word occurs in at least min_df={min_df} of the {n_docs} texts; "
                            "lower min_df or pass more texts")
        self.n_docs = n_docs
        self.vocabulary = tuple(ranked)
        self.idf = np.array([math.log((1 + n_docs) / (1 + df[w])) + 1.0 for w in ranked], dtype=np.float64)
        self._index = {w: i for i, w in enumerate(self.vocabulary)}
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, V] tf-idf rows with unit L2 norm (all-zero for texts without vocabulary words)."""
        if not self.vocabulary:
            raise DataError("TextVectorizer is not fitted; call fit(texts) or from_dict(...) first")
        out = np.zeros((len(texts), len(self.vocabulary)), dtype=np.float64)
        for row, text in enumerate(texts):
            counts = Counter(t for t in self.tokens(text) if t in self._index)
            for word, tf in counts.items():
                col = self._index[word]
                out[row, col] = (1.0 + math.log(tf)) * self.idf[col]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out.astype(np.float32)

    def fit_transform(self, texts: Sequence[str], max_features: int = 1000, min_df: int = 2) -> np.ndarray:
        return self.fit(texts, max_features=max_features, min_df=min_df).transform(texts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state: {"kind", "version", "vocabulary", "idf", "n_docs"}."""
        return {
            "kind": "tfidf",
            "version": 1,
            "vocabulary": list(self.vocabulary),
            "idf": [float(v) for v in self.idf],  # Python floats round-trip float64 exactly through JSON
            "n_docs": self.n_docs,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TextVectorizer:
        """Inverse of to_dict."""
        if state.get("kind") != "tfidf" or state.get("version") != 1:
            raise DataError(f"not a saved TextVectorizer (kind={state.get('kind')!r}, "
                            f"version={state.get('version')!r}); re-run precompute")
        vocab = tuple(str(w) for w in state["vocabulary"])
        idf = np.asarray(state["idf"], dtype=np.float64)
        if idf.shape != (len(vocab),) or len(set(vocab)) != len(vocab):
            raise DataError("saved TextVectorizer is inconsistent (vocabulary vs idf); re-run precompute")
        vec = cls()
        vec.vocabulary, vec.idf, vec.n_docs = vocab, idf, int(state["n_docs"])
        vec._index = {w: i for i, w in enumerate(vocab)}
        return vec
