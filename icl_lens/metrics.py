"""Pure metric functions for the ICL-vs-finetuning comparison (Dai et al. 2022, Deutch et al. 2024).

Nothing here touches a model: every function takes tensors recorded elsewhere and returns tensors,
floats or small dataclasses. Cosines and softmaxes are computed in float64 and returned as float64.
Notation: ZS = base model without demonstrations, ICL = base model with demonstrations,
FT = K/V-finetuned model without demonstrations. All activations are taken at the recorded
position (reference convention: the appended label token, position -1).

Classification (predictions are label indices):
    accuracy            #{pred == label} / n                             (fraction, not percent)
    label_distribution  p(c) = #{pred == c} / n
    rec2ftp             100 * #{ZS wrong, FT right, ICL right} / #{ZS wrong, FT right}
                        chance = 100 * sum_{i in D} p_ICL(label_i) / |D|,  D = {ZS wrong, FT right},
                        p_ICL = ICL's label rates over all examples (ICL drawn at its own rates)
    change_agreement    #{ICL and FT both changed ZS's prediction, to the same label}
                        / (#{ICL changed} + #{FT changed} - #{same})           (Deutch et al.)

SimAOU (inputs: ``hook_attn_out`` at the recorded position, [example, layer, d_model]):
    hat(x) = x / |x|;  dICL = hat(ICL) - hat(ZS),  dFT = hat(FT) - hat(ZS)
    simaou              cos(dICL, dFT) per (example, layer)
    simaou_orthogonal   cos(P dICL, P dFT),  P = I - hat(ZS) hat(ZS)^T  (drops the shared -ZS part)
    shared_origin_null  sqrt((1 - c_ICL)(1 - c_FT)) / 2,  c_X = cos(X, ZS): the expected SimAOU
                        when the parts of ICL and FT orthogonal to ZS are unrelated (high dim)
    simaou_random       cos(dICL, u),  u from uniform_random_like (paper: U[0,1)) or
                        gaussian_random_like (isotropic)

SimAM (inputs: pre-softmax score rows ``attn.hook_attn_scores`` of the recorded position,
restricted to the query example's own tokens, [example, layer, head, key]; optional bool mask of
visible keys, e.g. for sliding windows; masked entries are ignored, visible entries must be finite):
    simam               mean_h cos(a_h, b_h);  "before" = simam(ICL, ZS), "after" = simam(ICL, FT)
    simam(centered)     rows minus their mean over visible keys first (softmax is shift-invariant)
    simam_delta         mean_h cos(ICL_h - ZS_h, FT_h - ZS_h)                     (Deutch et al.)

Kendall (attention to training tokens):
    ICL weights   softmax_t( sum_h s_{h,t} ) over the demonstration tokens t (full-width q.k)
    FT weights    softmax_t( q_test . q_t ), q_t = stored scaled FT training-token queries
                  (all heads concatenated), q_test = FT model's query at the recorded position
    kendall_icl_ft      scipy.stats.kendalltau (tau-b) per (example, layer), at token level and,
                        given demo_of_token, at example level (weights summed per demonstration)
    kendall_random_baseline   tau-b of the ICL weights against a U[0,1) vector

Reducers: layer_means (mean over examples per layer, then over layers), bootstrap_ci
(percentile bootstrap over examples). f2t_mask selects the reference code's "f2t" subset
(ZS wrong, FT right, ICL right) for SimAOU/SimAM on those examples only.

Reference-code conventions kept: vectors are L2-normalised before the updates are formed; the
random SimAOU vector is drawn fresh per (example, layer); SimAM uses raw (pre-softmax) scores;
ICL context scores are summed over heads before the softmax; Kendall is scipy's tau-b and its
random baseline a fresh U[0,1) vector of the compared length; averages go examples -> layers.
Deliberate departure: the reference adds 1e-20 to norms, so a zero vector silently scores 0;
here it is undefined (see below).

Undefined values: a zero-norm vector or update, an empty row, a zero denominator or a constant
ranking has no value. Functions take ``on_undefined``: ``"raise"`` (default) raises
:class:`UndefinedMetricError` with a one-line reason; ``"nan"`` puts NaN exactly there and emits
an :class:`UndefinedMetricWarning` giving the count. ``layer_means`` refuses NaN unless told to
skip it, and then reports how many entries each layer used. Non-finite inputs are errors, never
"undefined"; in score rows, hidden (masked-out) entries may hold -inf and are never read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import einops
import numpy as np
import scipy.stats
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "UndefinedMetricError",
    "UndefinedMetricWarning",
    "OnUndefined",
    "accuracy",
    "label_distribution",
    "Rec2FTPResult",
    "rec2ftp",
    "f2t_mask",
    "ChangeAgreementResult",
    "change_agreement",
    "simaou",
    "simaou_orthogonal",
    "shared_origin_null",
    "simaou_random",
    "uniform_random_like",
    "gaussian_random_like",
    "simam",
    "simam_delta",
    "icl_demo_weights",
    "ft_train_weights",
    "KendallResult",
    "kendall_icl_ft",
    "kendall_random_baseline",
    "LayerMeans",
    "layer_means",
    "bootstrap_ci",
]

OnUndefined = Literal["raise", "nan"]


class UndefinedMetricError(ValueError):
    """A metric has no value for some input (zero-norm vector, empty row, zero denominator)."""


class UndefinedMetricWarning(UserWarning):
    """Emitted with ``on_undefined="nan"`` when NaN was placed at undefined entries."""


# --------------------------------------------------------------------------- helpers


def _check_on_undefined(on_undefined: str) -> None:
    if on_undefined not in ("raise", "nan"):
        raise ValueError(f"on_undefined must be 'raise' or 'nan', got {on_undefined!r}")


class _Undefined:
    """Collects where (and why) a tensor-valued metric is undefined."""

    def __init__(self, shape: torch.Size, device: torch.device, metric: str) -> None:
        self.mask = torch.zeros(shape, dtype=torch.bool, device=device)
        self.reasons: list[str] = []
        self.metric = metric

    def add(self, where: Tensor, reason: str) -> None:
        where = torch.broadcast_to(where, self.mask.shape)
        n = int(where.sum())
        if n:
            self.mask |= where
            self.reasons.append(f"{reason} at {n}")

    def finish(self, values: Tensor, on_undefined: OnUndefined) -> Tensor:
        n = int(self.mask.sum())
        if not n:
            return values
        msg = (
            f"{self.metric} undefined at {n} of {self.mask.numel()} entries "
            f"({'; '.join(self.reasons)})"
        )
        if on_undefined == "raise":
            raise UndefinedMetricError(msg + "; pass on_undefined='nan' to mask them")
        warnings.warn(msg + "; set to NaN", UndefinedMetricWarning, stacklevel=3)
        return values.masked_fill(self.mask, math.nan)


def _undefined_scalar(metric: str, reason: str, on_undefined: OnUndefined) -> float:
    _check_on_undefined(on_undefined)
    if on_undefined == "raise":
        raise UndefinedMetricError(f"{metric} undefined: {reason}")
    warnings.warn(f"{metric} undefined: {reason}; returning NaN", UndefinedMetricWarning, 3)
    return math.nan


def _check_finite(x: Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (inf/NaN)")


def _same_shape(**tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _resolve_tol(zero_tol: float | None, *xs: Tensor) -> float:
    """Default zero tolerance: 4 * machine epsilon of the least precise input dtype.

    Rounding an input perturbs its direction by about eps; a difference of normalised vectors
    below a few eps is rounding noise, not an update.
    """
    if zero_tol is not None:
        if zero_tol < 0:
            raise ValueError(f"zero_tol must be >= 0, got {zero_tol}")
        return float(zero_tol)
    eps = [torch.finfo(x.dtype).eps for x in xs if x.is_floating_point()]
    return 4.0 * max(eps, default=torch.finfo(torch.float64).eps)


def _cosine(
    a: Float[Tensor, "*batch d"],
    b: Float[Tensor, "*batch d"],
    undefined: _Undefined,
    names: tuple[str, str],
    scales: tuple[Tensor | None, Tensor | None] = (None, None),
    zero_tol: float = 0.0,
) -> Float[Tensor, "*batch"]:
    """cos(a, b) in float64 along the last dim; records zero-norm a or b as undefined.

    A vector counts as zero when its norm is <= zero_tol * scale (scale: the norm of what it was
    computed from; with no scale only an exactly zero vector counts).
    """
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    zero_a = na <= (zero_tol * scales[0] if scales[0] is not None else 0.0)
    zero_b = nb <= (zero_tol * scales[1] if scales[1] is not None else 0.0)
    undefined.add(zero_a, f"zero-norm {names[0]}")
    undefined.add(zero_b, f"zero-norm {names[1]}")
    denom = torch.where(zero_a | zero_b, torch.ones_like(na), na * nb)
    return ((a * b).sum(-1) / denom).clamp(-1.0, 1.0)


def _as_labels(x: Tensor | np.ndarray | list, name: str) -> Int[Tensor, " example"]:
    t = torch.as_tensor(x)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label index per example), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integer label indices, got dtype {t.dtype}")
    return t.long().cpu()


# --------------------------------------------------------------------------- classification


def accuracy(
    preds: Int[Tensor, " example"],
    labels: Int[Tensor, " example"],
    *,
    on_undefined: OnUndefined = "raise",
) -> float:
    """Fraction correct: #{pred == label} / n (in [0, 1]); undefined for n = 0."""
    p, y = _as_labels(preds, "preds"), _as_labels(labels, "labels")
    _same_shape(preds=p, labels=y)
    if p.numel() == 0:
        return _undefined_scalar("accuracy", "no examples", on_undefined)
    return float((p == y).double().mean())


