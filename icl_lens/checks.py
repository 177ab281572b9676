"""Run-time self-checks: the shared vocabulary of icl-lens's fast paths.

Every fast path (the shared-prefix KV cache, the label-column logits, the recorded scores,
the one-pass vocabulary loss, side-by-side FT) is compared with the plain computation on the
user's own model before it is trusted. A fast path that disagrees beyond the tolerance of
the model's dtype is dropped with a ``FastPathWarning``; a quantity that cannot be computed
correctly at all raises ``SelfCheckError``. What each check measured goes into the results'
provenance.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class SelfCheckError(RuntimeError):
    """A computation would give wrong numbers, and no correct fallback exists."""


class FastPathWarning(UserWarning):
    """A fast path failed its run-time check; the plain path ran instead."""


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


def warn(message: str, stacklevel: int = 3) -> None:
    """Emit a ``FastPathWarning`` (one line, naming the cause and what runs instead)."""
    warnings.warn(message, FastPathWarning, stacklevel=stacklevel)
