"""plots: every figure is written, tolerates missing metrics, and draws the frame's numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_lens import plots
from icl_lens.data import TaskData
from icl_lens.experiment import run_experiment
from icl_lens.results import Results, atomic_write_json
from icl_lens.toy import ToyTokenizer, load_toy, toy_episode, toy_task

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["accuracy", "simaou", "simam", "kendall", "layers", "lr_sensitivity", "rec2ftp", "dual"]
FAST = dict(n_demos=8, n_eval=24, seeds=(0, 1), lr_grid=(0.01, 0.1, 1.0), n_heldout=8,
            n_boot=100, progress=False, dual=True)  # fmt: skip


def _toy():
    """The committed toy, or (before it exists) a random one: plots need numbers, not skill."""
    try:
        return load_toy()
    except FileNotFoundError:
        from icl_lens.backend import toy_model

        tok = ToyTokenizer()
        return toy_model(2, 32, 4, tok.vocab_size, 128, seed=0), tok, toy_task(2)


@pytest.fixture(scope="module")
def results() -> Results:
    model, tok, task = _toy()
    pool, evals = toy_episode(seed=0, n_demos=16, n_eval=24, tokenizer=tok)
    data = TaskData(task, evals, pool, "toy", {"source": "toy_episode", "seed": 0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a shared machine
    try:
        return run_experiment(model, task, data=data, tokenizer=tok, **FAST)
    finally:
        torch.set_num_threads(threads)


def _expected(frame, group, metric, variant, scale=1.0):
    sel = frame[(frame.task == group) & (frame.metric == metric) & (frame.variant == variant)
                & (frame.layer == "mean")]  # fmt: skip
    return sel.value.dropna().mean() * scale


def _bars(fig):
    """{gid: height} of every bar drawn for a (group, metric, variant)."""
    return {p.get_gid(): p.get_height() for ax in fig.axes for p in ax.patches if p.get_gid()}


def test_make_all_writes_every_figure(results, tmp_path):
    paths = plots.make_all(results, tmp_path)
    want = {tmp_path / f"{n}.{fmt}" for n in NAMES for fmt in ("png", "pdf")}
    assert set(paths) == want
    for p in paths:
        head = p.read_bytes()[:4]
        assert head == (b"\x89PNG" if p.suffix == ".png" else b"%PDF"), p
        assert p.stat().st_size > 5000, p


def test_accuracy_bars_are_the_frame_values(results):
    frame = results.to_frame()
    bars = _bars(plots.accuracy(results))
    assert {"toy_icl|accuracy|zs", "toy_icl|accuracy|icl", "toy_icl|accuracy|ft"} <= set(bars)
    assert "toy_icl|accuracy|untrained_icl" in bars and "toy_icl|accuracy|ft_shuffled" in bars
    for gid, height in bars.items():
        group, metric, variant = gid.split("|")
        want = _expected(frame, group, metric, variant, 100.0)
        assert height == pytest.approx(want, abs=1e-9), gid
    # the mean over the two seeds, not one seed's value
    per_seed = frame[(frame.metric == "accuracy") & (frame.variant == "icl")].value
    assert len(per_seed) == 2
    assert bars["toy_icl|accuracy|icl"] == pytest.approx(per_seed.mean() * 100)


@pytest.mark.parametrize("name", ["simaou", "simam", "kendall", "rec2ftp", "dual"])
def test_other_bar_figures_draw_the_frame_values(results, name):
    frame = results.to_frame()
    bars = _bars(plots.FIGURES[name](results))
    assert bars
    for gid, height in bars.items():
        group, metric, variant = gid.split("|")
        scale = 100.0 if metric == "change_agreement" else 1.0
        assert height == pytest.approx(_expected(frame, group, metric, variant, scale)), gid


def test_rec2ftp_counts_annotated(results):
    counts = [r.diagnostics["rec2ftp_counts"] for r in results.runs]
    k = sum(c["also_icl_right"] for c in counts)
    n = sum(c["zs_wrong_ft_right"] for c in counts)
    texts = [t.get_text() for ax in plots.rec2ftp(results).axes for t in ax.texts]
    assert any(t.split("\n")[0] == f"{k}/{n}" for t in texts), texts
    assert any(t.endswith("undefined") for t in texts) == (n == 0)


def test_layer_curves_are_per_layer_means(results):
    frame = results.to_frame()
    fig = plots.layers(results)
    ax = fig.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "FT")
    sel = frame[(frame.metric == "simaou") & (frame.variant == "ft") & (frame.layer != "mean")]
    want = sel.groupby(sel.layer.astype(int)).value.mean()
    np.testing.assert_allclose(line.get_xdata(), want.index.to_numpy())
    np.testing.assert_allclose(line.get_ydata(), want.to_numpy())


def test_missing_baselines_are_skipped(results, tmp_path):
    frame = results.to_frame()
    bare = frame[frame.kind.isin(["result", "diagnostic"])]
    paths = plots.make_all(bare, tmp_path, formats=("png",))
    assert {p.stem for p in paths} == set(NAMES) - {"lr_sensitivity"}
    bars = _bars(plots.accuracy(bare))
    assert {g.split("|")[2] for g in bars} == {"zs", "icl", "ft"}
    assert {g.split("|")[2] for g in _bars(plots.simaou(bare))} == {"ft"}
    only_acc = frame[frame.metric == "accuracy"]
    paths = plots.make_all(only_acc, tmp_path / "acc", formats=("pdf",))
    assert [p.name for p in paths] == ["accuracy.pdf", "lr_sensitivity.pdf"]
    with pytest.raises(plots.MissingMetricsError, match="SimAOU"):
        plots.simaou(only_acc)


def test_frames_without_cis_and_bad_inputs(results):
    frame = results.to_frame()
    one = frame[frame.seed == 0].assign(ci_low=np.nan, ci_high=np.nan)
    for name in NAMES:
        plots.FIGURES[name](one)  # a single seed with no CIs draws without error bars
    with pytest.raises(TypeError, match="Results"):
        plots.accuracy({"value": 1})
    with pytest.raises(ValueError, match="columns"):
        plots.accuracy(frame.drop(columns=["ci_low"]))
    with pytest.raises(plots.MissingMetricsError):
        plots.accuracy(frame.iloc[:0])


def test_figures_main_and_script(results, tmp_path):
    run_dir = tmp_path / "runs"
    for run in results.runs:
        atomic_write_json(run_dir / run.task / f"seed{run.seed}.json", run.to_json())
    paths = plots.figures_main(str(run_dir), None, formats=("png",))
    assert {p.parent for p in paths} == {run_dir / "figures"}
    assert sorted(p.stem for p in paths) == sorted(NAMES)
    saved = results.save(tmp_path / "all.json")
    out = tmp_path / "script_out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "make_figures.py"), str(saved), "-o", str(out),
         "--formats", "png"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(NAMES)
    with pytest.raises(FileNotFoundError):
        plots.figures_main(str(tmp_path / "nowhere"), None)


def _errorbar_half_widths(fig):
    """The vertical extents of every drawn error bar, in drawing order."""
    spans = []
    for ax in fig.axes:
        for coll in ax.collections:
            segs = getattr(coll, "get_segments", lambda: [])()
            vertical = [s for s in segs if len(s) == 2 and s[0][0] == s[1][0]]
            spans += [abs(s[1][1] - s[0][1]) / 2 for s in vertical]
    return spans


def test_error_bars_are_seed_spread_with_several_seeds_and_the_ci_with_one(results):
    from scipy import stats

    frame = results.to_frame()
    sel = (frame.metric == "simaou") & (frame.variant == "ft") & (frame.layer == "mean")
    vals = frame[sel].sort_values("seed").value.to_numpy(float)
    assert len(vals) == 2
    half = stats.t.ppf(0.975, 1) * vals.std(ddof=1) / np.sqrt(2)  # by hand: t-interval of 2
    st = plots._stat(frame[sel])
    assert st.value == pytest.approx(vals.mean())
    assert (st.hi - st.lo) / 2 == pytest.approx(half)
    one = frame[sel & (frame.seed == 0)]
    st1 = plots._stat(one)
    assert (st1.lo, st1.hi) == (one.ci_low.iloc[0], one.ci_high.iloc[0])
    fig = plots.simaou(frame)
    assert "t-interval over seeds" in fig._supxlabel.get_text()
    assert any(h == pytest.approx(half) for h in _errorbar_half_widths(fig))
    assert "bootstrap CI" in plots.simaou(frame[frame.seed == 0])._supxlabel.get_text()


def test_lr_sensitivity_has_no_empty_panel_and_one_legend(results):
    fig = plots.lr_sensitivity(results)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert all(ax.lines for ax in visible)  # every visible panel draws something
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(set(labels)) and "FT accuracy" in labels


def test_patching_curves_are_per_layer_means_and_skipped_without_rows(results):
    import pandas as pd

    frame = results.to_frame()
    with pytest.raises(plots.MissingMetricsError, match="patching=True"):
        plots.patching(frame)
    rng = np.random.default_rng(0)
    rows = [
        {**frame.iloc[0].to_dict(), "metric": "patch_survival", "variant": f"{d}:{v}",
         "layer": str(layer), "seed": seed, "value": rng.normal(), "ci_low": None,
         "ci_high": None}
        for d, vs in [("icl_to_ft", ("ft", "ft_shuffled", "random", "zero")),
                      ("ft_to_icl", ("icl", "ft_shuffled", "random", "zero"))]
        for v in vs for layer in (0, 1) for seed in (0, 1)
    ]  # fmt: skip
    both = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
    fig = plots.patching(both)
    for ax, direction, label, v in [(fig.axes[0], "icl_to_ft", "by FT's", "ft"),
                                    (fig.axes[1], "ft_to_icl", "by ICL's", "icl")]:  # fmt: skip
        line = next(ln for ln in ax.get_lines() if ln.get_label() == label)
        sel = both[(both.metric == "patch_survival") & (both.variant == f"{direction}:{v}")]
        want = sel.groupby(sel.layer.astype(int)).value.mean()
        np.testing.assert_allclose(line.get_xdata(), want.index.to_numpy())
        np.testing.assert_allclose(line.get_ydata(), want.to_numpy())
