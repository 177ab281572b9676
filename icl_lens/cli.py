"""Command line: ``icl-lens reproduce | figures | compare | bench``.

Every error is one line, ``icl-lens: ...``, and the exit code says whose it is: 2 when the
command as given cannot run (argparse's own errors; icl-lens's checks of the arguments, of
the ``--data`` file, of ``--out``, of the model name and of the network, all made before any
computation; a path that does not exist), 1 when something fails while working.
``ICL_LENS_DEBUG=1`` re-raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icl_lens.tasks import TASKS, template_fields  # a stdlib-only module: --help stays fast

DEFAULT_TASKS = ("sst2", "sst5", "mr", "subj", "agnews")
DEFAULTS = {"n_demos": 32, "n_eval": 500, "seeds": [0, 1, 2]}
QUICK = {"tasks": ["sst2"], "n_eval": 24, "n_demos": 4, "seeds": [0], "lr_grid": [1e-3, 1e-2]}
# Copies of names defined in modules that import torch, so that --help and the checks of the
# arguments stay fast; tests/test_cli.py keeps them equal to the originals.
BASELINES = ("uniform", "gaussian", "untrained", "shuffled", "layer_causal")  # experiment
BUNDLES = ("gemma-3-270m", "smollm2-135m")  # models.BUNDLES
LR_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # ExperimentConfig.lr_grid
_TRUE = ("1", "on", "yes", "true")  # how huggingface_hub reads its *_OFFLINE variables


class UsageError(Exception):
    """The command as given cannot run (exit code 2); the message says what to change."""


# --------------------------------------------------------------------------- checks


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (case-insensitive; the two
    closest if they tie), else ``""``."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=2, cutoff=0.6)
    ratio = [difflib.SequenceMatcher(None, name.lower(), c).ratio() for c in close]
    close = [c for c, r in zip(close, ratio, strict=True) if r == ratio[0]]
    return f"did you mean {' or '.join(repr(lowered[c]) for c in close)}? " if close else ""


def _check_names(given: Sequence[str], known: Sequence[str], what: str) -> None:
    for name in given:
        if name not in known:
            raise UsageError(
                f"unknown {what} {name!r}; {_did_you_mean(name, known)}"
                f"the {what}s are: {', '.join(known)}"
            )


def _check_writable(path: Path, flag: str) -> None:
    """Raise unless files can be written under ``path`` (creating nothing): its nearest
    existing ancestor must be a directory in which a file can be made."""
    probe = path.expanduser()
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise UsageError(
                f"{flag} {path}: {probe} is a file, not a directory; choose another {flag}"
            )
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(
            f"{flag} {path}: cannot write in {probe} ({e.strerror or e}); choose a writable {flag}"
        ) from None


def _offline_env() -> str | None:
    """Which of huggingface_hub's / datasets' offline switches is on, if any."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (huggingface_hub's configured endpoint, through its HTTP
    session and proxies) answers within ``timeout`` seconds; any HTTP status counts."""
    answered = threading.Event()

    def probe() -> None:
        try:
            from huggingface_hub import constants
            from huggingface_hub.utils import get_session

            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.set()
        except Exception:  # no network, DNS failure, timeout, no huggingface_hub
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # also bounds name resolution, which has no timeout of its own
    return answered.is_set()


def _offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now (None when it can)."""
    env = _offline_env()
    if env is not None:
        return env
    if not _hub_reachable():
        from huggingface_hub import constants

        return f"{constants.ENDPOINT} cannot be reached"
    return None


def _tl_checkpoint_cached(name: str) -> bool:
    """Whether the HF checkpoint behind TransformerLens name ``name`` is in the local HF cache."""
    repo = name
    for module in ("transformer_lens.loading_from_pretrained", "transformer_lens.supported_models"):
        try:
            official = importlib.import_module(module).get_official_model_name
        except (ImportError, AttributeError):
            continue
        try:
            repo = official(name)
        except ValueError:
            pass
        break
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:
        return False


def _hf_cache_has_models() -> bool:
    """Whether the local Hugging Face hub cache holds any model checkpoint."""
    try:
        from huggingface_hub import constants

        return any(p.name.startswith("models--") for p in Path(constants.HF_HUB_CACHE).iterdir())
    except (ImportError, OSError):
        return False