def label_distribution(
    preds: Int[Tensor, " example"],
    n_labels: int,
    *,
    on_undefined: OnUndefined = "raise",
) -> Float[Tensor, " label"]:
    """Fraction of predictions per label: p(c) = #{pred == c} / n, c = 0..n_labels-1."""
    p = _as_labels(preds, "preds")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if p.numel() and (p.min() < 0 or p.max() >= n_labels):
        raise ValueError(f"preds must lie in [0, {n_labels}), got [{p.min()}, {p.max()}]")
    if p.numel() == 0:
        _undefined_scalar("label_distribution", "no examples", on_undefined)
        return torch.full((n_labels,), math.nan, dtype=torch.float64)
    return torch.bincount(p, minlength=n_labels).double() / p.numel()


@dataclass(frozen=True)
class Rec2FTPResult:
    """Rec2FTP with its counts and chance level (both in percent)."""

    value: float  # 100 * n_also_icl_right / n_zs_wrong_ft_right
    n_zs_wrong_ft_right: int  # the denominator
    n_also_icl_right: int  # the numerator
    chance: float  # expected value if ICL predicted at its own label rates, independently
    icl_label_rates: Float[Tensor, " label"]  # ICL's prediction rates over all examples


def rec2ftp(
    zs_pred: Int[Tensor, " example"],
    icl_pred: Int[Tensor, " example"],
    ft_pred: Int[Tensor, " example"],
    labels: Int[Tensor, " example"],
    n_labels: int | None = None,
    *,
    on_undefined: OnUndefined = "raise",
) -> Rec2FTPResult:
    """Recall to finetuning predictions (percent).

    D = {i : zs_i != y_i and ft_i == y_i};  value = 100 * #{i in D : icl_i == y_i} / |D|.
    chance = 100 * sum_{i in D} p_ICL(y_i) / |D|, p_ICL = label_distribution(icl_pred) over all
    examples: the expectation if ICL's predictions were drawn independently at its own rates
    (label collapse makes a high value cheap). |D| = 0 is undefined.
    """
    zs, icl = _as_labels(zs_pred, "zs_pred"), _as_labels(icl_pred, "icl_pred")
    ft, y = _as_labels(ft_pred, "ft_pred"), _as_labels(labels, "labels")
    _same_shape(zs_pred=zs, icl_pred=icl, ft_pred=ft, labels=y)
    if n_labels is None:
        n_labels = int(torch.cat([zs, icl, ft, y]).max()) + 1 if y.numel() else 1
    rates = (
        label_distribution(icl, n_labels)
        if icl.numel()
        else torch.full((n_labels,), math.nan, dtype=torch.float64)
    )
    if y.numel() and (y.min() < 0 or y.max() >= n_labels):
        raise ValueError(f"labels must lie in [0, {n_labels})")
    denom = (zs != y) & (ft == y)
    n_den = int(denom.sum())
    n_num = int((denom & (icl == y)).sum())
    if n_den == 0:
        value = _undefined_scalar(
            "rec2ftp", "no example where ZS is wrong and FT is right", on_undefined
        )
        return Rec2FTPResult(value, 0, 0, math.nan, rates)
    chance = 100.0 * float(rates[y[denom]].sum()) / n_den
    return Rec2FTPResult(100.0 * n_num / n_den, n_den, n_num, chance, rates)


