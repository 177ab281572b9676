"""capture: the shared-prefix engine equals a naive full-prompt run with full logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from icl_lens import backend as B
from icl_lens.capture import capture
from icl_lens.tasks import build_prompt, label_token_ids
from icl_lens.toy import ToyTokenizer, toy_episode, toy_task


@pytest.fixture(scope="module")
def setup():
    tok = ToyTokenizer()
    task = toy_task(2)
    demos, evals = toy_episode(seed=3, n_demos=8, n_eval=7, tokenizer=tok)
    model = B.toy_model(2, 32, 4, tok.vocab_size, 128, seed=2)
    return model, tok, task, demos, evals


def naive_scores(model, cache, layer):
    """Pre-softmax scores by hand, q.k/scale from hook_q/hook_k (absolute-position toys);
    rotary models use hook_attn_scores, which is genuine on HF-backed bridges and TL 3."""
    if B.dims(model).positional == "rotary":
        return cache[B.hook_name("attn_scores", layer)]
    q, k = cache[B.hook_name("q", layer)], cache[B.hook_name("k", layer)]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / B.attn_scale(model, layer)
    n = scores.shape[-1]
    return scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))


class _Cache(dict):
    def __init__(self, model, cache):
        super().__init__({k: cache[k] for k in cache.keys()})
        for layer in range(B.dims(model).n_layers):
            self[B.hook_name("attn_scores", layer)] = naive_scores(model, cache, layer)


def naive(model, prompt, label_ids):
    """Per example: full prompt, full-vocabulary logits, full activation cache."""
    tokens = torch.tensor([prompt.tokens])
    with torch.no_grad():
        logits, raw = model.run_with_cache(tokens)
    cache = _Cache(model, raw)
    d = B.dims(model)
    r = prompt.spans.record_pos
    q0 = prompt.spans.query[0]
    demo = prompt.spans.demo_token_positions()
    out = {
        "logits": logits[0, prompt.spans.predict_pos, label_ids],
        "attn_out": torch.stack(
            [cache[B.hook_name("attn_out", layer)][0, r] for layer in range(d.n_layers)]
        ),
        "query_scores": torch.stack(
            [
                cache[B.hook_name("attn_scores", layer)][0, :, r, q0 : r + 1]
                for layer in range(d.n_layers)
            ]
        ),
        "demo_scores": torch.stack(
            [cache[B.hook_name("attn_scores", layer)][0, :, r, demo] for layer in range(d.n_layers)]
        ),
        "q": torch.stack(
            [
                cache[B.hook_name("q", layer)][0, r].flatten() / B.attn_scale(model, layer) ** 0.5
                for layer in range(d.n_layers)
            ]
        ),
    }
    return out


@pytest.mark.parametrize("record", ["label", "predict"])
@pytest.mark.parametrize("n_demos", [0, 8])
def test_capture_matches_naive(setup, record, n_demos):
    model, tok, task, demos, evals = setup
    prompts = [build_prompt(task, tok, q, demos[:n_demos], record=record) for q in evals]
    label_ids = label_token_ids(task, tok)
    rec = capture(
        model, prompts, label_ids, "icl" if n_demos else "zs", batch_size=3, progress=False
    )
    if n_demos and B.supports_prefix_cache(model):
        assert rec.prefix_cached
    assert rec.attn_out.shape == (len(evals), 2, 32)
    assert rec.demo_scores.shape[-1] == len(prompts[0].spans.demo_token_positions())
    for i, p in enumerate(prompts):
        ref = naive(model, p, label_ids)
        torch.testing.assert_close(rec.label_logits[i], ref["logits"], atol=1e-4, rtol=0)
        torch.testing.assert_close(rec.attn_out[i], ref["attn_out"], atol=1e-4, rtol=0)
        torch.testing.assert_close(rec.q[i], ref["q"], atol=1e-4, rtol=0)
        n_q = ref["query_scores"].shape[-1]
        torch.testing.assert_close(
            rec.query_scores[i, :, :, :n_q], ref["query_scores"], atol=1e-4, rtol=0
        )
        assert rec.query_mask[i, :, :n_q].all() and not rec.query_mask[i, :, n_q:].any()
        torch.testing.assert_close(rec.demo_scores[i], ref["demo_scores"], atol=1e-4, rtol=0)
        assert rec.demo_mask[i].all()
        assert int(rec.preds[i]) == int(ref["logits"].argmax())


@pytest.mark.parametrize("n_demos", [0, 8])
def test_length_sorted_batches_come_back_in_order(setup, n_demos):
    """Queries of different lengths are batched by length; records keep the input order."""
    model, tok, task, demos, evals = setup
    queries = [
        dataclasses.replace(q, fields={"x": " ".join([q.fields["x"]] * (1 + (3 * i) % 4))})
        for i, q in enumerate(evals)
    ]
    prompts = [build_prompt(task, tok, q, demos[:n_demos]) for q in queries]
    assert len({len(p.tokens) for p in prompts}) > 2
    label_ids = label_token_ids(task, tok)
    rec = capture(model, prompts, label_ids, "icl", batch_size=3, progress=False)
    assert rec.example_ids == [p.example_id for p in prompts]
    for i, p in enumerate(prompts):
        one = capture(model, [p], label_ids, "icl", progress=False)
        torch.testing.assert_close(rec.attn_out[i], one.attn_out[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(rec.label_logits[i], one.label_logits[0], atol=1e-5, rtol=0)
        n_q = one.query_scores.shape[-1]
        torch.testing.assert_close(rec.query_scores[i, ..., :n_q], one.query_scores[0],
                                   atol=1e-5, rtol=0)  # fmt: skip
        assert torch.equal(rec.query_mask[i, :, :n_q], one.query_mask[0])
        assert not rec.query_mask[i, :, n_q:].any()
        assert int(rec.n_tokens[i]) == len(p.tokens)


def test_shared_prefix_equals_full_prompts(setup):
    model, tok, task, demos, evals = setup
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    full = capture(model, prompts, label_ids, shared_prefix=False, progress=False)
    auto = capture(model, prompts, label_ids, progress=False)
    assert not full.prefix_cached
    assert torch.equal(full.preds, auto.preds)
    for name in ("label_logits", "attn_out", "q", "query_scores", "demo_scores"):
        diff = (getattr(full, name) - getattr(auto, name)).abs().max()
        assert diff <= 1e-4, (name, float(diff))


def test_capture_rejects_bad_input(setup):
    model, tok, task, demos, evals = setup
    label_ids = label_token_ids(task, tok)
    with pytest.raises(ValueError, match="empty"):
        capture(model, [], label_ids, progress=False)
    with pytest.raises(ValueError, match="condition"):
        capture(model, [build_prompt(task, tok, evals[0])], label_ids, "fewshot", progress=False)
    long_demos = demos * 20
    with pytest.raises(ValueError, match="fewer demonstrations"):
        capture(model, [build_prompt(task, tok, evals[0], long_demos)], label_ids, progress=False)
    mixed = [build_prompt(task, tok, evals[0], demos), build_prompt(task, tok, evals[1], demos[:2])]
    with pytest.raises(ValueError, match="same demonstrations"):
        capture(model, mixed, label_ids, progress=False)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A random 3-layer Gemma-3 HF model (sliding windows, GQA, rotary) on TL 4's bridge."""
    if B.BACKEND != "bridge":
        pytest.skip("the HF-backed KV-cache path is TL 4's; TL 3 is covered by the toy")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = ToyTokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=12,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=8,
    )
    cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny_gemma")
    hf.save_pretrained(path)
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(path), hf_model=hf), tok


