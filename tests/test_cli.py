"""cli: argument handling and one-line errors (the real-model run is tested in CI's quick leg).

Exit codes: 2 when the command as given cannot run (checked before the model loads), 1 when
something fails while working. Models are toys (``icl_lens.models.load_model`` monkeypatched);
nothing here needs the network.
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from icl_lens import cli
from icl_lens.cli import checks, plan

FIXTURES = Path(__file__).parent / "fixtures"
REVIEWS = [
    "--data", str(FIXTURES / "reviews.csv"), "--text-column", "review",
    "--label-column", "sentiment", "--template", "Review: {text} Sentiment:",
    "--label-words", "negative= Negative", "positive= Positive",
]  # fmt: skip
SMALL = ["--n-demos", "2", "--n-eval", "4", "--seeds", "0", "--baselines", "--n-boot", "20"]


class ModelLoaded(BaseException):
    """Raised by the stand-in loader: a check that should have stopped the run did not.
    A BaseException, so no ``except Exception`` in the CLI can turn it into an exit code."""


ROOT = Path(__file__).resolve().parents[1]


class RunStarted(BaseException):
    """Raised by the stand-in run_experiment: computation began."""


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every check here must fire before it."""
    import icl_lens.models

    def load(name, **kwargs):
        raise ModelLoaded(name)

    monkeypatch.setattr(icl_lens.models, "load_model", load)


@pytest.fixture
def fake_tasks(monkeypatch):
    """Built-in tasks as small in-memory data (no StaICC needed): 600 eval, 100 demo examples."""
    from icl_lens.data import TaskData
    from icl_lens.tasks import Example, get_task

    def task_data(task, source):
        spec = get_task(task)
        ex = [
            Example(str(i), {f: f"text {i}" for f in spec.text_fields}, i % 2) for i in range(700)
        ]
        return TaskData(spec, ex[:600], ex[600:], source, {"source": source})

    monkeypatch.setattr(plan, "_task_data", task_data)


def toy_model(normalization_type="LN"):
    """A random toy whose tokenizer reads any English (unknown words -> <unk>), with the label
    words " Negative" and " Positive" as single tokens and a context of 128."""
    from icl_lens.backend import toy_model as make
    from icl_lens.toy import ToyTokenizer

    tok = ToyTokenizer(label_words=("Negative", "Positive"), strict=False)
    model = make(2, 32, 4, tok.vocab_size, 128, seed=0, normalization_type=normalization_type)
    model.tokenizer = tok
    return model


def use_model(monkeypatch, model):
    import icl_lens.models

    def load(name, **kwargs):
        seen_load.update(kwargs)  # what the CLI asked for (dtype, device)
        return model

    seen_load: dict = {}

    monkeypatch.setattr(icl_lens.models, "load_model", load)
    return seen_load


def fake_run(monkeypatch, seen: dict, error: BaseException | None = None):
    import icl_lens.experiment

    def run(model, task, **kwargs):
        seen.update(kwargs, task=task)
        raise error if error is not None else RunStarted()

    monkeypatch.setattr(icl_lens.experiment, "run_experiment", run)


