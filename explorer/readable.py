"""Manifest sections as tables people can read: named rows and columns, numbers formatted once.

Pure functions (no Streamlit). Every value comes back as text from ``render.format_number`` (or a
percentage), so no page shows a raw float such as 4.9938141498806614e-14.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pandas as pd

from explorer.render import finite, format_fraction, format_number

VALIDATION_COLUMNS = {
    "pearson": "Pearson",
    "spearman": "Spearman",
    "slope": "Slope (actual ÷ predicted)",
    "n_pairs": "Removals retrained",
    "spearman_random": "Spearman, random removals only",
    "n_not_converged": "Retrainings that did not converge",
    "n_left_basin": "Retrainings that slid to another minimum",
    "pearson_in_basin": "Pearson without those",
    "spearman_in_basin": "Spearman without those",
}
SIGNAL_NAMES = {
    "multi_stage_harmfulness": "multi-stage harmfulness (−Σ score)",
    "multi_stage_total_harm": "multi-stage total harm (Σ max(0, −score))",
    "self_influence": "self-influence",
    "pretrain_loss": "pretraining loss",
    "margin": "margin",
    "cleanlab": "cleanlab (out-of-sample)",
}
QUANTITY_NAMES = {
    "solver": "solver", "damping": "damping λ", "dim": "parameters", "n_rhs": "right-hand sides",
    "iterations": "iterations", "relative_residual": "relative residual ‖(H+λI)x − b‖/‖b‖",
    "eig_min": "smallest eigenvalue", "eig_max": "largest eigenvalue", "rank": "rank",
    "objective": "final objective", "grad_norm": "final gradient norm ‖∇‖", "converged": "converged",
    "certified": "certified minimum (‖∇‖ ≤ target and λ_min > 0)", "saddles_escaped": "saddles escaped",
    "grad_tol": "gradient target", "grad_floor": "gradient rounding floor", "eig_method": "λ_min computed by",
}
PART_NAMES = {"finetune_solve": "Finetune-side solve", "pretrain_solve": "Pretraining solve",
              "training.pretrain": "Pretraining", "training.finetune": "Finetuning",
              "score_precision": "Reduced-precision scoring"}


def validation_table(validation: Mapping) -> pd.DataFrame:
    """One row per quantity of ``VALIDATION_COLUMNS`` that the run has, one column per scenario."""
    rows = {}
    for scenario, v in (validation or {}).items():
        if isinstance(v, Mapping):
            rows[scenario] = {name: format_number(v[k]) for k, name in VALIDATION_COLUMNS.items() if k in v}
    df = pd.DataFrame(rows)            # one row per quantity, one column per scenario
    df.index.name = "quantity"
    return df.fillna("")


def _signed(value) -> str:
    """+0.123 / -0.123; a null mean (no retraining of that kind converged) reads "n/a (not converged)"."""
    v = finite(value)
    return "n/a (not converged)" if v is None else f"{v:+.3f}"


def group_table(group: Mapping) -> pd.DataFrame:
    """Group removal: one row per (scenario, percent) with the mean test-loss change per kind."""
    out = []
    for scenario, g in (group or {}).items():
        percents = sorted({float(m.group(1)) for k in g for m in [re.fullmatch(r"helpful_([\d.]+)", k)] if m})
        for p in percents:
            tag = f"{p:g}"
            row = {"scenario": scenario, "removed": f"top {tag}%"}
            for kind in ("helpful", "harmful", "random"):
                if f"{kind}_{tag}" in g:
                    row[f"{kind}: loss change"] = _signed(g[f"{kind}_{tag}"])
            if f"fraction_helpful{tag}_raises_loss" in g:
                row["helpful removal raised the loss"] = format_fraction(g[f"fraction_helpful{tag}_raises_loss"])
            if f"fraction_harmful{tag}_lowers_loss" in g:
                row["harmful removal lowered the loss"] = format_fraction(g[f"fraction_harmful{tag}_lowers_loss"])
            out.append(row)
    return pd.DataFrame(out)


def detection_table(detection: Mapping) -> pd.DataFrame:
    """Mislabel detection: one row per signal, AUC and the share of flipped labels in its top x%."""
    rows = []
    for signal, v in (detection or {}).items():
        if not isinstance(v, Mapping) or "auc" not in v:
            continue
        row = {"signal": SIGNAL_NAMES.get(signal, signal.replace("_", " ")), "AUC": format_number(v["auc"])}
        for k, val in v.items():
            m = re.fullmatch(r"recall_top_(\d+)", k)
            if m:
                row[f"flipped found in top {m.group(1)}%"] = format_fraction(val)
        rows.append(row)
    return pd.DataFrame(rows)


def diagnostics_table(diagnostics: Mapping) -> pd.DataFrame:
    """Solver and training diagnostics: rows 'part · quantity', one column per scenario, values as text."""
    table: dict[str, dict[str, str]] = {}
    for scenario, d in (diagnostics or {}).items():
        for part, values in _parts(d):
            for k, v in values.items():
                if isinstance(v, (Mapping, list)):
                    continue
                label = f"{PART_NAMES.get(part, part.replace('_', ' '))} · {QUANTITY_NAMES.get(k, k.replace('_', ' '))}"
                table.setdefault(label, {})[scenario] = format_number(v) if not isinstance(v, str) else v
    df = pd.DataFrame.from_dict(table, orient="index").fillna("")
    df.index.name = "quantity"
    return df


def _parts(d: Mapping, prefix: str = ""):
    """(dotted part name, flat dict of its scalar values) for every nested dict of diagnostics."""
    scalars = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
    if scalars and prefix:
        yield prefix, scalars
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _parts(v, f"{prefix}.{k}" if prefix else k)


def config_table(flat: Mapping) -> pd.DataFrame:
    """Flattened configuration as (setting, value) with readable values."""
    return pd.DataFrame({"setting": list(flat),
                         "value": [v if isinstance(v, str) else format_number(v) for v in flat.values()]})


__all__ = ["config_table", "detection_table", "diagnostics_table", "group_table", "validation_table"]
