"""Patching: hand-checked end points (the update itself, no update) and the curves' bookkeeping."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import icl_lens as il
from icl_lens import metrics as M
from icl_lens.circuit import patching as P
from tests.circuit.conftest import MODELS, toy_records


@pytest.mark.parametrize("name", list(MODELS))
def test_putting_icl_its_own_update_restores_its_logits(records, name):
    """ZS value + ΔICL at any patch site gives back ICL's logits: the records, the position
    and the patch hooks agree with the ICL run."""
    model, rec = records(name)
    want = rec.icl.label_logits
    for layer in range(rec.n_layers):
        value = rec.zs.residual[:, layer] + rec.update("icl", "residual")[:, layer]
        got = P.patched_label_logits(model, rec.icl_prompts, rec.label_ids, layer, value)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        z = rec.zs.z[:, layer] + (rec.icl.z - rec.zs.z)[:, layer]
        got = P.patched_label_logits(
            model, rec.icl_prompts, rec.label_ids, layer, z, site="attention"
        )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        got = P.patched_label_logits(
            model, rec.icl_prompts, rec.label_ids, layer, z[:, 1], site="attention", head=1
        )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and a real patch moves them
    moved = P.patched_label_logits(
        model, rec.icl_prompts, rec.label_ids, rec.n_layers - 1, rec.zs.residual[:, -1]
    )
    assert not torch.allclose(moved, want, atol=1e-3)


def test_putting_ft_its_own_update_restores_its_logits(records):
    model, rec = records("gemma3")
    with il.finetuned(model, rec.demos, rec.lr, task=rec.task, tokenizer=rec.tokenizer):
        got = P.patched_label_logits(model, rec.zs_prompts, rec.label_ids, 1, rec.ft.residual[:, 1])
    torch.testing.assert_close(got, rec.ft.label_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("site", ["residual", "attention"])
def test_zero_update_in_a_one_layer_rotary_toy_gives_zs_logits(models, site):
    """One attention-only layer and no positional embedding in the stream: the prediction
    row's residual is its token embedding plus the attention output, so putting ZS's attention
    output there gives exactly ZS's logits."""
    model, tok = models("toy1")
    rec = toy_records(model, tok, 4, n_demos=6, sites=["residual", "heads"], shuffled=False)
    value = rec.zs.residual[:, 0] if site == "residual" else rec.zs.z[:, 0]
    got = P.patched_label_logits(model, rec.icl_prompts, rec.label_ids, 0, value, site=site)
    torch.testing.assert_close(got, rec.zs.label_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rec.icl.label_logits, rec.zs.label_logits, atol=1e-3)


def test_label_logit_diff_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 1.0, 5.0]])
    got = P.label_logit_diff(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(got, torch.tensor([3 - 1.5, 0 - 3.0], dtype=torch.float64))


def test_survival_is_a_ratio_of_means_with_a_joint_bootstrap():
    moved = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, -1.0], [2.0, 0.0]])
    base = torch.tensor([2.0, 2.0, 4.0, 4.0])
    frac, low, high = P.survival(moved, base, n_boot=500, seed=3)
    torch.testing.assert_close(frac, torch.tensor([8 / 12, 0.0], dtype=torch.float64))
    # the interval of a ratio of means over jointly resampled examples, by hand
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 4, size=(500, 4))
    ratios = moved.double().numpy()[idx].mean(1) / base.double().numpy()[idx].mean(1)[:, None]
    want = np.quantile(ratios, [0.025, 0.975], axis=0)
    np.testing.assert_allclose(low.numpy(), want[0], rtol=1e-9)
    np.testing.assert_allclose(high.numpy(), want[1], rtol=1e-9)
    frac, *_ = P.survival(moved, torch.zeros(4), n_boot=0)
    assert torch.isnan(frac).all() or torch.isinf(frac).any()


