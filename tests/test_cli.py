"""cli: argument handling and one-line errors (the real-model run is tested in CI's quick leg)."""

from __future__ import annotations

import pytest

from icl_lens import cli


def test_parser_defaults():
    args = cli.build_parser().parse_args(["reproduce"])
    assert args.model == "gemma-3-270m"
    assert args.source == "staicc"
    assert args.record == "label"
    assert not args.quick


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        cli.main(["transmogrify"])


def test_cb_offline_is_refused(capsys):
    with pytest.raises(SystemExit, match="cb is not available offline"):
        cli.main(["reproduce", "--tasks", "cb", "--no-figures"])


def test_unknown_model_is_one_line(capsys, monkeypatch):
    code = cli.main(
        ["reproduce", "--model", "no-such-model-xyz", "--no-figures", "--out", "/tmp/x"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("icl-lens:") and len(err.splitlines()) == 1


def test_figures_on_missing_dir_is_one_line(capsys, tmp_path):
    code = cli.main(["figures", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("icl-lens:") and len(err.splitlines()) == 1


def test_reproduce_passes_dual_and_config_through(monkeypatch, tmp_path):
    import icl_lens.experiment
    import icl_lens.models

    seen = {}

    def fake_run(model, task, **kwargs):
        seen.update(kwargs, task=task)
        raise ValueError("stop here")

    monkeypatch.setattr(icl_lens.models, "load_model", lambda name: object())
    monkeypatch.setattr(icl_lens.experiment, "run_experiment", fake_run)
    argv = ["reproduce", "--dual", "--tasks", "mr", "--lr", "0.01", "--out", str(tmp_path)]
    assert cli.main([*argv, "--no-figures"]) == 2
    assert seen["dual"] is True and seen["task"] == "mr" and seen["lr"] == 0.01
    assert seen["n_demos"] == 32 and seen["n_eval"] == 500 and seen["seeds"] == (0, 1, 2)
    seen.clear()
    assert cli.main(["reproduce", "--tasks", "mr", "--out", str(tmp_path), "--no-figures"]) == 2
    assert "dual" not in seen