def one_line(capsys) -> str:
    """The error, which must be all that was printed to stderr, on one line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("icl-lens:") and len(err.splitlines()) == 1, err
    return err


def last_line(capsys) -> str:
    """A runtime error: after the progress bars (closed, with their cursor moves), one line
    and no traceback."""
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)
    assert "Traceback" not in err, err
    lines = [x.strip() for x in re.split(r"[\r\n]", err) if x.strip()]
    assert lines[-1].startswith("icl-lens:") and sum(x.startswith("icl-lens:") for x in lines) == 1
    return lines[-1]


# --------------------------------------------------------------------------- parser, help


def test_parser_defaults():
    args = cli.build_parser().parse_args(["reproduce"])
    assert args.model == "gemma-3-270m"
    assert args.source is None  # staicc, unless --data (which refuses --source)
    assert args.record == "label"
    assert args.n_demos is None and args.n_eval is None and args.seeds is None  # -> DEFAULTS
    assert not args.quick


def test_unknown_command_exits_2_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["transmogrify"])
    assert exit_.value.code == 2
    assert "transmogrify" in one_line(capsys)


def _reproduce_parser():
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices["reproduce"]


def test_help_documents_every_flag():
    rep = _reproduce_parser()
    for action in rep._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    helps = {a.option_strings[0]: a.help for a in rep._actions if a.option_strings}
    for value in ("sst2", "24", "4", "0.001 0.01", "--seeds 0"):
        assert value in helps["--quick"]
    assert all(name in helps["--baselines"] for name in cli.BASELINES)
    assert "label token" in helps["--record"] and "batch" not in helps["--record"]
    assert "forward pass" in helps["--batch-size"] and "threads" in helps["--threads"].lower()
    text = rep.format_help()
    for flag in ("--data", "--text-column", "--label-column", "--template", "--label-words"):
        assert flag in text


def test_entry_points_reach_main():
    """The console script ``icl-lens`` and ``python -m icl_lens.cli`` both run ``main``."""
    import importlib
    import subprocess
    import sys

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    target = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["icl-lens"]
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name) is cli.main
    out = subprocess.run([sys.executable, "-m", "icl_lens.cli", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0 and "reproduce" in out.stdout, out.stderr


def test_copies_of_names_match_their_sources():
    from icl_lens.experiment import ALL_BASELINES, ExperimentConfig
    from icl_lens.models import BUNDLES

    assert cli.BASELINES == ALL_BASELINES
    assert cli.BUNDLES == tuple(BUNDLES)
    cfg = ExperimentConfig()
    assert cli.LR_GRID == cfg.lr_grid
    assert cli.DEFAULTS == {"n_demos": cfg.n_demos, "n_eval": cfg.n_eval, "seeds": list(cfg.seeds)}


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--n-demos", "0"], "--n-demos"),
        (["--n-eval", "0"], "--n-eval"),
        (["--n-eval", "-1"], "--n-eval"),
        (["--seeds", "-1"], "--seeds"),
        (["--seeds"], "--seeds"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr-grid", "1e-3", "nan"], "--lr-grid"),
        (["--batch-size", "0"], "--batch-size"),
        (["--n-boot", "0"], "--n-boot"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_values_are_refused_not_replaced(argv, flag, capsys, no_model, tmp_path):
    """A value the user gave is used or refused, never swapped for a default (the old code
    ran --n-demos 0 with 32, --n-eval 0 with 500 and --n-eval -1 with 1999)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reproduce", *argv, "--tasks", "mr", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = one_line(capsys)
    assert f"argument {flag}:" in err and "--help" in err


def test_given_values_are_used_as_given(monkeypatch, tmp_path, fake_tasks):
    use_model(monkeypatch, object())
    seen: dict = {}
    fake_run(monkeypatch, seen)
    argv = ["reproduce", "--tasks", "mr", "--out", str(tmp_path), "--no-figures"]
    with pytest.raises(RunStarted):
        cli.main([*argv, "--n-demos", "1", "--n-eval", "1", "--seeds", "5", "--n-boot", "7"])
    assert (seen["n_demos"], seen["n_eval"], seen["seeds"], seen["n_boot"]) == (1, 1, (5,), 7)


