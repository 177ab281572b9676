"""Command line: ``icl-lens reproduce | figures | bench``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TASKS = ("sst2", "sst5", "mr", "subj", "agnews")
QUICK = {"tasks": ["sst2"], "n_eval": 24, "n_demos": 4, "seeds": [0], "lr_grid": [1e-3, 1e-2]}


def _reproduce(args: argparse.Namespace) -> int:
    import pandas as pd
    from tqdm.auto import tqdm

    from icl_lens.experiment import run_experiment
    from icl_lens.models import load_model
    from icl_lens.results import Results

    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    tasks = args.tasks or list(DEFAULT_TASKS)
    if args.source == "staicc" and "cb" in tasks:
        raise SystemExit("icl-lens: cb is not available offline; use --source hf (needs internet)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) / args.model.replace("/", "--")
    start = time.time()
    model = load_model(args.model)
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
    for task in tqdm(tasks, desc="tasks"):
        results = results + run_experiment(
            model,
            task,
            n_demos=args.n_demos or 32,
            n_eval=args.n_eval or 500,
            seeds=tuple(args.seeds or (0, 1, 2)),
            source=args.source,
            model_name=args.model,
            out_dir=out,
            **config,
        )
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
    return 0


def _figures(args: argparse.Namespace) -> int:
    from icl_lens.plots import figures_main

    paths = figures_main(args.results_dir, args.out)
    print(f"wrote {len(paths)} figure files")
    return 0


def _bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_engine.py"
    if not script.exists():
        raise SystemExit(
            "icl-lens bench: benchmarks/ ships with the source checkout, not the installed "
            "package; run `python benchmarks/bench_engine.py` from a clone"
        )
    return subprocess.call([sys.executable, str(script), *args.extra])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-lens",
        description="Reproduce Dai et al. 2022 (ICL as implicit gradient descent) with baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run ZS/ICL/FT analyses (offline default: Gemma-3)")
    rep.add_argument("--model", default="gemma-3-270m", help="offline bundle, TL name or path")
    rep.add_argument("--tasks", nargs="+", help=f"default: {' '.join(DEFAULT_TASKS)}")
    rep.add_argument("--source", default="staicc", choices=["staicc", "hf"])
    rep.add_argument("--n-demos", type=int, help="demonstrations per prompt (default 32)")
    rep.add_argument("--n-eval", type=int, help="evaluation examples per task (default 500)")
    rep.add_argument("--seeds", type=int, nargs="+", help="demonstration seeds (default 0 1 2)")
    rep.add_argument("--lr", type=float, help="fix the FT learning rate (default: choose)")
    rep.add_argument("--lr-grid", type=float, nargs="+", help="learning rates to choose from")
    rep.add_argument("--baselines", nargs="*", help="subset of the baselines to run")
    rep.add_argument("--record", default="label", choices=["label", "predict"])
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
    rep.add_argument("--batch-size", type=int, default=8)
    rep.add_argument("--n-boot", type=int, default=1000)
    rep.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    rep.add_argument("--out", default="results", help="results root (default ./results)")
    rep.add_argument("--quick", action="store_true", help="a small run for smoke tests")
    rep.add_argument("--no-figures", action="store_true")
    rep.set_defaults(func=_reproduce)

    fig = sub.add_parser("figures", help="regenerate figures from a results directory")
    fig.add_argument("results_dir")
    fig.add_argument("--out", help="output directory (default RESULTS_DIR/figures)")
    fig.set_defaults(func=_figures)

    bench = sub.add_parser("bench", help="run the engine benchmarks (source checkout)")
    bench.add_argument("extra", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("ICL_LENS_LOG", "WARNING"))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, ImportError, FileNotFoundError, NotImplementedError) as e:
        if os.environ.get("ICL_LENS_DEBUG"):
            raise
        print(f"icl-lens: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
