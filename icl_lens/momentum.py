"""Momentum attention (Dai et al. 2022, §5; DESIGN §5) as forward hooks on any hooked model.

    MoAttn(V, K, q_t) = Attn(V, K, q_t) + Σ_{i<t} η^{t−i} v_i

per head, before W_O: each layer's ``hook_v`` is captured in the same forward pass and the
causal EMA of past values is added to ``hook_z``. The EMA is an O(T) chunked scan
(:func:`ema_scan`), differentiable, so models train through it. GQA: value heads are
repeated to query heads as attention does (``repeat_interleave``).

:class:`LearnableEMA` is the learnable, multi-dimensional damped variant (MEGA-style), one
decay per channel (layer × head × d_head):

    α = σ(a), δ = σ(d), λ = 1 − α⊙δ ∈ (0, 1)
    y_t = α⊙v_t + λ⊙y_{t−1},  y_{−1} = 0
    z'_t = z_t + γ⊙y_{t−1}                      (strict past, like the fixed-η form)

With λ = η and γ⊙α = η it equals fixed momentum exactly (``LearnableEMA(eta0=η)`` starts there).

Limits: the EMA runs over the positions of one forward pass, so it does not carry across a
prefix KV cache (``backend.run_with_prefix``); right padding is harmless (causal), left
padding is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from icl_lens import backend as B

HookList = list[tuple[str, object]]


def ema_scan(
    u: Float[Tensor, "batch pos channel"],
    decay: Float[Tensor, " channel"] | float,
    chunk: int = 64,
) -> Float[Tensor, "batch pos channel"]:
    """Inclusive causal EMA ``y_t = decay ⊙ y_{t−1} + u_t`` (``y_t = Σ_{s≤t} decay^{t−s} u_s``).

    Linear in T: chunks of ``chunk`` positions with a running state carried between them.
    Inside a chunk, a scalar decay uses one [chunk, chunk] weight matrix (a matmul); a
    per-channel decay uses log2(chunk) doubling steps. Only powers decay^n with n ≥ 0 occur,
    so any decay in [0, 1] is numerically safe.
    """
    n_ch = u.shape[-1]
    decay_t = torch.as_tensor(decay, dtype=u.dtype, device=u.device)
    if (decay_t.detach() < 0).any() or (decay_t.detach() > 1).any():
        raise ValueError("decay must lie in [0, 1]; larger values make the EMA blow up")
    scalar = decay_t.dim() == 0
    if not scalar and decay_t.shape != (n_ch,):
        raise ValueError(f"decay must be a scalar or [{n_ch}] (one per channel)")
    out = []
    state = u.new_zeros(u.shape[0], n_ch)
    for start in range(0, u.shape[1], chunk):
        piece = u[:, start : start + chunk]
        n = piece.shape[1]
        idx = torch.arange(1, n + 1, device=u.device, dtype=u.dtype)
        carry = decay_t**idx if scalar else decay_t[None] ** idx[:, None]  # decay^(t+1)
        y = _chunk_scalar(piece, decay_t) if scalar else _chunk_channels(piece, decay_t)
        y = y + carry.reshape(1, n, -1) * state[:, None]
        out.append(y)
        state = y[:, -1]
    return torch.cat(out, dim=1)


def _chunk_scalar(u: Tensor, decay: Tensor) -> Tensor:
    """In-chunk EMA from zero state, scalar decay: ``W @ u`` with ``W[t, s] = decay^(t−s)``."""
    idx = torch.arange(u.shape[1], device=u.device)
    lag = idx[:, None] - idx[None, :]
    weights = torch.where(lag >= 0, decay ** lag.clamp_min(0).to(u.dtype), decay * 0)
    return weights @ u


def _chunk_channels(u: Tensor, decay: Tensor) -> Tensor:
    """In-chunk EMA from zero state, per-channel decay: Hillis–Steele doubling."""
    y, power, step = u, decay, 1
    while step < u.shape[1]:
        shifted = torch.cat([torch.zeros_like(y[:, :step]), y[:, :-step]], dim=1)
        y = y + power * shifted
        power, step = power * power, 2 * step
    return y


def shift_right(y: Float[Tensor, "batch pos channel"]) -> Float[Tensor, "batch pos channel"]:
    """``y_{t−1}`` with zeros at t = 0: turns an inclusive EMA into a strict-past one."""
    return torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)


def momentum_term(
    v: Float[Tensor, "batch pos kv_head d_head"],
    eta: float | Float[Tensor, "head d_head"],
    n_heads: int,
    scale: float | Float[Tensor, "head d_head"] | None = None,
    chunk: int = 64,
) -> Float[Tensor, "batch pos head d_head"]:
    """``scale ⊙ Σ_{i<t} eta^{t−i−1} v_i`` per query head; ``scale=None`` means ``eta``.

    With ``scale=None`` this is the paper's ``Σ_{i<t} η^{t−i} v_i``. ``eta`` and ``scale`` are
    scalars or per-channel ``[head, d_head]`` tensors.
    """
    n_kv = v.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} value heads evenly")
    if n_kv != n_heads:
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
    d_head = v.shape[-1]
    decay = torch.as_tensor(eta, dtype=v.dtype, device=v.device)
    gain = decay if scale is None else torch.as_tensor(scale, dtype=v.dtype, device=v.device)
    if decay.dim():
        decay = decay.expand(n_heads, d_head).reshape(-1)
    flat = einops.rearrange(v, "b p h d -> b p (h d)")
    y = ema_scan(flat, decay, chunk=chunk)
    y = einops.rearrange(shift_right(y), "b p (h d) -> b p h d", h=n_heads)
    return y * gain


def _layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n = B.dims(model).n_layers
    chosen = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in chosen if not 0 <= x < n]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {n}-layer model")
    return chosen


def _hooks(model: nn.Module, layers: list[int], term) -> HookList:
    """A ``hook_v`` capture and a ``hook_z`` addition per layer; ``term(layer, v)`` -> addend."""
    n_heads = B.dims(model).n_heads
    hooks: HookList = []
    for layer in layers:
        store: dict[str, Tensor] = {}

        def grab_v(t: Tensor, hook: object, store=store) -> None:
            store["v"] = t

        def add_z(t: Tensor, hook: object, store=store, layer=layer) -> Tensor:
            v = store.pop("v", None)
            if v is None:
                raise RuntimeError(f"momentum: hook_v of layer {layer} did not fire before hook_z")
            if v.shape[:2] != t.shape[:2] or t.shape[2] != n_heads:
                raise RuntimeError(f"momentum: hook_v {tuple(v.shape)} vs hook_z {tuple(t.shape)}")
            return t + term(layer, v).to(t.dtype)

        hooks += [(B.hook_name("v", layer), grab_v), (B.hook_name("z", layer), add_z)]
    return hooks


def momentum_hooks(
    model: nn.Module, eta: float, layers: Sequence[int] | None = None, chunk: int = 64
) -> HookList:
    """``fwd_hooks`` adding ``Σ_{i<t} η^{t−i} v_i`` to ``hook_z`` in ``layers`` (default: all)."""
    if not 0 <= eta < 1:
        raise ValueError(f"eta must be in [0, 1), got {eta}")
    chosen = _layers(model, layers)
    if eta == 0:
        return []
    n_heads = B.dims(model).n_heads
    return _hooks(model, chosen, lambda layer, v: momentum_term(v, eta, n_heads, chunk=chunk))


def token_shift_hooks(
    model: nn.Module, eta: float, layers: Sequence[int] | None = None
) -> HookList:
    """Control for momentum: add only ``η v_{t−1}`` (the previous token's value) to ``hook_z``.

    At small η momentum is nearly this (its weights are η, η², ...); a gain that this control
    matches comes from local token mixing, not from an EMA of past values.
    """
    chosen = _layers(model, layers)
    n_heads = B.dims(model).n_heads
    return _hooks(model, chosen, lambda layer, v: momentum_term(v, 0.0, n_heads, scale=eta))


@contextmanager
def momentum_attention(
    model: nn.Module, eta: float = 0.1, layers: Sequence[int] | None = None
) -> Iterator[nn.Module]:
    """Within the block, ``model`` runs momentum attention (forward and backward)."""
    with model.hooks(fwd_hooks=momentum_hooks(model, eta, layers)):
        yield model


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class LearnableEMA(nn.Module):
    """Learnable damped EMA of values added to ``hook_z`` (formula in the module docstring).

    Parameters per chosen layer and channel: ``a``, ``d`` (α = σ(a), δ = σ(d)) and ``gamma``.
    ``eta0`` sets the start: λ = η0, γ⊙α = η0, i.e. exactly fixed momentum with η = η0.
    Train it together with the model: ``opt = AdamW([*model.parameters(), *ema.parameters()])``.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[int] | None = None, eta0: float = 0.1
    ) -> None:
        super().__init__()
        if not 0 < eta0 < 1:
            raise ValueError(f"eta0 must be in (0, 1), got {eta0}")
        d = B.dims(model)
        self.layers = _layers(model, layers)
        self.n_heads = d.n_heads
        shape = (len(self.layers), d.n_heads, d.d_head)
        kw = {"dtype": next(model.parameters()).dtype}
        alpha0 = 1 - eta0 / 2  # any α0 > 1 − η0 keeps δ0 = (1 − η0)/α0 inside (0, 1)
        delta0 = (1 - eta0) / alpha0
        self.a = nn.Parameter(torch.full(shape, _logit(alpha0), **kw))
        self.d = nn.Parameter(torch.full(shape, _logit(delta0), **kw))
        self.gamma = nn.Parameter(torch.full(shape, eta0 / alpha0, **kw))

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """(α, λ, γ), each ``[chosen_layer, head, d_head]``."""
        alpha = torch.sigmoid(self.a)
        return alpha, 1 - alpha * torch.sigmoid(self.d), self.gamma

    def term(self, i: int, v: Float[Tensor, "batch pos kv_head d_head"]) -> Tensor:
        """The addend to ``hook_z`` of the ``i``-th chosen layer."""
        alpha, lam, gamma = self.coefficients()
        return momentum_term(v, lam[i], self.n_heads, scale=gamma[i] * alpha[i])

    def hooks(self, model: nn.Module) -> HookList:
        """``fwd_hooks`` for ``model`` (the one this module was built for)."""
        index = {layer: i for i, layer in enumerate(self.layers)}
        return _hooks(model, self.layers, lambda layer, v: self.term(index[layer], v))

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block, ``model`` runs with this EMA."""
        with model.hooks(fwd_hooks=self.hooks(model)):
            yield model


__all__ = [
    "LearnableEMA",
    "ema_scan",
    "momentum_attention",
    "momentum_hooks",
    "momentum_term",
    "shift_right",
    "token_shift_hooks",
]