def _check_model(name: str) -> None:
    """Raise unless ``name`` can be loaded here: an offline bundle, a checkpoint directory, or
    a TransformerLens name with the hub reachable or its checkpoint in the HF cache."""
    bundles = ", ".join(BUNDLES)
    if name in BUNDLES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        raise UsageError(
            f"--model {name}: the directory has no config.json; pass a Hugging Face checkpoint "
            f"directory (model.save_pretrained(dir)) or an offline bundle: {bundles}"
        )
    if path.exists():
        raise UsageError(
            f"--model {name} is a file; pass an offline bundle ({bundles}), a checkpoint "
            "directory or a TransformerLens name"
        )
    if name.startswith(("/", "./", "../", "~")):
        raise UsageError(f"--model {name}: no such directory")
    hint = _did_you_mean(name, BUNDLES)
    offline = _offline_reason()
    if offline is not None and not _hf_cache_has_models():  # decided without TransformerLens
        raise UsageError(
            f"--model {name!r} is not an offline bundle or a local checkpoint directory, and "
            f"{offline}, so it cannot be fetched (no model is in your Hugging Face cache); "
            f"{hint}the offline bundles are {bundles}"
        )
    from icl_lens.backend import is_tl_name  # imports TransformerLens

    known = is_tl_name(name)
    if known and (offline is None or _tl_checkpoint_cached(name)):
        return
    if known:
        raise UsageError(
            f"--model {name!r} is a TransformerLens name, which needs the Hugging Face hub, and "
            f"{offline}; {hint}the offline bundles are {bundles} (or pass a local checkpoint "
            "directory)"
        )
    raise UsageError(
        f"unknown model {name!r}: not an offline bundle, a local checkpoint directory or a "
        f"TransformerLens name; {hint}the offline bundles are {bundles}"
    )


def _check_template(template: str | None) -> str:
    example = '--template "Review: {text} Sentiment:"'
    if template is None:
        raise UsageError(
            f"--data needs --template with one placeholder for the text, e.g. {example}"
        )
    try:
        fields = template_fields(template)
    except ValueError as e:
        raise UsageError(
            f"--template {template!r}: {e}; write a literal brace as {{{{ or }}}}"
        ) from None
    if len(fields) != 1 or not fields[0].isidentifier():
        raise UsageError(
            f"--template {template!r} has the placeholders {list(fields)}; it needs exactly one, "
            f"named, for the text: e.g. {example}"
        )
    return template


def _parse_label_words(items: Sequence[str] | None) -> dict[str, str]:
    """``VALUE=WORD`` items as {label value: label word}, in label-word order."""
    example = 'e.g. --label-words negative=" Negative" positive=" Positive"'
    if not items:
        raise UsageError(
            "--data needs --label-words, one VALUE=WORD for each label value in the file, "
            + example
        )
    words: dict[str, str] = {}
    for item in items:
        value, sep, word = item.partition("=")
        value = value.strip()
        if not sep or not value:
            raise UsageError(f"--label-words: {item!r} is not VALUE=WORD; {example}")
        if value in words:
            raise UsageError(f"--label-words: the label value {value!r} is given twice")
        if not word.strip():
            raise UsageError(f"--label-words: the word for {value!r} is empty; {example}")
        words[value] = word
    if len(words) < 2:
        raise UsageError(f"--label-words needs at least two label values, {example}")
    seen: dict[str, str] = {}
    for value, word in words.items():
        if word in seen:
            raise UsageError(
                f"--label-words: {seen[word]!r} and {value!r} have the same word {word!r}; "
                "give each label its own word"
            )
        seen[word] = value
    return words


