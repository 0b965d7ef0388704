"""Streamlit building blocks shared by the pages (examples as image grids or text cards)."""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from explorer import data, render
from explorer.state import Ctx

GRID_SIZE = 96
BIG_SIZE = 224


def md(html_text: str) -> None:
    st.markdown(html_text, unsafe_allow_html=True)


def section_header(title: str, kind: str, subtitle: str | None = None) -> None:
    """A coloured heading for a helpful / harmful / neutral block."""
    sub = f'<div class="mi-sub">{html.escape(subtitle)}</div>' if subtitle else ""
    md(f'<div class="mi-head mi-head-{kind}"><span class="mi-dot"></span>{html.escape(title)}</div>{sub}')


def score_legend() -> None:
    md(
        '<div class="mi-legend">'
        '<span class="mi-chip mi-helpful">helpful: score &gt; 0</span>'
        '<span class="mi-chip mi-harmful">harmful: score &lt; 0</span>'
        '<div class="mi-legend-text">score = predicted change of this test point\'s loss if the '
        "pretraining example is removed and both stages are retrained.</div></div>"
    )


def flag_text(row) -> str | None:
    """'flipped (true 3)' for an example whose label the run's label noise changed, else None."""
    if bool(row.get("flipped", False)):
        orig = row.get("original_label_name")
        return f"flipped (true {orig})" if orig is not None else "flipped"
    return None


def retrained_text(pid: int, retrained: dict[int, float] | None) -> str | None:
    """'↻ actual +1.20e-02' (the retrained loss change) when the example was actually removed and retrained."""
    if retrained and int(pid) in retrained:
        return f"↻ actual {render.format_score(retrained[int(pid)])}"
    return None


def example_grid(ctx: Ctx, rows: pd.DataFrame, kind: str, per_row: int = 6, size: int = GRID_SIZE,
                 retrained: dict[int, float] | None = None) -> None:
    """Images of ranked pretraining examples with rank, score, id, label, a flipped flag and, when it
    was actually retrained, the actual loss change.

    One HTML block (images inline as data URLs): a single element for the browser to replace when
    the test point changes, instead of an image and a caption element per example.
    """
    border = render.KIND_COLORS.get(kind)
    cells = []
    for r in rows.to_dict("records"):
        png = data.image_png(ctx.key, "pretrain", int(r["pretrain_id"]), size, border)
        cap = render.caption_html(
            [f"#{r['rank']}  {render.format_score(r['score'])}", f"id {r['pretrain_id']} · label {r['label_name']}"],
            kind=kind, flag=flag_text(r), mark=retrained_text(r["pretrain_id"], retrained))
        cells.append(f'<div class="mi-cell"><img src="{render.data_url(png)}" alt="pretraining example '
                     f'{int(r["pretrain_id"])}">{cap}</div>')
    md(f'<div class="mi-grid" style="grid-template-columns: repeat({int(per_row)}, minmax(0, 1fr))">'
       + "".join(cells) + "</div>")


def text_cards(ctx: Ctx, rows: pd.DataFrame, kind: str, test_text: str, max_chars: int = 300,
               retrained: dict[int, float] | None = None) -> None:
    """Text cards of ranked pretraining examples, words shared with the test text highlighted."""
    vocab = data.vocabulary(ctx.key)
    parts = []
    for r in rows.to_dict("records"):
        words = render.shared_words(test_text, r.get("text", ""), vocab)
        badges = [f"label {r['label_name']}"]
        if flag_text(r):
            badges.append("⚑ " + flag_text(r))
        if retrained_text(r["pretrain_id"], retrained):
            badges.append(retrained_text(r["pretrain_id"], retrained))
        shared = ", ".join(sorted(words)[:8])
        parts.append(render.text_card_html(
            r.get("text", ""),
            title=f"#{r['rank']} · {render.format_score(r['score'])} · id {r['pretrain_id']}",
            kind=kind, words=words, max_chars=max_chars, badges=badges,
            footer=f"shared words: {shared}" if shared else None,
        ))
    md('<div class="mi-cards">' + "".join(parts) + "</div>")


def examples(ctx: Ctx, rows: pd.DataFrame, kind: str, test_text: str | None, per_row: int = 6,
             retrained: dict[int, float] | None = None) -> None:
    if rows.empty:
        st.caption("No examples.")
    elif ctx.is_image:
        example_grid(ctx, rows, kind, per_row=per_row, retrained=retrained)
    else:
        text_cards(ctx, rows, kind, test_text or "", retrained=retrained)


def big_test_example(ctx: Ctx, info: dict, size: int = BIG_SIZE) -> None:
    if ctx.is_image:
        st.image(data.image_png(ctx.key, "test", info["test_id"], size, render.NEUTRAL), width=size)
    else:
        md(render.text_card_html(info["text"] or "", title=f"Test point #{info['test_id']}", kind="test",
                                 max_chars=1500, footer=info["source"]))


def big_pretrain_example(ctx: Ctx, info: dict, size: int = 192, highlight_with: str | None = None) -> None:
    if ctx.is_image:
        st.image(data.image_png(ctx.key, "pretrain", info["pretrain_id"], size, render.NEUTRAL), width=size)
    else:
        words = render.shared_words(highlight_with, info["text"], data.vocabulary(ctx.key)) if highlight_with else set()
        md(render.text_card_html(info["text"] or "", title=f"Pretraining example #{info['pretrain_id']}",
                                 kind="neutral", words=words, max_chars=1500, footer=info["source"]))


def verdict_html(correct: bool) -> str:
    return ('<span class="mi-verdict mi-ok">✓ correct</span>' if correct
            else '<span class="mi-verdict mi-bad">✗ misclassified</span>')


def facts(items: list[tuple[str, str]]) -> None:
    """A compact definition list (label: value), values already plain text."""
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    md(f'<dl class="mi-facts">{body}</dl>')
