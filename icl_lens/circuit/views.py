"""Views: the recorded row's attention to the demonstrations under ICL beside FT's dual form,
and patching curves. Matplotlib, imported on first use.

FT has no demonstrations in its context; its "attention" to them is the dual form of
gradient descent (Irie et al.; DESIGN §2, Kendall): ``softmax_i(q_test · q_i)`` over the
demonstration tokens trained on, q_i the scaled query each one had in its training step and
q_test the FT model's scaled query at the recorded position (``metrics.ft_train_weights``).
ICL's side is the model's own attention (``hook_pattern``) and the softmax over the
demonstration tokens of the head-summed pre-softmax scores (``metrics.icl_demo_weights``),
the two quantities Kendall compares.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from icl_lens import metrics as M
from icl_lens.circuit.patching import PatchResult
from icl_lens.circuit.records import CircuitRecords

__all__ = ["attention_frame", "attention_view", "plot_patching", "plot_where"]


def attention_frame(
    records: CircuitRecords, example: int = 0, layer: int = 0, head: int | None = None
) -> pd.DataFrame:
    """One row per demonstration token: ``token`` (string), ``demo`` (its demonstration),
    ``visible`` (inside the layer's window), ``icl_pattern`` (the model's attention from the
    recorded row; ``head``'s, or the mean over heads), ``icl_weights`` (softmax over the
    demonstration tokens of the head-summed scores) and ``ft_dual`` (FT's dual-form weights).
    Both softmaxes run over the visible tokens only, as Kendall's do."""
    icl = records.icl
    if icl.demo_scores is None or icl.demo_scores.shape[-1] == 0:
        raise ValueError("the records have no demonstration tokens")
    if records.ft.q_pre is None:
        raise ValueError("the FT dual form needs site 'q_pre' in the records")
    train_q = records.ft_state.train_q
    if train_q is None or train_q.shape[1] != icl.demo_scores.shape[-1]:
        raise ValueError("FT's stored training queries do not match the demonstration tokens")
    mask = icl.demo_mask[example : example + 1, layer : layer + 1]
    icl_w = M.icl_demo_weights(icl.demo_scores[example : example + 1, layer : layer + 1], mask)
    scale = float(records.attn_scale[layer]) ** 0.5  # as the stored training queries
    q_test = records.ft.q_pre[example : example + 1, layer : layer + 1].flatten(2) / scale
    ft_w = M.ft_train_weights(q_test, train_q[layer : layer + 1], mask)
    pattern = icl.demo_pattern[example, layer]
    pattern = pattern.mean(0) if head is None else pattern[head]
    return pd.DataFrame({
        "token": records.demo_tokens,
        "demo": records.demo_of_token.numpy(),
        "visible": mask[0, 0].numpy(),
        "icl_pattern": pattern.double().numpy(),
        "icl_weights": icl_w[0, 0].numpy(),
        "ft_dual": ft_w[0, 0].numpy(),
    })  # fmt: skip


def attention_view(
    records: CircuitRecords,
    example: int = 0,
    layer: int = 0,
    *,
    head: int | None = None,
    ax: Any = None,
    backend: str = "matplotlib",
) -> Any:
    """Bars over the demonstration tokens of one example and layer: ICL's attention from the
    recorded row (``hook_pattern``; ``head``'s, or the mean over heads), ICL's renormalised
    head-summed weights and FT's dual-form weights (see :func:`attention_frame`), with the
    token strings, demonstration boundaries and the tokens outside the window shaded.
    Returns the matplotlib Figure.

    ``backend="circuitsvis"`` returns an interactive ``circuitsvis`` view instead (the tokens
    coloured by each of the three weights; hover for the values), for a live notebook; it needs
    ``pip install 'icl-lens[circuitsvis]'``. It is HTML and JavaScript, so it is not kept in a
    PNG as the matplotlib figure is. Offline, circuitsvis inlines its script."""
    if backend not in ("matplotlib", "circuitsvis"):
        raise ValueError(f"backend must be 'matplotlib' or 'circuitsvis', not {backend!r}")
    frame = attention_frame(records, example, layer, head)
    if backend == "circuitsvis":
        if ax is not None:
            raise ValueError("ax= is for the matplotlib backend; circuitsvis draws its own view")
        return _circuitsvis_view(frame, head)
    import matplotlib.pyplot as plt

    n = len(frame)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 3.2))
    else:
        fig = ax.figure
    x = torch.arange(n).numpy()
    width = 0.28
    who = "mean over heads" if head is None else f"head {head}"
    ax.bar(x - width, frame.icl_pattern, width, label=f"ICL attention ({who})")
    ax.bar(x, frame.icl_weights, width, label="ICL, softmax over demos (head-summed)")
    ax.bar(x + width, frame.ft_dual, width, label="FT dual form softmax(q·q_i)")
    for i in range(1, n):
        if frame.demo.iloc[i] != frame.demo.iloc[i - 1]:
            ax.axvline(i - 0.5, color="0.85", lw=0.8, zorder=0)
    for i in range(n):
        if not frame.visible.iloc[i]:
            ax.axvspan(i - 0.5, i + 0.5, color="0.93", zorder=-1)
    ax.set_xticks(x)
    ax.set_xticklabels([repr(t)[1:-1] for t in frame.token], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("weight")
    ex_id = records.example_ids[example]
    ax.set_title(f"layer {layer}, example {ex_id}: attention to the demonstrations", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _circuitsvis_view(frame: pd.DataFrame, head: int | None) -> Any:
    """The three weights of :func:`attention_frame` as circuitsvis coloured tokens."""
    try:
        from circuitsvis.tokens import colored_tokens_multi
    except ImportError:
        raise ImportError(
            "backend='circuitsvis' needs circuitsvis: pip install 'icl-lens[circuitsvis]' "
            "(or use the default backend='matplotlib')"
        ) from None
    who = "mean over heads" if head is None else f"head {head}"
    values = torch.tensor(frame[["icl_pattern", "icl_weights", "ft_dual"]].to_numpy())
    labels = [f"ICL attention ({who})", "ICL, softmax over demos", "FT dual form"]
    return colored_tokens_multi(list(frame.token), values.float(), labels)


_STYLE = {  # variant: (colour, line style)
    "ft": ("C0", "-"),
    "icl": ("C0", "-"),
    "ft_shuffled": ("C1", "--"),
    "random": ("C2", ":"),
    "zero": ("0.5", "-."),
}


def plot_patching(result: PatchResult, direction: str = "icl_to_ft", *, ax: Any = None) -> Any:
    """The surviving fraction per layer (or per layer·head) of one direction, one line per
    variant with its bootstrap CI band; 1 = the base run's whole label-logit change survives,
    0 = none. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    frame = result.curve(direction)
    if frame.empty:
        raise ValueError(f"no {direction!r} rows in this result")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 3.2))
    else:
        fig = ax.figure
    heads = bool((frame["head"] >= 0).any())
    for variant, rows in frame.groupby("variant", sort=False):
        rows = rows.sort_values(["layer", "head"])
        x = range(len(rows))
        colour, style = _STYLE.get(variant, (None, "-"))
        ax.plot(x, rows.fraction, style, color=colour, marker="o", ms=3, label=variant)
        ax.fill_between(x, rows.ci_low, rows.ci_high, color=colour, alpha=0.15, lw=0)
    rows = frame[frame.variant == frame.variant.iloc[0]].sort_values(["layer", "head"])
    ticks = [f"L{r.layer}H{r.head}" if heads else str(r.layer) for r in rows.itertuples()]
    ax.set_xticks(range(len(ticks)))
    ax.set_xticklabels(ticks, rotation=90 if heads else 0, fontsize=7)
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.axhline(0.0, color="0.7", lw=0.8)
    base, put = {"icl_to_ft": ("ICL", "FT"), "ft_to_icl": ("FT", "ICL")}.get(direction, ("", ""))
    ax.set_xlabel("layer · head" if heads else "layer patched")
    ax.set_ylabel(f"fraction of {base}'s change kept")
    ax.set_title(f"{base} run, {base} update replaced by {put}'s (norm-matched)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


_SITE_COLOURS = {"resid": "#2ca02c", "residual": "#ff7f0e", "attention": "#9467bd"}


def plot_where(records: CircuitRecords, other: str = "ft") -> Any:
    """Where the ICL-like update lives: left, per layer, the similarity of ΔICL and Δ``other``
    at each recorded vector site (solid) beside its shared-origin null (dotted); middle, per
    (layer, head), the per-head SimAOU; right, the DLA of each head's ICL update onto the
    label-logit difference (when recorded at the prediction position). Means over examples
    (``layer_table``, ``head_table``). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from icl_lens.circuit.attribution import head_table, layer_table

    layers, heads = layer_table(records, other), head_table(records, other)
    with_dla = "dla_icl" in heads
    ratios = [1.3, 1, 1] if with_dla else [1.3, 1]
    fig, axes = plt.subplots(1, len(ratios), figsize=(13.0 if with_dla else 9.0, 3.6),
                             gridspec_kw={"width_ratios": ratios})  # fmt: skip
    ax = axes[0]
    for site, colour in _SITE_COLOURS.items():
        if f"{site}_simaou" not in layers:
            continue
        ax.plot(layers.layer, layers[f"{site}_simaou"], "-o", ms=3, color=colour, label=site)
        ax.plot(layers.layer, layers[f"{site}_null"], ":", color=colour, label=f"{site} null")
    ax.axhline(0.0, color="0.7", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"cos(ΔICL, Δ{other.upper()})")
    ax.set_title("update similarity per site (dotted: null)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    grids = [("simaou", f"per-head SimAOU (ICL vs {other})", "RdBu_r")]
    if with_dla:
        grids.append(("dla_icl", "per-head DLA of ΔICL (label-logit diff)", "PuOr_r"))
    for ax, (col, title, cmap) in zip(axes[1:], grids, strict=True):
        grid = heads.pivot(index="layer", columns="head", values=col).to_numpy(float)
        lim = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-lim, vmax=lim, origin="lower")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"Where the ICL update resembles {other.upper()}'s "
                 f"({len(records)} examples, seed {records.seed})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig
