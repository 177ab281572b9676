"""ICL records of Gemma-3-270m on SST-2, saved per package stack, and compared across stacks.

A new transformers release once disabled the prefix KV cache without a word (ICL ran
without its demonstrations). This script makes the check a person can read: run it in two
environments (say transformers 5.23 and 5.24), then compare the two files.

    python scripts/stack_records.py save OUT.safetensors [--n-eval 64] [--n-demos 32]
    python scripts/stack_records.py compare A.safetensors B.safetensors

``save`` prints the versions, which capture path ran and what its self-checks measured, the
demonstration tokens visible per layer and the ICL accuracy. ``compare`` prints the largest
difference of every record field and exits 1 if any exceeds the fp32 self-check tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file

FIELDS = ("label_logits", "attn_out", "query_scores", "demo_scores", "query_mask", "demo_mask")


def save(args: argparse.Namespace) -> int:
    import icl_lens
    from icl_lens import backend as B
    from icl_lens.capture import capture
    from icl_lens.data import load_task_data, sample_demos
    from icl_lens.models import load_model
    from icl_lens.tasks import build_prompt, fit_demos, get_task, label_token_ids

    torch.set_num_threads(args.threads)
    model = load_model("gemma-3-270m", progress=False)
    tok = model.tokenizer
    task = get_task("sst2")
    data = load_task_data(task, "staicc")
    evals = data.eval[: args.n_eval]
    demos = fit_demos(task, tok, sample_demos(data.demo_pool, args.n_demos, 0), evals,
                      B.dims(model).n_ctx).demos  # fmt: skip
    prompts = [build_prompt(task, tok, q, demos) for q in evals]
    rec = capture(model, prompts, label_token_ids(task, tok), "icl", progress=False)
    versions = B.tl_version_info()
    print(json.dumps({"icl_lens": icl_lens.__version__, **versions}))
    print("prefix cache used:", rec.prefix_cached)
    print("self-checks:", json.dumps(rec.checks, default=str))
    visible = rec.demo_mask.sum(-1).float().mean(0)
    print(f"demonstration tokens visible per layer (of {rec.demo_mask.shape[-1]}):",
          " ".join(f"{v:.0f}" for v in visible.tolist()))  # fmt: skip
    acc = float((rec.preds == rec.labels).double().mean())
    print(f"ICL accuracy on {len(rec)} SST-2 examples: {acc:.4f}")
    tensors = {f: getattr(rec, f).contiguous() for f in FIELDS}
    save_file(tensors, args.out, metadata={"versions": json.dumps(versions)})
    print("wrote", args.out)
    return 0


def compare(args: argparse.Namespace) -> int:
    a, b = load_file(args.a), load_file(args.b)
    worst = 0.0
    for f in FIELDS:
        x, y = a[f], b[f]
        if x.dtype == torch.bool:
            same = bool(torch.equal(x, y))
            print(f"{f:14s} {'equal' if same else 'DIFFERENT'}")
            worst = worst if same else float("inf")
            continue
        diff = float((x.double() - y.double()).abs().max())
        rel = diff / max(1.0, float(y.double().abs().max()))
        worst = max(worst, rel)
        print(f"{f:14s} max |diff| {diff:.3g} (relative {rel:.3g})")
    ok = worst <= 1e-4
    print("records agree within the fp32 tolerance 1e-4" if ok else "RECORDS DIFFER")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("out")
    s.add_argument("--n-eval", type=int, default=64)
    s.add_argument("--n-demos", type=int, default=32)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=save)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.set_defaults(func=compare)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
