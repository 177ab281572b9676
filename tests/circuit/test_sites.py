"""Recording sites: what each one reads, checked against the model's own computation."""

from __future__ import annotations

import pytest
import torch

from icl_lens import backend as B
from icl_lens.circuit import sites as S
from tests.circuit.conftest import MODELS, NO_POST_NORM, ROTARY, run_sites

TOKENS = torch.tensor([[0, 7, 8, 9, 4, 10, 11, 5]])  # shorter than the Gemma window (8)


@pytest.mark.parametrize("name", list(MODELS))
def test_heads_sum_with_b_o_to_the_attention_site(models, name):
    model, _ = models(name)
    got = run_sites(model, TOKENS, ["heads", "attention"])
    for layer in range(B.dims(model).n_layers):
        w = B.attn_weights(model, layer)
        heads = S.head_outputs(got["heads", layer], w["W_O"].detach())
        assert heads.shape == (*TOKENS.shape, B.dims(model).n_heads, B.dims(model).d_model)
        total = heads.sum(-2) + w["b_O"].detach()
        torch.testing.assert_close(total, got["attention", layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NO_POST_NORM)
def test_attention_and_residual_sites_coincide_without_post_norm(models, name):
    model, _ = models(name)
    got = run_sites(model, TOKENS, ["attention", "residual"])
    for layer in range(B.dims(model).n_layers):
        assert B.post_attn_norm(model, layer) is None
        assert torch.equal(got["attention", layer], got["residual", layer])


def test_attention_site_is_the_post_norm_input_on_gemma3(models):
    model, _ = models("gemma3")
    got = run_sites(
        model, TOKENS, ["attention", "residual", "resid"], ["blocks.{l}.hook_resid_pre"]
    )
    for layer in range(B.dims(model).n_layers):
        norm = B.post_attn_norm(model, layer)
        assert norm == f"blocks.{layer}.ln1_post"
        attention, residual = got["attention", layer], got["residual", layer]
        assert (attention - residual).abs().max() > 1e-2, "a post-norm changes the output"
        with torch.no_grad():  # the norm applied to the 'attention' site gives hook_attn_out
            torch.testing.assert_close(
                model.get_submodule(norm)(attention), residual, atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("name", list(MODELS))
def test_q_pre_and_q_post(models, name):
    """q_pre is hook_q; q_post differs from it exactly under RoPE (and q-norm), and it is what
    the scores use: softmax(q_post · k_post / scale) is the model's pattern."""
    model, _ = models(name)
    d = B.dims(model)
    extra = ["blocks.{l}.attn.hook_q", "blocks.{l}.attn.hook_k", "blocks.{l}.attn.hook_pattern"]
    if name == "gemma3" or B.BACKEND == "hooked":
        extra.append("blocks.{l}.attn.hook_rot_k")
    got = run_sites(model, TOKENS, ["q_pre", "q_post"], extra)
    for layer in range(d.n_layers):
        q_pre, q_post = got["q_pre", layer], got["q_post", layer]
        assert torch.equal(q_pre, got[f"blocks.{layer}.attn.hook_q"])
        if name in ROTARY:
            assert not torch.allclose(q_pre, q_post, atol=1e-3)
            # position 0 is not rotated: there only a q-norm can make them differ
            if name == "rotary":
                torch.testing.assert_close(q_pre[:, 0], q_post[:, 0])
        else:
            assert torch.equal(q_pre, q_post)
        k = got.get(f"blocks.{layer}.attn.hook_rot_k")
        if k is None:
            _, k = B.attended_qk(model, layer, q_pre, got[f"blocks.{layer}.attn.hook_k"])
        k = k.repeat_interleave(d.n_heads // k.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q_post, k) / B.attn_scale(model, layer)
        causal = torch.ones(TOKENS.shape[1], TOKENS.shape[1], dtype=torch.bool).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(
            pattern, got[f"blocks.{layer}.attn.hook_pattern"], atol=1e-5, rtol=1e-4
        )


def test_describe_sites_names_the_hooks(models):
    model, _ = models("gemma3")
    frame = S.describe_sites(model, layer=1).set_index("site")
    assert list(frame.index) == list(S.SITES)
    assert frame.loc["residual", "hooks"] == "blocks.1.hook_attn_out"
    assert frame.loc["heads", "hooks"] == "blocks.1.attn.hook_z"
    assert frame.loc["q_post", "hooks"] == "blocks.1.attn.hook_rot_q"
    want = {"bridge": "blocks.1.ln1_post.hook_in", "hooked": "blocks.1.ln1_post.hook_scale"}
    assert frame.loc["attention", "hooks"].startswith(want[B.BACKEND])


def test_unknown_site_and_unavailable_site(models, monkeypatch):
    model, _ = models("toy")
    with pytest.raises(ValueError, match="unknown site"):
        S.site_hooks(model, "mlp", 0, lambda t: None)

    def refuse(model, layer, fn):
        raise NotImplementedError(f"{B.architecture(model)}: site 'q_post' is not hooked")

    monkeypatch.setattr(B, "attended_q_hooks", refuse)
    frame = S.describe_sites(model).set_index("site")
    assert frame.loc["q_post", "hooks"].startswith("unavailable: ")
    assert "site 'q_post'" in frame.loc["q_post", "hooks"]


@pytest.mark.skipif(B.BACKEND != "hooked", reason="TL 3's adapter builds HookedTransformers")
def test_tl3_refuses_a_layernorm_post_norm_input(models):
    """TL 3 rebuilds a post-norm's input only for RMS norms; others are refused by name."""
    from icl_lens.backend import tl3

    model, _ = models("toy")
    with pytest.raises(NotImplementedError, match="site 'attention'.*LayerNorm"):
        tl3.ADAPTER.attn_pre_norm_hooks(model, 0, "ln_final", lambda t: None)


def test_frozen_norm_is_the_norm_at_its_own_scale(models):
    """With the scale held at the input's own, the frozen linear map is the norm minus its
    bias: the norm itself on RMS (Gemma-3); on LayerNorm they differ by one constant row."""
    for name in ("gemma3", "toy"):
        model, _ = models(name)
        x = torch.randn(5, B.dims(model).d_model, generator=torch.Generator().manual_seed(0))
        norm = model.get_submodule("ln_final")
        kept: dict = {}

        def keep(t, hook, kept=kept):
            kept["s"] = t

        with torch.no_grad():
            with model.hooks(fwd_hooks=[("ln_final.hook_scale", keep)]):
                y = norm(x)
            frozen = B.frozen_norm_linear(model, "ln_final", x, kept["s"])
        if name == "gemma3":
            torch.testing.assert_close(frozen, y, atol=1e-5, rtol=1e-5)
        else:
            bias = y - frozen
            torch.testing.assert_close(bias, bias[:1].expand_as(bias), atol=1e-5, rtol=0)
