"""Attribution: per-head SimAOU against a naive loop, DLA sums, hand-computed directions."""

from __future__ import annotations

import math

import pytest
import torch

from icl_lens import metrics as M
from icl_lens.circuit import attribution as A
from tests.circuit.conftest import MODELS, NO_POST_NORM


def naive_simaou(zs, icl, ft):
    """The SimAOU recipe written out for one vector triple."""
    z, i, f = (x.double() / x.double().norm() for x in (zs, icl, ft))
    a, b = i - z, f - z
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", ["toy", "gemma3"])
def test_head_simaou_against_a_naive_loop(records, name):
    _, rec = records(name)
    got = A.head_simaou(rec.zs.heads, rec.icl.heads, rec.ft.heads)
    assert got.shape == (len(rec), rec.n_layers, rec.n_heads)
    for e in range(len(rec)):
        for layer in range(rec.n_layers):
            for h in range(rec.n_heads):
                want = naive_simaou(*(rec[c].heads[e, layer, h] for c in ("zs", "icl", "ft")))
                assert math.isclose(float(got[e, layer, h]), want, abs_tol=1e-9)


def test_update_similarity_reuses_the_metrics(records):
    _, rec = records("toy")
    sim = A.site_similarity(rec, "resid")
    z, i, f = rec.zs.resid, rec.icl.resid, rec.ft.resid
    assert torch.equal(sim.simaou, M.simaou(z, i, f))
    assert torch.equal(sim.null, M.shared_origin_null(z, i, f))
    assert torch.equal(sim.orthogonal, M.simaou_orthogonal(z, i, f))
    assert list(sim.means().columns) == ["simaou", "null", "orthogonal"]
    shuffled = A.site_similarity(rec, "resid", other="ft_shuffled")
    assert torch.equal(shuffled.simaou, M.simaou(z, i, rec.ft_shuffled.resid))
    with pytest.raises(ValueError, match="queries"):
        A.site_similarity(rec, "q_pre")


def test_logit_diff_direction_by_hand():
    readout = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # 3 labels, d_model 2
    got = A.logit_diff_direction(readout, torch.tensor([0, 2]))
    want = torch.tensor([[1 - 1.5, 0 - 2.5], [3 - 0.5, 3 - 1.0]])
    torch.testing.assert_close(got, want)
    per_layer = A.logit_diff_direction(torch.stack([readout, 2 * readout]), torch.tensor([1]))
    assert per_layer.shape == (1, 2, 2)
    torch.testing.assert_close(per_layer[0, 1], 2 * per_layer[0, 0])
    dla = A.direct_logit_attribution(torch.tensor([[2.0, 1.0]]), want[:1], torch.tensor([2.0]))
    assert float(dla) == pytest.approx((2 * -0.5 + 1 * -2.5) / 2)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("condition", ["icl", "ft"])
def test_head_dla_sums_to_the_layer_dla(records, name, condition):
    """Heads sum to the layer's attention-site update (b_O cancels), so their DLA sums to its
    DLA; without a post-attention norm that is the residual-site DLA too."""
    _, rec = records(name)
    heads = A.dla(rec, condition, "heads")
    attention = A.dla(rec, condition, "attention")
    assert heads.shape == (len(rec), rec.n_layers, rec.n_heads)
    torch.testing.assert_close(heads.sum(-1), attention, atol=1e-5, rtol=1e-5)
    residual = A.dla(rec, condition, "residual")
    if name in NO_POST_NORM:
        torch.testing.assert_close(attention, residual, atol=1e-5, rtol=1e-5)
    else:  # through the post-norm held at ZS's scale: close only to first order, not equal
        assert not torch.allclose(attention, residual, atol=1e-6)


def test_dla_matches_the_readout_by_hand(records):
    _, rec = records("toy")
    got = A.dla(rec, "icl", "residual")
    e, layer = 2, 1
    delta = rec.icl.residual[e, layer] - rec.zs.residual[e, layer]
    gold = int(rec.labels[e])
    direction = rec.readout[gold] - rec.readout[1 - gold]  # two labels
    want = float(delta.double() @ direction.double()) / float(rec.zs.final_scale[e])
    assert float(got[e, layer]) == pytest.approx(want, rel=1e-6)


def test_tables(records):
    _, rec = records("toy")
    heads = A.head_table(rec)
    assert len(heads) == rec.n_layers * rec.n_heads
    assert {"layer", "head", "simaou", "null", "orthogonal", "dla_icl", "dla_ft"} <= set(heads)
    assert heads.loc[3, "dla_icl"] == pytest.approx(
        float(A.dla(rec, "icl", "heads")[:, 0, 3].mean())
    )
    layers = A.layer_table(rec)
    assert len(layers) == rec.n_layers
    assert {"resid_simaou", "residual_null", "attention_orthogonal", "dla_icl"} <= set(layers)
