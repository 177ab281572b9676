"""The paper's figures and the controls its critiques need, drawn from a ``Results`` (or its
tidy frame), never from a model.

Seeds are aggregated the same way everywhere: a bar or line is the **mean over seeds**, and each
seed's own value is a dot beside it. With several seeds the error bar (or band) is the **95%
t-interval of the mean over seeds**, so it reflects the spread across seeds (different
demonstrations), which on the reference run is far wider than any one seed's bootstrap CI over
evaluation examples. With one seed it is that seed's 95% bootstrap CI (rows without one get
none). Every figure's footnote says which of the two it shows.

Figures are built on matplotlib's Agg canvas without pyplot: nothing opens a window and the
caller's backend is left alone. Metrics that were not run are left out of a figure; a figure
with nothing to draw raises :class:`MissingMetricsError`, which :func:`make_all` skips.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from icl_lens.results import COLUMNS, Results

log = logging.getLogger(__name__)

TASK_ORDER = ("sst2", "sst5", "mr", "subj", "agnews", "cb")
MAX_WIDTH = 15.0  # inches: wider figures wrap their panels onto more rows
COS = "cosine similarity"
# one colour per variant (and per baseline), the same in every figure
COLORS = {
    "zs": "#595959",
    "icl": "#1f77b4",
    "ft": "#ff7f0e",
    "ft_layer_causal": "#9467bd",
    "ft_shuffled": "#8c564b",
    "untrained": "#e377c2",
    "uniform": "#bcbd22",
    "gaussian": "#17becf",
    "null": "#a3a3a3",
    "orthogonal": "#d62728",
    "before": "#2ca02c",
    "chance": "#cccccc",
}


class MissingMetricsError(ValueError):
    """The results hold none of the metrics a figure draws."""


class S(NamedTuple):
    """One drawn series: legend label, the rows it reads, colour, and whether it is faded."""

    label: str
    metric: str
    variant: str
    color: str
    faded: bool = False


# --------------------------------------------------------------------------- data


def _frame(results: Results | pd.DataFrame) -> pd.DataFrame:
    """The tidy frame with a ``group`` column (task, plus model when there are several)."""
    if isinstance(results, pd.DataFrame):
        f = results.copy()
    elif hasattr(results, "to_frame"):
        f = results.to_frame()
    else:
        raise TypeError(f"expected Results or its to_frame(), got {type(results).__name__}")
    missing = [c for c in COLUMNS if c not in f.columns]
    if missing:
        raise ValueError(f"not a Results frame: columns {missing} are missing")
    if f.empty:
        raise MissingMetricsError("the results hold no rows")
    f["layer"] = f["layer"].astype(str)
    several = f["model"].nunique() > 1
    f["group"] = f["task"] + ("\n" + f["model"].astype(str) if several else "")
    return f


def _groups(f: pd.DataFrame) -> list[str]:
    """Groups in the paper's task order, other tasks after it alphabetically."""
    rank = {t: i for i, t in enumerate(TASK_ORDER)}
    keys = f[["task", "model", "group"]].drop_duplicates().itertuples(index=False)
    ordered = sorted(keys, key=lambda r: (rank.get(r.task, len(rank)), r.task, str(r.model)))
    return list(dict.fromkeys(r.group for r in ordered))


class Stat(NamedTuple):
    value: float
    lo: float  # nan where no CI
    hi: float
    points: np.ndarray  # per-seed values


def _stat(rows: pd.DataFrame, scale: float = 1.0) -> Stat | None:
    """Mean over seeds with its 95% t-interval over seeds (several seeds) or the one seed's
    bootstrap CI (one seed), and the per-seed values."""
    rows = rows[rows["value"].notna()]
    if rows.empty:
        return None
    pts = rows.sort_values("seed")["value"].to_numpy(float)
    mean = pts.mean()
    if len(pts) > 1:
        half = stats.t.ppf(0.975, len(pts) - 1) * pts.std(ddof=1) / np.sqrt(len(pts))
        lo, hi = mean - half, mean + half
    else:
        lo, hi = rows["ci_low"].iloc[0], rows["ci_high"].iloc[0]
        lo, hi = (lo, hi) if pd.notna(lo) and pd.notna(hi) else (np.nan, np.nan)
    return Stat(mean * scale, lo * scale, hi * scale, pts * scale)


