"""experiment: invariants, the end-to-end run on the trained toy, resuming, determinism."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from icl_lens import backend as B
from icl_lens import experiment as E
from icl_lens import metrics as M
from icl_lens.capture import capture
from icl_lens.data import TaskData
from icl_lens.results import Results, RunResult, atomic_write_json
from icl_lens.tasks import build_prompt, label_token_ids
from icl_lens.toy import ToyTokenizer, load_toy, toy_episode, toy_task


def _layer0_rows(positional: str):
    tok = ToyTokenizer()
    task = toy_task(2)
    model = B.toy_model(2, 32, 4, tok.vocab_size, 128, seed=0,
                        positional_embedding_type=positional)  # fmt: skip
    demos, evals = toy_episode(seed=2, n_demos=6, n_eval=4, tokenizer=tok)
    ids = label_token_ids(task, tok)
    zs = capture(model, [build_prompt(task, tok, q) for q in evals], ids, "zs", progress=False)
    icl = capture(model, [build_prompt(task, tok, q, demos) for q in evals], ids, progress=False)
    return zs, icl


def test_rotary_layer0_rows_equal_so_simam_before_is_one():
    """Rotary scores depend on relative positions only, and layer 0's inputs are the token
    embeddings alone, so the query's own score rows cannot see that demonstrations came first."""
    zs, icl = _layer0_rows("rotary")
    assert (zs.query_scores[:, 0] - icl.query_scores[:, 0]).abs().max() < 1e-5
    before = M.simam(icl.query_scores, zs.query_scores, icl.query_mask.unsqueeze(2))
    assert torch.allclose(before[:, 0], torch.ones_like(before[:, 0]), atol=1e-6)
    # layer 1 has mixed in the demonstrations, so there the rows differ
    assert (zs.query_scores[:, 1] - icl.query_scores[:, 1]).abs().max() > 1e-3