def test_shared_prefix_on_hf_bridge_with_sliding_windows(tiny_gemma):
    model, tok = tiny_gemma
    task = toy_task(2)
    demos, evals = toy_episode(seed=1, n_demos=6, n_eval=5, tokenizer=tok)
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    assert B.supports_prefix_cache(model)
    full = capture(model, prompts, label_ids, shared_prefix=False, progress=False)
    auto = capture(model, prompts, label_ids, batch_size=2, progress=False)
    assert auto.prefix_cached and not full.prefix_cached
    assert torch.equal(full.preds, auto.preds)
    for name in ("label_logits", "attn_out", "q", "query_scores", "demo_scores"):
        diff = (getattr(full, name) - getattr(auto, name)).abs().max()
        assert diff <= 1e-4, (name, float(diff))
    assert torch.equal(full.demo_mask, auto.demo_mask)
    # the sliding-window layers hide early demonstration tokens; the global layer sees all
    assert not full.demo_mask[:, 0].all() and full.demo_mask[:, 2].all()
    for i, p in enumerate(prompts):
        ref = naive(model, p, label_ids)
        torch.testing.assert_close(auto.attn_out[i], ref["attn_out"], atol=1e-4, rtol=0)
        torch.testing.assert_close(auto.label_logits[i], ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_captured_scores_softmax_to_the_pattern(positional):
    """The scores capture keeps are pre-softmax: their softmax is the model's own pattern."""
    model = B.toy_model(2, 32, 4, 50, 64, seed=5, positional_embedding_type=positional)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    got, pattern = {}, {}
    hooks = []
    for layer in range(2):
        hooks += B.attn_scores_hooks(model, layer, lambda t, layer=layer: got.update({layer: t}))
        hooks.append(
            (B.hook_name("pattern", layer), lambda t, hook, layer=layer: pattern.update({layer: t}))
        )
    with torch.no_grad():
        B.run_until(model, tokens, hooks)
    for layer in range(2):
        assert got[layer].shape == (2, 4, 9, 9)
        assert (got[layer] < 0).any(), "scores, not probabilities"
        torch.testing.assert_close(got[layer].softmax(-1), pattern[layer], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_real_model_shared_prefix_equals_naive():
    """Gemma-3-270m (offline bundle): cached-prefix capture equals full prompts, full logits."""
    from icl_lens.data import load_task_data, sample_demos
    from icl_lens.models import load_model
    from icl_lens.tasks import get_task

    model = load_model("gemma-3-270m", progress=False)
    tok = model.tokenizer
    task = get_task("sst2")
    data = load_task_data(task, "staicc", n_eval=3)
    demos = sample_demos(data.demo_pool, 8, seed=0)
    prompts = [build_prompt(task, tok, q, demos) for q in data.eval]
    label_ids = label_token_ids(task, tok)
    rec = capture(model, prompts, label_ids, batch_size=2, progress=False)
    assert rec.prefix_cached == B.supports_prefix_cache(model)
    for i, p in enumerate(prompts):
        ref = naive(model, p, label_ids)
        assert int(rec.preds[i]) == int(ref["logits"].argmax())
        torch.testing.assert_close(rec.label_logits[i], ref["logits"], atol=1e-3, rtol=1e-4)
        for name in ("attn_out", "demo_scores"):
            diff = (getattr(rec, name)[i] - ref[name]).abs().max()
            scale = ref[name].abs().max()
            assert diff <= 1e-4 * max(1.0, float(scale)), (name, float(diff))


def test_detail_limit_keeps_q_and_demo_scores_for_the_first_prompts(setup):
    model, tok, task, demos, evals = setup
    queries = [  # different lengths, so the length-sorted batches come out of input order
        dataclasses.replace(q, fields={"x": " ".join([q.fields["x"]] * (1 + (3 * i) % 5))})
        for i, q in enumerate(evals)
    ]
    prompts = [build_prompt(task, tok, q, demos) for q in queries]
    label_ids = label_token_ids(task, tok)
    full = capture(model, prompts, label_ids, "icl", batch_size=3, progress=False)
    some = capture(model, prompts, label_ids, "icl", batch_size=3, detail_limit=4, progress=False)
    assert some.q.shape[0] == some.demo_scores.shape[0] == 4
    torch.testing.assert_close(some.q, full.q[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(some.demo_scores, full.demo_scores[:4], atol=1e-6, rtol=0)
    for name in ("attn_out", "label_logits", "query_scores", "demo_mask"):
        torch.testing.assert_close(getattr(some, name), getattr(full, name), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="detail_limit"):
        capture(model, prompts, label_ids, "icl", detail_limit=-1, progress=False)


# --------------------------------------------------------------------------- self-checks


@pytest.fixture
def cached_model(request, setup):
    """A model whose prefix KV cache is used: the toy on TL 3, a tiny HF Gemma-3 on TL 4."""
    if B.BACKEND == "bridge":
        model, tok = request.getfixturevalue("tiny_gemma")
        demos, evals = toy_episode(seed=1, n_demos=6, n_eval=5, tokenizer=tok)
        return model, tok, toy_task(2), demos, evals
    return setup


def _drop_prefix(model, cache, tokens, attention_mask, fwd_hooks, stop_at=None, split=False):
    """A broken fast path: runs the continuations without the cached prefix, as TL 4.3 did
    on transformers 5.24 (the cache went in under a name the attention never read)."""
    return B.run_until(model, tokens, fwd_hooks, stop_at=stop_at)


def _assert_same_records(a, b, atol=1e-5):
    """Every tensor field close (``atol=0``: equal), masks equal."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) and (x.dtype == torch.bool or atol == 0):
            assert torch.equal(x, y), f.name
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-4, msg=f.name)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_split_attention_matches_full_prompts(arch, tmp_path):
    """Split-prefix attention (one product of every row's new queries with the shared prefix)
    gives the records of full prompts, on GQA (Llama 4 q / 2 kv heads) and on Gemma-3 (q/k
    norms, sliding windows shorter than the prefix, 4 q / 1 kv heads); TL 3 and TL 4's native
    toys keep the model's own attention and say why."""
    from test_models import save_tiny, tiny_gemma3

    from icl_lens.models import load_model

    if arch == "llama":
        save_tiny(tmp_path, "llama")
    else:
        tiny_gemma3(tmp_path)
    from icl_lens.tasks import Example, TaskSpec

    model = load_model(str(tmp_path), progress=False)
    tok = model.tokenizer
    task = TaskSpec("words", "w3 {x} w4", (" w10", " w11"))
    rng = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"w{12 + int(i)}" for i in torch.randint(0, 48, (n,), generator=rng))

    demos = [Example(f"d{i}", {"x": text(3)}, i % 2) for i in range(6)]
    evals = [Example(f"e{i}", {"x": text(1 + i % 4)}, i % 2) for i in range(5)]
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    full = capture(model, prompts, label_ids, shared_prefix=False, progress=False)
    rec = capture(model, prompts, label_ids, batch_size=2, progress=False)
    own = capture(model, prompts, label_ids, batch_size=2, split_attention=False, progress=False)
    assert rec.prefix_cached and own.prefix_cached
    report, own_report = rec.checks["prefix_cache"], own.checks["prefix_cache"]
    if B.BACKEND == "bridge":
        assert report["attention"] == "split" and report["split_attention"]["used"], report
        assert B.split_attention_unsupported(B.toy_model(1, 16, 2, 20, 32)) is not None
    else:
        assert report["attention"] == "model" and "TL 3" in report["split_attention"]["reason"]
    assert own_report["attention"] == "model"
    assert own_report["split_attention"]["reason"] == "split_attention=False"
    assert full.checks["prefix_cache"]["split_attention"]["reason"] == "no shared prefix"
    _assert_same_records(rec, full)
    _assert_same_records(rec, own)
    for block in model.blocks:  # the bridges' own forward is back, the HF modules' untouched
        assert "forward" not in vars(block.attn)
        assert "forward" not in vars(getattr(block.attn, "original_component", block.attn))
    if arch == "gemma3":  # the windowed layers hide early demonstrations: masks mattered
        assert not full.demo_mask[:, 0].all() and full.demo_mask[:, 2].all()


def test_broken_split_attention_falls_back_to_the_models_own(tiny_gemma, monkeypatch):
    """Split-prefix attention that loses the prefix's values is caught by the self-check; the
    capture then runs the model's own attention over the cache, with a warning."""
    from icl_lens.backend import tl4_split
    from icl_lens.capture import FastPathWarning

    model, tok = tiny_gemma
    task = toy_task(2)
    demos, evals = toy_episode(seed=1, n_demos=6, n_eval=5, tokenizer=tok)
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    own = capture(model, prompts, label_ids, batch_size=2, split_attention=False, progress=False)
    real = tl4_split._forward

    def broken(attn, keys, values):
        return real(attn, keys, torch.zeros_like(values))

    monkeypatch.setattr(tl4_split, "_forward", broken)
    with pytest.warns(FastPathWarning, match="disagree.*split-prefix attention.*model's own"):
        rec = capture(model, prompts, label_ids, batch_size=2, progress=False)
    report = rec.checks["prefix_cache"]
    assert rec.prefix_cached and report["used"] and report["attention"] == "model"
    assert "attn_out off by" in report["split_attention"]["reason"]
    assert report["split_attention"]["check"]["max_rel_diff"]["attn_out"] > 1e-3
    _assert_same_records(rec, own, atol=0)


def test_broken_prefix_cache_is_caught_and_falls_back(cached_model, monkeypatch):
    from icl_lens.capture import FastPathWarning

    model, tok, task, demos, evals = cached_model
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    full = capture(model, prompts, label_ids, shared_prefix=False, progress=False)
    good = capture(model, prompts, label_ids, batch_size=2, progress=False)
    assert good.prefix_cached and good.checks["prefix_cache"]["used"]
    assert max(good.checks["prefix_cache"]["max_rel_diff"].values()) <= 1e-4
    monkeypatch.setattr(B, "run_with_prefix", _drop_prefix)
    with pytest.warns(FastPathWarning, match="shared-prefix records disagree"):
        rec = capture(model, prompts, label_ids, batch_size=2, progress=False)
    assert not rec.prefix_cached
    report = rec.checks["prefix_cache"]
    assert not report["used"] and "demo_mask differ" in report["reason"]
    for f in dataclasses.fields(full):
        a, b = getattr(full, f.name), getattr(rec, f.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
    # without the check, a capture that sees no demonstration is still refused
    from icl_lens.capture import SelfCheckError

    with pytest.raises(SelfCheckError, match="no demonstration token is visible"):
        capture(model, prompts, label_ids, batch_size=2, self_check=False, progress=False)


def test_probabilities_recorded_as_scores_are_refused(setup, monkeypatch):
    """A backend whose hook_attn_scores holds the softmax (OPT on TL 4) must not be used."""
    from icl_lens.capture import SelfCheckError

    model, tok, task, demos, evals = setup
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    real = B.attn_scores_hooks

    def softmaxed(model, layer, fn):
        return real(model, layer, lambda t: fn(t.softmax(-1)))

    monkeypatch.setattr(B, "attn_scores_hooks", softmaxed)
    with pytest.raises(SelfCheckError, match="not pre-softmax"):
        capture(model, prompts, label_token_ids(task, tok), progress=False)


def test_label_logits_check_falls_back_to_the_models_logits(setup, monkeypatch):
    """If the label-column shortcut disagrees with the model (say a missed soft cap or
    scale), capture warns and reads the label logits from the model's own logits."""
    from icl_lens.capture import FastPathWarning

    model, tok, task, demos, evals = setup
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    monkeypatch.setattr(B, "logit_soft_cap", lambda model: 0.5)  # a cap the model lacks
    with pytest.warns(FastPathWarning, match="label-word logits"):
        rec = capture(model, prompts, label_ids, progress=False)
    assert rec.checks["label_logits"]["path"] == "model_logits"
    for i, p in enumerate(prompts):
        torch.testing.assert_close(
            rec.label_logits[i], naive(model, p, label_ids)["logits"], atol=1e-4, rtol=0
        )


def test_self_checks_pass_quietly_on_a_correct_model(cached_model):
    import warnings

    model, tok, task, demos, evals = cached_model
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = capture(model, prompts, label_token_ids(task, tok), progress=False)
    c = rec.checks
    assert c["label_logits"]["path"] == "label_columns" and c["label_logits"]["max_rel_diff"] < 1e-5
    assert c["scores"]["checked"] and c["scores"]["max_abs_diff"] < 1e-5
    assert c["windows"]["ok"], c["windows"]
    assert c["prefix_cache"]["used"]


# --------------------------------------------------------------------------- recording sites


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny random Gemma-3 checkpoint (post-attention norms, q-norm, RoPE, GQA, sliding
    windows) loaded by the installed TL, with a toy episode in its word-level vocabulary."""
    from icl_lens.conformance import build_tiny_checkpoint
    from icl_lens.models import load_model

    path = build_tiny_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3_sites"))
    model = load_model(str(path), progress=False)
    demos, evals = toy_episode(seed=1, n_demos=6, n_eval=5, tokenizer=None)
    return model, model.tokenizer, toy_task(2), demos, evals


def test_other_sites_are_the_defaults_own_tensors_without_post_norm_or_rope(setup):
    """Standard positions, no post-attention norm, no q-norm: site 'attention' is
    hook_attn_out and 'q_post' is hook_q, recorded once (the same tensors)."""
    model, tok, task, demos, evals = setup
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    rec = capture(model, prompts, label_token_ids(task, tok), batch_size=3, progress=False)
    assert rec.attn_pre_norm is rec.attn_out and rec.q_post is rec.q
    assert rec.sites["attention"]["same_as"] == "residual"
    assert rec.sites["q_post"]["same_as"] == "q_pre"
    assert rec.sites["residual"]["hooks"] == ["blocks.{l}.hook_attn_out"]
    assert "attn_pre_norm" not in rec.checks["prefix_cache"].get("max_rel_diff", {})


def _plain_run(model, prompt):
    """One full prompt, plain forward: TL's cache, and each layer's post-attention norm input
    read with a plain PyTorch pre-hook on the norm module (independent of icl_lens.backend)."""
    d = B.dims(model)
    pre_norm: dict[int, torch.Tensor] = {}
    handles = [
        model.get_submodule(f"blocks.{layer}.ln1_post").register_forward_pre_hook(
            lambda mod, args, layer=layer: pre_norm.update({layer: args[0].detach().clone()})
        )
        for layer in range(d.n_layers)
    ]
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([prompt.tokens]))
    finally:
        for h in handles:
            h.remove()
    return cache, pre_norm


def test_other_sites_on_gemma3_match_independent_computations(gemma3):
    """Gemma-3 (prefix cache on): 'attention' is the input of ln1_post and differs from
    hook_attn_out; 'q_post' is the rotated, q-normed query: with the rotated keys it gives
    exactly the recorded pre-softmax scores, and it differs from q_pre."""
    model, tok, task, demos, evals = gemma3
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    rec = capture(model, prompts, label_token_ids(task, tok), batch_size=2, progress=False)
    assert rec.prefix_cached and rec.checks["prefix_cache"]["used"]
    assert {"attn_pre_norm", "q_post"} <= set(rec.checks["prefix_cache"]["max_rel_diff"])
    assert rec.sites["attention"]["same_as"] is None and rec.sites["q_post"]["same_as"] is None
    d = B.dims(model)
    demo = prompts[0].spans.demo_token_positions()
    for i, p in enumerate(prompts):
        cache, pre_norm = _plain_run(model, p)
        r = p.spans.record_pos
        for layer in range(d.n_layers):
            want = pre_norm[layer][0, r]
            torch.testing.assert_close(rec.attn_pre_norm[i, layer], want, atol=1e-5, rtol=1e-5)
            assert (rec.attn_pre_norm[i, layer] - rec.attn_out[i, layer]).abs().max() > 1e-2
            norm = model.get_submodule(f"blocks.{layer}.ln1_post")
            with torch.no_grad():
                torch.testing.assert_close(norm(want), rec.attn_out[i, layer], atol=1e-5, rtol=1e-5)
            # q_post · k_post / sqrt(scale) (q_post is already divided by sqrt(scale)) = scores
            q = rec.q_post[i, layer].view(d.n_heads, -1)
            k = cache[f"blocks.{layer}.attn.hook_rot_k"][0, demo]  # [demo, kv_head, d_head]
            k = k.repeat_interleave(d.n_heads // k.shape[1], dim=1)
            scores = torch.einsum("hd,thd->ht", q, k) / B.attn_scale(model, layer) ** 0.5
            seen = rec.demo_mask[i, layer]
            assert seen.any()
            torch.testing.assert_close(scores[:, seen], rec.demo_scores[i, layer][:, seen],
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
            assert (rec.q_post[i, layer] - rec.q[i, layer]).abs().max() > 1e-2


@pytest.mark.parametrize("site", ["attention", "q_post"])
def test_prefix_cache_check_covers_the_other_sites(gemma3, monkeypatch, site):
    """A site recorded wrongly on the shared-prefix path only (here: shifted by the number of
    tokens fed, which the cache shortens) fails the check by name; capture falls back to full
    prompts, whose records are right."""
    from icl_lens.capture import FastPathWarning

    model, tok, task, demos, evals = gemma3
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    full = capture(model, prompts, label_ids, shared_prefix=False, progress=False)
    name = {"attention": "attn_pre_norm_hooks", "q_post": "attended_q_hooks"}[site]
    real = getattr(B, name)

    def shifted(model, layer, fn):
        return real(model, layer, lambda t: fn(t + t.shape[1]))

    monkeypatch.setattr(B, name, shifted)
    with pytest.warns(FastPathWarning, match="shared-prefix records disagree"):
        rec = capture(model, prompts, label_ids, batch_size=2, progress=False)
    field = {"attention": "attn_pre_norm", "q_post": "q_post"}[site]
    report = rec.checks["prefix_cache"]
    assert not rec.prefix_cached and not report["used"]
    assert report["reason"].startswith(f"{field} off by") and ";" not in report["reason"]
    assert report["max_rel_diff"][field] > 1e3 * report["allowed"][field]  # far beyond rounding
    assert torch.equal(rec.attn_out, full.attn_out) and torch.equal(rec.q, full.q)
    # full prompts: every record shifted by its batch's width (> 1 even after 1/sqrt(scale))
    assert (getattr(rec, field) - getattr(full, field)).min() > 1


def test_a_site_whose_hook_never_fires_is_none_with_the_reason(gemma3, monkeypatch):
    """A hook the adapter lists but the model never calls (as a TL 4 bridge may) leaves the
    site out, with the reason, instead of returning uninitialised memory."""
    model, tok, task, demos, evals = gemma3
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    real = B.attended_q_hooks
    monkeypatch.setattr(B, "attended_q_hooks",
                        lambda model, layer, fn: real(model, layer, lambda t: None))  # fmt: skip
    with pytest.warns(UserWarning, match="site 'q_post' is not recorded.*did not fire"):
        rec = capture(model, prompts, label_token_ids(task, tok), batch_size=2, progress=False)
    assert rec.q_post is None and "did not fire" in rec.sites["q_post"]["unavailable"]
    assert rec.attn_pre_norm is not None and rec.prefix_cached  # the rest is unaffected
    with pytest.warns(UserWarning, match="did not fire"):
        rec = capture(model, prompts, label_token_ids(task, tok), self_check=False,
                      progress=False)  # fmt: skip
    assert rec.q_post is None


def test_a_site_the_model_does_not_expose_is_none_with_the_reason(setup, monkeypatch):
    model, tok, task, demos, evals = setup

    def refuse(model, layer, fn):
        raise NotImplementedError("site 'q_post' is not hooked here (test)")

    monkeypatch.setattr(B, "attended_q_hooks", refuse)
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    rec = capture(model, prompts, label_token_ids(task, tok), progress=False)
    assert rec.q_post is None and rec.sites["q_post"]["unavailable"].endswith("(test)")
    assert rec.attn_pre_norm is rec.attn_out


def test_a_site_that_fires_only_on_full_prompts_fails_the_prefix_check(gemma3, monkeypatch):
    """A hook that fires on full prompts but not on the shared-prefix path fails that path's
    self-check by name; capture runs full prompts, and the site is recorded from them."""
    from icl_lens.capture import FastPathWarning

    model, tok, task, demos, evals = gemma3
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    full = capture(model, prompts, label_ids, shared_prefix=False, progress=False)
    shortest = min(len(p.tokens) for p in prompts)
    real = B.attended_q_hooks

    def full_prompts_only(model, layer, fn):
        return real(model, layer, lambda t: fn(t) if t.shape[1] >= shortest else None)

    monkeypatch.setattr(B, "attended_q_hooks", full_prompts_only)
    with pytest.warns(FastPathWarning, match="KV cache failed.*site 'q_post'.*did not fire"):
        rec = capture(model, prompts, label_ids, batch_size=2, progress=False)
    assert not rec.prefix_cached and rec.sites["q_post"]["unavailable"] is None
    torch.testing.assert_close(rec.q_post, full.q_post, atol=1e-5, rtol=1e-5)


def test_rounding_above_the_tolerance_is_judged_against_the_models_own_rounding(
    gemma3, monkeypatch
):
    """A prefix beyond the sliding window changes the order of the sums, so the fast path
    differs from full prompts by rounding. When that exceeds the dtype's tolerance (forced
    tiny here; the untrained Gemma-3-270m does it at 1e-4), the check measures how far the
    plain path itself moves under a rounding-sized change of its input, and accepts the fast
    path within ROUNDING_FACTOR times that."""
    import importlib

    C = importlib.import_module("icl_lens.capture")  # the module; il.capture is the function

    model, tok, task, demos, evals = gemma3
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    label_ids = label_token_ids(task, tok)
    rec = capture(model, prompts, label_ids, batch_size=2, progress=False)
    diffs = rec.checks["prefix_cache"]["max_rel_diff"]
    assert rec.prefix_cached and max(diffs.values()) > 0  # rounding, not bit-identical
    monkeypatch.setattr(C, "tolerance", lambda dtype: 0.5 * min(v for v in diffs.values() if v))
    again = capture(model, prompts, label_ids, batch_size=2, progress=False)
    report = again.checks["prefix_cache"]
    assert report["used"] and report["accepted_by"] == "rounding_sensitivity"
    noise = report["rounding_sensitivity"]
    assert min(noise.values()) > 0  # the probe moved every field
    for name, diff in report["max_rel_diff"].items():
        assert diff <= report["allowed"][name] == max(0.5 * min(v for v in diffs.values() if v),
                                                      C.ROUNDING_FACTOR * noise[name])  # fmt: skip
    for f in ("attn_out", "q", "attn_pre_norm", "q_post"):
        torch.testing.assert_close(getattr(again, f), getattr(rec, f), rtol=0, atol=0)
