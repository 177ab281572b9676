"""Cost of the run-time self-checks: one (task, seed) with and without them, side by side.

    python benchmarks/bench_selfcheck.py [--model gemma-3-270m|toy] [--n-eval 100] [--repeats 1]

Runs ``run_experiment`` on SST-2 seed 0 (default protocol otherwise: 32 demonstrations, the
learning-rate grid, every baseline) twice per repeat, alternating ``self_checks=True`` and
``False``, and prints the wall-time ratio. The checks cost a fixed amount per capture (two
prompts and one short forward pass) while the rest grows with the number of evaluation
examples, so a smaller ``--n-eval`` than the default 500 gives an upper bound on the
default's overhead. It also prints what the checks measured. Target: <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_engine import load  # the same model and SST-2 (or toy) data as the engine bench

from icl_lens.experiment import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-demos", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, data = load(args.model)
    n_demos = min(args.n_demos, 12) if args.model == "toy" else args.n_demos
    times: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for _ in range(args.repeats):
        for checks in (True, False):
            start = time.perf_counter()
            results[checks] = run_experiment(
                model, data.task, n_demos, args.n_eval, (0,), data=data, tokenizer=tok,
                self_checks=checks, progress=False,
            )  # fmt: skip
            times[checks].append(time.perf_counter() - start)
    on, off = min(times[True]), min(times[False])
    print(f"{args.model}, {data.task.name} seed 0, n_eval {args.n_eval}, {n_demos} "
          f"demonstrations, {args.threads} threads; best of {args.repeats}")  # fmt: skip
    print(f"with self-checks {on:.1f}s, without {off:.1f}s: {on / off:.3f}x")
    fast = results[True].runs[0].provenance["fast_paths"]
    for cond, reports in fast["captures"].items():
        for r in reports[:1]:
            prefix = r.get("prefix_cache", {})
            print(f"  {cond}: label logits rel diff {r['label_logits']['max_rel_diff']:.2g}, "
                  f"scores {r['scores'].get('max_abs_diff', float('nan')):.2g}, windows ok "
                  f"{r['windows'].get('ok')}, prefix cache used {prefix.get('used')}"
                  + (f" (max rel diff {max(prefix['max_rel_diff'].values()):.2g})"
                     if prefix.get("max_rel_diff") else ""))  # fmt: skip
    print("  ft:", json.dumps(fast["ft"]))
    same = results[True].to_frame().equals(results[False].to_frame())
    print(f"results identical with and without the checks: {same}")


if __name__ == "__main__":
    main()