def test_absolute_positions_break_the_layer0_invariant():
    """With learned absolute position embeddings, the query's tokens sit at later positions
    when demonstrations precede them, so their layer-0 inputs (token + position embedding),
    hence their q/k and scores, change even though no demonstration was attended to."""
    zs, icl = _layer0_rows("standard")
    assert (zs.query_scores[:, 0] - icl.query_scores[:, 0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def toy_setup():
    model, tok, task = load_toy()
    pool, evals = toy_episode(seed=0, n_demos=40, n_eval=48, tokenizer=tok)
    data = TaskData(task, evals, pool, "toy", {"source": "toy_episode", "seed": 0})
    return model, tok, data


FAST = dict(n_demos=24, n_eval=48, seeds=(0,), lr_grid=(0.01, 0.1, 1.0), n_heldout=8,
            n_boot=200, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def toy_results(toy_setup):
    model, tok, data = toy_setup
    return E.run_experiment(model, data.task, data=data, tokenizer=tok, **FAST)


EXPECTED = {
    ("accuracy", "zs"), ("accuracy", "icl"), ("accuracy", "ft"),
    ("rec2ftp", "ft"), ("rec2ftp", "chance"), ("change_agreement", "ft"),
    ("simaou", "ft"), ("simaou", "uniform"), ("simaou", "gaussian"), ("simaou", "untrained"),
    ("simaou", "ft_shuffled"), ("simaou", "ft_layer_causal"),
    ("simaou_null", "ft"), ("simaou_orthogonal", "ft"),
    ("simam_before", "icl_vs_zs"), ("simam_after", "ft"), ("simam_before_centered", "icl_vs_zs"),
    ("simam_after_centered", "ft"), ("simam_delta", "ft"),
    ("kendall_token", "ft"), ("kendall_example", "ft"), ("kendall_token", "uniform"),
    ("kendall_token", "untrained"),
}  # fmt: skip


def test_every_metric_and_baseline_present_and_finite(toy_results):
    f = toy_results.to_frame()
    overall = f[f.layer == "mean"]
    have = set(zip(overall.metric, overall.variant, strict=True))
    assert EXPECTED <= have, EXPECTED - have
    for metric, variant in EXPECTED:
        row = overall[(overall.metric == metric) & (overall.variant == variant)].iloc[0]
        assert row.value == row.value and abs(row.value) < 1e6, (metric, variant, row.value)
        if metric != "rec2ftp" or variant == "ft":
            if row.ci_low == row.ci_low:  # CIs exist for estimated means
                assert row.ci_low - 1e-9 <= row.value <= row.ci_high + 1e-9, (metric, variant)
    with_ci = overall[overall.ci_low.notna()]
    assert len(with_ci) >= 15
    # per-layer rows exist for the layered metrics
    n_layers = B.dims(load_toy()[0]).n_layers
    simaou_layers = f[(f.metric == "simaou") & (f.variant == "ft") & (f.layer != "mean")]
    assert len(simaou_layers) == n_layers


def test_trained_toy_learns_in_context(toy_results):
    acc = toy_results.summary().iloc[0]
    assert acc["ICL acc"] > acc["ZSL acc"] + 20


def test_summary_and_provenance(toy_setup, toy_results):
    table = toy_results.summary()
    assert list(table.index) == ["toy_icl"]
    for col in ("ZSL acc", "FT acc", "ICL acc", "SimAOU", "SimAOU null", "SimAM before",
                "SimAM after", "Kendall", "Kendall random"):  # fmt: skip
        assert col in table.columns
    prov = toy_results.runs[0].provenance
    for key in ("model", "transformer_lens", "icl_lens", "data", "eval_ids", "demo_ids", "seed",
                "lr", "record_position", "lr_selection"):  # fmt: skip
        assert key in prov, key
    assert len(prov["demo_ids"]) == 24 and len(prov["eval_ids"]) == 48
    assert prov["lr"] in FAST["lr_grid"]
    assert set(prov["lr_selection"]["heldout_ids"]).isdisjoint(prov["demo_ids"])
    diag = toy_results.runs[0].diagnostics
    assert set(diag["label_distribution"]) >= {"zs", "icl", "ft"}
    # which fast paths ran, and what their run-time checks measured
    fast = prov["fast_paths"]
    assert set(fast["captures"]) >= {"zs", "icl", "ft"} and prov["transformers"]
    for reports in fast["captures"].values():
        for report in reports:
            assert report["label_logits"]["max_rel_diff"] <= report["tolerance"]
            assert report["scores"]["checked"] and report["windows"]["ok"]
    icl_cache = fast["captures"]["icl"][0]["prefix_cache"]
    assert icl_cache["used"] == B.supports_prefix_cache(toy_setup[0])
    assert fast["ft"]["side_by_side"] is True
    assert fast["ft"]["side_by_side_check"]["grad_rel_diff"] <= 1e-3


def test_save_load_roundtrip_and_determinism(toy_setup, toy_results, tmp_path):
    model, tok, data = toy_setup
    toy_results.save(tmp_path / "a.json")
    again = E.run_experiment(model, data.task, data=data, tokenizer=tok, **FAST)
    again.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    loaded = Results.load(tmp_path / "a.json")
    assert loaded.to_frame().equals(toy_results.to_frame())


def test_resumes_per_seed_and_redoes_bad_files(toy_setup, tmp_path, monkeypatch):
    model, tok, data = toy_setup
    kw = {**FAST, "baselines": (), "lr": 0.1, "lr_sensitivity": False}
    first = E.run_experiment(model, data.task, data=data, tokenizer=tok, out_dir=tmp_path, **kw)
    path = tmp_path / "toy_icl" / "seed0.json"
    assert path.exists()
    timings = tmp_path / "timings.jsonl"  # wall times live beside, not in, the results
    assert [json.loads(x)["seed"] for x in timings.read_text().splitlines()] == [
        r.seed for r in first.runs
    ]

    def boom(*a, **k):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(E, "_run_seed", boom)
    resumed = E.run_experiment(model, data.task, data=data, tokenizer=tok, out_dir=tmp_path, **kw)
    assert resumed.to_frame().equals(first.to_frame())
    monkeypatch.undo()
    path.write_text("{ truncated")  # a corrupt file is recomputed, not crashed on
    redone = E.run_experiment(model, data.task, data=data, tokenizer=tok, out_dir=tmp_path, **kw)
    assert redone.to_frame().equals(first.to_frame())
    assert json.loads(path.read_text())["seed"] == 0
    assert len(timings.read_text().splitlines()) == len(first.runs) + 1


def _finished(path, cfg):
    rows = [{"task": "t", "model": "m", "seed": 0, "metric": "accuracy", "variant": "ft",
             "kind": "result", "layer": "mean", "value": 0.75}]  # fmt: skip
    run = RunResult("t", 0, rows, {"config_key": cfg.key()}, {})
    atomic_write_json(path, run.to_json())


def _drop_checksum(path):
    obj = json.loads(path.read_text())
    del obj["checksum"]
    path.write_text(json.dumps(obj))


def _edit_accuracy(path):
    path.write_text(path.read_text().replace('"value": 0.75', '"value": 0.87'))


@pytest.mark.parametrize(
    ("damage", "why"),
    [(_edit_accuracy, "edited or corrupted"), (_drop_checksum, "has no checksum")],
)
def test_resume_refuses_files_without_a_valid_checksum(tmp_path, caplog, damage, why):
    cfg = E.ExperimentConfig()
    path = tmp_path / "t" / "seed0.json"
    _finished(path, cfg)
    assert E._load_done(path, cfg).rows[0]["value"] == 0.75  # intact: resumed
    damage(path)
    if damage is _drop_checksum:
        Results.load(path)  # still readable for tables and figures
    with caplog.at_level(logging.WARNING, logger=E.log.name):
        assert E._load_done(path, cfg) is None
    (record,) = [r for r in caplog.records if r.name == E.log.name]
    assert str(path) in record.getMessage() and why in record.getMessage()
    assert "recomputing" in record.getMessage()


def test_bad_configs(toy_setup):
    model, tok, data = toy_setup
    with pytest.raises(ValueError, match="n_demos must be >= 1"):
        E.run_experiment(model, data.task, data=data, tokenizer=tok, n_demos=0)
    with pytest.raises(ValueError, match="unknown baselines"):
        E.run_experiment(model, data.task, data=data, tokenizer=tok, baselines=("vibes",))
    # a value the user gave is never replaced by a default or silently clipped
    bad = [({"n_eval": -1}, "n_eval must be >= 1"), ({"n_eval": 0}, "n_eval must be >= 1"),
           ({"seeds": []}, "seeds must be"), ({"lr": float("inf")}, "lr must be finite"),
           ({"lr_grid": (0.1, -1.0)}, "lr_grid must be finite"),
           ({"batch_size": 0}, "batch_size must be >= 1")]  # fmt: skip
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            E.run_experiment(model, data.task, data=data, tokenizer=tok, **kw)
    empty = TaskData(data.task, [], data.demo_pool, "toy", {})
    with pytest.raises(ValueError, match="no evaluation examples"):
        E.run_experiment(model, data.task, data=empty, tokenizer=tok, **FAST)


@pytest.mark.slow
def test_real_model_small_run():
    """Gemma-3-270m offline on a few SST-2 examples: every headline metric is produced."""
    from icl_lens.models import load_model

    model = load_model("gemma-3-270m", progress=False)
    res = E.run_experiment(model, "sst2", n_demos=4, n_eval=12, seeds=(0,), lr=1e-3,
                           lr_sensitivity=False, baselines=("uniform", "gaussian"), n_boot=100,
                           progress=False)  # fmt: skip
    table = res.summary()
    print(table.T.to_string())
    row = table.loc["sst2"]
    for col in ("ZSL acc", "ICL acc", "FT acc", "SimAOU", "SimAOU null", "SimAM before",
                "SimAM after", "Kendall", "Kendall random"):  # fmt: skip
        assert row[col] == row[col], col
    prov = res.runs[0].provenance
    assert prov["model"] == "gemma-3-270m" and prov["data"]["source"] == "staicc"
    assert res.runs[0].diagnostics["sliding_windows"][5] is None


def test_dual_analysis_is_wired_in(toy_setup):
    """run_experiment(dual=True) reports ΔW_ICL vs ΔW_FT beside its random/shuffled baselines."""
    model, tok, data = toy_setup
    kw = {**FAST, "baselines": (), "lr": 0.1, "lr_sensitivity": False, "n_eval": 8}
    res = E.run_experiment(model, data.task, data=data, tokenizer=tok, dual=True, **kw)
    f = res.to_frame()
    dual = f[(f.variant == "dual") & (f.layer == "mean")].set_index("metric")
    names = ["dual_cos_icl_ft", "dual_cos_icl_uniform", "dual_cos_icl_gaussian"]
    names += ["dual_cos_icl_ft_shuffled", "dual_act_icl_ft", "dual_act_icl_gaussian"]
    for name in names:
        assert name in dual.index, name
        assert -1.0 <= dual.loc[name, "value"] <= 1.0
    assert dual.loc["dual_cos_icl_ft", "kind"] == "result"
    assert dual.loc["dual_cos_icl_uniform", "kind"] == "baseline"


def test_a_diverging_grid_rate_is_left_out_not_fatal(toy_setup, caplog):
    """A rate whose FT loss turns NaN/inf (a huge rate) is reported and skipped; the run goes
    on with the rest of the grid. If every rate diverges the error names the fix."""
    model, tok, data = toy_setup
    kw = {**FAST, "baselines": (), "n_eval": 8, "lr_grid": (0.1, 1e300)}
    res = E.run_experiment(model, data.task, data=data, tokenizer=tok, **kw)
    selection = res.runs[0].provenance["lr_selection"]
    assert selection["lr"] == 0.1
    assert list(selection["diverged"]) == ["1e+300"]
    assert "use a lower learning rate" in selection["diverged"]["1e+300"]
    assert list(selection["heldout_accuracy"]) == ["0.1"]
    lrs = {r["lr"] for r in res.runs[0].rows if r["lr"] is not None}
    assert lrs == {0.1}
    assert "rate left out" in caplog.text
    with pytest.raises(E.FinetuneDivergedError, match="every rate of lr_grid"):
        E.run_experiment(model, data.task, data=data, tokenizer=tok,
                         **{**kw, "lr_grid": (1e200, 1e300)})  # fmt: skip


def test_undefined_entries_carry_their_reason():
    """Entries a metric cannot define are left out of the mean, counted in ``n``, and the
    metric's own explanation is the rows' ``note`` (never a silent NaN)."""
    import warnings

    undefined: list[str] = []
    ctx = E._Ctx("t", "m", 0, E.ExperimentConfig(n_boot=50), undefined=undefined)
    gen = torch.Generator().manual_seed(0)
    zs = torch.randn(4, 2, 8, generator=gen)
    icl = zs + torch.randn(4, 2, 8, generator=gen)
    icl[1] = zs[1]  # example 1: ICL did not move the output, so its update has no direction
    ft = zs + torch.randn(4, 2, 8, generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = M.simaou(zs, icl, ft, on_undefined="nan")
    undefined += [str(w.message) for w in caught]
    ctx.add_layered("simaou", "ft", x)
    ctx.add("accuracy", "ft", 0.5, n=4)  # defined: no note, and the messages are used up
    rows = {r["layer"]: r for r in ctx.rows if r["metric"] == "simaou"}
    for r in rows.values():
        assert r["n"] == 3 and r["value"] is not None
        assert r["note"].startswith("1 of 4 examples undefined: simaou undefined"), r["note"]
    assert ctx.rows[-1]["note"] is None
    ctx.add("rec2ftp", "ft", float("nan"))
    assert ctx.rows[-1]["value"] is None and ctx.rows[-1]["note"] == "undefined"


def test_results_rows_with_missing_values_are_explained(toy_results):
    frame = toy_results.to_frame()
    missing = frame[frame["value"].isna()]
    assert missing["note"].notna().all(), missing[["metric", "variant", "layer"]]
    partial = frame[frame["note"].notna() & frame["value"].notna()]
    assert partial["note"].str.contains("examples undefined").all()


def test_resume_reuses_only_runs_of_the_same_stack_unless_asked(tmp_path, caplog):
    """A finished run made with another transformers (or model) is recomputed by default,
    reused with resume='any', and never reused with resume='never'."""
    cfg = E.ExperimentConfig()
    path = tmp_path / "t" / "seed0.json"
    now = E._stack(B.tl_version_info(), "m")
    rows = [{"task": "t", "model": "m", "seed": 0, "metric": "accuracy", "variant": "ft",
             "kind": "result", "layer": "mean", "value": 0.75}]  # fmt: skip
    prov = {"config_key": cfg.key(), "model": "m", **B.tl_version_info()}
    atomic_write_json(path, RunResult("t", 0, rows, prov, {}).to_json())
    assert E._load_done(path, cfg, "same_versions", now) is not None
    assert E._load_done(path, cfg, "never", now) is None
    assert E._load_done(path, cfg, "same_versions", {**now, "model": "other"}) is None
    prov["transformers"] = "5.23.0-not-this-one"
    atomic_write_json(path, RunResult("t", 0, rows, prov, {}).to_json())
    with caplog.at_level(logging.WARNING, logger=E.log.name):
        assert E._load_done(path, cfg, "same_versions", now) is None
    assert "transformers 5.23.0-not-this-one (now" in caplog.text and "resume='any'" in caplog.text
    assert E._load_done(path, cfg, "any", now).rows[0]["value"] == 0.75


def test_resume_needs_the_same_data(tmp_path, caplog):
    """A finished run is reused only when it was made from the same data: the file's content,
    its columns and label values, the template, the label words, the evaluation examples."""
    from pathlib import Path

    from icl_lens.data import load_file

    fixture = Path(__file__).parent / "fixtures" / "reviews.csv"
    words = (" Negative", " Positive")

    def load(template="Review: {x} Sentiment:", labels=("negative", "positive"), **kw):
        return load_file(fixture, "review", "sentiment", template, kw.pop("words", words),
                         labels=list(labels), split_column="split", **kw)  # fmt: skip

    cfg = E.ExperimentConfig(n_eval=4)
    data = load()
    path = tmp_path / "reviews" / "seed0.json"
    prov = {"config_key": cfg.key(), "template": data.task.template,
            "label_words": list(data.task.label_words), "data": data.provenance,
            "eval_ids": [x.id for x in data.eval[:4]]}  # fmt: skip
    atomic_write_json(path, RunResult("reviews", 0, [], json.loads(json.dumps(prov)), {}).to_json())
    assert E._load_done(path, cfg, "any", None, E._data_identity(data, cfg)) is not None
    other = [
        ("template 'Review: {x} Sentiment:' (now 'Text: {x} Sentiment:')",
         load("Text: {x} Sentiment:")),
        ("label words [' Negative', ' Positive'] (now [' Positive', ' Negative'])",
         load(labels=("positive", "negative"), words=words[::-1])),  # same mapping, reordered
        ("label values ['negative', 'positive'] (now ['positive', 'negative'])",
         load(labels=("positive", "negative"))),
        ("other evaluation examples", load(seed=2)),
    ]  # fmt: skip
    for why, changed in other:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=E.log.name):
            assert E._load_done(path, cfg, "any", None, E._data_identity(changed, cfg)) is None
        assert f"made from other data ({why}" in caplog.text, caplog.text


def test_run_experiment_lists_what_it_resumed(toy_setup, tmp_path):
    model, tok, data = toy_setup
    kw = {**FAST, "baselines": (), "lr": 0.1, "lr_sensitivity": False}
    first = E.run_experiment(model, data.task, data=data, tokenizer=tok, out_dir=tmp_path, **kw)
    assert first.resumed == []
    again = E.run_experiment(model, data.task, data=data, tokenizer=tok, out_dir=tmp_path, **kw)
    (entry,) = again.resumed
    assert entry["task"] == "toy_icl" and entry["seed"] == 0 and entry["transformers"]
    with pytest.raises(ValueError, match="resume="):
        E.run_experiment(model, data.task, data=data, tokenizer=tok, resume="maybe", **kw)


def test_a_diverging_baseline_ft_is_reported_not_fatal(toy_setup, monkeypatch):
    """If a baseline's FT (here layer-causal) diverges at the chosen rate, the run goes on and
    the baseline's row says why it is missing."""
    from icl_lens.finetune import FinetuneDivergedError

    model, tok, data = toy_setup
    real = E.finetuned

    def finetuned(model, demos, lr, **kw):
        if kw.get("mode") == "layer_causal":
            raise FinetuneDivergedError("finetune loss exploded (test)")
        return real(model, demos, lr, **kw)

    monkeypatch.setattr(E, "finetuned", finetuned)
    kw = {**FAST, "baselines": ("layer_causal", "shuffled"), "lr": 0.1, "lr_sensitivity": False}
    res = E.run_experiment(model, data.task, data=data, tokenizer=tok, **kw)
    f = res.to_frame()
    row = f[(f.variant == "ft_layer_causal") & (f.metric == "simaou")]
    assert len(row) == 1 and row.value.isna().all()
    assert (
        "ft_layer_causal FT diverged at lr=0.1: finetune loss exploded (test)" in row.note.iloc[0]
    )
    assert f[(f.variant == "ft_shuffled") & (f.metric == "simaou")].value.notna().any()


def test_config_key_ignores_which_seeds_and_fast_paths_but_not_settings():
    key = E.ExperimentConfig().key()
    assert E.ExperimentConfig(seeds=(0,)).key() == key  # --seeds 0 is resumed by --seeds 0 1 2
    assert E.ExperimentConfig(shared_prefix=False, self_checks=False).key() == key
    assert E.ExperimentConfig(n_demos=16).key() != key


def test_each_ft_reports_its_loss_rise_as_a_diagnostic_row():
    from types import SimpleNamespace

    ctx = E._Ctx("sst2", "toy", 0, E.ExperimentConfig())
    E._loss_rise(ctx, "ft", SimpleNamespace(losses=[3.0, 2.5, 2.0], lr=1e-3))
    E._loss_rise(ctx, "untrained", SimpleNamespace(losses=[30.0, 31.0, 42.0, 20.0], lr=1e-4))
    E._loss_rise(ctx, "ft_shuffled", SimpleNamespace(losses=[3.0, float("nan")], lr=1e-3))
    rows = {r["variant"]: r for r in ctx.rows if r["metric"] == "ft_loss_max_over_first"}
    assert set(rows) == {"ft", "untrained"}  # a NaN loss has no ratio (FT diverged)
    assert rows["ft"]["value"] == pytest.approx(1.0)
    assert rows["untrained"]["value"] == pytest.approx(1.4) and rows["untrained"]["n"] == 4
    assert rows["untrained"]["kind"] == "diagnostic" and rows["untrained"]["lr"] == 1e-4


def test_layers_choose_the_reported_layers_and_what_the_mean_averages(toy_setup, toy_results):
    model, tok, data = toy_setup
    one = E.run_experiment(model, data.task, data=data, tokenizer=tok, layers=[1], **FAST)
    full, part = toy_results.to_frame(), one.to_frame()
    assert set(part.layer) == {"1", "mean"}
    assert list(one.runs[0].provenance["config"]["layers"]) == [1]

    def sel(f, metric, layer):
        return f[(f.metric == metric) & (f.variant == "ft") & (f.layer == layer)].value.iloc[0]

    for metric in ("simaou", "kendall_token", "simam_after"):
        # same seed, same numbers: layer 1 as in the full run, and the mean is over layer 1 only
        assert sel(part, metric, "1") == pytest.approx(sel(full, metric, "1"), abs=1e-12)
        assert sel(part, metric, "mean") == pytest.approx(sel(full, metric, "1"), abs=1e-12)
    acc = lambda f: f[(f.metric == "accuracy") & (f.variant == "icl")].value.iloc[0]  # noqa: E731
    assert acc(part) == acc(full)  # not a per-layer metric: unchanged
    assert E.ExperimentConfig(layers=(1,)).key() != E.ExperimentConfig().key()
    with pytest.raises(ValueError, match="the model has 2 layers"):
        E.run_experiment(model, data.task, data=data, tokenizer=tok, layers=[2], **FAST)
    with pytest.raises(ValueError, match="layers must be one or more"):
        E.ExperimentConfig(layers=())


# --------------------------------------------------------------------------- recording sites

OTHER_SITE_ROWS = {  # other-site metric -> the default-site metric it is reported beside
    "simaou_attention": "simaou",
    "simaou_null_attention": "simaou_null",
    "simaou_orthogonal_attention": "simaou_orthogonal",
    "kendall_token_q_post": "kendall_token",
    "kendall_example_q_post": "kendall_example",
}


_COLS = ["variant", "layer", "kind", "value", "ci_low", "ci_high", "n", "lr", "note"]


def test_other_sites_coincide_on_the_toy(toy_results):
    """The toy has no post-attention norm, RoPE or q-norm, so every row at the other site
    (every variant and layer, CIs and notes included) equals the default site's exactly; the
    sites are in the provenance and the other site's columns in the summary."""
    import pandas as pd

    f = toy_results.to_frame()
    for other, default in OTHER_SITE_ROWS.items():
        got = f[f.metric == other][_COLS].reset_index(drop=True)
        assert set(got.variant) == {"ft", "untrained", "ft_shuffled", "ft_layer_causal"}, other
        want = f[(f.metric == default) & f.variant.isin(set(got.variant))][_COLS]
        pd.testing.assert_frame_equal(got, want.reset_index(drop=True), check_exact=True)
    sites = toy_results.runs[0].provenance["sites"]
    assert (sites["simaou"], sites["simaou_other"]) == ("residual", "attention")
    assert (sites["kendall"], sites["kendall_other"]) == ("q_pre", "q_post")
    assert sites["same_as_default"] == {"attention": True, "q_post": True}
    assert sites["hooks"]["residual"] == ["blocks.{l}.hook_attn_out"]
    assert sites["hooks"]["q_pre"] == ["blocks.{l}.attn.hook_q"] == sites["hooks"]["q_post"]
    assert "unavailable" not in sites
    table = toy_results.summary()
    assert table["SimAOU (attention site)"].equals(table["SimAOU"])
    assert table["Kendall (q_post)"].equals(table["Kendall"])
    cols = list(table.columns)
    assert cols.index("SimAOU (attention site)") == cols.index("SimAOU") + 1
    assert cols.index("Kendall (q_post)") == cols.index("Kendall") + 1


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny random Gemma-3 (post-attention norms, q-norm, RoPE) and a toy task for it."""
    from icl_lens.conformance import build_tiny_checkpoint
    from icl_lens.models import load_model

    path = build_tiny_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3_exp"))
    model = load_model(str(path), progress=False)
    pool, evals = toy_episode(seed=2, n_demos=12, n_eval=8, tokenizer=None)
    return model, TaskData(toy_task(2), evals, pool, "toy", {"source": "toy_episode"})


GEMMA_RUN = dict(n_demos=4, n_eval=8, seeds=(0,), lr=0.05, lr_sensitivity=False,
                 baselines=("untrained",), n_boot=50, progress=False)  # fmt: skip


def test_other_sites_differ_on_gemma3(gemma3):
    """Gemma-3: the attention site is the post-norm's input and q_post the rotated, q-normed
    query, so the other-site rows are their own numbers; the provenance names the hooks."""
    model, data = gemma3
    res = E.run_experiment(model, data.task, data=data, tokenizer=model.tokenizer, **GEMMA_RUN)
    f = res.to_frame()
    mean = f[f.layer == "mean"].set_index(["metric", "variant"])["value"]
    for other, default in OTHER_SITE_ROWS.items():
        for variant in ("ft", "untrained"):
            assert mean[(other, variant)] == mean[(other, variant)], (other, variant)
        got = f[f.metric == other][["variant", "layer"]].reset_index(drop=True)
        want = f[(f.metric == default) & f.variant.isin(["ft", "untrained"])]
        assert got.equals(want[["variant", "layer"]].reset_index(drop=True)), other
        if other != "kendall_example_q_post":  # 4 demonstrations: ties are likely
            assert mean[(other, "ft")] != mean[(default, "ft")], other
    sites = res.runs[0].provenance["sites"]
    assert sites["same_as_default"] == {"attention": False, "q_post": False}
    assert sites["hooks"]["q_post"] == ["blocks.{l}.attn.hook_rot_q"]
    assert sites["hooks"]["attention"][0].startswith("blocks.{l}.ln1_post.hook_")


def test_an_unavailable_site_gives_rows_with_the_reason(gemma3, monkeypatch):
    """A site the model does not expose is not fatal: its rows are undefined and say why, the
    provenance lists it, and the default rows are unchanged."""
    model, data = gemma3

    def refuse(model, layer, fn):
        raise NotImplementedError("site 'q_post' is not hooked here (test)")

    monkeypatch.setattr(B, "attended_q_hooks", refuse)
    res = E.run_experiment(model, data.task, data=data, tokenizer=model.tokenizer, **GEMMA_RUN)
    f = res.to_frame()
    for metric in ("kendall_token_q_post", "kendall_example_q_post"):
        rows = f[(f.metric == metric) & (f.variant == "ft")]
        assert len(rows) == 1 and rows.value.isna().all()
        assert rows.note.iloc[0].endswith("is not hooked here (test)"), rows.note.iloc[0]
    assert f[(f.metric == "kendall_token") & (f.variant == "ft")].value.notna().all()
    assert f[(f.metric == "simaou_attention") & (f.variant == "ft")].value.notna().all()
    sites = res.runs[0].provenance["sites"]
    assert sites["unavailable"]["q_post"].endswith("(test)")


@pytest.mark.parametrize("baselines", [("shuffled",), ()])
def test_patching_is_opt_in_and_its_rows_are_the_notebook_functions(
    toy_setup, toy_results, baselines
):
    """``patching=True`` adds one ``patch_survival`` row per (direction, variant, layer), equal
    to ``circuit.patch_curves`` on records made with the run's own demonstrations and rate;
    the shuffled-label variant only where that baseline ran, and the rows' notes say only
    whether the fractions are unstable."""
    from icl_lens.circuit import circuit_records, patch_curves
    from icl_lens.circuit.patching import DIRECTIONS

    model, tok, data = toy_setup
    assert "patch_survival" not in set(toy_results.to_frame().metric)  # off by default
    lr = toy_results.runs[0].provenance["lr"]  # the same rate, without the grid search
    kw = {**FAST, "baselines": baselines, "lr_sensitivity": False, "lr": lr}
    res = E.run_experiment(model, data.task, data=data, tokenizer=tok, patching=True,
                           patch_examples=12, **kw)  # fmt: skip
    run, f = res.runs[0], res.to_frame()
    assert run.provenance["config"]["patching"] is True
    assert E.ExperimentConfig(patching=True).key() != E.ExperimentConfig().key()
    rows = f[f.metric == "patch_survival"]
    variants = {f"{d}:{v}" for d, (_, vs) in DIRECTIONS.items() for v in vs
                if baselines or v != "ft_shuffled"}  # fmt: skip
    assert set(rows.variant) == variants and len(rows) == len(variants) * 2  # 2 layers
    assert set(rows.n) == {12}
    by_id = {x.id: x for x in data.demo_pool}
    demos = [by_id[i] for i in run.provenance["demo_ids"]]
    assert set(rows.lr) == {lr}
    rec = circuit_records(model, data, 0, lr=lr, n_eval=12, demos=demos, tokenizer=tok,
                          sites=("residual",), shuffled=bool(baselines))  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = patch_curves(model, rec, n_boot=FAST["n_boot"]).frame
    unstable = {str(w.message).split(":")[0] for w in caught if "unstable" in str(w.message)}
    for direction in DIRECTIONS:  # the notebook function's warning is carried in the rows
        notes = rows[rows.variant.str.startswith(direction + ":")].note
        assert notes.fillna("").str.contains("unstable").all() == (direction in unstable)
        assert notes.isna().all() == (direction not in unstable)  # nothing else in the notes
    for r in want.itertuples():
        got = rows[(rows.variant == f"{r.direction}:{r.variant}") & (rows.layer == str(r.layer))]
        assert got.value.iloc[0] == pytest.approx(r.fraction, abs=1e-12)
        assert got.ci_low.iloc[0] == pytest.approx(r.ci_low, abs=1e-12)
    base = f[f.metric == "patch_base_change"].set_index("variant").value
    assert base["icl_to_ft"] != 0 and base["ft_to_icl"] != 0
    assert run.diagnostics["patching"]["n_examples"] == 12


def test_patch_examples_is_in_the_key_only_with_patching():
    base = E.ExperimentConfig()
    assert E.ExperimentConfig(patch_examples=8).key() == base.key()
    on = E.ExperimentConfig(patching=True)
    assert (
        on.key() != base.key()
        and E.ExperimentConfig(patching=True, patch_examples=8).key() != on.key()
    )
