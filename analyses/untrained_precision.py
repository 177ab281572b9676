"""How sensitive is the untrained-model baseline to its weights' rounding?

The untrained-model baseline (``baselines.untrained``: attention and MLP matrices re-drawn)
runs ZS, ICL and FT on a random network. In bf16 its SimAOU sits outside float32's CI even with
the ZS/FT captures in float32. This script asks whether that is bf16's arithmetic or the
baseline itself: it runs the baseline's ZS, ICL and FT (``finetuned`` at ``--lr``, the ZS/FT
captures in float32 as ``run_experiment`` does by default) on

- ``fp32``: the float32 model;
- ``bf16``: the bf16 model (ICL captured in bf16, and again in float32);
- ``fp32, re-drawn rounded``: the float32 model, its re-drawn weights rounded to bf16 (all
  arithmetic in float32);
- ``fp32, all rounded``: the same with every weight rounded to bf16;

and prints each one's mean SimAOU (per example over layers, then over examples, as
``run_experiment``) and how far its records are from fp32's (mean distance of unit vectors).

    python analyses/untrained_precision.py --n-eval 500
"""

from __future__ import annotations

import time

import torch
from precision_simaou import _mean, _unit, episode, run_args  # this folder's (the script's own)

import icl_lens as il
from icl_lens import backend as B
from icl_lens.baselines import untrained
from icl_lens.metrics import simaou


def _dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((_unit(a) - _unit(b)).norm(dim=-1).mean())


def main(argv=None) -> None:
    args = run_args(__doc__, n_eval=500).parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    spec = il.get_task(args.task)
    data = il.load_task_data(spec, "staicc")
    runs: dict[str, dict] = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = il.load_model(args.model, dtype=dtype, progress=False)
        tok, demos, ids, zs_p, icl_p = episode(args, spec, data, model)

        def cap(prompts, cond, compute="float32", model=model, ids=ids):
            return il.capture(model, prompts, ids, cond, progress=False,
                              compute_dtype=compute).attn_out  # fmt: skip

        variants = {"fp32": None} if dtype == torch.float32 else {"bf16": None}
        if dtype == torch.float32:
            variants.update({"fp32, re-drawn rounded": "re-drawn", "fp32, all rounded": "all"})
        for name, rounded in variants.items():
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
            try:
                with untrained(model, args.seed):
                    if rounded is not None:
                        params = (B.attention_parameters(model) if rounded == "re-drawn"
                                  else list(model.named_parameters()))  # fmt: skip
                        with torch.no_grad():
                            for _, p in params:
                                p.copy_(p.to(torch.bfloat16).to(p.dtype))
                    run = {"zs": cap(zs_p, "zs"), "icl": cap(icl_p, "icl", "model")}
                    if dtype != torch.float32:
                        run["icl (float32)"] = cap(icl_p, "icl")
                    with il.finetuned(model, demos, args.lr, task=spec, tokenizer=tok):
                        run["ft"] = cap(zs_p, "ft")
            finally:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(saved[n])
            runs[name] = run
            print(f"{name}: done ({time.perf_counter() - t0:.0f}s)", flush=True)
        del model
    ref = runs["fp32"]
    print(f"untrained-model baseline, {args.model} {args.task} seed {args.seed}, "
          f"{args.n_eval} examples, lr {args.lr:g}")  # fmt: skip
    print(f"  {'':<26} {'SimAOU':>7}  |zs - fp32| |icl - fp32| |ft - fp32|  (unit vectors)")
    for name, run in runs.items():
        icls = [k for k in run if k.startswith("icl")]
        for icl in icls:
            sim = _mean(simaou(run["zs"], run[icl], run["ft"], on_undefined="nan"))
            label = name + ("" if icl == "icl" else ", ICL in float32")
            print(
                f"  {label:<26} {sim:7.4f}  {_dist(run['zs'], ref['zs']):10.4f} "
                f"{_dist(run[icl], ref['icl']):11.4f} {_dist(run['ft'], ref['ft']):10.4f}"
            )
    size = (_unit(ref["ft"]) - _unit(ref["zs"])).norm(dim=-1).median()
    print(f"  fp32's FT update: median |unit FT - unit ZS| {float(size):.3f}")


if __name__ == "__main__":
    main()
