"""Views: the attention frame's columns against hand computations; the figures draw."""

from __future__ import annotations

import warnings

import matplotlib
import pytest
import torch

from icl_lens.circuit import patching as P
from icl_lens.circuit import views as V
from tests.circuit.conftest import run_sites, toy_records

matplotlib.use("Agg")


@pytest.mark.parametrize("name", ["toy", "gemma3"])
def test_attention_frame_by_hand(records, name):
    model, rec = records(name)
    e, layer = 1, rec.n_layers - 1
    frame = V.attention_frame(rec, e, layer)
    assert list(frame.columns) == [
        "token",
        "demo",
        "visible",
        "icl_pattern",
        "icl_weights",
        "ft_dual",
    ]
    assert list(frame.token) == rec.demo_tokens and len(frame) == rec.ft_state.train_q.shape[1]
    # ICL: the model's own pattern row at the recorded position, mean over heads
    p = rec.icl_prompts[e]
    name_ = f"blocks.{layer}.attn.hook_pattern"
    got = run_sites(model, torch.tensor([p.tokens]), [], [name_])[name_]
    row = got[0, :, p.spans.record_pos, p.spans.demo_token_positions()].mean(0)
    torch.testing.assert_close(
        torch.tensor(frame.icl_pattern.values), row.double(), atol=1e-6, rtol=0
    )
    vis = torch.tensor(frame.visible.values)
    assert frame.icl_weights[vis.numpy()].sum() == pytest.approx(1.0)
    assert (frame.icl_weights[~vis.numpy()] == 0).all()
    # FT: softmax over the trained tokens of q_test · q_i, both scaled by attn_scale ** -0.5
    q = rec.ft.q_pre[e, layer].flatten().double() / float(rec.attn_scale[layer]) ** 0.5
    logits = rec.ft_state.train_q[layer].double() @ q
    want = logits.masked_fill(~vis, float("-inf")).softmax(-1)
    torch.testing.assert_close(torch.tensor(frame.ft_dual.values), want, atol=1e-9, rtol=1e-7)
    if name == "gemma3":  # the sliding window hides early demonstration tokens in layer 0
        assert not V.attention_frame(rec, e, 0).visible.all()
    one = V.attention_frame(rec, e, layer, head=0)
    torch.testing.assert_close(
        torch.tensor(one.icl_pattern.values),
        got[0, 0, p.spans.record_pos, p.spans.demo_token_positions()].double(),
    )


def test_circuitsvis_view_carries_the_frames_tokens_and_weights(records, monkeypatch):
    """The interactive view shows exactly :func:`attention_frame`'s three columns; without
    circuitsvis the error names the extra. Only the inlined (offline) source is read: asking
    for ``_repr_html_`` would make circuitsvis probe the network."""
    import json
    import re
    import sys

    pytest.importorskip("circuitsvis")
    _, rec = records("toy")
    frame = V.attention_frame(rec, 0, 1, head=1)
    view = V.attention_view(rec, example=0, layer=1, head=1, backend="circuitsvis")
    props = re.search(r"CircuitsVis\.ColoredTokensMulti,\s*(\{.*\})\s*\)", view.local_src, re.S)
    props = json.loads(props.group(1))
    assert props["tokens"] == rec.demo_tokens
    got = torch.tensor(props["values"], dtype=torch.float64)
    want = torch.tensor(frame[["icl_pattern", "icl_weights", "ft_dual"]].to_numpy())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert props["labels"][0] == "ICL attention (head 1)"
    monkeypatch.setitem(sys.modules, "circuitsvis.tokens", None)
    with pytest.raises(ImportError, match=r"icl-lens\[circuitsvis\]"):
        V.attention_view(rec, backend="circuitsvis")
    with pytest.raises(ValueError, match="ax= is for the matplotlib backend"):
        V.attention_view(rec, backend="circuitsvis", ax=object())
    with pytest.raises(ValueError, match="backend must be"):
        V.attention_view(rec, backend="plotly")


def test_figures_draw(records):
    import matplotlib.pyplot as plt

    model, rec = records("toy")
    fig = V.attention_view(rec, example=0, layer=1)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [repr(t)[1:-1] for t in rec.demo_tokens]
    assert len(ax.patches) >= 3 * len(rec.demo_tokens)
    plt.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = P.patch_curves(model, rec, directions=["icl_to_ft"], n_boot=20)
        heads = P.patch_curves(
            model, rec, directions=["icl_to_ft"], heads=True, layers=[1], n_boot=0
        )
    fig = V.plot_patching(res)
    assert len(fig.axes[0].lines) >= 4
    plt.close(fig)
    fig = V.plot_patching(heads)
    assert fig.axes[0].get_xticklabels()[0].get_text() == "L1H0"
    plt.close(fig)
    with pytest.raises(ValueError, match="no 'ft_to_icl' rows"):
        V.plot_patching(res, "ft_to_icl")


def test_attention_frame_needs_demos_and_q_pre(models):

    model, tok = models("toy")
    rec = toy_records(model, tok, 2, n_demos=4, sites=["residual"], shuffled=False)
    with pytest.raises(ValueError, match="q_pre"):
        V.attention_frame(rec)


@pytest.mark.parametrize("name", ["toy", "gemma3"])
def test_plot_where_draws_the_tables_it_is_built_from(records, name):
    from icl_lens.circuit.attribution import head_table, layer_table

    _, rec = records(name)
    fig = V.plot_where(rec)
    layers, heads = layer_table(rec), head_table(rec)
    lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].lines}
    for site in ("resid", "residual", "attention"):
        torch.testing.assert_close(torch.tensor(lines[site], dtype=torch.float64),
                                   torch.tensor(layers[f"{site}_simaou"].values))  # fmt: skip
    grid = fig.axes[1].images[0].get_array()
    assert grid.shape == (rec.n_layers, rec.n_heads)
    want = heads.set_index(["layer", "head"]).simaou
    assert grid[rec.n_layers - 1, 0] == pytest.approx(want[(rec.n_layers - 1, 0)])
    assert ("dla_icl" in heads) == (len(fig.axes) == 5)  # 3 panels + 2 colour bars
