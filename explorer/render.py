"""Pure rendering helpers: image upscaling to PNG, text cards with shared words highlighted.

No Streamlit here; everything is a pure function of its inputs so it can be unit-tested.
Every piece of user data that ends up in HTML goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Iterable

import numpy as np

# Okabe-Ito, colour-blind safe; used for the same meaning everywhere (charts, borders, cards).
HELPFUL = "#0072B2"  # blue
HARMFUL = "#D55E00"  # vermillion
RANDOM = "#999999"  # grey
NEUTRAL = "#555555"
KIND_COLORS = {"helpful": HELPFUL, "harmful": HARMFUL, "random": RANDOM}
KIND_LABELS = {
    "helpful": "helpful (score > 0)",
    "harmful": "harmful (score < 0)",
    "random": "random",
}

_TOKEN_RE = re.compile(r"\w\w+", re.UNICODE)

# Words too common to explain anything; used only when highlighting shared words.
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just me more
    most my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves said says mr mrs ms one two new year years""".split()
)


# ------------------------------------------------------------------------------------------------
# images


def upscale(image: np.ndarray, size: int = 96) -> np.ndarray:
    """Nearest-neighbour upscale of a uint8 [H,W] or [H,W,3] image so that its longer side is at least
    ~size (the smallest integer factor that reaches it).

    Integer factors keep every source pixel a crisp square (8x8 -> 96x96, a 28x28 garment -> 112x112
    at size=96; 28x28 -> 56x56 for a 48-pixel table thumbnail).
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an image [H,W] or [H,W,3], got shape {img.shape}")
    h, w = img.shape[:2]
    factor = max(1, -(-int(size) // max(h, w)))
    if factor == 1:
        return img.astype(np.uint8, copy=False)
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1).astype(np.uint8, copy=False)


def _hex_to_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def add_border(image: np.ndarray, color: str, width: int = 4) -> np.ndarray:
    """Frame an image with a coloured border (returns RGB uint8)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    h, w = img.shape[:2]
    out = np.empty((h + 2 * width, w + 2 * width, 3), np.uint8)
    out[...] = np.array(_hex_to_rgb(color), np.uint8)
    out[width:width + h, width:width + w] = img
    return out


def png_bytes(image: np.ndarray, size: int = 96, border: str | None = None) -> bytes:
    """PNG bytes of an upscaled (and optionally framed) image."""
    from PIL import Image

    img = upscale(image, size)
    if border:
        img = add_border(img, border, width=max(2, img.shape[0] // 24))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    """A data: URL for PNG bytes (for st.column_config.ImageColumn)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ------------------------------------------------------------------------------------------------
# numbers and nested dicts


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"} (lists and other values as text)."""
    out: dict[str, object] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix or "value"] = obj
    else:
        out[prefix or "value"] = str(obj)
    return out



SCORE_FORMAT = "%+.2e"
"""The one score format of every page (tables use it as a printf format): +6.04e-04, -1.89e-03."""


def format_score(score: float) -> str:
    """Signed, three significant digits, always in the same notation: +2.13e-03, -1.20e-06."""
    s = float(score)
    if not np.isfinite(s):
        return "n/a"
    return SCORE_FORMAT % s


def finite(value) -> float | None:
    """``value`` as a finite float, or None (missing, null, not a number, inf/nan)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def format_fraction(value) -> str:
    """0.947 -> '94.7%'; n/a when missing."""
    v = finite(value)
    return "n/a" if v is None else f"{v:.1%}"


def format_number(value, digits: int = 3) -> str:
    """A human-readable number: 0.961, 1.34, 4.99e-14 -> '5.0e-14', 1234567 -> '1,234,567'."""
    if isinstance(value, bool) or value is None:
        return "yes" if value is True else "no" if value is False else "n/a"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return "n/a"
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    if 1e-3 <= abs(v) < 1e6:
        return f"{v:.{digits}g}"
    return f"{v:.1e}"


def kind_of_score(score: float) -> str:
    """"helpful" (score > 0: removing the example would raise the loss), "harmful" (< 0) or "random" (0)."""
    return "helpful" if score > 0 else "harmful" if score < 0 else "random"


# ------------------------------------------------------------------------------------------------
# text


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens (two or more word characters), like sklearn's default token pattern."""
    return [t.lower() for t in _TOKEN_RE.findall(text or "")]


def shared_words(a: str, b: str, vocabulary: Iterable[str] | None = None) -> set[str]:
    """Words of ``b`` that also occur in ``a``: in the model's vocabulary when given, not stopwords."""
    common = set(tokens(a)) & set(tokens(b))
    if vocabulary is not None:
        vocab = vocabulary if isinstance(vocabulary, (set, frozenset)) else set(vocabulary)
        common &= vocab
    return {w for w in common if w not in STOPWORDS and len(w) > 2 and not w.isdigit()}


def highlight_html(text: str, words: set[str], max_chars: int | None = None) -> str:
    """Escaped HTML of ``text`` with ``words`` wrapped in <mark>; truncated at a word boundary."""
    text = text or ""
    truncated = False
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars)
        text = text[: cut if cut > max_chars // 2 else max_chars]
        truncated = True
    out, pos = [], 0
    for mt in _TOKEN_RE.finditer(text):
        out.append(html.escape(text[pos:mt.start()]))
        word = mt.group(0)
        if word.lower() in words:
            out.append(f"<mark>{html.escape(word)}</mark>")
        else:
            out.append(html.escape(word))
        pos = mt.end()
    out.append(html.escape(text[pos:]))
    body = "".join(out).replace("\n", "<br>")
    return body + (" …" if truncated else "")


def text_card_html(
    text: str,
    *,
    title: str,
    kind: str = "neutral",
    words: set[str] | None = None,
    max_chars: int | None = 420,
    badges: Iterable[str] = (),
    footer: str | None = None,
) -> str:
    """One card: a title line, optional badges, the (highlighted) text and a footer.

    ``title``, ``badges`` and ``footer`` are plain text (escaped here); ``kind`` picks the colour
    (helpful, harmful, random, neutral).
    """
    kind_cls = kind if kind in ("helpful", "harmful", "random", "neutral", "test") else "neutral"
    words = words or set()
    badge_html = "".join(f'<span class="mi-badge">{html.escape(b)}</span>' for b in badges)
    foot = f'<div class="mi-card-foot">{html.escape(footer)}</div>' if footer else ""
    return (
        f'<div class="mi-card mi-{kind_cls}">'
        f'<div class="mi-card-title">{html.escape(title)}{badge_html}</div>'
        f'<div class="mi-card-text">{highlight_html(text, words, max_chars)}</div>'
        f"{foot}</div>"
    )


def caption_html(lines: Iterable[str], kind: str = "neutral", flag: str | None = None, mark: str | None = None) -> str:
    """A short caption under an image: one <div> per line (the first in the kind's colour), a flag and
    a retrained mark (plain text, escaped here)."""
    kind_cls = kind if kind in ("helpful", "harmful", "random", "neutral") else "neutral"
    lines = list(lines)
    head = f'<div class="mi-cap-head">{html.escape(lines[0])}</div>' if lines else ""
    rest = "".join(f"<div>{html.escape(x)}</div>" for x in lines[1:])
    flag_html = f'<div class="mi-flag">⚑ {html.escape(flag)}</div>' if flag else ""
    mark_html = f'<div class="mi-retrained">{html.escape(mark)}</div>' if mark else ""
    return f'<div class="mi-cap mi-cap-{kind_cls}">{head}{rest}{flag_html}{mark_html}</div>'
