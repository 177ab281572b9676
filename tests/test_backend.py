"""backend: the TL 3 / TL 4 adapter works the same on whichever TL is installed."""

from __future__ import annotations

import pytest
import torch

from icl_lens import backend as B


def _cache(model, tokens, names):
    out = {}

    def save(name):
        def hook(t, hook):
            out[name] = t.detach().clone()

        return hook

    with torch.no_grad():
        B.run_until(model, tokens, [(n, save(n)) for n in names])
    return out


def test_toy_is_native_class(toy):
    assert isinstance(toy, B.NATIVE_CLASS)
    d = B.dims(toy)
    assert (d.n_layers, d.n_heads, d.d_head, d.d_model, d.d_vocab) == (2, 4, 8, 32, 50)
    assert d.windows == (None, None)


def test_toy_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    B.toy_model(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_toy_model_seeded():
    a, b = B.toy_model(seed=3), B.toy_model(seed=3)
    c = B.toy_model(seed=4)
    pa, pb, pc = B.kv_parameters(a), B.kv_parameters(b), B.kv_parameters(c)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc, strict=True))


def test_kv_parameters_are_trainable_leaves(toy):
    named = B.named_kv_parameters(toy)
    # K and V weights and biases, for each of 2 layers
    assert len(named) == 8
    own = {id(p) for p in toy.parameters()}
    for name, p in named:
        assert isinstance(p, torch.nn.Parameter), name
        assert p.is_leaf and p.requires_grad, name
        assert id(p) in own, f"{name} is not one of the model's own parameters"
    assert len(B.kv_parameters(toy, include_bias=False)) == 4


def test_changing_kv_changes_attn_out_not_layer0_q():
    model = B.toy_model(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=64, seed=1)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    names = [B.hook_name("attn_out", 0), B.hook_name("attn_out", 1), B.hook_name("q", 0)]
    before = _cache(model, tokens, names)
    with torch.no_grad():
        for p in B.kv_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    after = _cache(model, tokens, names)
    for layer in (0, 1):
        name = B.hook_name("attn_out", layer)
        assert (before[name] - after[name]).abs().max() > 1e-3, name
    # Layer 0's queries depend only on the embeddings and W_Q: K/V cannot reach them.
    assert torch.equal(before[B.hook_name("q", 0)], after[B.hook_name("q", 0)])


def test_gradients_reach_kv_parameters(toy):
    tokens = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(1))
    params = B.kv_parameters(toy)
    for p in params:
        p.grad = None
    toy(tokens).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    toy.zero_grad(set_to_none=True)


@pytest.mark.parametrize("positional", ["standard", "rotary"])
@pytest.mark.parametrize(("rows", "per"), [(3, 1), (1, 3), (3, 2)])
def test_kv_deltas_rows_run_their_own_weights(positional, rows, per):
    """Batch row ``b`` of a pass under ``kv_deltas`` (``rows`` deltas, ``per`` sequences each)
    equals a plain pass of that sequence with W + Δ[b // per] put into the model (float64),
    and gradients reach the deltas. ``rows=1`` is one delta for the whole batch (the FT
    captures' case), which runs as one matmul over every row's tokens."""
    model = B.toy_model(2, 32, 4, 40, 64, attn_only=False, seed=1,
                        positional_embedding_type=positional).double()  # fmt: skip
    named = B.named_kv_parameters(model)
    gen = torch.Generator().manual_seed(0)
    deltas = [0.1 * torch.randn(rows, *p.shape, generator=gen, dtype=p.dtype) for _, p in named]
    tokens = torch.randint(0, 40, (rows * per, 9), generator=gen)
    for t in deltas:
        t.requires_grad_(True)
    with B.kv_deltas(model, deltas):
        batched = model(tokens)
    batched.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in deltas)
    with torch.no_grad():
        plain = model(tokens)
        originals = [p.clone() for _, p in named]
        for b in range(rows * per):
            for (_, p), t in zip(named, deltas, strict=True):
                p.add_(t[b // per])
            torch.testing.assert_close(batched[b], model(tokens[b : b + 1])[0], rtol=1e-12,
                                       atol=1e-12)  # fmt: skip
            for (_, p), o in zip(named, originals, strict=True):
                p.copy_(o)
        assert not torch.allclose(batched[0], plain[0])  # the deltas matter
        assert torch.equal(model(tokens), plain)  # hooks gone after the block
    with pytest.raises(ValueError, match="deltas"):
        with B.kv_deltas(model, deltas[:1]):
            pass


def test_neutral_roundtrip_is_exact():
    src = B.toy_model(seed=1, attn_only=False, d_model=32, n_heads=4, d_vocab=40, n_ctx=32)
    dst = B.toy_model(seed=2, attn_only=False, d_model=32, n_heads=4, d_vocab=40, n_ctx=32)
    sd = B.neutral_state_dict(src)
    assert sd["blocks.0.attn.W_K"].shape == (4, 32, 8)
    assert sd["unembed.W_U"].shape == (32, 40)
    with torch.no_grad():
        sd["unembed.b_U"] = torch.zeros(40)  # TL 4 native toys have no unembedding bias
        if not B.is_bridge(src):
            src.unembed.b_U.zero_()
    B.load_neutral_state_dict(dst, sd)
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(src(tokens), dst(tokens))


def test_neutral_checkpoint_rejects_mismatch(toy):
    sd = B.neutral_state_dict(toy)
    sd["blocks.0.attn.W_K"] = torch.zeros(4, 16, 8)
    other = B.toy_model(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=128, seed=9)
    with pytest.raises((ValueError, RuntimeError)):
        B.load_neutral_state_dict(other, sd)


def test_run_until_stops_and_unembed_rows_match_logits():
    toy = B.toy_model(2, 32, 4, 50, 64, seed=8)
    with torch.no_grad():  # a non-trivial final norm: its affine must be part of the readout
        for p in toy.ln_final.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    name = B.final_norm_hook_name(toy)
    got = {}

    def save(t, hook):
        got["x"] = t.detach()

    with torch.no_grad():
        assert B.run_until(toy, tokens, [(name, save)], stop_at=name) is None
        logits = toy(tokens)
    ids = [3, 17, 42]
    w, b = B.unembed_rows(toy, ids)
    label_logits = got["x"] @ w + (0 if b is None else b)
    torch.testing.assert_close(label_logits, logits[..., ids], atol=1e-5, rtol=1e-5)


def test_canonical_hook_name(toy):
    canon = B.canonical_hook_name(toy, B.hook_name("attn_out", 1))
    seen = []
    with torch.no_grad():
        B.run_until(
            toy,
            torch.tensor([[1, 2, 3]]),
            [(B.hook_name("attn_out", 1), lambda t, hook: seen.append(hook.name))],
        )
    assert seen == [canon]
    with pytest.raises(KeyError, match="no hook"):
        B.canonical_hook_name(toy, "blocks.9.hook_nothing")


def test_hook_name_unknown_kind():
    with pytest.raises(KeyError, match="known"):
        B.hook_name("attn_outt", 0)


def test_check_model_rejects_non_models():
    with pytest.raises(TypeError, match="load_model"):
        B.dims(torch.nn.Linear(2, 2))