def f2t_mask(
    zs_pred: Int[Tensor, " example"],
    icl_pred: Int[Tensor, " example"],
    ft_pred: Int[Tensor, " example"],
    labels: Int[Tensor, " example"],
) -> Bool[Tensor, " example"]:
    """The reference code's "f2t" subset: ZS wrong, FT right and ICL right (Rec2FTP's numerator).

    Index per-example tensors with it to compute SimAOU/SimAM on that subset only.
    """
    zs, icl = _as_labels(zs_pred, "zs_pred"), _as_labels(icl_pred, "icl_pred")
    ft, y = _as_labels(ft_pred, "ft_pred"), _as_labels(labels, "labels")
    _same_shape(zs_pred=zs, icl_pred=icl, ft_pred=ft, labels=y)
    return (zs != y) & (ft == y) & (icl == y)


@dataclass(frozen=True)
class ChangeAgreementResult:
    """Deutch et al.'s agreement of the prediction changes ICL and FT make relative to ZS."""

    value: float  # n_same / n_denominator
    n_icl_changed: int
    n_ft_changed: int
    n_same: int  # both changed, to the same label
    n_denominator: int  # n_icl_changed + n_ft_changed - n_same


def change_agreement(
    zs_pred: Int[Tensor, " example"],
    icl_pred: Int[Tensor, " example"],
    ft_pred: Int[Tensor, " example"],
    *,
    on_undefined: OnUndefined = "raise",
) -> ChangeAgreementResult:
    """|icl != zs and ft != zs and icl == ft| / (|icl != zs| + |ft != zs| - |same|).

    A fraction in [0, 1]. Undefined when neither ICL nor FT changed any prediction.
    """
    zs, icl = _as_labels(zs_pred, "zs_pred"), _as_labels(icl_pred, "icl_pred")
    ft = _as_labels(ft_pred, "ft_pred")
    _same_shape(zs_pred=zs, icl_pred=icl, ft_pred=ft)
    icl_ch, ft_ch = icl != zs, ft != zs
    n_icl, n_ft = int(icl_ch.sum()), int(ft_ch.sum())
    n_same = int((icl_ch & ft_ch & (icl == ft)).sum())
    n_den = n_icl + n_ft - n_same
    if n_den == 0:
        value = _undefined_scalar("change_agreement", "neither ICL nor FT changed", on_undefined)
    else:
        value = n_same / n_den
    return ChangeAgreementResult(value, n_icl, n_ft, n_same, n_den)


# --------------------------------------------------------------------------- SimAOU


def _unit_triple(
    zs: Tensor, icl: Tensor, ft: Tensor, undefined: _Undefined
) -> tuple[Tensor, Tensor, Tensor]:
    """L2-normalise ZS/ICL/FT in float64, recording zero vectors as undefined."""
    _same_shape(zs=zs, icl=icl, ft=ft)
    if zs.ndim < 1:
        raise ValueError("expected [example, layer, d_model] attention outputs")
    out = []
    for x, name in ((zs, "zs"), (icl, "icl"), (ft, "ft")):
        _check_finite(x, name)
        x = x.double()
        n = x.norm(dim=-1, keepdim=True)
        undefined.add(n.squeeze(-1) == 0, f"zero {name} vector")
        out.append(x / torch.where(n == 0, torch.ones_like(n), n))
    return out[0], out[1], out[2]