def _note(f: pd.DataFrame, bars: str = "error bars", extra: str = "") -> str:
    """The footnote that says what the error bars are (they differ with one or several seeds)."""
    n = f["seed"].nunique()
    if n > 1:
        note = f"mean over {n} seeds (dots: single seeds); {bars}: 95% t-interval over seeds"
    else:
        note = f"one seed; {bars}: 95% bootstrap CI over evaluation examples"
    return note + (f"; {extra}" if extra else "")


def _rows(f: pd.DataFrame, s: S, group: str | None = None, layer: str = "mean") -> pd.DataFrame:
    sel = (f["metric"] == s.metric) & (f["variant"] == s.variant) & (f["layer"] == layer)
    if group is not None:
        sel &= f["group"] == group
    return f[sel]


def _present(f: pd.DataFrame, series: Sequence[S]) -> list[S]:
    return [s for s in series if _rows(f, s)["value"].notna().any()]


def _title(f: pd.DataFrame, what: str) -> str:
    models = ", ".join(map(str, dict.fromkeys(f["model"])))
    seeds = f["seed"].nunique()
    return f"{what}\nmodel: {models} · {seeds} seed{'s' * (seeds != 1)}"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, f: pd.DataFrame, what: str, note: str | None = None) -> Figure:
    fig.suptitle(_title(f, what), fontsize=11)
    fig.supxlabel(_note(f) if note is None else note, fontsize=7, color="#555555")
    return fig


# --------------------------------------------------------------------------- drawing


