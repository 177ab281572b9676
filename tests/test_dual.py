"""dual: the dual-form identities in float64, ΔW_FT, and the analysis' output format."""

from __future__ import annotations

import pytest
import torch

from icl_lens import backend as B
from icl_lens.dual import (
    _check_pattern,
    check_linear_dual_form,
    dual_analysis,
    dual_form,
    frobenius_cosine,
    operator,
    token_groups,
)
from icl_lens.tasks import build_prompt
from icl_lens.toy import ToyTokenizer, toy_episode, toy_task

TOL = 1e-10


@pytest.fixture(scope="module")
def setup():
    tok = ToyTokenizer()
    task = toy_task(2)
    demos, evals = toy_episode(seed=1, n_demos=8, n_eval=3, tokenizer=tok)
    return tok, task, demos, evals


def toy64(vocab: int, positional: str = "standard"):
    m = B.toy_model(2, 32, 4, vocab, 128, seed=2, positional_embedding_type=positional)
    return m.to(torch.float64)


@pytest.fixture(scope="module")
def model64(setup):
    return toy64(setup[0].vocab_size)


# --------------------------------------------------------------------------- linear layer


def test_linear_dual_form_squared_loss():
    g = torch.Generator().manual_seed(0)
    w0, x, t, xt = (torch.randn(*s, generator=g) for s in [(3, 5), (7, 5), (7, 3), (4, 5)])
    assert check_linear_dual_form(w0, x, t, xt, lr=0.3, tol=TOL) < TOL


def test_linear_dual_form_any_loss():
    g = torch.Generator().manual_seed(1)
    w0, x, xt = (torch.randn(*s, generator=g) for s in [(4, 6), (9, 6), (6,)])
    labels = torch.randint(0, 4, (9,), generator=g)
    ce = lambda y: torch.nn.functional.cross_entropy(y, labels, reduction="sum")
    assert check_linear_dual_form(w0, x, None, xt, lr=0.05, loss=ce) < TOL


def test_linear_dual_form_tol_raises():
    w0, x, t, xt = torch.ones(2, 2), torch.ones(3, 2), torch.zeros(3, 2), torch.ones(2)
    with pytest.raises(AssertionError, match="dual form"):
        check_linear_dual_form(w0, x, t, xt, lr=0.1, tol=-1.0)
    with pytest.raises(ValueError, match="targets"):
        check_linear_dual_form(w0, x, None, xt, lr=0.1)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("positional", ["standard", "rotary"])
@pytest.mark.parametrize("record", ["label", "predict"])
def test_dual_identity_exact(setup, positional, record):
    tok, task, demos, evals = setup
    model = toy64(tok.vocab_size, positional)
    prompt = build_prompt(task, tok, evals[0], demos, record=record)
    form = dual_form(model, prompt)
    assert form.residual() < TOL
    groups = form.groups[0]
    assert sorted(sum(groups.values(), [])) == list(range(prompt.spans.record_pos + 1))
    assert groups["demos"] == prompt.spans.demo_token_positions()
    # the per-token meta-gradients sum to ΔW_ICL
    torch.testing.assert_close(form.meta_gradient_terms(1).sum(0), form.dw_icl[1], atol=TOL, rtol=0)


def test_operators_match_raw_weights(setup, model64):
    """W_ZSL = W_V X (W_K X)^T and the relaxed output, from the weights, not from hook_k/v."""
    tok, task, demos, evals = setup
    prompt = build_prompt(task, tok, evals[1], demos)
    form = dual_form(model64, prompt)
    names = [B.attn_input_hook(model64, layer) for layer in (0, 1)]
    _, cache = model64.run_with_cache(torch.tensor([prompt.tokens]), names_filter=names)
    rec = prompt.spans.record_pos
    for i, layer in enumerate(form.layers):
        w = B.attn_weights(model64, layer)
        x = cache[names[i]][0]  # [pos, d_model]
        k = torch.einsum("pm,hmd->phd", x, w["W_K"]) + w["b_K"]
        v = torch.einsum("pm,hmd->phd", x, w["W_V"]) + w["b_V"]
        q = (torch.einsum("m,hmd->hd", x[rec], w["W_Q"]) + w["b_Q"]) / B.attn_scale(model64, i)
        for group, pos in form.groups[i].items():
            ref = torch.einsum("phe,phd->hed", v[pos], k[pos])
            torch.testing.assert_close(form.w[group][i], ref, atol=TOL, rtol=0)
        relaxed = torch.einsum("phe,phd,hd->he", v[: rec + 1], k[: rec + 1], q)
        torch.testing.assert_close(form.relaxed[i], relaxed, atol=TOL, rtol=0)


