"""The argparse definitions of ``icl-lens`` and the argument type checkers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from icl_lens.cli.commands import _bench, _compare, _figures, _reproduce
from icl_lens.cli.defaults import BASELINES, BUNDLES, DEFAULT_TASKS, DEFAULTS, LR_GRID, QUICK
from icl_lens.tasks import TASKS


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


def _layer_spec(text: str) -> list[int]:
    """``--layers`` items: a layer index ("5") or an inclusive range ("6-11")."""
    lo, sep, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a layer index or a range like 6-11, got {text!r}"
        ) from None
    if first < 0 or last < first:
        raise argparse.ArgumentTypeError(f"expected layers >= 0 and a rising range, got {text!r}")
    return list(range(first, last + 1))


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
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the model's dtype (default float32). FT trains in float32 (see --ft-train-dtype) "
        "and the metrics run in fp32/fp64 whatever this is; the self-checks' "
        "tolerances follow it. A non-default dtype writes to OUT/<model>-<dtype>/",
    )
    rep.add_argument(
        "--ft-train-dtype",
        choices=("float32", "model"),
        default="float32",
        help="what FT's training computes in for a bf16/fp16 model: float32 (default; an exact "
        "float32 copy of the model during training, restored after) or model (its own dtype, "
        "with fp32 master deltas: less memory, but bf16's gradients are a few percent off)",
    )
    rep.add_argument(
        "--update-capture-dtype",
        choices=("float32", "model"),
        default="float32",
        help="what the ZS and FT captures (their difference is FT's update) compute in for a "
        "bf16/fp16 model: float32 (default; on an exact float32 copy of the model) or model "
        "(its own dtype: faster, less memory, but bf16 moves SimAOU by more than its CI)",
    )
    rep.add_argument(
        "--device",
        default="cpu",
        help="torch device for the model: cpu (default), cuda, cuda:N, mps; checked before "
        "the model loads. A non-CPU device writes to OUT/<model>[-<dtype>]-<device type>/",
    )
    rep.add_argument(
        "--layers",
        nargs="+",
        type=_layer_spec,
        metavar="L",
        help="report per-layer metrics only for these layers (indices or ranges, e.g. 0 6-11), "
        "and average the 'mean' rows over them; every layer still runs and FT still trains "
        "every layer's K/V (default: all layers). Checked against the model once it loads, "
        "before any work",
    )
    rep.add_argument(
        "--patching",
        nargs="?",
        const=64,
        type=_int_at_least(1),
        metavar="N",
        help="also run ICL<->FT activation patching per layer (rows patch_survival, with the "
        "shuffled-label, random and zero baselines) on the first N evaluation examples "
        "(default N 64). Costs a few more FT trainings and captures of them, and 8 forward "
        "passes over them per patched layer (see --layers)",
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
        help="a .csv, .tsv or .jsonl file: one task named after the file's stem. With a column "
        "named split, its train rows are the demonstration pool and its test (or validation, "
        "dev, eval) rows are evaluated on; without one, a seeded half of the rows is evaluated "
        "on and the other half is the demonstration pool (at most 2000 evaluated on)",
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
