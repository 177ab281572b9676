"""The subcommands' bodies: ``reproduce``, ``figures``, ``compare``, ``bench``."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from icl_lens.cli.checks import _check_writable
from icl_lens.cli.errors import UsageError
from icl_lens.cli.plan import _plan
from icl_lens.cli.user_data import _check_data_for_model


def _plan_line(plan) -> str:
    """What ``reproduce`` is about to do, said before the model loads: how many runs, where,
    and how many of them already have a file there (each reused only if it qualifies)."""
    from icl_lens.experiment import run_file

    runs = [(d.task.name, s) for d in plan.data for s in plan.seeds]
    there = sum(run_file(plan.out, task, seed).exists() for task, seed in runs)

    def n(k: int, what: str) -> str:
        return f"{k} {what}{'' if k == 1 else 's'}"

    line = (f"{n(len(runs), 'run')} ({n(len(plan.data), 'task')} x {n(len(plan.seeds), 'seed')}) "
            f"into {plan.out}")  # fmt: skip
    if there:
        line += (f"; {there} of them have a file there from an earlier run, reused only if made "
                 "by icl-lens with the same settings, data, model and package versions "
                 "(--force recomputes)")  # fmt: skip
    return line


def _reproduce(args: argparse.Namespace) -> int:
    plan = _plan(args)

    import pandas as pd
    import torch

    from icl_lens.experiment import run_experiment
    from icl_lens.models import load_model
    from icl_lens.progress import tqdm
    from icl_lens.results import Results

    if args.threads:
        torch.set_num_threads(args.threads)
    out = plan.out
    start = time.time()
    print(_plan_line(plan), flush=True)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if args.data:
        _check_data_for_model(plan.data[0], model, plan.n_eval)
    config = dict(
        n_boot=args.n_boot,
        batch_size=args.batch_size,
        record=args.record,
        lr=args.lr,
        ft_train_dtype=args.ft_train_dtype,
        update_capture_dtype=args.update_capture_dtype,
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
    if args.layers:
        config["layers"] = _check_layers(args.layers, model)
    if args.patching:
        config.update(patching=True, patch_examples=args.patching)
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
        print(f"computed all {n_runs} runs (none resumed)" if n_runs != 1
              else "computed the 1 run (not resumed)")  # fmt: skip
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


def _check_layers(specs: list[list[int]], model) -> tuple[int, ...]:
    """``--layers``, flattened, against the loaded model's layer count (before any work)."""
    from icl_lens import backend as B

    layers = sorted({i for spec in specs for i in spec})
    n = B.dims(model).n_layers
    if layers[-1] >= n:
        raise UsageError(f"--layers {layers[-1]}: the model has {n} layers; use 0-{n - 1}")
    return tuple(layers)


def _compare_with_reference(results, out: Path) -> None:
    """This run beside the committed reference run, if there is one (a reproduction that
    disagrees must say so loudly)."""
    from icl_lens.compare import compare, default_reference, load_side, report
    from icl_lens.results import Results

    try:
        reference = default_reference(out, results)
    except FileNotFoundError as e:
        print(f"no reference run to compare with ({e})")
        return
    tasks = sorted({r.task for r in results.runs})
    ref, label = load_side(reference, "reference")
    ref = Results([r for r in ref.runs if r.task in tasks])  # only the tasks this run has
    if not ref.runs:
        print(f"the reference run ({reference}) has no {', '.join(tasks)}: nothing to compare")
        return
    print(report(compare(results, ref, run_label=str(out), reference_label=label)))


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
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_engine.py"
    if not script.exists():
        raise SystemExit(
            "icl-lens bench: benchmarks/ ships with the source checkout, not the installed "
            "package; run `python benchmarks/bench_engine.py` from a clone"
        )
    return subprocess.call([sys.executable, str(script), *args.extra])