def _user_data(args: argparse.Namespace) -> Any:
    """The ``--data`` file as TaskData, every problem a UsageError naming the fix."""
    from icl_lens.data import FILE_SUFFIXES, load_file, read_table

    path = Path(args.data).expanduser()
    flag = f"--data {args.data}"
    if not path.exists():
        raise UsageError(f"{flag}: no such file")
    if path.is_dir():
        raise UsageError(f"{flag} is a directory; pass a .csv, .tsv or .jsonl file")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UsageError(f"{flag}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    if path.stem in TASKS:
        raise UsageError(
            f"{flag}: its task would be named {path.stem!r} (the file's stem), a built-in task's "
            "name, and its results would mix with that task's under --out; rename the file"
        )
    template = _check_template(args.template)
    words = _parse_label_words(args.label_words)
    text_column, label_column = args.text_column or "text", args.label_column or "label"
    try:
        frame = read_table(path, [text_column])
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    for option, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in frame.columns:
            raise UsageError(
                f"{path}: no column {column!r} ({option}); its columns are {list(frame.columns)}"
            )
    if len(frame) == 0:
        raise UsageError(f"{path}: no rows; add one example per row under the header")
    present = {str(v) for v in frame[label_column] if isinstance(v, str) and v.strip()}
    present |= {str(v) for v in frame[label_column] if not isinstance(v, str) and v == v}
    missing = sorted(present - set(words))
    if missing:
        shown = " ".join(f'{v}=" ..."' for v in missing[:3])
        one = len(missing) == 1
        what = f"value {missing[0]!r}" if one else f"values {missing[:5]}"
        raise UsageError(
            f"{path}: the label {what} of column {label_column!r} {'has' if one else 'have'} no "
            f"label word; add {'it' if one else 'them'} to --label-words ({shown}); given: "
            f"{', '.join(words)}"
        )
    try:
        return load_file(path, text_column, label_column, template, tuple(words.values()),
                         labels=list(words), name=path.stem)  # fmt: skip
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None


def _task_data(task: str, source: str) -> Any:
    """A built-in task's data; a problem that stops it (no StaICC, offline) is a UsageError."""
    from icl_lens.data import load_task_data

    try:
        return load_task_data(task, source=source)
    except OSError as e:  # datasets' ConnectionError, a missing file
        offline = _offline_env()
        if source == "hf" and offline:
            raise UsageError(
                f"--source hf: {task} is not in your Hugging Face cache and {offline} (offline "
                "mode); unset it and connect to the internet, or use --source staicc"
            ) from None
        if source == "hf":  # online: a failure while downloading
            raise
        raise UsageError(f"{task}: {e}") from None
    except (ValueError, ImportError) as e:
        raise UsageError(f"{task}: {e}") from None


def _check_data_for_model(data: Any, model: Any, n_eval: int) -> None:
    """``--data`` checks that need the tokenizer: single-token label words, rows that fit."""
    from icl_lens import backend as B
    from icl_lens.tasks import build_prompt

    tok = getattr(model, "tokenizer", None)
    if tok is None:  # run_experiment names this
        return
    spec = data.task
    encoded = {w: list(tok.encode(w, add_special_tokens=False)) for w in spec.label_words}
    bad = {w: ids for w, ids in encoded.items() if len(ids) != 1}
    if bad:
        shown = "; ".join(f"{w!r} is {len(ids)} tokens" for w, ids in bad.items())
        raise UsageError(
            f"--label-words: {shown} for this model's tokenizer; each label word must be one "
            "token: choose another word (with or without its leading space)"
        )
    if len({ids[0] for ids in encoded.values()}) != len(encoded):
        raise UsageError(
            f"--label-words: {list(spec.label_words)} share a token for this model's tokenizer; "
            "choose words that are different tokens"
        )
    n_ctx = B.dims(model).n_ctx
    where = data.provenance.get("file", spec.name)
    for ex in [*data.eval[:n_eval], *data.demo_pool]:
        try:
            n = len(build_prompt(spec, tok, ex))
        except ValueError as e:
            raise UsageError(f"{where}: row {ex.id}: {e}") from None
        if n > n_ctx:
            raise UsageError(
                f"{where}: row {ex.id} is {n} tokens in the template (with BOS and the label "
                f"word), more than the model's context of {n_ctx}; shorten or drop that row"
            )


@dataclass
class _Plan:
    """What ``reproduce`` will run, once every check that needs no model has passed."""

    data: list[Any]
    n_demos: int
    n_eval: int
    seeds: list[int]
    out: Path


def _plan(args: argparse.Namespace) -> _Plan:
    """Check every argument, the output directory, the model name and the data, before any
    model loads; a value the user gave is used as given (never replaced by a default)."""
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None and not (key == "tasks" and args.data):
                setattr(args, key, value)
    given = {k: getattr(args, k) for k in DEFAULTS}
    n_demos, n_eval, seeds = (v if v is not None else DEFAULTS[k] for k, v in given.items())
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {' '.join(map(str, seeds))}: give each seed once")
    if args.baselines is not None:
        _check_names(args.baselines, BASELINES, "baseline")
    data_flags = ("text_column", "label_column", "template", "label_words")
    if args.data is None:
        stray = [f"--{f.replace('_', '-')}" for f in data_flags if getattr(args, f) is not None]
        if stray:
            verb = "describes" if len(stray) == 1 else "describe"
            raise UsageError(f"{', '.join(stray)} {verb} a --data file; add --data PATH")
    else:
        if args.tasks:
            raise UsageError("--data runs the one task in your file; drop --tasks")
        if args.source is not None:
            raise UsageError("--source picks where built-in tasks come from; drop it with --data")
    tasks = list(args.tasks or DEFAULT_TASKS)
    _check_names(tasks, list(TASKS), "task")
    source = args.source or "staicc"
    if source == "staicc" and "cb" in tasks and not args.data:
        raise UsageError("cb is not available offline; use --source hf (needs internet)")
    out = Path(args.out) / args.model.replace("/", "--")
    _check_writable(out, "--out")
    _check_model(args.model)
    if args.data:
        datas = [_user_data(args)]
    else:
        if source == "hf":
            offline = _offline_reason()
            if offline is not None and _offline_env() is None:  # else: try the HF cache
                raise UsageError(
                    f"--source hf needs the Hugging Face hub, but {offline}; connect to the "
                    "internet, use --source staicc (the offline copies), or set "
                    "HF_DATASETS_OFFLINE=1 to use datasets already in your Hugging Face cache"
                )
        datas = [_task_data(t, source) for t in tasks]
    for data in datas:
        name = data.provenance["file"] if args.data else data.task.name
        pool = len(data.demo_pool)
        default = " (the default)" if given["n_demos"] is None else ""
        if n_demos > pool:
            raise UsageError(
                f"{name}: the demonstration pool has {pool} examples, fewer than --n-demos "
                f"{n_demos}{default}; pass --n-demos {pool} or fewer"
            )
        if args.lr is None and pool == n_demos:
            raise UsageError(
                f"{name}: no demonstration-pool example is left to choose the learning rate on "
                f"({pool} in the pool, --n-demos {n_demos}{default}); pass --lr, or a smaller "
                "--n-demos"
            )
        if n_eval > len(data.eval):
            print(
                f"icl-lens: note: {name} has {len(data.eval)} evaluation examples; evaluating on "
                f"all of them (--n-eval {n_eval})",
                file=sys.stderr,
            )
    return _Plan(datas, n_demos, n_eval, list(seeds), out)


# --------------------------------------------------------------------------- commands


def _reproduce(args: argparse.Namespace) -> int:
    plan = _plan(args)

    import pandas as pd
    from tqdm.auto import tqdm

    from icl_lens.experiment import run_experiment
    from icl_lens.models import load_model
    from icl_lens.results import Results

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = plan.out
    start = time.time()
    model = load_model(args.model)
    if args.data:
        _check_data_for_model(plan.data[0], model, plan.n_eval)
    config = dict(
        n_boot=args.n_boot,
        batch_size=args.batch_size,
        record=args.record,
        lr=args.lr,
    )
    if args.lr_grid:
        config["lr_grid"] = tuple(args.lr_grid)
    if args.baselines is not None:
        config["baselines"] = tuple(args.baselines)
    if args.dual:
        config["dual"] = True
    if args.no_prefix_cache:
        config["shared_prefix"] = False
    if args.no_self_checks:
        config["self_checks"] = False
    results = Results()
    for data in tqdm(plan.data, desc="tasks"):
        results = results + run_experiment(
            model,
            data.task,
            n_demos=plan.n_demos,
            n_eval=plan.n_eval,
            seeds=tuple(plan.seeds),
            data=data,
            model_name=args.model,
            out_dir=out,
            resume="never" if args.force else "any" if args.resume_any else "same_versions",
            **config,
        )
    n_runs = len(results.runs)
    if results.resumed:
        stacks = sorted({(r.get("icl_lens_git") or "?")[:7] + ", transformers "
                         + str(r.get("transformers")) for r in results.resumed})  # fmt: skip
        print(f"resumed {len(results.resumed)} of {n_runs} runs from {out} "
              f"(icl-lens {'; '.join(stacks)}); --force recomputes them")  # fmt: skip
    else:
        print(f"computed all {n_runs} runs (none resumed)")
    summary = results.summary()
    summary.to_csv(out / "summary.csv", float_format="%.4f")
    results.to_frame().to_csv(out / "results.csv", index=False, float_format="%.6g")
    with pd.option_context("display.width", 200, "display.max_columns", 40):
        print(summary.round(3).T.to_string())
    if not args.no_figures:
        from icl_lens.plots import make_all

        paths = make_all(results, out / "figures")
        print(f"wrote {len(paths)} figure files to {out / 'figures'}")
    print(f"results in {out} ({time.time() - start:.0f} s)")
    _compare_with_reference(results, out)
    return 0


def _compare_with_reference(results, out: Path) -> None:
    """This run beside the committed reference run, if there is one (a reproduction that
    disagrees must say so loudly)."""
    from icl_lens.compare import compare, default_reference, report

    try:
        reference = default_reference(out, results)
    except FileNotFoundError as e:
        print(f"no reference run to compare with ({e})")
        return
    print(report(compare(results, reference, run_label=str(out))))


def _figures(args: argparse.Namespace) -> int:
    src = Path(args.results_dir)
    if not src.exists():
        raise UsageError(
            f"no results at {src}; pass a results directory (e.g. results/gemma-3-270m) or a "
            "results file"
        )
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "figures"
    _check_writable(out, "--out")
    from icl_lens.plots import figures_main

    try:
        paths = figures_main(args.results_dir, args.out)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a JSON of another shape
        raise ValueError(
            f"{src}: not icl-lens results ({type(e).__name__}: {e}); pass a directory of run "
            "files or a file written by Results.save"
        ) from e
    except ValueError as e:  # name the file where the message does not
        if str(src) in str(e):
            raise
        raise ValueError(f"{src}: {e}") from e
    print(f"wrote {len(paths)} figure files")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from icl_lens.compare import compare, default_reference, load_side, report, reproduces

    run, label = load_side(args.run_dir, "run")
    reference = args.reference_dir or default_reference(args.run_dir, run)
    frame = compare(run, reference, run_label=label)
    if args.csv:
        try:
            frame.to_csv(args.csv, index=False, float_format="%.6g")
        except OSError as e:
            raise ValueError(f"compare: cannot write {args.csv}: {e}") from e
    print(report(frame, per_seed=args.per_seed))
    return 1 if args.strict and not reproduces(frame) else 0


def _bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engine.py"
    if not script.exists():
        raise SystemExit(
            "icl-lens bench: benchmarks/ ships with the source checkout, not the installed "
            "package; run `python benchmarks/bench_engine.py` from a clone"
        )
    return subprocess.call([sys.executable, str(script), *args.extra])


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, ``icl-lens: ... (see `PROG --help`)``, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"icl-lens: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a learning rate must be finite and > 0, got {text}")
    return value


