"""Run-time self-checks: the shared vocabulary of icl-lens's fast paths.

Every fast path (the shared-prefix KV cache, the label-column logits, the recorded scores,
the one-pass vocabulary loss, side-by-side FT) is compared with the plain computation on the
user's own model before it is trusted. A fast path that disagrees beyond the tolerance of
the model's dtype is dropped with a ``FastPathWarning``; a quantity that cannot be computed
correctly at all raises ``SelfCheckError``. What each check measured goes into the results'
provenance.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import Tensor


class SelfCheckError(RuntimeError):
    """A computation would give wrong numbers, and no correct fallback exists."""


class FastPathWarning(UserWarning):
    """A fast path failed its run-time check; the plain path ran instead."""


class PrecisionWarning(UserWarning):
    """A half-precision run: some metrics are known to move beyond their CIs against fp32."""


def precision_caveat(dtype: torch.dtype, update_capture_dtype: str = "float32") -> str | None:
    """What is known to differ from fp32 when the model computes in ``dtype`` (None for fp32
    and fp64), with the ZS/FT captures computed in ``update_capture_dtype`` ("float32", the
    default, or "model"). ``benchmarks/bench_flops.py --dtypes float32 bfloat16``
    (Gemma-3-270m, SST-2 seed 0, 500 examples, bf16 kernels on a CPU with AVX512-BF16, FT
    trained in float32):

    - ZS/FT captured in float32: every headline metric within its CI half-width of float32's
      (SimAOU 0.1643 vs 0.1651, half-width 0.0030), except the untrained-model baseline
      (SimAOU 0.389 vs 0.423, 0.003). That baseline's FT on re-drawn weights is chaotic: its FT
      record moves almost orthogonally when the weights are rounded to bf16 (README, Half
      precision).
    - ZS/FT captured in the model's dtype: SimAOU 0.158 vs 0.165, SimAM_Δ -0.006 vs -0.018
      (0.0065): two half-precision passes round differently, and that rounding is a sizeable
      part of FT's small update (``analyses/precision_simaou.py``).
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    name = str(dtype).removeprefix("torch.")
    untrained = ("the untrained-model baseline's FT, chaotic on re-drawn weights, moves more "
                 "than its CI")  # fmt: skip
    if update_capture_dtype == "float32":
        return (
            f"{name}: the ZS and FT captures computed in float32, the rest in {name}; on "
            "Gemma-3-270m SST-2 seed 0 (500 examples, bf16 vs float32) every headline metric "
            f"agreed within its CI, but {untrained} (SimAOU 0.389 vs 0.423, CI half-width "
            "0.003); cross-check it with a float32 run"
        )
    return (
        f"{name}: with the ZS and FT captures in {name} (update_capture_dtype='model'), FT's "
        "small update is partly rounding noise, which pulls SimAOU and its baselines toward 0 "
        "and moves SimAM_Δ (Gemma-3-270m SST-2 seed 0, 500 examples, bf16 vs float32: SimAOU "
        "0.158 vs 0.165, CI half-width 0.003; SimAM_Δ -0.006 vs -0.018, 0.0065); "
        f"{untrained}; cross-check these with a float32 run before reading small differences"
    )


#: Relative tolerance per model dtype: a fast path and the plain path compute the same thing
#: in another order, so they agree to a few units of that dtype's rounding.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    """The self-checks' relative tolerance for a model computing in ``dtype``."""
    return TOLERANCE.get(dtype, 1e-4)


def rel_diff(a: Tensor, b: Tensor) -> float:
    """``max|a - b|`` relative to the reference ``b``'s largest finite magnitude (at least 1);
    equal infinities count as equal (masked keys)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    diff = torch.where(same_inf, torch.zeros(()), (a - b).abs())
    scale = torch.where(torch.isfinite(b), b.abs(), torch.zeros(())).max().clamp_min(1.0)
    return float(diff.max() / scale)


#: modules whose frames a warning looks past to find the user's line: icl-lens itself, and the
#: context-manager and decorator plumbing its calls go through
_PLUMBING = ("contextlib", "torch.utils._contextlib")


def _outside_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` called right here) of the first frame outside
    icl-lens, ``contextlib`` and torch's ``no_grad`` decorator: the user's own line, however
    deep the call ran (a ``with finetuned(...)`` block's warnings come from nested generators).
    Frames are told apart by their module's name, so it works for any install layout."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == "icl_lens" or module.startswith("icl_lens.") or module in _PLUMBING):
            break
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning] = FastPathWarning) -> None:
    """Emit a one-line warning (by default a ``FastPathWarning``: the cause and what runs
    instead), attributed to the user's line that led to it."""
    warnings.warn(message, category, stacklevel=_outside_stacklevel())


_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")


def refuse_autocast(what: str) -> None:
    """Raise where ``torch.autocast`` is on. Within an autocast block torch keeps one cast of
    each weight and reuses it, so a weight changed in place inside the block (FT's K/V
    update) is not seen: the FT records would silently be the ZS ones. Autocast also computes
    in a dtype other than the model's, from which every self-check derives its tolerance."""
    on = []
    for device in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device):
                on.append(device)
        except TypeError:  # torch < 2.4 takes no device: its per-device functions instead
            legacy = {
                "cuda": torch.is_autocast_enabled,
                "cpu": getattr(torch, "is_autocast_cpu_enabled", None),
                "xpu": getattr(torch, "is_autocast_xpu_enabled", None),
            }.get(device)
            if legacy is not None and legacy():
                on.append(device)
        except RuntimeError:  # a device type this torch does not know
            continue
    if on:
        raise RuntimeError(
            f"{what} cannot run under torch.autocast (on for {', '.join(on)}): autocast reuses "
            "one cast of each weight, so FT's in-place update would be invisible; call it "
            "outside the autocast block and load the model in the dtype to compute in "
            "(il.load_model(..., dtype=torch.bfloat16))"
        )


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype ``model`` computes in: that of its first floating-point parameter (fp32 if
    it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype updates of a ``dtype`` tensor are accumulated in: at least fp32, so that
    small steps of a half-precision weight are not rounded away."""
    return torch.promote_types(dtype, torch.float32)


def rel_l2(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` over tensors (or lists of tensors taken together), in float64; 0 when
    both are 0, inf when only ``b`` is."""
    a = [a] if isinstance(a, Tensor) else list(a)
    b = [b] if isinstance(b, Tensor) else list(b)
    num = sum(float((x.detach().double().cpu() - y.detach().double().cpu()).pow(2).sum())
              for x, y in zip(a, b, strict=True))  # fmt: skip
    den = sum(float(y.detach().double().cpu().pow(2).sum()) for y in b)
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5


def round_to_halves(model: torch.nn.Module) -> None:
    """Round every weight, in place, to a value that bfloat16 and float16 both hold exactly,
    so that copies of it in fp32, bf16 and fp16 start from the same numbers and differ only in
    their arithmetic (the half-precision checks compare FT updates across dtypes)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float16).to(p.dtype))