def test_reproduce_says_what_it_will_do_before_the_model_loads(capsys, no_model, tmp_path,
                                                               fake_tasks):  # fmt: skip
    """Before any model loads: how many runs, where, and how many have an earlier file there."""
    argv = ["reproduce", "--tasks", "mr", "sst2", "--seeds", "0", "1", "--out", str(tmp_path)]
    with pytest.raises(ModelLoaded):
        cli.main(argv)
    out = capsys.readouterr().out
    assert f"4 runs (2 tasks x 2 seeds) into {tmp_path / 'gemma-3-270m'}" in out
    cli_one = ["reproduce", "--tasks", "mr", "--seeds", "0", "--out", str(tmp_path / "one")]
    with pytest.raises(ModelLoaded):
        cli.main(cli_one)
    assert "1 run (1 task x 1 seed) into" in capsys.readouterr().out
    assert "earlier run" not in out
    (tmp_path / "gemma-3-270m" / "mr").mkdir(parents=True)
    (tmp_path / "gemma-3-270m" / "mr" / "seed1.json").write_text("{}")
    with pytest.raises(ModelLoaded):
        cli.main(argv)
    out = capsys.readouterr().out
    assert "1 of them have a file there from an earlier run, reused only if" in out


def test_seeds_must_be_distinct(capsys, no_model, tmp_path):
    assert cli.main(["reproduce", "--seeds", "0", "0", "--out", str(tmp_path)]) == 2
    assert "give each seed once" in one_line(capsys)


def test_unknown_task_and_baseline_name_the_valid_ones(capsys, no_model, tmp_path):
    assert cli.main(["reproduce", "--tasks", "sst3", "--out", str(tmp_path)]) == 2
    err = one_line(capsys)
    assert "unknown task 'sst3'" in err and "did you mean" in err and "'sst2'" in err
    assert "sst2, sst5, mr, subj, agnews, cb" in err
    assert cli.main(["reproduce", "--baselines", "uniform", "gausian", "--out", str(tmp_path)]) == 2
    err = one_line(capsys)
    assert "unknown baseline 'gausian'; did you mean 'gaussian'?" in err
    assert ", ".join(cli.BASELINES) in err


def test_cb_offline_is_refused(capsys, no_model, tmp_path):
    assert cli.main(["reproduce", "--tasks", "cb", "--out", str(tmp_path)]) == 2
    assert "cb is not available offline; use --source hf" in one_line(capsys)


# --------------------------------------------------------------------------- the model name


@pytest.mark.parametrize(
    "name, hint", [("gpt2", None), ("gemma-3-270M", "did you mean 'gemma-3-270m'?")]
)
def test_model_that_cannot_load_offline_is_one_line(name, hint, capsys, monkeypatch, no_model,
                                                     tmp_path):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(checks, "_hf_cache_has_models", lambda: False)
    assert cli.main(["reproduce", "--model", name, "--out", str(tmp_path)]) == 2
    err = one_line(capsys)
    assert f"--model {name!r}" in err and "HF_HUB_OFFLINE is set" in err
    assert "the offline bundles are gemma-3-270m, smollm2-135m" in err
    assert (hint in err) if hint else "did you mean" not in err


def test_tl_name_offline_needs_its_checkpoint_in_the_hf_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(checks, "_hf_cache_has_models", lambda: True)
    monkeypatch.setattr(checks, "_tl_checkpoint_cached", lambda name: False)
    with pytest.raises(cli.UsageError, match="'gpt2' is a TransformerLens name, which needs"):
        checks._check_model("gpt2")
    monkeypatch.setattr(checks, "_tl_checkpoint_cached", lambda name: True)
    checks._check_model("gpt2")  # loadable from the cache


def test_model_names_online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(checks, "_hub_reachable", lambda timeout=3.0: True)
    checks._check_model("gpt2")
    checks._check_model("gemma-3-270m")
    with pytest.raises(cli.UsageError, match="unknown model 'no-such-model-xyz'"):
        checks._check_model("no-such-model-xyz")


def test_model_paths(tmp_path, capsys, no_model):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "file.bin").write_text("x")
    out = ["--out", str(tmp_path / "out")]
    for model, why in [(tmp_path / "ckpt", "has no config.json"), (tmp_path / "file.bin",
                       "is a file"), ("./no-such-dir", "no such directory")]:  # fmt: skip
        assert cli.main(["reproduce", "--model", str(model), *out]) == 2
        assert why in one_line(capsys)


