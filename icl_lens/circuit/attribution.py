"""Per-layer and per-head attributions of the ICL and FT updates.

- Update similarity (SimAOU's recipe, ``icl_lens.metrics``) at any site and per head, beside
  its shared-origin null and its orthogonal variant: :func:`update_similarity`,
  :func:`head_simaou`, :func:`site_similarity`.
- Direct logit attribution (DLA) of ΔICL = ICL − ZS and ΔFT = FT − ZS onto the label-word
  logit difference (gold label minus the mean of the others), per layer and head:
  :func:`logit_diff_direction`, :func:`direct_logit_attribution`, :func:`dla`.

The functions on tensors are pure; the ``records`` helpers read a
:class:`~icl_lens.circuit.records.CircuitRecords`.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_lens import metrics as M
from icl_lens.circuit.records import CircuitRecords

__all__ = [
    "UpdateSimilarity",
    "direct_logit_attribution",
    "dla",
    "head_simaou",
    "head_table",
    "layer_table",
    "logit_diff_direction",
    "site_similarity",
    "update_similarity",
]


# --------------------------------------------------------------------------- similarity


@dataclass(frozen=True)
class UpdateSimilarity:
    """SimAOU of two updates per entry, with its shared-origin null and orthogonal variant
    (``metrics.simaou``, ``metrics.shared_origin_null``, ``metrics.simaou_orthogonal``)."""

    simaou: Float[Tensor, "example ..."]
    null: Float[Tensor, "example ..."]
    orthogonal: Float[Tensor, "example ..."]

    def means(self) -> pd.DataFrame:
        """Means over examples (NaN-aware), one row per unit (layer, or layer × head)."""
        cols = {k: _nanmean0(getattr(self, k)).reshape(-1).numpy() for k in _SIM}
        return pd.DataFrame(cols)


_SIM = ("simaou", "null", "orthogonal")


def _nanmean0(x: Tensor) -> Tensor:
    """Mean over dim 0 ignoring NaN (NaN where every entry is)."""
    x = x.double()
    ok = ~torch.isnan(x)
    n = ok.sum(0)
    return torch.where(n > 0, x.nan_to_num(0.0).sum(0) / n.clamp_min(1), torch.nan)


def update_similarity(
    zs: Float[Tensor, "example ... d"],
    icl: Float[Tensor, "example ... d"],
    ft: Float[Tensor, "example ... d"],
    *,
    on_undefined: M.OnUndefined = "nan",
) -> UpdateSimilarity:
    """SimAOU, shared-origin null and orthogonal SimAOU of any site, per entry of the leading
    dims (the metrics are elementwise over them): the residual stream [example, layer, d],
    per-head outputs [example, layer, head, d], ... Undefined entries (a zero update) are NaN
    by default."""
    kw = dict(on_undefined=on_undefined)
    return UpdateSimilarity(
        simaou=M.simaou(zs, icl, ft, **kw),
        null=M.shared_origin_null(zs, icl, ft, **kw),
        orthogonal=M.simaou_orthogonal(zs, icl, ft, **kw),
    )


def head_simaou(
    zs: Float[Tensor, "example layer head d_model"],
    icl: Float[Tensor, "example layer head d_model"],
    ft: Float[Tensor, "example layer head d_model"],
    *,
    on_undefined: M.OnUndefined = "nan",
) -> Float[Tensor, "example layer head"]:
    """Per-head SimAOU: cos(hat(ICL_h) − hat(ZS_h), hat(FT_h) − hat(ZS_h)) of each head's
    output ``z_h · W_O^h`` (the SimAOU recipe of ``metrics.simaou``, one head at a time)."""
    if zs.ndim != 4:
        raise ValueError(f"expected [example, layer, head, d_model], got {tuple(zs.shape)}")
    return M.simaou(zs, icl, ft, on_undefined=on_undefined)


def site_similarity(
    records: CircuitRecords, site: str = "resid", other: str = "ft", **kw
) -> UpdateSimilarity:
    """:func:`update_similarity` of ΔICL and Δ``other`` (``"ft"`` or ``"ft_shuffled"``) at a
    recorded site: [example, layer], or [example, layer, head] for ``"heads"``."""
    if site in ("q_pre", "q_post"):
        raise ValueError(f"site {site!r} holds queries, not outputs; compare 'heads' or others")
    z, i, f = (records[c].site(site) for c in ("zs", "icl", other))
    return update_similarity(z, i, f, **kw)


# --------------------------------------------------------------------------- logit attribution


def logit_diff_direction(
    readout: Float[Tensor, "*layer label d_model"], labels: Int[Tensor, " example"]
) -> Float[Tensor, "example *layer d_model"]:
    """Per example, ``readout[gold] − mean_{c ≠ gold} readout[c]``: the direction whose dot
    product is the label-word logit difference (gold minus the mean of the other labels)."""
    n_labels = readout.shape[-2]
    if n_labels < 2:
        raise ValueError("a logit difference needs at least two label words")
    onehot = torch.nn.functional.one_hot(labels.long(), n_labels).to(readout.dtype)
    weights = onehot - (1 - onehot) / (n_labels - 1)  # [example, label]
    return einops.einsum(weights, readout, "e c, ... c d -> e ... d")


def direct_logit_attribution(
    update: Float[Tensor, "example ... d_model"],
    direction: Float[Tensor, "example ... d_model"],
    scale: Float[Tensor, "example ..."],
) -> Float[Tensor, "example ..."]:
    """``update · direction / scale`` per entry (broadcasting): the update's direct effect on
    the logit difference through norms whose scales are held at ``scale``."""
    return (update.double() * direction.double()).sum(-1) / scale.double()


def dla(
    records: CircuitRecords, condition: str = "icl", site: str = "residual"
) -> Float[Tensor, "example layer *head"]:
    """DLA of ``condition``'s update (ICL − ZS, FT − ZS, ...) onto the label-word logit
    difference at the prediction position, per example and layer (and head for ``"heads"``).

    Approximation: the final norm's scale (and, for ``"attention"``/``"heads"``, the
    post-attention norm's scale) is held at the ZS run's value, so the map from an update to
    the logits is linear: DLA = Δ · (readout_gold − mean readout_other) / scale. The real
    change also moves those scales and runs through every later layer; this counts only the
    direct path. Output soft caps (Gemma-2) are left out. ``"residual"``: the update added to
    the residual stream; ``"attention"``: the update before the post-attention norm (equal to
    ``"residual"`` without one); ``"heads"``: each head's share of ``"attention"`` (the heads
    sum to it exactly: b_O cancels in the update).
    """
    if records.record != "predict":
        raise ValueError(
            "DLA reads the label-word logits at the prediction position: build the records "
            f"with record='predict' (these are at {records.record!r})"
        )
    if site not in ("residual", "attention", "heads"):
        raise ValueError(f"DLA sites: 'residual', 'attention' or 'heads', not {site!r}")
    update = records.update(condition, site)
    zs = records.zs
    if site == "residual":
        direction = logit_diff_direction(records.readout, records.labels)[:, None]
        scale = zs.final_scale[:, None]
    else:
        direction = logit_diff_direction(records.attn_readout, records.labels)
        scale = zs.final_scale[:, None] * zs.post_scale
        if site == "heads":
            direction, scale = direction[:, :, None], scale[..., None]
    return direct_logit_attribution(update, direction, scale)


# --------------------------------------------------------------------------- tables


def head_table(records: CircuitRecords, other: str = "ft") -> pd.DataFrame:
    """One row per (layer, head), means over examples: per-head SimAOU of ΔICL vs
    Δ``other``, its null and orthogonal variant, the DLA of both updates (when the records are
    at the prediction position) and the updates' norms."""
    sim = site_similarity(records, "heads", other)
    n_l, n_h = records.n_layers, records.n_heads
    layer, head = np.meshgrid(np.arange(n_l), np.arange(n_h), indexing="ij")
    table = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel()})
    for k in _SIM:
        table[k] = _nanmean0(getattr(sim, k)).reshape(-1).numpy()
    if records.record == "predict":
        table["dla_icl"] = _nanmean0(dla(records, "icl", "heads")).reshape(-1).numpy()
        table[f"dla_{other}"] = _nanmean0(dla(records, other, "heads")).reshape(-1).numpy()
    for c in ("icl", other):
        norm = records.update(c, "heads").norm(dim=-1)
        table[f"norm_{c}"] = norm.double().mean(0).reshape(-1).numpy()
    return table


def layer_table(records: CircuitRecords, other: str = "ft") -> pd.DataFrame:
    """One row per layer, means over examples: update similarity (SimAOU, null, orthogonal)
    at each recorded vector site, and the DLA of ΔICL and Δ``other`` at the residual site."""
    table = pd.DataFrame({"layer": np.arange(records.n_layers)})
    for site in ("resid", "residual", "attention"):
        if site not in records.sites:
            continue
        sim = site_similarity(records, site, other)
        for k in _SIM:
            table[f"{site}_{k}"] = _nanmean0(getattr(sim, k)).numpy()
    if records.record == "predict" and "residual" in records.sites:
        table["dla_icl"] = _nanmean0(dla(records, "icl")).numpy()
        table[f"dla_{other}"] = _nanmean0(dla(records, other)).numpy()
    return table