def _quick_text() -> str:
    q = QUICK
    return (
        f"--tasks {' '.join(q['tasks'])} --n-eval {q['n_eval']} --n-demos {q['n_demos']} "
        f"--seeds {' '.join(map(str, q['seeds']))} --lr-grid {' '.join(map(str, q['lr_grid']))}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="icl-lens",
        description="Reproduce Dai et al. 2022 (ICL as implicit gradient descent) with baselines.",
        epilog="Exit codes: 0 done; 2 the command as given cannot run (checked before any "
        "computation) or names a path that does not exist; 1 a failure while working. "
        "ICL_LENS_DEBUG=1 shows tracebacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser(
        "reproduce",
        help="run ZS/ICL/FT analyses (offline default: Gemma-3)",
        description="Run zero-shot (ZS), in-context (ICL) and finetuned (FT) on each task and "
        "seed, compute every analysis beside its baselines, and write the results (one file "
        "per task and seed, resumed when rerun), summary.csv and figures. Every argument, the "
        "output directory, the model name and the data are checked before the model loads.",
    )
    rep.add_argument(
        "--model",
        default="gemma-3-270m",
        help=f"an offline bundle ({', '.join(BUNDLES)}; default gemma-3-270m), a local Hugging "
        "Face checkpoint directory (with config.json), or a TransformerLens model name (needs "
        "internet, or its checkpoint in the Hugging Face cache)",
    )
    rep.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help=f"built-in tasks, any of: {' '.join(TASKS)} (default: {' '.join(DEFAULT_TASKS)}; "
        "cb needs --source hf)",
    )
    rep.add_argument(
        "--source",
        choices=["staicc", "hf"],
        help="where the built-in tasks' data comes from: staicc, the offline copies in the "
        "StaICC package (default); hf, the official Hugging Face datasets (needs internet, or "
        "HF_DATASETS_OFFLINE=1 with them in your Hugging Face cache)",
    )
    rep.add_argument(
        "--n-demos",
        type=_int_at_least(1),
        help=f"demonstrations per prompt, >= 1 (default {DEFAULTS['n_demos']}); fewer are used "
        "only if the prompts would not fit the model's context (with a warning)",
    )
    rep.add_argument(
        "--n-eval",
        type=_int_at_least(1),
        help=f"evaluation examples per task, >= 1 (default {DEFAULTS['n_eval']})",
    )
    rep.add_argument(
        "--seeds",
        type=_int_at_least(0),
        nargs="+",
        help="demonstration seeds, distinct integers >= 0 (default "
        f"{' '.join(map(str, DEFAULTS['seeds']))})",
    )
    rep.add_argument(
        "--lr",
        type=_learning_rate,
        help="fix the FT learning rate (> 0); by default it is chosen per seed from --lr-grid "
        "by accuracy on held-out demonstration-pool examples",
    )
    rep.add_argument(
        "--lr-grid",
        type=_learning_rate,
        nargs="+",
        metavar="LR",
        help="learning rates (> 0) to choose from; every metric is also reported at each "
        f"(default {' '.join(f'{g:g}' for g in LR_GRID)})",
    )
    rep.add_argument(
        "--baselines",
        nargs="*",
        metavar="NAME",
        help=f"baselines to run, any of: {' '.join(BASELINES)} (default: all; the flag alone "
        "runs none)",
    )
    rep.add_argument(
        "--record",
        default="label",
        choices=["label", "predict"],
        help="where attention outputs are recorded: label, at the label token appended to each "
        "prompt, as in the paper's code (default); predict, at the query's last token, where "
        "predictions are read",
    )
    rep.add_argument(
        "--dual",
        action="store_true",
        help="add the ΔW_ICL vs ΔW_FT meta-gradient analysis (a new config: seeds rerun)",
    )
    rep.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run every ICL prompt in full instead of reusing the demonstrations' KV cache "
        "(slower; by default the cache is used only after it matches full prompts)",
    )
    rep.add_argument(
        "--no-self-checks",
        action="store_true",
        help="skip the run-time checks of the fast paths against the plain ones (not advised)",
    )
    rep.add_argument(
        "--force",
        action="store_true",
        help="recompute every (task, seed), even those already finished in --out",
    )
    rep.add_argument(
        "--resume-any",
        action="store_true",
        help="also reuse finished runs in --out that other package versions made (by default "
        "only runs made with the same model and package versions are reused)",
    )
    rep.add_argument(
        "--batch-size",
        type=_int_at_least(1),
        default=8,
        help="prompts per forward pass, >= 1 (default 8): larger is faster and needs more memory",
    )
    rep.add_argument(
        "--n-boot",
        type=_int_at_least(1),
        default=1000,
        help="bootstrap resamples for the 95%% confidence intervals, >= 1 (default 1000)",
    )
    rep.add_argument(
        "--threads",
        type=_int_at_least(1),
        help="CPU threads for torch, >= 1 (default: torch's choice, usually one per core)",
    )
    rep.add_argument(
        "--out",
        default="results",
        help="results root: the run writes to OUT/<model>/ (default ./results); checked for "
        "writing before any work",
    )
    rep.add_argument(
        "--quick",
        action="store_true",
        help=f"a two-minute smoke test (CI runs it): {_quick_text()}; flags you give win",
    )
    rep.add_argument(
        "--no-figures",
        action="store_true",
        help="skip the figures (the results files and summary.csv are still written)",
    )
    own = rep.add_argument_group(
        "your own data (instead of --tasks)",
        "e.g. --data reviews.csv --text-column review --label-column sentiment --template "
        '"Review: {text} Sentiment:" --label-words negative=" Negative" positive=" Positive"',
    )
    own.add_argument(
        "--data",
        metavar="PATH",
        help="a .csv, .tsv or .jsonl file: one task named after the file's stem; a seeded half "
        "of its rows (at most 2000) is evaluated on, the other half is the demonstration pool",
    )
    own.add_argument("--text-column", metavar="COL", help="the texts' column (default: text)")
    own.add_argument("--label-column", metavar="COL", help="the labels' column (default: label)")
    own.add_argument(
        "--template",
        help='how a text is shown, with one placeholder for it, e.g. "Review: {text} Sentiment:"',
    )
    own.add_argument(
        "--label-words",
        nargs="+",
        metavar="VALUE=WORD",
        help="the label word of each label value in the file (strings or integers), in order, "
        'e.g. negative=" Negative" positive=" Positive"; each word must be one token for '
        "the model and usually starts with a space",
    )
    rep.set_defaults(func=_reproduce)

    fig = sub.add_parser("figures", help="regenerate figures from a results directory")
    fig.add_argument("results_dir", help="a results directory (of run files) or a results file")
    fig.add_argument("--out", help="output directory (default RESULTS_DIR/figures)")
    fig.set_defaults(func=_figures)

    cmp = sub.add_parser("compare", help="compare a run's headline numbers with the reference")
    cmp.add_argument("run_dir")
    cmp.add_argument(
        "reference_dir",
        nargs="?",
        help="default: results/reference/<model> of the source checkout",
    )
    cmp.add_argument("--strict", action="store_true", help="exit 1 if any value does not reproduce")
    cmp.add_argument("--per-seed", action="store_true", help="list every seed, not only means")
    cmp.add_argument("--csv", help="also write the comparison to this CSV file")
    cmp.set_defaults(func=_compare)

    bench = sub.add_parser("bench", help="run the engine benchmarks (source checkout)")
    bench.add_argument("extra", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    return parser


def _one_line(e: BaseException) -> str:
    """An exception as one line: its message (lines joined), typed when unexpected."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    expected = (UsageError, ValueError, OSError, ImportError, RuntimeError, ArithmeticError)
    if isinstance(e, expected) and text:
        return text
    return f"{type(e).__name__}: {text} (unexpected; ICL_LENS_DEBUG=1 shows the traceback)"


def _close_progress_bars() -> None:
    """Close the progress bars an error left open (innermost first), so that the error line
    comes last and is not redrawn over."""
    if "tqdm" not in sys.modules:
        return
    try:
        from tqdm import tqdm

        for bar in sorted(list(tqdm._instances), key=lambda b: -abs(getattr(b, "pos", 0))):
            bar.close()
    except Exception:  # a progress bar must never hide the error
        pass


def _fail(e: BaseException, code: int) -> int:
    _close_progress_bars()
    print(f"icl-lens: {_one_line(e)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run a command; errors become one line ``icl-lens: ...`` and exit code 2 (the command as
    given cannot run, or a path it names does not exist) or 1 (a failure while working).
    ``ICL_LENS_DEBUG=1`` re-raises."""
    logging.basicConfig(level=os.environ.get("ICL_LENS_LOG", "WARNING"))
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("ICL_LENS_DEBUG"))
    try:
        return int(args.func(args))
    except (UsageError, FileNotFoundError) as e:
        if debug:
            raise
        return _fail(e, 2)
    except KeyboardInterrupt:
        if debug:
            raise
        return _fail(UsageError("interrupted"), 130)
    except Exception as e:
        if debug:
            raise
        return _fail(e, 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
