"""compare: a run's headline numbers against a reference run, within their CIs."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from icl_lens import cli
from icl_lens.compare import compare, counts, default_reference, report, reproduces
from icl_lens.results import Results, RunResult, atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = [ROOT / "results" / "reference" / "gemma-3-270m", ROOT / "results" / "gemma-3-270m"]

# (metric, variant): (value, CI half-width or None) of seed 0; other seeds add 0.01 * seed
VALUES = {
    ("accuracy", "zs"): (0.60, 0.04),
    ("accuracy", "icl"): (0.70, 0.04),
    ("accuracy", "ft"): (0.65, 0.04),
    ("rec2ftp", "ft"): (50.0, 10.0),
    ("rec2ftp", "chance"): (30.0, None),
    ("simaou", "ft"): (0.20, 0.005),
    ("simaou", "uniform"): (-0.005, 0.001),
}


def _run(task: str, seed: int, *, model: str = "m", n_eval: int = 100, **shift) -> RunResult:
    rows = []
    for (metric, variant), (value, hw) in VALUES.items():
        value = value + 0.01 * seed + shift.get(f"{metric}_{variant}", 0.0)
        for layer, x in (("mean", value), (0, value - 0.1), (1, value + 0.1)):
            rows.append(
                {"task": task, "model": model, "seed": seed, "metric": metric,
                 "variant": variant, "kind": "result", "layer": layer, "value": x,
                 "ci_low": None if hw is None else x - hw,
                 "ci_high": None if hw is None else x + hw, "n": n_eval, "lr": None}
            )  # fmt: skip
    config = {"n_eval": n_eval, "n_demos": 4, "seeds": [0, 1, 2], "self_checks": True}
    provenance = {
        "model": model,
        "config": config,
        "config_key": f"key-{n_eval}",
        "eval_ids": [str(i) for i in range(n_eval)],
        "demo_ids": [str(100 + seed + i) for i in range(4)],
        "icl_lens_git": "abc123",
        "transformer_lens": "4.3.0",
        "transformers": "4.57.0",
        "torch": "2.13.0",
        "lr": 1e-3,
    }
    return RunResult(task, seed, rows, provenance, {})


def _write(root: Path, runs: list[RunResult]) -> Path:
    for run in runs:
        atomic_write_json(root / run.task / f"seed{run.seed}.json", run.to_json())
    return root


def _runs(tasks=("sst2", "mr"), seeds=(0, 1, 2), **kw) -> list[RunResult]:
    return [_run(t, s, **kw) for t in tasks for s in seeds]


def _row(frame: pd.DataFrame, task, seed, metric, variant) -> pd.Series:
    sel = frame[
        (frame.task == task)
        & (frame.seed == seed)
        & (frame.metric == metric)
        & (frame.variant == variant)
    ]
    assert len(sel) == 1
    return sel.iloc[0]


def test_identical_runs_reproduce_everything(tmp_path):
    run = _write(tmp_path / "run", _runs())
    ref = _write(tmp_path / "ref", _runs())
    frame = compare(run, ref)
    # 2 tasks x 7 values x (3 seeds + mean)
    assert len(frame) == 2 * 7 * 4
    assert frame["within"].all() and (frame["diff"] == 0).all()
    assert reproduces(frame)
    assert counts(frame) == {"compared": 56, "reproduce": 56, "differ": 0, "not_compared": 0}
    text = report(frame)
    assert "56 of 56 headline values" in text and "none differ" in text
    assert "DOES NOT REPRODUCE" not in text and "NOT COMPARABLE" not in text
    assert "abc123" in text and "4.57.0" in text  # versions of both sides
    # Results objects work as well as directories
    assert compare(Results.load(run), Results.load(ref))["within"].all()


def test_the_rule_is_ci_half_widths_summed_and_seeds_spread_without_ci(tmp_path):
    ref = _write(tmp_path / "ref", _runs(tasks=("sst2",)))
    # SimAOU +0.009 (tolerance 0.005 + 0.005): within; ICL +0.09 (0.04 + 0.04): not
    shifted = [_run("sst2", s, simaou_ft=0.009 if s == 0 else 0.0) for s in (0, 1, 2)]
    shifted[1] = _run("sst2", 1, accuracy_icl=0.09)
    frame = compare(_write(tmp_path / "run", shifted), ref)
    simaou = _row(frame, "sst2", 0, "simaou", "ft")
    assert simaou["tolerance"] == pytest.approx(0.01) and simaou["within"]
    icl = _row(frame, "sst2", 1, "accuracy", "icl")
    assert icl["diff"] == pytest.approx(0.09) and icl["tolerance"] == pytest.approx(0.08)
    assert not icl["within"]
    # the mean over 3 seeds: half-width sqrt(3 * 0.04^2) / 3 per side; diff 0.03
    mean = _row(frame, "sst2", "mean", "accuracy", "icl")
    assert mean["diff"] == pytest.approx(0.03)
    assert mean["tolerance"] == pytest.approx(2 * 0.04 / math.sqrt(3))
    assert mean["within"]
    # no CI: the seeds' standard deviation (values 30, 30.01, 30.02) on each side
    chance = _row(frame, "sst2", 0, "rec2ftp", "chance")
    assert chance["tolerance"] == pytest.approx(2 * 0.01)
    assert "seeds' spread" in chance["note"]


def test_a_shifted_value_is_flagged_and_strict_exits_1(tmp_path, capsys):
    ref = _write(tmp_path / "ref", _runs())
    runs = _runs()
    runs[1] = _run("sst2", 1, simaou_ft=0.05)  # 10x its tolerance
    run = _write(tmp_path / "run", runs)
    frame = compare(run, ref)
    bad = frame[frame["within"] == False]  # noqa: E712
    assert set(zip(bad.task, bad.seed, bad.metric, strict=True)) == {
        ("sst2", 1, "simaou"),
        ("sst2", "mean", "simaou"),
    }
    assert not reproduces(frame)
    text = report(frame)
    assert "DOES NOT REPRODUCE (2 values" in text
    assert "!! sst2 seed 1 SimAOU: run 0.26 vs reference 0.21" in text
    assert "54 of 56 headline values" in text and "2 do not: sst2 seed 1 SimAOU" in text

    assert cli.main(["compare", str(run), str(ref)]) == 0
    assert cli.main(["compare", str(run), str(ref), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "2 do not" in out
    assert cli.main(["compare", str(ref), str(ref), "--strict"]) == 0
    csv = tmp_path / "cmp.csv"
    assert cli.main(["compare", str(run), str(ref), "--per-seed", "--csv", str(csv)]) == 0
    assert len(pd.read_csv(csv)) == 56


def test_missing_tasks_seeds_and_values_are_noted_not_failed(tmp_path):
    ref = _write(tmp_path / "ref", _runs())
    runs = [r for r in _runs() if not (r.task == "mr" or (r.task == "sst2" and r.seed == 2))]
    runs[0].rows = [r for r in runs[0].rows if r["variant"] != "uniform"]  # a baseline not run
    runs.append(_run("subj", 0))  # a task the reference lacks
    frame = compare(_write(tmp_path / "run", runs), ref)
    assert _row(frame, "mr", 0, "simaou", "ft")["note"] == "missing in run"
    assert _row(frame, "mr", "mean", "simaou", "ft")["note"] == "missing in run"
    assert _row(frame, "sst2", 2, "accuracy", "icl")["note"] == "missing in run"
    assert _row(frame, "sst2", 0, "simaou", "uniform")["note"] == "missing in run"
    assert _row(frame, "subj", 0, "accuracy", "zs")["note"] == "missing in reference"
    # the mean is over the seeds both sides have
    mean = _row(frame, "sst2", "mean", "accuracy", "icl")
    assert mean["within"] and "seeds compared (0, 1)" in mean["note"]
    assert pd.isna(_row(frame, "mr", 1, "simaou", "ft")["within"])
    assert reproduces(frame)  # nothing compared differs
    text = report(frame)
    assert "not compared (" in text and "missing in run" in text
    assert re.search(r"^mr\s+all\s+all values[\s–]+missing in run$", text, re.M)
    assert "missing in reference" in text


def test_different_config_model_or_ids_are_not_comparable(tmp_path):
    ref = _write(tmp_path / "ref", _runs(tasks=("sst2",)))
    runs = _runs(tasks=("sst2",))
    runs[0] = _run("sst2", 0, n_eval=50, accuracy_icl=0.3)  # other config and eval ids
    runs[1] = copy.deepcopy(runs[1])
    runs[1].provenance["demo_ids"] = ["x", "y"]
    runs[2] = _run("sst2", 2, model="other")
    frame = compare(_write(tmp_path / "run", runs), ref)
    s0 = _row(frame, "sst2", 0, "accuracy", "icl")
    assert pd.isna(s0["within"]) and s0["note"].startswith("not comparable")
    assert "different config (n_eval 50 vs 100)" in s0["note"]
    assert "different eval ids" in s0["note"]
    assert "different demo ids" in _row(frame, "sst2", 1, "accuracy", "icl")["note"]
    assert "different model (other vs m)" in _row(frame, "sst2", 2, "simaou", "ft")["note"]
    assert frame["within"].isna().all()  # no value flagged as a non-reproduction
    assert not reproduces(frame)  # ... but nothing was compared either
    text = report(frame)
    assert "NOT COMPARABLE (3 task/seed runs" in text and "NOTHING was compared" in text
    assert "DOES NOT REPRODUCE" not in text


def test_seeds_run_and_fast_path_fields_do_not_change_the_config(tmp_path):
    ref = _write(tmp_path / "ref", _runs(tasks=("sst2",)))
    run = _run("sst2", 0)
    run.provenance["config"] = {**run.provenance["config"], "seeds": [0], "self_checks": False}
    run.provenance["config_key"] = "another-key"
    run.provenance["lr"] = 1e-2
    frame = compare(_write(tmp_path / "run", [run]), ref)
    row = _row(frame, "sst2", 0, "simaou", "ft")
    assert row["within"] and "chosen FT lr 0.01 vs 0.001" in row["note"]
    assert "missing in run" in _row(frame, "sst2", 1, "simaou", "ft")["note"]


def test_undefined_values(tmp_path):
    ref_runs, runs = _runs(tasks=("sst2",)), _runs(tasks=("sst2",))
    for run in (*ref_runs, runs[0]):
        for r in run.rows:
            if r["metric"] == "rec2ftp" and r["variant"] == "ft" and run.seed == 0:
                r.update(value=None, ci_low=None, ci_high=None, note="no changed predictions")
    for r in runs[1].rows:
        if r["metric"] == "rec2ftp" and r["variant"] == "ft":
            r.update(value=None, ci_low=None, ci_high=None, note="no changed predictions")
    frame = compare(_write(tmp_path / "run", runs), _write(tmp_path / "ref", ref_runs))
    both = _row(frame, "sst2", 0, "rec2ftp", "ft")
    assert both["within"] and "undefined on both sides: no changed predictions" in both["note"]
    one = _row(frame, "sst2", 1, "rec2ftp", "ft")
    assert not one["within"] and one["note"] == "undefined in run: no changed predictions"


def test_disjoint_seeds_compare_the_means(tmp_path):
    ref = _write(tmp_path / "ref", _runs(tasks=("sst2",), seeds=(0, 1, 2)))
    run = _write(tmp_path / "run", _runs(tasks=("sst2",), seeds=(3, 4)))
    frame = compare(run, ref)
    mean = _row(frame, "sst2", "mean", "accuracy", "icl")
    assert "different seeds: run 3, 4 vs reference 0, 1, 2" in mean["note"]
    assert mean["diff"] == pytest.approx(0.025)
    assert mean["tolerance"] == pytest.approx(
        pd.Series([0.73, 0.74]).std() / math.sqrt(2) + pd.Series([0.7, 0.71, 0.72]).std() / 3**0.5
    )


def test_errors_are_one_line_with_usage_and_runtime_exit_codes(tmp_path, capsys):
    """A path that does not exist is a usage error (2); a corrupt file met while working is a
    runtime failure (1), as in ``figures``; both are one line."""
    ref = _write(tmp_path / "ref", _runs())
    assert cli.main(["compare", str(tmp_path / "nothing"), str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("icl-lens:") and len(err.splitlines()) == 1 and "nothing" in err
    broken = tmp_path / "broken" / "sst2"
    broken.mkdir(parents=True)
    (broken / "seed0.json").write_text("{not json")
    assert cli.main(["compare", str(tmp_path / "broken"), str(ref)]) == 1
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and len(err.splitlines()) == 1
    # no reference found for a model that has none: names what to pass
    other = _write(tmp_path / "no-such-model-xyz", _runs(model="no-such-model-xyz"))
    assert cli.main(["compare", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "REFERENCE_DIR" in err and len(err.splitlines()) == 1


def test_default_reference_is_the_committed_run_and_never_the_run_itself(tmp_path):
    committed = next((p for p in COMMITTED if p.is_dir()), None)
    if committed is None:
        pytest.skip("no committed reference run in this checkout")
    run = _write(tmp_path / "gemma-3-270m", _runs(model="gemma-3-270m"))
    assert default_reference(run, Results.load(run)) == committed
    with pytest.raises(FileNotFoundError, match="REFERENCE_DIR"):
        default_reference(committed, Results.load(committed))


def test_the_committed_reference_reproduces_itself(capsys):
    committed = next((p for p in COMMITTED if p.is_dir()), None)
    if committed is None:
        pytest.skip("no committed reference run in this checkout")
    frame = compare(committed, committed)
    assert frame["within"].all() and reproduces(frame)
    assert set(frame.task) == {"sst2", "sst5", "mr", "subj", "agnews"}
    assert cli.main(["compare", str(committed), str(committed), "--strict"]) == 0
    out = capsys.readouterr().out
    assert f"{len(frame)} of {len(frame)} headline values" in out


def test_config_fields_added_later_read_as_what_older_files_ran_with(tmp_path):
    """A file from before dtype/device were recorded ran fp32 on the CPU: only a real
    difference (n_eval here) is listed, not 'dtype float32 vs None'."""
    ref = _write(tmp_path / "ref", _runs(tasks=("sst2",)))
    run = _run("sst2", 0, n_eval=50)
    config = {**run.provenance["config"], "dtype": "float32", "device": "cpu"}
    run.provenance["config"] = config
    note = _row(compare(_write(tmp_path / "run", [run]), ref), "sst2", 0, "simaou", "ft")["note"]
    assert "different config (n_eval 50 vs 100)" in note and "dtype" not in note
    run.provenance["config"] = {**config, "dtype": "bfloat16"}
    note = _row(compare(_write(tmp_path / "r2", [run]), ref), "sst2", 0, "simaou", "ft")["note"]
    assert "dtype 'bfloat16' vs 'float32'" in note


def test_an_old_half_precision_file_trained_ft_in_its_own_dtype(tmp_path):
    """A bf16 file made before ``ft_train_dtype`` existed trained FT in bf16: against a bf16
    run trained in float32 (the default now) the difference is named, not hidden."""
    old = _run("sst2", 0)
    old.provenance["config"] = {**old.provenance["config"], "dtype": "bfloat16"}
    old.provenance["config_key"] = "old-bf16"
    new = _run("sst2", 0)
    new.provenance["config"] = {**old.provenance["config"], "ft_train_dtype": "float32"}
    new.provenance["config_key"] = "new-bf16"
    row = _row(compare(_write(tmp_path / "new", [new]), _write(tmp_path / "old", [old])),
               "sst2", 0, "simaou", "ft")  # fmt: skip
    assert "ft_train_dtype 'float32' vs 'model'" in row["note"]
    # nor did it compute its ZS/FT captures in float32 (``update_capture_dtype``, later)
    new.provenance["config"] = {**old.provenance["config"], "update_capture_dtype": "float32"}
    row = _row(compare(_write(tmp_path / "new2", [new]), _write(tmp_path / "old", [old])),
               "sst2", 0, "simaou", "ft")  # fmt: skip
    assert "update_capture_dtype 'float32' vs 'model'" in row["note"]
    new.provenance["config"] = {**old.provenance["config"], "update_capture_dtype": "model"}
    row = _row(compare(_write(tmp_path / "new3", [new]), _write(tmp_path / "old", [old])),
               "sst2", 0, "simaou", "ft")  # fmt: skip
    assert "update_capture_dtype" not in (row["note"] or "")


def test_every_field_left_out_of_the_key_at_its_default_reads_as_that_default(tmp_path):
    """A file made before ``layers``/``patching`` existed compares with one that records their
    defaults, and with one that ran patching (it only adds rows)."""
    from icl_lens import compare as C
    from icl_lens import experiment as E

    assert E._KEY_DEFAULTS.items() <= C._CONFIG_DEFAULTS.items()
    ref = _write(tmp_path / "ref", _runs(tasks=("sst2",)))
    for i, extra in enumerate([dict(E._KEY_DEFAULTS), {"patching": True, "patch_examples": 8}]):
        run = _run("sst2", 0)
        run.provenance["config"] = {**run.provenance["config"], **extra}
        run.provenance["config_key"] = f"another-key-{i}"
        row = _row(compare(_write(tmp_path / f"run{i}", [run]), ref), "sst2", 0, "simaou", "ft")
        assert row["within"], row["note"]


def test_a_reference_made_before_the_other_sites_lacks_them_without_failing(tmp_path):
    """A run with the other recording sites' rows against a reference made before they were
    recorded (no provenance["sites"]): those values are noted as such, not compared, and the
    rest still reproduces."""
    ref = _write(tmp_path / "ref", _runs(tasks=("sst2",)))
    runs = _runs(tasks=("sst2",))
    for run in runs:
        run.provenance["sites"] = {"simaou": "residual", "simaou_other": "attention"}
        extra = [{**r, "metric": "simaou_attention"} for r in run.rows if r["metric"] == "simaou"]
        run.rows += extra
    run = _write(tmp_path / "run", runs)
    frame = compare(run, ref)
    note = "missing in reference (made before the other recording sites were recorded)"
    assert _row(frame, "sst2", 0, "simaou_attention", "ft")["note"] == note
    assert _row(frame, "sst2", "mean", "simaou_attention", "ft")["note"] == note
    assert _row(frame, "sst2", 0, "simaou_attention", "ft")["name"] == "SimAOU (attention site)"
    assert pd.isna(_row(frame, "sst2", "mean", "simaou_attention", "ft")["within"])
    assert reproduces(frame) and counts(frame)["differ"] == 0
    assert _row(frame, "sst2", "mean", "simaou", "ft")["within"]
    assert note in report(frame)
    # a reference that has the sites but not this value (say, not run): plainly missing
    for r in runs:
        r.rows = [row for row in r.rows if row["metric"] != "simaou_attention"]
    frame = compare(run, _write(tmp_path / "ref2", runs))
    assert _row(frame, "sst2", 0, "simaou_attention", "ft")["note"] == "missing in reference"
    assert _row(frame, "sst2", "mean", "simaou_attention", "ft")["note"] == "missing in reference"
