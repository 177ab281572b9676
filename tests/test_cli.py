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