def test_unknown_model_is_one_line(capsys, monkeypatch, no_model, tmp_path):
    monkeypatch.setattr(checks, "_hf_cache_has_models", lambda: False)
    code = cli.main(["reproduce", "--model", "no-such-model-xyz", "--out", str(tmp_path)])
    assert code == 2
    assert "the offline bundles are" in one_line(capsys)


# --------------------------------------------------------------------------- the network


def test_source_hf_without_network_fails_at_once(capsys, monkeypatch, no_model, tmp_path):
    import icl_lens.data

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(checks, "_hub_reachable", lambda timeout=3.0: False)

    def no_download(*args):
        raise RunStarted("tried to download")

    monkeypatch.setattr(icl_lens.data, "_hf_load", no_download)
    assert cli.main(["reproduce", "--source", "hf", "--tasks", "sst2", "--out", str(tmp_path)]) == 2
    err = one_line(capsys)
    assert "--source hf needs the Hugging Face hub" in err and "--source staicc" in err
    assert "HF_DATASETS_OFFLINE=1" in err


def test_source_hf_offline_mode_reads_the_cache_or_says_what_to_do(capsys, monkeypatch,
                                                                   no_model, tmp_path):  # fmt: skip
    import icl_lens.data

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def offline(*args):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(icl_lens.data, "_hf_load", offline)
    assert cli.main(["reproduce", "--source", "hf", "--tasks", "sst2", "--out", str(tmp_path)]) == 2
    err = one_line(capsys)
    assert "sst2 is not in your Hugging Face cache and HF_DATASETS_OFFLINE is set" in err


def test_hub_probe_is_fast_and_asks_the_configured_endpoint(monkeypatch):
    """The probe goes to huggingface_hub's ENDPOINT: a closed port is 'offline' at once, a
    local server that answers is 'online'."""
    from huggingface_hub import constants

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode, undone
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: closed
    start = time.perf_counter()
    assert checks._hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - start < 2.6

    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert checks._hub_reachable(timeout=5.0) is True
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- --out


def test_out_must_be_writable(tmp_path, capsys, no_model):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["reproduce", "--out", str(afile)]) == 2
    assert "afile is a file, not a directory; choose another --out" in one_line(capsys)
    assert cli.main(["reproduce", "--out", str(afile / "deeper")]) == 2
    one_line(capsys)


def test_out_read_only_directory(tmp_path, capsys, no_model):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write in a read-only directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["reproduce", "--out", str(ro)]) == 2
        assert "cannot write in" in one_line(capsys)
    finally:
        ro.chmod(0o700)


# --------------------------------------------------------------------------- exit codes


def test_runtime_errors_exit_1_in_one_line_and_debug_reraises(monkeypatch, tmp_path, capsys,
                                                              fake_tasks):  # fmt: skip
    use_model(monkeypatch, object())
    seen: dict = {}
    fake_run(monkeypatch, seen, ValueError("stop here\nsecond line"))
    argv = ["reproduce", "--tasks", "mr", "--out", str(tmp_path), "--no-figures"]
    assert cli.main(argv) == 1
    assert last_line(capsys) == "icl-lens: stop here second line"
    monkeypatch.setenv("ICL_LENS_DEBUG", "1")
    with pytest.raises(ValueError, match="stop here"):
        cli.main(argv)


def test_reproduce_passes_dual_and_config_through(monkeypatch, tmp_path, fake_tasks):
    use_model(monkeypatch, object())
    seen: dict = {}
    fake_run(monkeypatch, seen)
    argv = ["reproduce", "--dual", "--tasks", "mr", "--lr", "0.01", "--out", str(tmp_path)]
    with pytest.raises(RunStarted):
        cli.main([*argv, "--no-figures"])
    assert seen["dual"] is True and seen["task"].name == "mr" and seen["lr"] == 0.01
    assert seen["data"].task.name == "mr"
    assert seen["n_demos"] == 32 and seen["n_eval"] == 500 and seen["seeds"] == (0, 1, 2)
    seen.clear()
    with pytest.raises(RunStarted):
        cli.main(["reproduce", "--tasks", "mr", "--out", str(tmp_path), "--no-figures"])
    assert "dual" not in seen and seen["resume"] == "same_versions"
    for flag, policy in (("--force", "never"), ("--resume-any", "any")):
        seen.clear()
        with pytest.raises(RunStarted):
            cli.main(["reproduce", "--tasks", "mr", "--out", str(tmp_path), "--no-figures", flag])
        assert seen["resume"] == policy