def simaou(
    zs: Float[Tensor, "example layer d_model"],
    icl: Float[Tensor, "example layer d_model"],
    ft: Float[Tensor, "example layer d_model"],
    *,
    on_undefined: OnUndefined = "raise",
    zero_tol: float | None = None,
) -> Float[Tensor, "example layer"]:
    """SimAOU = cos(hat(ICL) - hat(ZS), hat(FT) - hat(ZS)) per (example, layer), hat(x) = x/|x|.

    An update counts as zero (undefined) when its norm is <= zero_tol (the vectors are unit;
    default: 4 * eps of the least precise input dtype, i.e. rounding level).
    Reduce with :func:`layer_means`; compare with :func:`shared_origin_null`.
    """
    _check_on_undefined(on_undefined)
    und = _Undefined(zs.shape[:-1], zs.device, "simaou")
    z, i, f = _unit_triple(zs, icl, ft, und)
    one = torch.ones((), dtype=torch.float64, device=z.device)
    tol = _resolve_tol(zero_tol, zs, icl, ft)
    cos = _cosine(i - z, f - z, und, ("ICL update", "FT update"), (one, one), tol)
    return und.finish(cos, on_undefined)


def simaou_orthogonal(
    zs: Float[Tensor, "example layer d_model"],
    icl: Float[Tensor, "example layer d_model"],
    ft: Float[Tensor, "example layer d_model"],
    *,
    on_undefined: OnUndefined = "raise",
    zero_tol: float | None = None,
) -> Float[Tensor, "example layer"]:
    """cos(P dICL, P dFT) with P = I - hat(ZS) hat(ZS)^T: SimAOU without the shared -ZS part.

    P dX = hat(X) - (hat(X).hat(ZS)) hat(ZS). Its expectation is 0 when the orthogonal parts of
    ICL and FT are unrelated. Undefined where ICL or FT is parallel to ZS (norm <= zero_tol;
    default: rounding level, as in :func:`simaou`).
    """
    _check_on_undefined(on_undefined)
    und = _Undefined(zs.shape[:-1], zs.device, "simaou_orthogonal")
    z, i, f = _unit_triple(zs, icl, ft, und)

    def perp(x: Tensor) -> Tensor:
        d = x - z
        return d - (d * z).sum(-1, keepdim=True) * z

    one = torch.ones((), dtype=torch.float64, device=z.device)
    names = ("orthogonal ICL update", "orthogonal FT update")
    tol = _resolve_tol(zero_tol, zs, icl, ft)
    cos = _cosine(perp(i), perp(f), und, names, (one, one), tol)
    return und.finish(cos, on_undefined)


def shared_origin_null(
    zs: Float[Tensor, "example layer d_model"],
    icl: Float[Tensor, "example layer d_model"],
    ft: Float[Tensor, "example layer d_model"],
    *,
    on_undefined: OnUndefined = "raise",
) -> Float[Tensor, "example layer"]:
    """Expected SimAOU if the parts of ICL and FT orthogonal to ZS were unrelated.

    null = sqrt((1 - c_ICL)(1 - c_FT)) / 2, c_X = cos(X, ZS). Derivation: with unit vectors
    x = c_x z + s_x u_x (u_x unit, orthogonal to z), x - z = (c_x - 1) z + s_x u_x has squared norm
    2(1 - c_x), fixed by c_x. If u_ICL and u_FT are independent and either is isotropic,
    E[u_ICL . u_FT] = 0, so E[cos] is exactly the expression above in any dimension (high
    dimension only concentrates cos around it). It is 0.5 when both are orthogonal to ZS, 0 when
    either equals ZS, and approaches 1 as both approach -ZS.
    """
    _check_on_undefined(on_undefined)
    und = _Undefined(zs.shape[:-1], zs.device, "shared_origin_null")
    z, i, f = _unit_triple(zs, icl, ft, und)
    c_icl = (i * z).sum(-1).clamp(-1.0, 1.0)
    c_ft = (f * z).sum(-1).clamp(-1.0, 1.0)
    return und.finish(torch.sqrt((1 - c_icl) * (1 - c_ft)) / 2, on_undefined)


def uniform_random_like(
    x: Float[Tensor, "..."], generator: torch.Generator | None = None
) -> Float[Tensor, "..."]:
    """The paper's random baseline vector: u ~ U[0, 1) elementwise, shaped like x (all-positive)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # half-precision x: an fp32 draw
    return torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)


def gaussian_random_like(
    x: Float[Tensor, "..."], generator: torch.Generator | None = None
) -> Float[Tensor, "..."]:
    """An isotropic baseline vector: g ~ N(0, 1) elementwise, shaped like x."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # half-precision x: an fp32 draw
    return torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)