def test_relaxed_equals_model_with_linear_attention(setup, model64):
    """Swap the softmax pattern for the raw scores inside the model: hook_z becomes `relaxed`."""
    tok, task, demos, evals = setup
    prompt = build_prompt(task, tok, evals[2], demos)
    form = dual_form(model64, prompt)
    rec, layer = prompt.spans.record_pos, 1
    got = {}

    def keep_qk(t, hook, kind):
        got[kind] = t[0]

    def linear(pattern, hook):
        scores = torch.einsum("qhd,khd->hqk", got["q"], got["k"]) / B.attn_scale(model64, layer)
        out = pattern.clone()
        out[0, :, rec, : rec + 1] = scores[:, rec, : rec + 1]
        return out

    hooks = [
        (B.hook_name("q", layer), lambda t, hook: keep_qk(t, hook, "q")),
        (B.hook_name("k", layer), lambda t, hook: keep_qk(t, hook, "k")),
        (B.hook_name("pattern", layer), linear),
        (B.hook_name("z", layer), lambda t, hook: keep_qk(t, hook, "z")),
    ]
    with torch.no_grad(), model64.hooks(fwd_hooks=hooks):
        model64(torch.tensor([prompt.tokens]))
    torch.testing.assert_close(got["z"][rec], form.relaxed[layer], atol=TOL, rtol=0)


def test_pattern_check_catches_wrong_keys(setup, model64):
    tok, task, demos, evals = setup
    prompt = build_prompt(task, tok, evals[0], demos)
    form = dual_form(model64, prompt, layers=[0])
    rec = prompt.spans.record_pos
    k = torch.randn(rec + 1, 4, 8, dtype=torch.float64)
    pattern = torch.full((4, rec + 1), 1.0 / (rec + 1), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="hook_pattern"):
        _check_pattern(pattern, form.q[0], k, list(range(rec + 1)), model64, 0, 1e-8)


def test_token_groups_window(setup):
    tok, task, demos, evals = setup
    spans = build_prompt(task, tok, evals[0], demos).spans
    groups = token_groups(spans, window=5)
    visible = sorted(sum(groups.values(), []))
    assert visible == list(range(spans.record_pos - 4, spans.record_pos + 1))


def test_operator_empty_is_zero():
    k = torch.randn(3, 2, 4)
    assert operator(k, k, []).abs().max() == 0


@pytest.mark.skipif(B.BACKEND != "hooked", reason="GQA toy built with TL 3's config")
def test_gqa_rotary_identity(setup):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok, task, demos, evals = setup
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=32, n_heads=4, d_head=8, n_key_value_heads=2, d_vocab=tok.vocab_size,
        n_ctx=64, attn_only=True, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="rotary", dtype=torch.float64,
    )  # fmt: skip
    with torch.random.fork_rng():
        model = HookedTransformer(cfg)
    form = dual_form(model, build_prompt(task, tok, evals[0], demos))  # pattern check passes
    assert form.residual() < TOL
    assert torch.equal(form.demo_k[0][:, 0], form.demo_k[0][:, 1])  # heads 0, 1 share KV head 0


# --------------------------------------------------------------------------- comparisons


def test_frobenius_cosine():
    a = torch.randn(3, 4, 5, dtype=torch.float64)
    assert torch.allclose(frobenius_cosine(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(frobenius_cosine(a, -2 * a), -torch.ones(3, dtype=torch.float64))
    assert frobenius_cosine(a[0], torch.zeros(4, 5)).isnan()


def test_dual_analysis_format_and_tiny_lr(setup, model64):
    tok, task, demos, evals = setup
    icl = [build_prompt(task, tok, e, demos) for e in evals]
    zs = [build_prompt(task, tok, e) for e in evals]
    before = {k: v.clone() for k, v in model64.state_dict().items()}
    res = dual_analysis(model64, icl, zs, demos, lr=1e-13, task=task, tokenizer=tok)
    for k, v in model64.state_dict().items():
        assert torch.equal(v, before[k]), k  # FT undone
    assert res.tensors["cos_icl_ft"].shape == (3, 2, 4)
    assert len(res.frame) == 3 * 2 * 4
    assert {"example", "example_id", "layer", "head", "cos_icl_ft", "act_icl_ft"} <= set(
        res.frame.columns
    )
    assert (res.tensors["norm_ft"] < 1e-9 * res.tensors["norm_zsl"]).all()  # lr -> 0: ΔW_FT -> 0
    assert (res.tensors["dual_residual"] < TOL).all()
    assert set(res.summary().index) == {0, 1, "all"}
    assert dict(res.items()).keys() == res.tensors.keys()  # mapping access (run_experiment)
    assert res["cos_icl_ft"] is res.tensors["cos_icl_ft"]
    assert res.kind("cos_icl_ft") == "result" and res.kind("cos_icl_gaussian") == "baseline"


def test_dw_ft_is_linear_in_small_lr(setup, model64):
    tok, task, demos, evals = setup
    icl = [build_prompt(task, tok, evals[0], demos)]
    zs = [build_prompt(task, tok, evals[0])]
    kw = dict(task=task, tokenizer=tok, shuffled=False)
    a = dual_analysis(model64, icl, zs, demos, lr=1e-7, **kw).tensors
    b = dual_analysis(model64, icl, zs, demos, lr=2e-7, **kw).tensors
    torch.testing.assert_close(b["norm_ft"], 2 * a["norm_ft"], rtol=1e-5, atol=0)
    torch.testing.assert_close(a["cos_icl_ft"], b["cos_icl_ft"], rtol=0, atol=1e-5)
