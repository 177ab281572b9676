"""circuit_records: one call, ZS/ICL/FT at every site, checked against plain forward passes."""

from __future__ import annotations

import pytest
import torch

import icl_lens as il
from icl_lens import backend as B
from icl_lens.circuit import circuit_records
from tests.circuit.conftest import MODELS, run_sites, toy_data, toy_records


@pytest.mark.parametrize("name", list(MODELS))
def test_records_equal_plain_passes(records, name):
    """Every site at the recorded position and the label logits at the prediction position
    equal a plain forward pass of that prompt, for ZS (base model) and ICL."""
    model, rec = records(name)
    d = B.dims(model)
    n = len(rec)
    assert rec.record == "predict" and rec.sites == tuple(il.circuit.SITES)
    assert rec.conditions == ["zs", "icl", "ft", "ft_shuffled"]
    for cond, prompts in (("zs", rec.zs_prompts), ("icl", rec.icl_prompts)):
        r = rec[cond]
        assert r.resid.shape == (n, d.n_layers, d.d_model)
        assert r.heads.shape == (n, d.n_layers, d.n_heads, d.d_model)
        assert r.z.shape == r.q_pre.shape == r.q_post.shape == (n, d.n_layers, d.n_heads, d.d_head)
        for e in (0, n - 1):
            p = prompts[e]
            got = run_sites(model, torch.tensor([p.tokens]), list(rec.sites))
            pos = p.spans.record_pos
            for layer in range(d.n_layers):
                for s in ("resid", "residual", "attention", "q_pre", "q_post"):
                    want = got[s, layer][0, pos]
                    torch.testing.assert_close(
                        r.site(s)[e, layer], want.reshape(r.site(s)[e, layer].shape)
                    )
                torch.testing.assert_close(r.z[e, layer], got["heads", layer][0, pos])
            logits = got["logits"][0, p.spans.predict_pos, rec.label_ids]
            torch.testing.assert_close(r.label_logits[e], logits, atol=1e-4, rtol=1e-4)


def test_ft_records_are_the_finetuned_model_and_the_model_is_restored(records, models):
    model, rec = records("toy")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with il.finetuned(model, rec.demos, rec.lr, task=rec.task, tokenizer=rec.tokenizer):
        got = run_sites(model, torch.tensor([rec.zs_prompts[1].tokens]), ["residual"])
    pos = rec.zs_prompts[1].spans.record_pos
    torch.testing.assert_close(rec.ft.residual[1, 1], got["residual", 1][0, pos])
    assert not torch.allclose(rec.ft.residual, rec.zs.residual), "FT changed the outputs"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the shuffled-label FT trained on the same demonstrations with permuted labels
    assert [x.fields for x in rec.shuffled_demos] == [x.fields for x in rec.demos]
    assert sorted(x.label for x in rec.shuffled_demos) == sorted(x.label for x in rec.demos)


def test_token_strings_and_demo_tokens(records):
    model, rec = records("toy")
    tok = rec.tokenizer
    p = rec.icl_prompts[0]
    assert rec.icl_tokens[0] == [tok.decode([t]) for t in p.tokens]
    assert len(rec.zs_tokens[0]) == len(rec.zs_prompts[0].tokens)
    demo_pos = p.spans.demo_token_positions()
    assert rec.demo_tokens == [rec.icl_tokens[0][i] for i in demo_pos]
    assert "\n" not in rec.demo_tokens and "<bos>" not in rec.demo_tokens
    assert rec.demo_of_token.tolist() == p.spans.demo_of_position()
    assert rec.icl.demo_scores.shape == (len(rec), rec.n_layers, rec.n_heads, len(demo_pos))
    assert rec.ft_state.train_q.shape[1] == len(demo_pos)  # FT trained on the same tokens
    assert rec.zs.demo_scores is None and rec.ft.demo_mask is None


@pytest.mark.parametrize("name", ["toy", "gemma3"])
def test_readout_reproduces_the_label_logits(records, name):
    """With the final norm at each example's own scale, the readout gives the label logits up
    to one constant row (the norm's bias and b_U): differences between examples match."""
    model, rec = records(name)
    d = B.dims(model)
    final = []
    for p in rec.zs_prompts:
        got = run_sites(
            model, torch.tensor([p.tokens]), [], [f"blocks.{d.n_layers - 1}.hook_resid_post"]
        )
        final.append(got[f"blocks.{d.n_layers - 1}.hook_resid_post"][0, p.spans.predict_pos])
    x = torch.stack(final)
    ours = (x / rec.zs.final_scale[:, None]) @ rec.readout.T
    diff = rec.zs.label_logits - ours
    torch.testing.assert_close(diff, diff[:1].expand_as(diff), atol=1e-4, rtol=0)
    if B.post_attn_norm(model, 0) is None:
        assert torch.equal(rec.attn_readout, rec.readout[None].expand_as(rec.attn_readout))
    else:
        assert not torch.allclose(rec.attn_readout[0], rec.readout)


def test_post_norm_scales_are_recorded_where_there_is_one(records):
    _, gemma = records("gemma3")
    _, toy = records("toy")
    assert (gemma.zs.post_scale != 1).all() and (toy.zs.post_scale == 1).all()
    assert gemma.info["post_attn_norm"][0] == "blocks.0.ln1_post"
    assert toy.info["hooks"]["attention"] == "blocks.0.hook_attn_out"


def test_sites_subset_and_missing_site(models):
    model, tok = models("toy")
    rec = toy_records(model, tok, 3, n_demos=4, quiet=False, sites=["residual"], shuffled=False)
    assert rec.sites == ("residual",) and rec.icl.heads is None and rec.ft_shuffled is None
    with pytest.raises(ValueError, match="site 'heads' was not recorded"):
        rec.icl.site("heads")
    with pytest.raises(ValueError, match="unknown site"):
        circuit_records(model, toy_data(tok, 3), lr=0.05, tokenizer=tok, sites=["mlp"])