def test_new_updates_are_norm_matched(records):
    model, rec = records("toy")
    units = P._units(rec, "residual", False)
    target = P._norms(units["icl"][1] - units["zs"][1], 2)
    gen = torch.Generator().manual_seed(0)
    for variant in ("ft", "ft_shuffled", "random"):
        new = P._new_update(rec, units, variant, 1, None, target, 2, gen)
        torch.testing.assert_close(new.norm(dim=-1), target[:, 1])
    ft = P._new_update(rec, units, "ft", 1, None, target, 2, gen)
    cos = torch.nn.functional.cosine_similarity(ft, rec.update("ft", "residual")[:, 1], dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    assert torch.equal(
        P._new_update(rec, units, "zero", 1, None, target, 2, gen), torch.zeros(5, 32)
    )
    # z space: the output-space norm (through W_O) is matched, for all heads and for one
    for heads, head in ((False, None), (True, 2)):
        units = P._units(rec, "attention", heads)
        dims = 3 if heads else 2
        target = P._norms(units["icl"][1] - units["zs"][1], dims)
        for variant in ("ft", "random"):
            new = P._new_update(rec, units, variant, 0, head, target, dims, gen)
            if head is None:
                out = il.circuit.head_outputs(new, rec.w_o[0]).sum(1)
                want = target[:, 0]
            else:
                out = il.circuit.head_outputs(new[:, None], rec.w_o[0, head][None])[:, 0]
                want = target[:, 0, head]
            torch.testing.assert_close(out.norm(dim=-1), want, atol=1e-4, rtol=1e-4)


def test_patch_curves_frame(records):
    model, rec = records("toy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = P.patch_curves(model, rec, n_boot=50)
        heads = P.patch_curves(
            model, rec, heads=True, directions=["icl_to_ft"], layers=[1], n_boot=0
        )
    assert set(res.frame.direction) == {"icl_to_ft", "ft_to_icl"}
    assert set(res.curve("icl_to_ft").variant) == {"ft", "ft_shuffled", "random", "zero"}
    assert set(res.curve("ft_to_icl").variant) == {"icl", "ft_shuffled", "random", "zero"}
    assert len(res.frame) == 2 * 4 * rec.n_layers and (res.frame["head"] == -1).all()
    # the frame's fraction is the ratio of the kept per-example means
    row = res.frame.iloc[0]
    moved = res.moved[(row.direction, row.variant)][:, row.layer]
    assert row.fraction == pytest.approx(float(moved.mean() / res.base[row.direction].mean()))
    assert row.base_mean == pytest.approx(float(res.base[row.direction].mean()))
    assert len(heads.frame) == 4 * rec.n_heads and set(heads.frame["head"]) == set(range(4))
    # a layer's rows (the random baseline's too) do not depend on which other layers are patched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = P.patch_curves(model, rec, layers=[1], n_boot=50)
    full = res.frame[res.frame.layer == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(one.frame, full)
    assert heads.info["site"] == "attention"
    # the model is left as it was (the FT run re-trains and restores)
    model2, rec2 = records("toy")
    got = P.patched_label_logits(model2, rec2.zs_prompts, rec2.label_ids, 0, rec2.zs.residual[:, 0])
    torch.testing.assert_close(got, rec2.zs.label_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*within 2 standard errors")
def test_patch_curves_refusals(records, models):
    model, rec = records("toy")
    with pytest.raises(ValueError, match="direction"):
        P.patch_curves(model, rec, directions=["sideways"])
    with pytest.raises(ValueError, match="patch site"):
        P.patch_curves(model, rec, site="resid")
    tok = models("toy")[1]
    only = toy_records(model, tok, 3, n_demos=4, sites=["resid"], shuffled=False)
    with pytest.raises(ValueError, match="needs site 'residual'"):
        P.patch_curves(model, only)
    with pytest.warns(UserWarning, match="shuffled-label"):
        kw = {"sites": ["residual"], "shuffled": False}
        only_res = toy_records(model, tok, 3, n_demos=4, quiet=False, **kw)
        res = P.patch_curves(model, only_res, directions=["icl_to_ft"], n_boot=0)
    assert "ft_shuffled" not in set(res.frame.variant)


def test_unstable_base_change_warns(records):
    model, rec = records("toy")
    rec0 = dataclasses.replace(rec, ft=rec.zs)  # FT "changes" nothing: its mean change is 0
    with pytest.warns(UserWarning, match="within 2 standard errors"):
        P.patch_curves(model, rec0, directions=["ft_to_icl"], layers=[0], n_boot=0)


def test_metrics_bootstrap_is_the_one_used(records, monkeypatch):
    calls = []
    real = M.bootstrap_ci

    def spy(*args, **kwargs):
        calls.append(kwargs.get("n_boot"))
        return real(*args, **kwargs)

    monkeypatch.setattr(M, "bootstrap_ci", spy)
    P.survival(torch.ones(3, 2), torch.ones(3), n_boot=7)
    assert calls == [7]
