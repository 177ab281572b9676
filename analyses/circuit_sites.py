"""SimAOU at every recording site, per layer, on a real model (issue 15's must-show).

    python analyses/circuit_sites.py [--model gemma-3-270m] [--task sst2] [--seed 0]
        [--n-eval 24] [--n-demos 8] [--lr 1e-4] [--out results/circuit]

Prints the per-layer table of ``il.circuit.layer_table`` (update similarity ΔICL vs ΔFT, its
shared-origin null and orthogonal variant, at the residual stream, the attention output as
added to the stream, and the attention output before the post-attention norm; DLA of each
update) and its mean over layers, and writes the table as CSV.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import icl_lens as il


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=24)
    ap.add_argument("--n-demos", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/circuit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = il.load_model(args.model, progress=False)
    rec = il.circuit_records(model, args.task, args.seed, lr=args.lr, n_eval=args.n_eval,
                             n_demos=args.n_demos)  # fmt: skip
    table = il.circuit.layer_table(rec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.model}-{args.task}-seed{args.seed}-layers.csv"
    table.to_csv(path, index=False)
    print(f"{args.model} {args.task} seed {args.seed}: {len(rec)} examples, lr {args.lr:g}, "
          f"{time.perf_counter() - start:.0f} s; written {path}")  # fmt: skip
    print(table.round(3).to_string(index=False))
    print("mean over layers:")
    print(table.drop(columns="layer").mean().round(3).to_string())


if __name__ == "__main__":
    main()
