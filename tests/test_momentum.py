"""momentum: the O(T) EMA scan against an explicit O(T²) reference, hooks on the installed TL."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_lens import backend as B
from icl_lens.momentum import (
    LearnableEMA,
    ema_scan,
    momentum_attention,
    momentum_hooks,
    momentum_term,
    token_shift_hooks,
)

N_HEADS = 4


@pytest.fixture(scope="module")
def model64():
    m = B.toy_model(n_layers=2, d_model=32, n_heads=N_HEADS, d_vocab=40, n_ctx=160, seed=3)
    return m.to(torch.float64)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 40, (2, 150), generator=torch.Generator().manual_seed(1))


def reference_momentum(v: torch.Tensor, eta: float) -> torch.Tensor:
    """Σ_{i<t} η^{t−i} v_i as an explicit [T, T] weight matrix."""
    t = torch.arange(v.shape[1], dtype=v.dtype)
    lag = t[:, None] - t[None, :]
    weights = torch.where(lag > 0, eta ** lag.clamp_min(0), torch.zeros_like(lag))
    return torch.einsum("ts,bshd->bthd", weights, v)


def reference_hooks(model, eta, layers):
    hooks = []
    for layer in layers:
        store = {}
        hooks += [
            (B.hook_name("v", layer), lambda t, hook, s=store: s.__setitem__("v", t)),
            (
                B.hook_name("z", layer),
                lambda t, hook, s=store: t + reference_momentum(s["v"], eta),
            ),
        ]
    return hooks


@settings(max_examples=25, deadline=None)
@given(
    n_pos=st.integers(1, 90),
    chunk=st.integers(1, 40),
    decay=st.floats(0.0, 1.0),
)
def test_ema_scan_matches_loop(n_pos, chunk, decay):
    u = torch.randn(2, n_pos, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    decays = torch.tensor([decay, 0.5, 0.0], dtype=torch.float64)
    for dec in (decays, decay):  # per-channel (doubling) and scalar (matmul) paths
        y = ema_scan(u, dec, chunk=chunk)
        state = torch.zeros(2, 3, dtype=torch.float64)
        for t in range(n_pos):
            state = dec * state + u[:, t]
            torch.testing.assert_close(y[:, t], state, atol=1e-12, rtol=1e-10)


def test_ema_scan_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        ema_scan(torch.zeros(1, 3, 2), 1.5)
    with pytest.raises(ValueError, match="per channel"):
        ema_scan(torch.zeros(1, 3, 2), torch.ones(3) / 2)


def test_ema_scan_gradient_is_finite_at_zero_decay():
    decay = torch.tensor([0.0, 0.5], requires_grad=True)
    ema_scan(torch.ones(1, 70, 2), decay, chunk=16).sum().backward()
    assert torch.isfinite(decay.grad).all()


@pytest.mark.parametrize("eta", [0.1, 0.6, 0.95])
def test_momentum_term_matches_quadratic_reference(eta):
    v = torch.randn(2, 130, N_HEADS, 8, dtype=torch.float64)
    got = momentum_term(v, eta, N_HEADS, chunk=16)
    torch.testing.assert_close(got, reference_momentum(v, eta), atol=1e-12, rtol=1e-10)


def test_momentum_term_maps_gqa_heads():
    v = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    got = momentum_term(v, 0.3, n_heads=4)
    ref = reference_momentum(v.repeat_interleave(2, dim=2), 0.3)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="evenly"):
        momentum_term(v, 0.3, n_heads=3)


@pytest.mark.parametrize("layers", [None, [1]])
def test_model_matches_quadratic_reference(model64, tokens, layers):
    eta = 0.4
    with torch.no_grad(), momentum_attention(model64, eta=eta, layers=layers):
        got = model64(tokens)
    chosen = [0, 1] if layers is None else layers
    with torch.no_grad(), model64.hooks(fwd_hooks=reference_hooks(model64, eta, chosen)):
        ref = model64(tokens)
    assert (got - ref).abs().max() < 1e-6


def test_eta_zero_is_identity(model64, tokens):
    assert momentum_hooks(model64, 0.0) == []
    with torch.no_grad():
        plain = model64(tokens)
        with momentum_attention(model64, eta=0.0):
            same = model64(tokens)
    assert torch.equal(plain, same)


def test_hook_z_edit_reaches_attn_out_and_layer_selection(model64, tokens):
    """Editing hook_z must change hook_attn_out on this backend; other layers stay put."""
    names = [B.hook_name("attn_out", layer) for layer in (0, 1)]
    with torch.no_grad():
        _, base = model64.run_with_cache(tokens, names_filter=names)
        with momentum_attention(model64, eta=0.5, layers=[1]):
            _, mom = model64.run_with_cache(tokens, names_filter=names)
    assert torch.equal(base[names[0]], mom[names[0]])
    diff = (base[names[1]] - mom[names[1]]).abs()
    assert diff[:, 0].max() == 0  # position 0 has no past
    assert diff[:, 1:].amax(-1).min() > 0


def test_hooks_are_removed_after_context(model64, tokens):
    with torch.no_grad():
        plain = model64(tokens)
        with momentum_attention(model64, eta=0.5):
            pass
        assert torch.equal(model64(tokens), plain)


def test_bad_arguments(model64):
    with pytest.raises(ValueError, match="eta"):
        momentum_hooks(model64, 1.0)
    with pytest.raises(ValueError, match="out of range"):
        momentum_hooks(model64, 0.1, layers=[5])


def test_learnable_ema_starts_at_fixed_momentum(model64, tokens):
    ema = LearnableEMA(model64, layers=[0, 1], eta0=0.3)
    with torch.no_grad():
        with ema.attached(model64):
            got = model64(tokens)
        with momentum_attention(model64, eta=0.3):
            ref = model64(tokens)
    assert (got - ref).abs().max() < 1e-9
    _, lam, _ = ema.coefficients()
    assert ((lam > 0) & (lam < 1)).all()


def test_gradients_flow_to_ema_and_model():
    torch.manual_seed(0)
    model = B.toy_model(n_layers=2, d_model=16, n_heads=2, d_vocab=20, n_ctx=32, seed=1)
    ema = LearnableEMA(model, layers=[1], eta0=0.2)
    tokens = torch.randint(0, 20, (2, 24))
    with ema.attached(model):
        loss = model(tokens, return_type="loss")
    loss.backward()
    for name, p in ema.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    w_v = dict(B.named_kv_parameters(model, layers=[1]))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in w_v.values())
    model.zero_grad(set_to_none=True)


def test_token_shift_adds_previous_value_only(model64, tokens):
    got = {}
    hooks = [(B.hook_name("v", 1), lambda t, hook: got.__setitem__("v", t))]
    hooks.append((B.hook_name("z", 1), lambda t, hook: got.__setitem__("z0", t)))
    with torch.no_grad(), model64.hooks(fwd_hooks=hooks):
        model64(tokens)
    z_hook = [(B.hook_name("z", 1), lambda t, hook: got.__setitem__("z1", t))]
    with torch.no_grad(), model64.hooks(fwd_hooks=token_shift_hooks(model64, 0.3, [1]) + z_hook):
        model64(tokens)
    expected = got["z0"].clone()
    expected[:, 1:] += 0.3 * got["v"][:, :-1]
    torch.testing.assert_close(got["z1"], expected, atol=1e-12, rtol=0)