def test_a_site_that_never_fires_is_named(models, monkeypatch):
    model, tok = models("toy")
    monkeypatch.setattr(B, "attended_q_hooks", lambda model, layer, fn: [])
    with pytest.raises(NotImplementedError, match=r"site 'q_post'.*did not fire"):
        toy_records(model, tok, 2, n_demos=4, quiet=False, sites=["q_post"], shuffled=False)


def test_an_unknown_post_norm_layout_blocks_only_the_sites_that_need_it(models, monkeypatch):
    model, tok = models("toy")

    def unknown(model, layer):
        raise NotImplementedError(f"{B.architecture(model)}: site 'attention' is unknown here")

    monkeypatch.setattr(B, "post_attn_norm", unknown)
    kw = dict(lr=0.05, n_demos=4, n_eval=2, tokenizer=tok, shuffled=False)
    rec = circuit_records(model, toy_data(tok, 2), sites=["residual", "resid"], **kw)
    assert rec.info["post_attn_norm"] == [None, None]
    with pytest.raises(NotImplementedError, match="site 'attention'"):
        circuit_records(model, toy_data(tok, 2), sites=["heads"], **kw)


def test_one_label_demos_skip_the_shuffled_baseline(models):
    from icl_lens.data import TaskData

    model, tok = models("toy")
    data = toy_data(tok, 3)
    data = TaskData(data.task, data.eval, [x for x in data.demo_pool if x.label == 0], "toy", {})
    with pytest.warns(UserWarning, match="no shuffled-label FT"):
        rec = circuit_records(
            model, data, lr=0.05, n_demos=3, n_eval=3, tokenizer=tok, sites=["residual"]
        )
    assert rec.ft_shuffled is None and rec.conditions == ["zs", "icl", "ft"]


def test_label_position_records(models):
    model, tok = models("toy")
    rec = toy_records(model, tok, 3, n_demos=4, record="label", sites=["residual"])
    assert rec.record == "label"
    assert all(p.spans.record_pos == len(p.tokens) - 1 for p in rec.icl_prompts)
    with pytest.raises(ValueError, match="record='predict'"):
        il.circuit.dla(rec)


@pytest.mark.slow
def test_real_gemma3_sites_records_and_patching():
    """Gemma-3-270m (offline bundle): the sites hold their identities on the real model."""
    from icl_lens.circuit import attribution as A
    from icl_lens.circuit import patching as P
    from icl_lens.models import load_model

    model = load_model("gemma-3-270m", progress=False)
    rec = circuit_records(model, "sst2", seed=0, lr=1e-4, n_eval=3, n_demos=3, batch_size=3)
    assert rec.info["post_attn_norm"][0] == "blocks.0.ln1_post"
    heads = rec.icl.heads.sum(2) + rec.b_o
    torch.testing.assert_close(heads, rec.icl.attention, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(rec.icl.attention, rec.icl.residual, atol=1e-2)
    assert not torch.allclose(rec.icl.q_pre, rec.icl.q_post, atol=1e-2)
    torch.testing.assert_close(
        A.dla(rec, "icl", "heads").sum(-1), A.dla(rec, "icl", "attention"), atol=1e-5, rtol=1e-5
    )
    layer = 9
    value = rec.zs.residual[:, layer] + rec.update("icl", "residual")[:, layer]
    got = P.patched_label_logits(model, rec.icl_prompts, rec.label_ids, layer, value)
    torch.testing.assert_close(got, rec.icl.label_logits, atol=2e-3, rtol=1e-3)


def test_half_precision_update_passes_run_in_float32_and_patching_refuses_the_mix(models):
    """On a bf16 model, circuit_records' ZS and FT passes (FT's update) run in float32 by
    default: they equal the records of the same model converted to float32 by TL's own ``.to``
    (ICL, in bf16, does not), and the model is its own afterwards. Patching, whose passes run in
    the model's dtype, refuses such records and takes ``update_capture_dtype="model"`` ones."""
    import copy
    import warnings

    from icl_lens.circuit import patch_curves

    model, tok = models("toy")
    half = copy.deepcopy(model).to(torch.bfloat16)
    upcast = copy.deepcopy(half).to(torch.float32)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    kw = dict(seed=0, lr=0.05, n_eval=4, n_demos=6, tokenizer=tok, shuffled=False,
              sites=("residual",))  # fmt: skip
    data = toy_data(tok)
    rec = circuit_records(half, data, **kw)
    ref = circuit_records(upcast, data, **kw)
    own = circuit_records(half, data, update_capture_dtype="model", **kw)
    assert rec.update_capture_dtype == "float32" and own.update_capture_dtype == "model"
    for cond in ("zs", "ft"):
        torch.testing.assert_close(rec[cond].residual, ref[cond].residual, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(own[cond].residual, ref[cond].residual, rtol=1e-4, atol=1e-4)
    update = (rec.ft.residual - rec.zs.residual, ref.ft.residual - ref.zs.residual)
    torch.testing.assert_close(*update, rtol=1e-3, atol=1e-4)
    for k, v in half.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="update_capture_dtype='model'"):
        patch_curves(half, rec, n_boot=10)
    with warnings.catch_warnings():  # a toy's unstable ratios and the missing shuffled FT
        warnings.simplefilter("ignore", UserWarning)
        assert len(patch_curves(half, own, layers=[0], n_boot=10).frame)
    with pytest.raises(ValueError, match="update_capture_dtype"):
        circuit_records(half, data, update_capture_dtype="half", **kw)