@pytest.mark.parametrize("content", ["[]", "null", ""])
def test_figures_on_a_bad_results_file_is_one_line_exit_1(content, tmp_path, capsys):
    path = tmp_path / ("results.csv" if content == "" else "results.json")
    path.write_text(content)
    assert cli.main(["figures", str(path)]) == 1
    assert str(path) in one_line(capsys)


def test_figures_on_missing_dir_is_one_line(capsys, tmp_path):
    code = cli.main(["figures", str(tmp_path / "nothing")])
    assert code == 2 and "no results at" in one_line(capsys)


def test_figures_on_a_json_of_another_shape(capsys, tmp_path):
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / "seed0.json").write_text("{}")
    assert cli.main(["figures", str(tmp_path)]) == 1
    err = one_line(capsys)
    assert str(tmp_path) in err and "not an icl-lens results file" in err


# --------------------------------------------------------------------------- --data


def test_data_file_runs_end_to_end_on_a_toy(monkeypatch, tmp_path, capsys):
    use_model(monkeypatch, toy_model())
    argv = ["reproduce", *REVIEWS, *SMALL, "--lr", "0.01", "--out", str(tmp_path), "--no-figures"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    # the committed reference has no 'reviews' task: said in one line, no table of absentees
    if (ROOT / "results" / "reference" / "gemma-3-270m").exists():
        assert "has no reviews: nothing to compare" in printed
        assert "missing in run" not in printed
    run = json.loads((tmp_path / "gemma-3-270m" / "reviews" / "seed0.json").read_text())
    prov = run["provenance"]
    assert prov["task"] == "reviews" and prov["template"] == "Review: {text} Sentiment:"
    assert prov["label_words"] == [" Negative", " Positive"]
    assert prov["data"]["file"].endswith("reviews.csv") and prov["lr"] == 0.01
    assert len(prov["eval_ids"]) == 4 and len(prov["demo_ids"]) == 2
    assert (tmp_path / "gemma-3-270m" / "summary.csv").exists()


def test_data_lr_that_explodes_exits_1_in_one_line(monkeypatch, tmp_path, capsys):
    """FT at --lr 1e9 on a toy without normalisation: the loss explodes to a finite 3.6e14,
    which the run refuses (FinetuneDivergedError), in one line, exit code 1."""
    use_model(monkeypatch, toy_model(normalization_type=None))
    argv = ["reproduce", *REVIEWS, *SMALL, "--lr", "1e9", "--out", str(tmp_path), "--no-figures"]
    assert cli.main(argv) == 1
    err = last_line(capsys)
    assert "finetune loss exploded" in err and "lr=1000000000.0" in err
    assert "use a lower learning rate" in err


def test_data_jsonl_integer_labels_map_through_the_words(monkeypatch, tmp_path):
    use_model(monkeypatch, toy_model())
    seen: dict = {}
    fake_run(monkeypatch, seen)
    argv = ["reproduce", "--data", str(FIXTURES / "reviews.jsonl"), "--text-column", "review",
            "--template", "{text} =>", "--out", str(tmp_path), *SMALL]  # fmt: skip
    with pytest.raises(RunStarted):  # label values 1, 0 given in this order: words in this order
        cli.main([*argv, "--label-words", "1= Positive", "0= Negative"])
    data = seen["data"]
    assert data.task.label_words == (" Positive", " Negative") and data.task.name == "reviews"
    by_text = {e.fields["text"]: e.label for e in [*data.eval, *data.demo_pool]}
    assert by_text["A warm, funny film."] == 0 and by_text["Dull and far too long."] == 1


def test_data_text_na_is_the_text_na(monkeypatch, tmp_path):
    use_model(monkeypatch, toy_model())
    seen: dict = {}
    fake_run(monkeypatch, seen)
    path = tmp_path / "na.csv"
    words = ["NA", "null", "nan", "N/A", "None", "good", "bad", "fine", "poor", "great"]
    rows = [f"{w},{'positive' if i % 2 else 'negative'}" for i, w in enumerate(words)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    argv = ["reproduce", "--data", str(path), "--template", "Review: {text} Sentiment:",
            "--label-words", "negative= Negative", "positive= Positive", "--out",
            str(tmp_path / "out"), *SMALL]  # fmt: skip
    with pytest.raises(RunStarted):
        cli.main(argv)
    texts = {e.fields["text"] for e in [*seen["data"].eval, *seen["data"].demo_pool]}
    assert texts == set(words)  # none read as a missing value


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "case, why",
    [
        ("missing", "no such file"),
        ("empty", "the file is empty"),
        ("column", "no column 'text' (--text-column); its columns are ['review', 'sentiment'"),
        ("no word", "the label value 'positive' of column 'sentiment' has no label word"),
        ("ints", "the label values ['0', '1'] of column 'label' have no label word"),
        ("template", "it needs exactly one, named, for the text"),
        ("braces", "write a literal brace"),
        ("word syntax", "is not VALUE=WORD"),
        ("one word", "needs at least two label values"),
        ("same word", "have the same word"),
        ("blank cell", "1 empty cell in column 'review' (rows 2, counting from 0"),
        ("with tasks", "--data runs the one task in your file; drop --tasks"),
        ("with source", "drop it with --data"),
        ("stray", "--template describes a --data file; add --data PATH"),
        ("pool", "has 6 examples, fewer than --n-demos 32 (the default)"),  # the train rows
        (
            "split value",
            "column 'split' has the values ['holdout'], which are not splits; use demo or "
            "train for demonstrations and dev, eval, test, valid, validation for evaluation",
        ),
        ("no eval rows", "no row of column 'split' is in an evaluation split; use demo or train"),
        ("no heldout", "no demonstration-pool example is left to choose the learning rate"),
        ("builtin name", "a built-in task's name"),
    ],
)
def test_data_problems_are_one_line_before_the_model_loads(case, why, tmp_path, capsys,
                                                           no_model):  # fmt: skip
    argv = list(REVIEWS)
    csv = (FIXTURES / "reviews.csv").read_text()
    tail = ["--out", str(tmp_path / "out")]
    if case == "missing":
        argv[1] = str(tmp_path / "missing.csv")
    elif case == "empty":
        argv[1] = _write(tmp_path, "empty.csv", "")
    elif case == "column":
        argv[3] = "text"
    elif case == "no word":
        argv[-1] = "neutral= Neutral"
    elif case == "ints":
        argv[1] = str(FIXTURES / "reviews.jsonl")
        argv[4:6] = []  # the label column defaults to "label": integers 0 and 1
    elif case == "template":
        argv[7] = "Review: Sentiment:"
    elif case == "braces":
        argv[7] = "Review: {text Sentiment:"
    elif case == "word syntax":
        argv[-1] = "positive"
    elif case == "one word":
        argv = argv[:-1]
    elif case == "same word":
        argv[-1] = "positive= Negative"
    elif case == "blank cell":
        argv[1] = _write(tmp_path, "blank.csv", csv.replace("The cast is superb.", ""))
    elif case == "with tasks":
        tail += ["--tasks", "sst2"]
    elif case == "with source":
        tail += ["--source", "staicc"]
    elif case == "stray":
        argv = ["--template", "{text}"]
    elif case == "pool":
        pass
    elif case == "split value":
        argv[1] = _write(tmp_path, "held.csv", csv.replace("positive,eval", "positive,holdout"))
    elif case == "no eval rows":
        argv[1] = _write(tmp_path, "train.csv", csv.replace(",eval", ",train"))
    elif case == "no heldout":
        tail += ["--n-demos", "6"]
    elif case == "builtin name":
        argv[1] = _write(tmp_path, "sst2.csv", csv)
    if case not in ("pool", "no heldout"):
        tail += ["--n-demos", "2"]
    assert cli.main(["reproduce", *argv, *tail]) == 2
    assert why in one_line(capsys)


def test_data_checks_with_the_tokenizer_run_before_any_computation(monkeypatch, tmp_path,
                                                                   capsys):  # fmt: skip
    use_model(monkeypatch, toy_model())
    fake_run(monkeypatch, {})  # RunStarted: computation would begin
    argv = ["reproduce", *REVIEWS, *SMALL, "--out", str(tmp_path)]
    two_tokens = list(argv)
    two_tokens[two_tokens.index("negative= Negative")] = "negative= Very negative"
    assert cli.main(two_tokens) == 2
    err = one_line(capsys)
    assert "--label-words: ' Very negative' is 2 tokens for this model's tokenizer" in err
    shared = list(argv)  # the toy reads both unknown words as <unk>: one token, the same
    shared[shared.index("negative= Negative")] = "negative= Foo"
    shared[shared.index("positive= Positive")] = "positive= Bar"
    assert cli.main(shared) == 2
    assert "[' Foo', ' Bar'] share a token for this model's tokenizer" in one_line(capsys)
    long = tmp_path / "long.csv"
    text = " ".join(["word"] * 200)
    rows = [f"{text} {i},positive\nshort {i},negative" for i in range(5)]
    long.write_text("review,sentiment\n" + "\n".join(rows) + "\n")
    argv[argv.index("--data") + 1] = str(long)
    assert cli.main(argv) == 2
    err = one_line(capsys)
    assert "tokens in the template" in err and "more than the model's context of 128" in err


def test_data_split_column_decides_demos_and_eval(monkeypatch, tmp_path):
    """A column named split: train rows are the demonstration pool, test / validation / dev /
    eval rows (any case) are evaluated on, and the provenance says so; without it, half and
    half as before."""
    use_model(monkeypatch, toy_model())
    seen: dict = {}
    fake_run(monkeypatch, seen)
    tail = ["--out", str(tmp_path / "out"), *SMALL]
    with pytest.raises(RunStarted):
        cli.main(["reproduce", *REVIEWS, *tail])
    data = seen["data"]
    assert sorted(int(e.id) for e in data.eval) == [6, 7, 8, 9]
    assert [e.id for e in data.demo_pool] == [str(i) for i in range(6)]
    assert data.provenance["splits"] == {"column": "split", "eval": "eval", "demo": "train"}
    csv = (FIXTURES / "reviews.csv").read_text().splitlines()
    values = ["Train", "train ", "TRAIN", "train", "train", "train", "Test", "validation", "dev",
              "eval"]  # fmt: skip
    rows = [line.rsplit(",", 1)[0] + "," + v for line, v in zip(csv[1:], values, strict=True)]
    argv = list(REVIEWS)
    argv[1] = _write(tmp_path, "mixed.csv", "\n".join([csv[0], *rows]) + "\n")
    with pytest.raises(RunStarted):
        cli.main(["reproduce", *argv, *tail])
    data = seen["data"]
    assert sorted(int(e.id) for e in data.eval) == [6, 7, 8, 9] and len(data.demo_pool) == 6
    assert data.provenance["splits"]["eval"] == "dev, eval, test, validation"
    argv[1] = _write(tmp_path, "nosplit.csv", "\n".join(r.rsplit(",", 1)[0] for r in csv) + "\n")
    with pytest.raises(RunStarted):
        cli.main(["reproduce", *argv, *tail])
    data = seen["data"]
    assert data.provenance["splits"] == {"eval": "carved", "demo": "carved"}
    assert len(data.eval) == len(data.demo_pool) == 5


def test_data_resume_recomputes_when_the_data_changes(monkeypatch, tmp_path, capsys, caplog):
    """A finished run is resumed only for the same data: a file of the same name with one row
    changed, or another template, is recomputed, with a warning that says why."""
    use_model(monkeypatch, toy_model())
    path = tmp_path / "data" / "reviews.csv"
    path.parent.mkdir()
    path.write_text((FIXTURES / "reviews.csv").read_text())
    argv = list(REVIEWS)
    argv[1] = str(path)
    argv = ["reproduce", *argv, *SMALL, "--lr", "0.01", "--out", str(tmp_path), "--no-figures"]
    assert cli.main(argv) == 0
    assert "computed the 1 run (not resumed)" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "resumed 1 of 1 runs" in capsys.readouterr().out
    path.write_text(path.read_text().replace("Dull and far too long.", "Dull and far too slow."))
    with caplog.at_level(logging.WARNING, logger="icl_lens.experiment"):
        assert cli.main(argv) == 0
    assert "computed the 1 run (not resumed)" in capsys.readouterr().out
    assert "made from other data (data file sha256" in caplog.text
    assert "reviews" in caplog.text and "recomputing it" in caplog.text


def test_dtype_and_device_reach_the_model_and_pick_their_own_directory(monkeypatch, tmp_path):
    import torch

    load_kwargs = use_model(monkeypatch, toy_model())
    seen: dict = {}
    fake_run(monkeypatch, seen)
    with pytest.raises(RunStarted):
        cli.main(["reproduce", "--tasks", "mr", "--dtype", "bfloat16", "--device", "cpu",
                  "--out", str(tmp_path), "--no-figures"])  # fmt: skip
    assert load_kwargs == {"dtype": torch.bfloat16, "device": "cpu"}
    assert Path(seen["out_dir"]).name == "gemma-3-270m-bfloat16"


@pytest.mark.parametrize(
    ("device", "says"), [("foo", "not a torch device"), ("tpu", "use cpu, cuda")]
)
def test_bad_device_is_one_line_before_the_model_loads(capsys, no_model, tmp_path, device, says):
    assert cli.main(["reproduce", "--device", device, "--out", str(tmp_path)]) == 2
    assert says in one_line(capsys)


def _close_bars() -> None:
    """Close the bars a stand-in run left open (it raised inside them)."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()


def test_layers_reach_run_experiment_and_are_checked_against_the_model(
    monkeypatch, tmp_path, capsys
):
    use_model(monkeypatch, toy_model())  # 2 layers
    seen: dict = {}
    fake_run(monkeypatch, seen)
    base = ["reproduce", "--tasks", "mr", "--out", str(tmp_path), "--no-figures"]
    with pytest.raises(RunStarted):
        cli.main([*base, "--layers", "1", "0-1"])
    assert seen["layers"] == (0, 1)
    seen.clear()
    _close_bars()
    capsys.readouterr()
    assert cli.main([*base, "--layers", "0", "2-3"]) == 2
    assert "--layers 3: the model has 2 layers; use 0-1" in one_line(capsys)
    assert seen == {}  # nothing ran
    for bad in ("x", "3-1", "-1"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*base, "--layers", bad])
        assert exit_.value.code == 2 and "--layers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "want"), [([], None), (["--patching"], 64), (["--patching", "8"], 8)]
)
def test_patching_flag_reaches_run_experiment(monkeypatch, tmp_path, args, want):
    use_model(monkeypatch, toy_model())
    seen: dict = {}
    fake_run(monkeypatch, seen)
    with pytest.raises(RunStarted):
        cli.main(["reproduce", "--tasks", "mr", "--out", str(tmp_path), "--no-figures", *args])
    _close_bars()
    if want is None:
        assert "patching" not in seen  # off by default: the config key is unchanged
    else:
        assert seen["patching"] is True and seen["patch_examples"] == want
