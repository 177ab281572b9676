"""Regenerate the committed ICL toy: icl_lens/assets/toy_icl.safetensors + toy_icl.json.

    python scripts/make_toy.py [--out DIR] [--seed 0] [--steps N] [--threads 1]

Training is deterministic given seed, steps and thread count (all recorded in the json).
The json also stores reference logits of a fixed prompt, so any backend can check its load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from icl_lens.toy import (
    DEFAULT_PATH,
    generate_batch,
    load_toy,
    save_toy,
    toy_icl_accuracy,
    train_toy,
)

EVAL_SEED = 2024  # not a training seed: training draws its batches from default_rng(seed)
EVAL_DEMOS = (1, 4, 8, 16, 32, 47)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH.parent, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: train_toy's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    kwargs = {"steps": args.steps} if args.steps else {}
    start = time.perf_counter()
    model, tok, info = train_toy(
        seed=args.seed, threads=args.threads, progress=not args.no_progress, **kwargs
    )
    wall = time.perf_counter() - start
    torch.set_num_threads(args.threads)
    losses = info.pop("losses")
    info["label_loss_every_100"] = [
        round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 4)
        for i in range(0, len(losses), 100)
    ]
    acc = {
        str(k): {
            "icl": toy_icl_accuracy(model, 1024, k, EVAL_SEED, tokenizer=tok),
            "zero_shot": toy_icl_accuracy(model, 1024, k, EVAL_SEED, False, tokenizer=tok),
        }
        for k in EVAL_DEMOS
    }
    ref_tokens = generate_batch(1, 8, EVAL_SEED, tokenizer=tok).tokens
    with torch.no_grad():
        ref_logits = model(ref_tokens)[0, -2]
    info.update(
        eval_seed=EVAL_SEED,
        accuracy=acc,
        chance=1 / len(tok.label_ids),
        reference={"tokens": ref_tokens[0].tolist(), "logits_at_-2": ref_logits.tolist()},
        command="python scripts/make_toy.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    path = save_toy(model, tok, args.out / DEFAULT_PATH.name, training=info)

    reloaded, _, _ = load_toy(path)
    with torch.no_grad():
        diff = (reloaded(ref_tokens)[0, -2] - ref_logits).abs().max().item()
    size = path.stat().st_size
    print(f"trained in {info['train_seconds']} s (wall {wall:.1f} s, {info['threads']} threads)")
    print(f"label loss {info['label_loss_first50']:.3f} -> {info['label_loss_last50']:.3f}")
    print(f"{'demos':>6} {'ICL':>6} {'zero-shot':>9}   (chance {info['chance']:.2f})")
    for k, a in acc.items():
        print(f"{k:>6} {a['icl']:6.3f} {a['zero_shot']:9.3f}")
    print(f"wrote {path} ({size / 1e6:.3f} MB) and {path.with_suffix('.json').name}")
    print(f"reload max |logit diff| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