def simaou_random(
    zs: Float[Tensor, "example layer d_model"],
    icl: Float[Tensor, "example layer d_model"],
    random: Float[Tensor, "example layer d_model"],
    *,
    on_undefined: OnUndefined = "raise",
    zero_tol: float | None = None,
) -> Float[Tensor, "example layer"]:
    """Random-update baseline: cos(hat(ICL) - hat(ZS), u), u from uniform_random_like (paper) or
    gaussian_random_like (isotropic; E = 0)."""
    _check_on_undefined(on_undefined)
    _same_shape(zs=zs, random=random)
    _check_finite(random, "random")
    und = _Undefined(zs.shape[:-1], zs.device, "simaou_random")
    z, i, _ = _unit_triple(zs, icl, icl, und)
    one = torch.ones((), dtype=torch.float64, device=z.device)
    tol = _resolve_tol(zero_tol, zs, icl)
    cos = _cosine(i - z, random, und, ("ICL update", "random vector"), (one, None), tol)
    return und.finish(cos, on_undefined)


# --------------------------------------------------------------------------- SimAM


def _visibility(mask: Tensor | None, shape: torch.Size, device: torch.device, what: str) -> Tensor:
    """Broadcast a bool visibility mask to ``shape`` ([example, layer, (head,) key]).

    Accepted mask shapes: [key], [example, layer, key] (same for every head, only if ``shape`` has
    a head dim) or the full shape; size-1 dims broadcast.
    """
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.dtype != torch.bool:
        raise ValueError(f"{what} mask must be a bool tensor (True = visible), got {mask.dtype}")
    m = mask.to(device)
    if m.ndim == len(shape) - 1 and len(shape) == 4:
        m = m.unsqueeze(-2)  # [example, layer, key] -> [example, layer, 1, key]
    elif m.ndim not in (1, len(shape)):
        raise ValueError(
            f"{what} mask of shape {tuple(mask.shape)} does not fit scores of shape "
            f"{tuple(shape)}; use [key], [example, layer, key] or the full shape"
        )
    try:
        return torch.broadcast_to(m, shape)
    except RuntimeError as e:
        raise ValueError(
            f"{what} mask of shape {tuple(mask.shape)} does not broadcast to {tuple(shape)}"
        ) from e