def _legend(ax: Axes) -> None:
    """A legend right of the axes, if anything in it is labelled."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _bars(ax: Axes, f: pd.DataFrame, series: Sequence[S], scale: float = 1.0) -> list[S]:
    """Grouped bars: x = task, one bar per present series. Each bar's gid is
    ``"<group>|<metric>|<variant>"`` (tests read heights back by it)."""
    present = _present(f, series)
    groups = _groups(f)
    width = 0.8 / max(len(present), 1)
    for j, s in enumerate(present):
        for i, g in enumerate(groups):
            st = _stat(_rows(f, s, g), scale)
            if st is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            (rect,) = ax.bar(x, st.value, width * 0.92, color=s.color,
                             alpha=0.45 if s.faded else 1.0, hatch="//" if s.faded else None,
                             edgecolor="white" if s.faded else s.color,
                             label=s.label if i == 0 else None)  # fmt: skip
            rect.set_gid(f"{g}|{s.metric}|{s.variant}")
            if np.isfinite(st.lo):
                err = [[max(st.value - st.lo, 0)], [max(st.hi - st.value, 0)]]
                ax.errorbar(x, st.value, yerr=err, fmt="none", ecolor="black", elinewidth=1,
                            capsize=2)  # fmt: skip
            if len(st.points) > 1:
                ax.scatter(np.full(len(st.points), x), st.points, s=9, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax)
    return present


def _bar_panels(f: pd.DataFrame, panels, what: str, ncols: int | None = None) -> Figure:
    """One bar panel per (title, ylabel, series); panels with nothing present are dropped."""
    panels = [p for p in panels if _present(f, p[2])]
    if not panels:
        raise MissingMetricsError(f"no rows for {what.splitlines()[0]!r} in these results")
    n_groups = len(_groups(f))
    max_series = max(len(_present(f, p[2])) for p in panels)
    panel_w = 2.6 + n_groups * (0.35 + 0.16 * max_series)
    ncols = max(1, min(ncols or len(panels), len(panels), int(MAX_WIDTH // panel_w)))
    nrows = -(-len(panels) // ncols)
    fig = _new_figure(ncols * panel_w, nrows * 3.6 + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, ylabel, series) in zip(axes, panels, strict=False):
        _bars(ax, f, series)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _finish(fig, f, what)


def _line(ax: Axes, x, st_list: list[Stat | None], s: S, style: str = "-") -> None:
    keep = [(xi, st) for xi, st in zip(x, st_list, strict=True) if st is not None]
    if not keep:
        return
    xs = np.array([k[0] for k in keep], float)
    ys = np.array([k[1].value for k in keep])
    ax.plot(xs, ys, style, marker="o", markersize=4, color=s.color, label=s.label)
    lo = np.array([k[1].lo for k in keep])
    hi = np.array([k[1].hi for k in keep])
    if np.isfinite(lo).any():
        ax.fill_between(xs, lo, hi, color=s.color, alpha=0.18, linewidth=0)
    for xi, st in keep:
        if len(st.points) > 1:
            ax.scatter(np.full(len(st.points), xi), st.points, s=7, color=s.color, alpha=0.6)


# --------------------------------------------------------------------------- figures


def accuracy(results: Results | pd.DataFrame) -> Figure:
    """ZSL / FT / ICL accuracy per task (the paper's table), with the controls faded beside."""
    f = _frame(results)
    series = [
        S("ZSL", "accuracy", "zs", COLORS["zs"]),
        S("FT", "accuracy", "ft", COLORS["ft"]),
        S("ICL", "accuracy", "icl", COLORS["icl"]),
        S("FT, shuffled labels", "accuracy", "ft_shuffled", COLORS["ft_shuffled"], True),
        S("FT, layer-causal", "accuracy", "ft_layer_causal", COLORS["ft_layer_causal"], True),
        S("untrained ZSL", "accuracy", "untrained_zs", COLORS["zs"], True),
        S("untrained FT", "accuracy", "untrained_ft", COLORS["ft"], True),
        S("untrained ICL", "accuracy", "untrained_icl", COLORS["icl"], True),
    ]
    if not _present(f, series):
        raise MissingMetricsError("no accuracy rows in these results")
    n = len(_present(f, series))
    fig = _new_figure(3.2 + len(_groups(f)) * (0.4 + 0.2 * n), 4.4)
    ax = fig.subplots()
    _bars(ax, f, series, scale=100.0)
    for i, g in enumerate(_groups(f)):
        level = _chance(results, f[f["group"] == g]["task"].iloc[0])
        if level is not None:
            ax.hlines(level, i - 0.45, i + 0.45, colors="black", linestyles=":",
                      label="chance (1 / #labels)" if i == 0 else None)  # fmt: skip
    _legend(ax)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    return _finish(fig, f, "Accuracy: zero-shot (ZSL), finetuned (FT), in-context (ICL)")


def _chance(results, task: str) -> float | None:
    """100 / #labels from a run's provenance (a bare frame does not know it)."""
    for run in getattr(results, "runs", []):
        words = run.provenance.get("label_words") if run.task == task else None
        if words:
            return 100.0 / len(words)
    return None


def simaou(results: Results | pd.DataFrame) -> Figure:
    """SimAOU beside every baseline, and its part orthogonal to ZS for each FT variant."""
    f = _frame(results)
    main = [
        S("FT (paper)", "simaou", "ft", COLORS["ft"]),
        S("random U[0,1) (paper)", "simaou", "uniform", COLORS["uniform"]),
        S("random Gaussian", "simaou", "gaussian", COLORS["gaussian"]),
        S("shared-origin null", "simaou_null", "ft", COLORS["null"]),
        S("FT, orthogonal to ZS", "simaou_orthogonal", "ft", COLORS["orthogonal"]),
        S("untrained model", "simaou", "untrained", COLORS["untrained"]),
        S("FT, shuffled labels", "simaou", "ft_shuffled", COLORS["ft_shuffled"]),
        S("FT, layer-causal", "simaou", "ft_layer_causal", COLORS["ft_layer_causal"]),
    ]
    orth = [
        S("FT", "simaou_orthogonal", "ft", COLORS["ft"]),
        S("untrained model", "simaou_orthogonal", "untrained", COLORS["untrained"]),
        S("FT, shuffled labels", "simaou_orthogonal", "ft_shuffled", COLORS["ft_shuffled"]),
        S("FT, layer-causal", "simaou_orthogonal", "ft_layer_causal", COLORS["ft_layer_causal"]),
    ]
    return _bar_panels(
        f,
        [
            ("SimAOU = cos(ICL − ZS, FT − ZS)\nbeside its baselines", COS, main),
            ("SimAOU of the parts orthogonal to ZS\n(expected 0 if unrelated)", COS, orth),
        ],
        "SimAOU: do ICL and FT move the attention output the same way?",
    )


def simam(results: Results | pd.DataFrame) -> Figure:
    """SimAM before (ICL vs ZS) and after (ICL vs FT), raw and mean-centred, and SimAM_Δ."""
    f = _frame(results)

    def before_after(suffix: str) -> list[S]:
        return [
            S("before: ICL vs ZS", f"simam_before{suffix}", "icl_vs_zs", COLORS["before"]),
            S("after: ICL vs FT", f"simam_after{suffix}", "ft", COLORS["ft"]),
            S("after, untrained", f"simam_after{suffix}", "untrained", COLORS["untrained"]),
            S("after, FT shuffled", f"simam_after{suffix}", "ft_shuffled", COLORS["ft_shuffled"]),
            S("after, FT layer-causal", f"simam_after{suffix}", "ft_layer_causal",
              COLORS["ft_layer_causal"]),
        ]  # fmt: skip

    def delta(suffix: str) -> list[S]:
        return [
            S("FT", f"simam_delta{suffix}", "ft", COLORS["ft"]),
            S("untrained model", f"simam_delta{suffix}", "untrained", COLORS["untrained"]),
            S("FT, shuffled labels", f"simam_delta{suffix}", "ft_shuffled",
              COLORS["ft_shuffled"]),
            S("FT, layer-causal", f"simam_delta{suffix}", "ft_layer_causal",
              COLORS["ft_layer_causal"]),
        ]  # fmt: skip

    return _bar_panels(
        f,
        [
            ("SimAM before / after\n(raw scores)", COS, before_after("")),
            ("SimAM before / after\n(mean-centred rows)", COS, before_after("_centered")),
            ("SimAM_Δ = cos(ICL − ZS, FT − ZS)\n(raw scores)", COS, delta("")),
            ("SimAM_Δ\n(mean-centred rows)", COS, delta("_centered")),
        ],
        "SimAM: attention scores over the query's own tokens",
        ncols=2,
    )


def kendall(results: Results | pd.DataFrame) -> Figure:
    """Kendall τ between ICL's and FT's attention to the demonstrations, beside baselines."""
    f = _frame(results)

    def series(level: str) -> list[S]:
        m = f"kendall_{level}"
        return [
            S("FT", m, "ft", COLORS["ft"]),
            S("random ranking", m, "uniform", COLORS["uniform"]),
            S("untrained model", m, "untrained", COLORS["untrained"]),
            S("FT, shuffled labels", m, "ft_shuffled", COLORS["ft_shuffled"]),
            S("FT, layer-causal", m, "ft_layer_causal", COLORS["ft_layer_causal"]),
        ]

    tau = "Kendall τ-b (−1…1)"
    return _bar_panels(
        f,
        [
            ("token level\n(demonstration tokens)", tau, series("token")),
            ("example level\n(weights summed per demonstration)", tau, series("example")),
        ],
        "Kendall: does FT attend to the training tokens ICL attends to?",
    )


def layers(results: Results | pd.DataFrame) -> Figure:
    """Per-layer SimAOU (FT, null, orthogonal, untrained) and Kendall (FT vs random), per task."""
    f = _frame(results)
    cols = [
        ("SimAOU per layer", COS, [
            S("FT", "simaou", "ft", COLORS["ft"]),
            S("shared-origin null", "simaou_null", "ft", COLORS["null"]),
            S("FT, orthogonal to ZS", "simaou_orthogonal", "ft", COLORS["orthogonal"]),
            S("untrained model", "simaou", "untrained", COLORS["untrained"]),
        ]),
        ("Kendall (token level) per layer", "Kendall τ-b", [
            S("FT", "kendall_token", "ft", COLORS["ft"]),
            S("random ranking", "kendall_token", "uniform", COLORS["uniform"]),
        ]),
    ]  # fmt: skip
    per_layer = f[f["layer"] != "mean"]
    cols = [c for c in cols if _present(per_layer.assign(layer="mean"), c[2])]
    if not cols:
        raise MissingMetricsError("no per-layer SimAOU or Kendall rows in these results")
    groups = _groups(f)
    fig = _new_figure(5.2 * len(cols), 2.8 * len(groups) + 0.9)
    axes = fig.subplots(len(groups), len(cols), squeeze=False)
    for r, g in enumerate(groups):
        for c, (title, ylabel, series) in enumerate(cols):
            ax = axes[r, c]
            rows = per_layer[per_layer["group"] == g]
            layer_ids = sorted({int(x) for x in rows["layer"]})
            for s in series:
                stats = [_stat(_rows(rows, s, layer=str(layer))) for layer in layer_ids]
                _line(ax, layer_ids, stats, s, "--" if s.variant == "uniform" else "-")
            ax.axhline(0, color="black", linewidth=0.6)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
            ax.set_xlabel("layer")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{g.replace(chr(10), ' · ')}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            if r == 0:
                _legend(ax)
    return _finish(fig, f, "Per-layer similarities", _note(f, "bands"))


def lr_sensitivity(results: Results | pd.DataFrame) -> Figure:
    """Similarities and FT accuracy across the learning-rate grid (kind ``lr_grid``), per task."""
    f = _frame(results)
    grid = f[(f["kind"] == "lr_grid") & f["lr"].notna() & (f["layer"] == "mean")]
    if grid.empty:
        raise MissingMetricsError("no learning-rate grid rows (run with lr_sensitivity=True)")
    sims = [
        S("SimAOU", "simaou", "", COLORS["ft"]),
        S("SimAOU orthogonal to ZS", "simaou_orthogonal", "", COLORS["orthogonal"]),
        S("shared-origin null", "simaou_null", "", COLORS["null"]),
        S("SimAM after", "simam_after", "", COLORS["before"]),
    ]
    groups = [g for g in _groups(f) if g in set(grid["group"])]
    # one column per task (up to six in a row), similarities above FT accuracy; one legend
    # for the whole figure, so every panel keeps the same width
    ncols = min(len(groups), len(TASK_ORDER))
    nrows = -(-len(groups) // ncols)
    fig = _new_figure(2.8 * ncols + 2.4, 5.4 * nrows + 0.8)
    axes = fig.subplots(2 * nrows, ncols, squeeze=False, sharex=True)
    for k in range(len(groups), nrows * ncols):
        axes[2 * (k // ncols), k % ncols].set_visible(False)
        axes[2 * (k // ncols) + 1, k % ncols].set_visible(False)
    for i, g in enumerate(groups):
        top, bottom = axes[2 * (i // ncols), i % ncols], axes[2 * (i // ncols) + 1, i % ncols]
        rows = grid[grid["group"] == g]
        lrs = sorted(rows["lr"].unique())
        for s in sims:
            m = rows[rows["metric"] == s.metric]
            _line(top, lrs, [_stat(m[m["lr"] == lr]) for lr in lrs], s,
                  "--" if s.metric == "simaou_null" else "-")  # fmt: skip
        acc = rows[rows["metric"] == "accuracy"]
        ft_acc = S("FT accuracy", "accuracy", "", COLORS["ft"])
        _line(bottom, lrs, [_stat(acc[acc["lr"] == lr], 100.0) for lr in lrs], ft_acc)
        for v, label in (("zs", "ZSL"), ("icl", "ICL")):
            st = _stat(_rows(f, S(label, "accuracy", v, ""), g), 100.0)
            if st is not None:
                bottom.axhline(st.value, color=COLORS[v], linestyle=":", label=f"{label} accuracy")
        chosen = f[(f["group"] == g) & (f["kind"] == "result") & (f["variant"] == "ft")]
        for j, lr in enumerate(sorted(chosen["lr"].dropna().unique())):
            for ax in (top, bottom):
                ax.axvline(lr, color="black", linewidth=0.8, linestyle="-.",
                           label="chosen lr (per seed)" if j == 0 else None)  # fmt: skip
        top.axhline(0, color="black", linewidth=0.6)
        top.set_title(g.replace("\n", " · "), fontsize=10)
        bottom.set_ylim(0, 105)
        bottom.set_xlabel("FT learning rate")
        if i % ncols == 0:
            top.set_ylabel(COS)
            bottom.set_ylabel("FT accuracy (%)")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    # one legend entry per label, gathered over every panel (a task may lack a series)
    handles: dict[str, object] = {}
    for ax in axes.ravel():
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8,
               frameon=False)  # fmt: skip
    note = _note(f, "bands", "similarities are means over layers")
    return _finish(fig, f, "Learning-rate sensitivity of the similarities and of FT", note)


def rec2ftp(results: Results | pd.DataFrame) -> Figure:
    """Rec2FTP beside its chance level, annotated with the counts; change agreement beside it."""
    f = _frame(results)
    r2 = [
        S("Rec2FTP", "rec2ftp", "ft", COLORS["ft"]),
        S("chance (ICL at its own label rates)", "rec2ftp", "chance", COLORS["chance"]),
    ]
    ca = [S("change agreement (ICL, FT)", "change_agreement", "ft", COLORS["icl"])]
    panels = [
        ("Rec2FTP: % of (ZS wrong, FT right)\nthat ICL also gets right", "Rec2FTP (%)", r2),
        ("change agreement (Deutch et al.):\nsame changed predictions", "agreement (%)", ca),
    ]
    # kept even when undefined (no ZS-wrong & FT-right example): the 0/0 is the finding
    panels = [p for p in panels if any(not _rows(f, s).empty for s in p[2])]
    if not panels:
        raise MissingMetricsError("no rec2ftp or change_agreement rows in these results")
    width = 2.6 + len(_groups(f)) * 0.9
    fig = _new_figure(width * len(panels) + 1.5, 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (title, ylabel, series) in zip(axes, panels, strict=True):
        scale = 100.0 if series is ca else 1.0
        present = _present(f, series) or series[:1]
        _bars(ax, f, series, scale)
        for i, g in enumerate(_groups(f)):
            rows = _rows(f, series[0], g)
            if rows.empty:
                continue
            st = _stat(rows, scale)
            x = i - 0.4 + 0.8 / len(present) / 2
            n = int(rows["n"].fillna(0).sum())
            if series is r2:
                ok = rows[rows["value"].notna()]
                k = int(np.round(ok["value"] * ok["n"].fillna(0) / 100).sum())
                text = f"{k}/{n}"
            else:
                text = f"n={n}"
            if st is None:
                text += "\nundefined"
            top = 0.0 if st is None else np.nanmax([st.value, st.hi, *st.points])
            ax.annotate(text, (x, top), xytext=(0, 5), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 112)
    note = _note(f, extra="Rec2FTP counts k/n summed over seeds; change agreement n = denominator")
    return _finish(fig, f, "Rec2FTP and change agreement", note)


def dual(results: Results | pd.DataFrame) -> Figure:
    """ΔW_ICL vs ΔW_FT (linear-attention dual form, ``run_experiment(dual=True)``) vs baselines."""
    f = _frame(results)

    def series(prefix: str) -> list[S]:
        out = [
            S("ΔW_FT", f"dual_{prefix}_icl_ft", "dual", COLORS["ft"]),
            S("ΔW_FT, shuffled", f"dual_{prefix}_icl_ft_shuffled", "dual", COLORS["ft_shuffled"]),
            S("random U[0,1)", f"dual_{prefix}_icl_uniform", "dual", COLORS["uniform"]),
            S("random Gaussian", f"dual_{prefix}_icl_gaussian", "dual", COLORS["gaussian"]),
        ]
        if prefix == "cos":
            out.append(S("W_ZSL (any Σ v kᵀ)", "dual_cos_icl_zsl", "dual", COLORS["zs"]))
        else:
            out.insert(1, S("ΔW_FT, each on its own query", "dual_act_icl_ft_own", "dual",
                            COLORS["ft"], True))  # fmt: skip
        return out

    return _bar_panels(
        f,
        [
            ("Frobenius cosine of ΔW_ICL\nwith each matrix", COS, series("cos")),
            ("cosine of their actions on\nthe zero-shot query", COS, series("act")),
        ],
        "Meta-gradients: is ΔW_ICL (demonstrations) aligned with ΔW_FT (K/V finetuning)?",
    )


def patching(results: Results | pd.DataFrame) -> Figure:
    """ICL <-> FT activation patching (``run_experiment(patching=True)``): per layer, the
    fraction of the base run's label-logit change that survives when its update is replaced
    by FT's (left) or ICL's (right), norm-matched, beside the shuffled-label FT update, a
    random update of equal norm and no update."""
    f = _frame(results)
    per_layer = f[(f["metric"] == "patch_survival") & (f["layer"] != "mean")]
    if per_layer.empty:
        raise MissingMetricsError("no patch_survival rows (run with patching=True)")
    cols = [
        ("ICL run, ICL's update replaced", "icl_to_ft", [
            ("by FT's", "ft", COLORS["ft"]), ("by shuffled-label FT's", "ft_shuffled",
            COLORS["ft_shuffled"]), ("by a random one", "random", COLORS["gaussian"]),
            ("removed", "zero", COLORS["zs"]),
        ]),
        ("FT run, FT's update replaced", "ft_to_icl", [
            ("by ICL's", "icl", COLORS["icl"]), ("by shuffled-label FT's", "ft_shuffled",
            COLORS["ft_shuffled"]), ("by a random one", "random", COLORS["gaussian"]),
            ("removed", "zero", COLORS["zs"]),
        ]),
    ]  # fmt: skip
    groups = _groups(per_layer)
    fig = _new_figure(5.2 * len(cols), 2.8 * len(groups) + 0.9)
    axes = fig.subplots(len(groups), len(cols), squeeze=False)
    for r, g in enumerate(groups):
        rows = per_layer[per_layer["group"] == g]
        layer_ids = sorted({int(x) for x in rows["layer"]})
        for c, (title, direction, variants) in enumerate(cols):
            ax = axes[r, c]
            for label, v, color in variants:
                s = S(label, "patch_survival", f"{direction}:{v}", color)
                stats = [_stat(_rows(rows, s, layer=str(layer))) for layer in layer_ids]
                _line(ax, layer_ids, stats, s, "-" if v in ("ft", "icl") else "--")
            ax.axhline(0, color="black", linewidth=0.6)
            ax.axhline(1, color="black", linewidth=0.6, linestyle=":")
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
            ax.set_xlabel("layer patched")
            ax.set_ylabel("fraction of the change kept")
            ax.set_title(f"{g.replace(chr(10), ' · ')}: {title}", fontsize=10)
            ax.grid(alpha=0.3)
            if r == 0:
                _legend(ax)
    note = _note(f, "bands", "1 = the base run's whole label-logit change survives")
    return _finish(fig, f, "ICL <-> FT activation patching", note)


FIGURES = {
    "accuracy": accuracy,
    "simaou": simaou,
    "simam": simam,
    "kendall": kendall,
    "layers": layers,
    "lr_sensitivity": lr_sensitivity,
    "rec2ftp": rec2ftp,
    "dual": dual,
    "patching": patching,
}


def make_all(
    results: Results | pd.DataFrame,
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Write every figure the results support as ``out_dir/<name>.<fmt>``; returns the paths.

    Figures whose metrics are all missing are skipped (logged), not fatal.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, draw in FIGURES.items():
        try:
            fig = draw(results)
        except MissingMetricsError as e:
            log.info("skipping %s: %s", name, e)
            continue
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, dpi=dpi)
            paths.append(path)
    return paths


def figures_main(
    results_dir: str, out_dir: str | None = None, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """``icl-lens figures RESULTS_DIR [OUT_DIR]``: load results (a directory of run files or one
    saved file) and write all figures, by default to ``<results dir>/figures``."""
    src = Path(results_dir)
    if not src.exists():
        raise FileNotFoundError(f"no results at {src}")
    results = Results.load(src)
    default = (src if src.is_dir() else src.parent) / "figures"
    return make_all(results, Path(out_dir) if out_dir else default, formats)