def _visible_rows(
    x: Tensor, vis: Tensor, name: str, centered: bool
) -> tuple[Float[Tensor, "... key"], Int[Tensor, "..."]]:
    """float64 rows with hidden entries set to 0 (optionally centred over visible entries)."""
    bad = vis & ~torch.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite (-inf/NaN) scores at visible positions; "
            "mark them hidden in the mask or restrict the rows to visible keys"
        )
    x = torch.where(vis, x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
    n_vis = vis.sum(-1)
    if centered:
        mean = x.sum(-1, keepdim=True) / n_vis.clamp(min=1).unsqueeze(-1)
        x = torch.where(vis, x - mean, torch.zeros_like(x))
    return x, n_vis


def _mean_over_heads(per_head: Tensor, und: _Undefined) -> tuple[Tensor, _Undefined]:
    """Mean over the head dim; an (example, layer) with any undefined head is undefined."""
    out = _Undefined(per_head.shape[:-1], per_head.device, und.metric)
    out.add(und.mask.any(-1), "an undefined head (" + "; ".join(und.reasons) + ")")
    vals = einops.reduce(per_head.masked_fill(und.mask, 0.0), "... head -> ...", "mean")
    return vals, out


def simam(
    a: Float[Tensor, "example layer head key"],
    b: Float[Tensor, "example layer head key"],
    mask: Bool[Tensor, "example layer head key"] | None = None,
    *,
    centered: bool = False,
    reduce_heads: bool = True,
    on_undefined: OnUndefined = "raise",
) -> Float[Tensor, "example layer"]:
    """SimAM = mean_h cos(a_h, b_h) over the visible keys of each score row.

    a, b: pre-softmax scores q.k/sqrt(d_head) of the recorded position, restricted to the query
    example's own tokens ("before" = simam(ICL, ZS), "after" = simam(ICL, FT)). mask: True =
    visible ([key], [example, layer, key] or full shape); hidden entries may hold anything (-inf),
    visible ones must be finite. centered=True subtracts each row's mean over visible keys first
    (softmax ignores that shift). Undefined: a row with no visible key or zero norm (after
    centring: a constant row); an (example, layer) is undefined if any head is.
    reduce_heads=False returns [example, layer, head].
    """
    _check_on_undefined(on_undefined)
    _same_shape(a=a, b=b)
    if a.ndim != 4:
        raise ValueError(f"expected [example, layer, head, key] scores, got {tuple(a.shape)}")
    vis = _visibility(mask, a.shape, a.device, "simam")
    ra, n_vis = _visible_rows(a, vis, "a", centered)
    rb, _ = _visible_rows(b, vis, "b", centered)
    name = "simam_centered" if centered else "simam"
    und = _Undefined(a.shape[:-1], a.device, name)
    und.add(n_vis == 0, "no visible keys")
    what = "centred row" if centered else "row"
    per_head = _cosine(ra, rb, und, (f"zero {what} a", f"zero {what} b"))
    if not reduce_heads:
        return und.finish(per_head, on_undefined)
    vals, und_el = _mean_over_heads(per_head, und)
    return und_el.finish(vals, on_undefined)


def simam_delta(
    zs: Float[Tensor, "example layer head key"],
    icl: Float[Tensor, "example layer head key"],
    ft: Float[Tensor, "example layer head key"],
    mask: Bool[Tensor, "example layer head key"] | None = None,
    *,
    centered: bool = False,
    reduce_heads: bool = True,
    on_undefined: OnUndefined = "raise",
    zero_tol: float | None = None,
) -> Float[Tensor, "example layer"]:
    """SimAM_delta (Deutch et al.) = mean_h cos(ICL_h - ZS_h, FT_h - ZS_h) over visible keys.

    An update row counts as zero (undefined) when its norm is <= zero_tol * max(|X_h|, |ZS_h|)
    (default zero_tol: 4 * eps of the least precise input dtype).
    Where ICL and ZS rows coincide up to rounding (rotary models at layer 0), the update is
    rounding noise: raise zero_tol (e.g. 1e-4) to mark such rows undefined instead.
    """
    _check_on_undefined(on_undefined)
    _same_shape(zs=zs, icl=icl, ft=ft)
    if zs.ndim != 4:
        raise ValueError(f"expected [example, layer, head, key] scores, got {tuple(zs.shape)}")
    vis = _visibility(mask, zs.shape, zs.device, "simam_delta")
    rz, n_vis = _visible_rows(zs, vis, "zs", centered)
    ri, _ = _visible_rows(icl, vis, "icl", centered)
    rf, _ = _visible_rows(ft, vis, "ft", centered)
    und = _Undefined(
        zs.shape[:-1], zs.device, "simam_delta_centered" if centered else "simam_delta"
    )
    und.add(n_vis == 0, "no visible keys")
    nz = rz.norm(dim=-1)
    scales = (torch.maximum(ri.norm(dim=-1), nz), torch.maximum(rf.norm(dim=-1), nz))
    tol = _resolve_tol(zero_tol, zs, icl, ft)
    per_head = _cosine(ri - rz, rf - rz, und, ("ICL update", "FT update"), scales, tol)
    if not reduce_heads:
        return und.finish(per_head, on_undefined)
    vals, und_el = _mean_over_heads(per_head, und)
    return und_el.finish(vals, on_undefined)


# --------------------------------------------------------------------------- Kendall


def _masked_softmax(logits: Tensor, vis: Tensor) -> Tensor:
    """float64 softmax over visible entries of the last dim; hidden entries get weight 0."""
    x = logits.double().masked_fill(~vis, -math.inf)
    w = torch.softmax(x, dim=-1)
    return torch.nan_to_num(w, nan=0.0)  # rows with nothing visible -> all zeros


def _token_mask(
    mask: Tensor | None, n_ex: int, n_layers: int, n_tok: int, device: torch.device
) -> Bool[Tensor, "example layer tok"]:
    return _visibility(mask, torch.Size((n_ex, n_layers, n_tok)), device, "kendall")


def icl_demo_weights(
    icl_scores: Float[Tensor, "example layer head demo_tok"],
    mask: Bool[Tensor, "example layer demo_tok"] | None = None,
) -> Float[Tensor, "example layer demo_tok"]:
    """ICL attention to demonstration tokens: softmax_t(sum_h s_{h,t}) over visible tokens.

    Summing pre-softmax scores over heads gives the full-width q.k (all heads, same scaling).
    Hidden tokens get weight 0; visible scores must be finite.
    """
    if icl_scores.ndim != 4:
        raise ValueError(
            f"expected icl_scores [example, layer, head, demo_tok], got {tuple(icl_scores.shape)}"
        )
    n_ex, n_layers, _, n_tok = icl_scores.shape
    vis = _token_mask(mask, n_ex, n_layers, n_tok, icl_scores.device)
    summed = einops.reduce(icl_scores.double(), "e l h t -> e l t", "sum")
    bad = vis & ~torch.isfinite(summed)
    if bad.any():
        raise ValueError(f"icl_scores has {int(bad.sum())} non-finite scores at visible tokens")
    return _masked_softmax(summed, vis)


def ft_train_weights(
    ft_q_test: Float[Tensor, "example layer d_q"],
    ft_train_q: Float[Tensor, "layer train_tok d_q"],
    mask: Bool[Tensor, "example layer train_tok"] | None = None,
) -> Float[Tensor, "example layer train_tok"]:
    """FT "attention" to training tokens (Irie et al. dual form): softmax_t(q_test . q_t).

    q_t: the stored (already scaled) queries of the FT training tokens, all heads concatenated;
    q_test: the FT model's query at the recorded position. No further scaling is applied.
    """
    if ft_q_test.ndim != 3 or ft_train_q.ndim != 3:
        raise ValueError(
            "expected ft_q_test [example, layer, d_q] and ft_train_q [layer, train_tok, d_q], got "
            f"{tuple(ft_q_test.shape)} and {tuple(ft_train_q.shape)}"
        )
    if ft_q_test.shape[1] != ft_train_q.shape[0] or ft_q_test.shape[2] != ft_train_q.shape[2]:
        raise ValueError(
            f"ft_q_test {tuple(ft_q_test.shape)} and ft_train_q {tuple(ft_train_q.shape)} disagree "
            "on layers or d_q"
        )
    _check_finite(ft_q_test, "ft_q_test")
    _check_finite(ft_train_q, "ft_train_q")
    n_ex, n_layers, _ = ft_q_test.shape
    vis = _token_mask(mask, n_ex, n_layers, ft_train_q.shape[1], ft_q_test.device)
    logits = einops.einsum(ft_q_test.double(), ft_train_q.double(), "e l d, l t d -> e l t")
    return _masked_softmax(logits, vis)


def _demo_sums(
    weights: Tensor, vis: Tensor, demo_of_token: Tensor
) -> tuple[Float[Tensor, "example layer demo"], Bool[Tensor, "example layer demo"]]:
    """Sum token weights within each demonstration; a demo is visible if any token is."""
    d = torch.as_tensor(demo_of_token, device=weights.device).long()
    if d.ndim != 1 or d.numel() != weights.shape[-1]:
        raise ValueError(
            f"demo_of_token must be 1-D with one entry per demo token ({weights.shape[-1]}), got "
            f"{tuple(d.shape)}"
        )
    if d.numel() and d.min() < 0:
        raise ValueError("demo_of_token must hold demonstration indices >= 0")
    onehot = torch.nn.functional.one_hot(d, int(d.max()) + 1 if d.numel() else 0).double()
    sums = einops.einsum(weights.double(), onehot, "e l t, t k -> e l k")
    demo_vis = einops.einsum(vis.double(), onehot, "e l t, t k -> e l k") > 0
    return sums, demo_vis


def _kendall_rows(
    x: Tensor, y: Tensor, vis: Tensor, und: _Undefined
) -> Float[Tensor, "example layer"]:
    """scipy tau-b between x and y restricted to visible entries, per (example, layer)."""
    xn, yn, vn = x.double().cpu().numpy(), y.double().cpu().numpy(), vis.cpu().numpy()
    out = np.full(vn.shape[:-1], np.nan)
    for idx in np.ndindex(*vn.shape[:-1]):
        v = vn[idx]
        if v.sum() >= 2:
            out[idx] = scipy.stats.kendalltau(xn[idx][v], yn[idx][v]).statistic
    tau = torch.from_numpy(out).to(x.device)
    und.add(vis.sum(-1) < 2, "fewer than 2 visible items")
    und.add(torch.isnan(tau) & (vis.sum(-1) >= 2), "a constant ranking")
    return tau


@dataclass(frozen=True)
class KendallResult:
    """Kendall tau-b per (example, layer), token level and (optionally) demonstration level."""

    token: Float[Tensor, "example layer"]
    example: Float[Tensor, "example layer"] | None  # None without demo_of_token
    n_visible_tokens: Int[Tensor, "example layer"]
    n_visible_demos: Int[Tensor, "example layer"] | None


def _kendall_against(
    icl_w: Tensor,
    other_tok: Tensor,
    vis: Tensor,
    demo_of_token: Tensor | None,
    other_demo: Callable[[Tensor], Tensor] | None,
    metric: str,
    on_undefined: OnUndefined,
) -> KendallResult:
    und = _Undefined(icl_w.shape[:-1], icl_w.device, metric + " (token level)")
    tok = und.finish(_kendall_rows(icl_w, other_tok, vis, und), on_undefined)
    if demo_of_token is None:
        return KendallResult(tok, None, vis.sum(-1), None)
    icl_d, demo_vis = _demo_sums(icl_w, vis, demo_of_token)
    other_d = (
        other_demo(demo_vis)
        if other_demo is not None
        else _demo_sums(other_tok, vis, demo_of_token)[0]
    )
    und_d = _Undefined(icl_w.shape[:-1], icl_w.device, metric + " (example level)")
    ex = und_d.finish(_kendall_rows(icl_d, other_d, demo_vis, und_d), on_undefined)
    return KendallResult(tok, ex, vis.sum(-1), demo_vis.sum(-1))


def kendall_icl_ft(
    icl_scores: Float[Tensor, "example layer head demo_tok"],
    ft_q_test: Float[Tensor, "example layer d_q"],
    ft_train_q: Float[Tensor, "layer train_tok d_q"],
    demo_of_token: Int[Tensor, " demo_tok"] | None = None,
    mask: Bool[Tensor, "example layer demo_tok"] | None = None,
    *,
    on_undefined: OnUndefined = "raise",
) -> KendallResult:
    """Kendall tau-b between ICL's and FT's attention to the demonstration tokens.

    ICL: w_t = softmax_t(sum_h icl_scores_{h,t}) (:func:`icl_demo_weights`); FT: v_t =
    softmax_t(q_test . q_t) (:func:`ft_train_weights`). token = kendalltau(w, v) per (example,
    layer). With demo_of_token (token -> demonstration index), example = kendalltau over
    demonstrations of the weights summed within each one. Demo tokens and training tokens must be
    the same tokens in the same order. mask: visible tokens (sliding windows); both softmaxes and
    both statistics use only visible tokens; counts are returned. Undefined: < 2 visible items or a
    constant ranking.
    """
    _check_on_undefined(on_undefined)
    if icl_scores.ndim != 4:
        raise ValueError(
            f"expected icl_scores [example, layer, head, demo_tok], got {tuple(icl_scores.shape)}"
        )
    if ft_train_q.ndim != 3 or ft_q_test.ndim != 3:
        raise ValueError("expected ft_q_test [example, layer, d_q], ft_train_q [layer, tok, d_q]")
    n_ex, n_layers, _, n_tok = icl_scores.shape
    if ft_train_q.shape[1] != n_tok:
        raise ValueError(
            f"ICL scores cover {n_tok} demonstration tokens but FT stored {ft_train_q.shape[1]} "
            "training-token queries; they must be the same demonstrations, in the same order"
        )
    if ft_q_test.shape[:2] != (n_ex, n_layers) or ft_train_q.shape[0] != n_layers:
        raise ValueError(
            f"example/layer dims disagree: icl_scores {tuple(icl_scores.shape)}, ft_q_test "
            f"{tuple(ft_q_test.shape)}, ft_train_q {tuple(ft_train_q.shape)}"
        )
    vis = _token_mask(mask, n_ex, n_layers, n_tok, icl_scores.device)
    icl_w = icl_demo_weights(icl_scores, vis)
    ft_w = ft_train_weights(ft_q_test, ft_train_q, vis)
    return _kendall_against(icl_w, ft_w, vis, demo_of_token, None, "kendall", on_undefined)


def kendall_random_baseline(
    icl_scores: Float[Tensor, "example layer head demo_tok"],
    demo_of_token: Int[Tensor, " demo_tok"] | None = None,
    mask: Bool[Tensor, "example layer demo_tok"] | None = None,
    *,
    generator: torch.Generator | None = None,
    on_undefined: OnUndefined = "raise",
) -> KendallResult:
    """Kendall tau-b of the ICL weights against a U[0, 1) vector (E[tau] = 0).

    The random vector is drawn per (example, layer) at the level compared: one value per token
    for ``token``, one per demonstration for ``example``.
    """
    _check_on_undefined(on_undefined)
    if icl_scores.ndim != 4:
        raise ValueError(
            f"expected icl_scores [example, layer, head, demo_tok], got {tuple(icl_scores.shape)}"
        )
    n_ex, n_layers, _, n_tok = icl_scores.shape
    vis = _token_mask(mask, n_ex, n_layers, n_tok, icl_scores.device)
    icl_w = icl_demo_weights(icl_scores, vis)
    u_tok = torch.rand(icl_w.shape, generator=generator, dtype=torch.float64).to(icl_w.device)

    def u_demo(demo_vis: Tensor) -> Tensor:
        return torch.rand(demo_vis.shape, generator=generator, dtype=torch.float64).to(icl_w.device)

    return _kendall_against(
        icl_w, u_tok, vis, demo_of_token, u_demo, "kendall_random_baseline", on_undefined
    )


# --------------------------------------------------------------------------- reducers


@dataclass(frozen=True)
class LayerMeans:
    """Per-layer means over examples and their mean over layers; unpacks as (per_layer, overall)."""

    per_layer: Float[Tensor, " layer"]
    overall: float
    n_used: Int[Tensor, " layer"]  # examples averaged in each layer (fewer if NaN was skipped)

    def __iter__(self) -> Iterator:
        return iter((self.per_layer, self.overall))


def layer_means(
    per_example_layer: Float[Tensor, "example layer"],
    *,
    skip_nan: bool = False,
) -> LayerMeans:
    """per_layer[l] = mean_e x[e, l]; overall = mean_l per_layer[l] (the reference order).

    NaN entries (from on_undefined="nan") raise UndefinedMetricError unless skip_nan=True, which
    averages the defined entries only and reports their count in ``n_used``; a layer with none
    defined still raises.
    """
    x = per_example_layer.double()
    if x.ndim != 2:
        raise ValueError(f"expected [example, layer], got {tuple(x.shape)}")
    if torch.isinf(x).any():
        raise ValueError("per_example_layer contains inf")
    nan = torch.isnan(x)
    n_used = (~nan).sum(0)
    if nan.any() and not skip_nan:
        raise UndefinedMetricError(
            f"{int(nan.sum())} of {nan.numel()} (example, layer) values are NaN (undefined); "
            "pass skip_nan=True to average the defined ones"
        )
    if (n_used == 0).any():
        empty = torch.nonzero(n_used == 0).flatten().tolist()
        raise UndefinedMetricError(f"no defined examples in layer(s) {empty}")
    per_layer = x.nan_to_num(0.0).sum(0) / n_used
    return LayerMeans(per_layer, float(per_layer.mean()), n_used)


def bootstrap_ci(
    values: Float[Tensor, "example ..."],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[..., np.ndarray] = np.mean,
) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """Percentile bootstrap (1 - alpha) interval of stat over examples (dim 0).

    Resample b = 1..n_boot: idx_b ~ U{0..n-1}^n from numpy default_rng(seed) (one draw of n per
    resample, in order); theta_b = stat over examples of values[idx_b]; (low, high) = the alpha/2
    and 1 - alpha/2 quantiles (linear interpolation) of theta_b. stat is a numpy reduction called
    on a stack of resamples as stat(array[batch, example, ...], axis=1) (np.mean, np.median, ...).
    Returns float64 tensors of shape values.shape[1:] (0-d for 1-D input). NaN input raises.
    (scipy.stats.bootstrap is not used: this keeps the resampling stream explicit and testable.)
    """
    x = values.detach().double().cpu().numpy()
    if x.ndim < 1 or x.shape[0] == 0:
        raise UndefinedMetricError("bootstrap_ci undefined: no examples")
    if np.isnan(x).any():
        raise UndefinedMetricError("bootstrap_ci: values contain NaN (undefined entries)")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError("need 0 < alpha < 1 and n_boot >= 1")
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    per_resample = max(1, x.size)
    batch = max(1, min(n_boot, 4_000_000 // per_resample))
    thetas = []
    for start in range(0, n_boot, batch):
        b = min(batch, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        thetas.append(np.asarray(stat(x[idx], axis=1)))
    theta = np.concatenate(thetas, axis=0)
    low, high = np.quantile(theta, [alpha / 2, 1 - alpha / 2], axis=0)
    return torch.as_tensor(low, dtype=torch.float64), torch.as_tensor(high, dtype=torch.float64)
