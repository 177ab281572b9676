"""The prepared GPU check: what the CPU tests cannot show, in one short run (run by gpu_check.sh).

Part 1, tiny random checkpoints (built from ``transformers`` config classes; nothing is
downloaded), for Llama, GPT-2 and Gemma-3, on ``--device`` in ``--dtype`` against fp32 on
the CPU:
  * the FT K/V update's relative L2 error, trained in float32 (the default) and in the
    model's dtype (its fp32 master deltas), in place, side by side and layer-causal
    (target: <= 2%, or twice the floor that the dtype's own gradients
    set, where that is larger; see tests/test_finetune_half.py);
  * the restore after FT is bit exact on the device;
  * ``run_experiment`` with every default baseline finishes there, and which fast paths ran.
Part 2, the default (task, seed) on ``--model`` (Gemma-3-270m) in ``--dtype`` on ``--device``,
with the protocol of the committed CPU fp32 reference file (``--reference``): wall time, peak
device memory, and every headline metric's difference from the reference against the
bootstrap CI half-widths of both. Skipped, with the reason, when the model cannot load here
(a GPU box without the offline bundle) or with ``--tiny-only``.

Run it on CPU too, as a dry run of the script itself:
    python benchmarks/gpu_check.py --device cpu --dtype bfloat16 --tiny-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flops import _headline_rows, headline_diffs  # noqa: E402

from icl_lens import backend as B  # noqa: E402
from icl_lens.checks import rel_l2, round_to_halves  # noqa: E402
from icl_lens.conformance import build_tiny_checkpoint  # noqa: E402
from icl_lens.finetune import finetuned, finetuned_grid, first_step_updates  # noqa: E402
from icl_lens.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("llama", "gpt2", "gemma3")
LR = 1e-3
DEMOS = [
    [0] + torch.randint(4, 50, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (10, 14, 9, 12, 11)
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _deltas(model, mode: str, side_by_side: bool, demos=DEMOS,
            train_dtype: str = "float32") -> tuple[list[torch.Tensor], str]:  # fmt: skip
    kw = dict(mode=mode, progress=False, train_dtype=train_dtype)
    if side_by_side:
        with finetuned_grid(model, demos, [LR, 3 * LR], **kw) as grid:
            how = "side by side" if grid.fallback is None else f"fell back: {grid.fallback}"
            with grid.applied(LR) as state:
                return [d.detach().float().cpu() for d in state.deltas], how
    with finetuned(model, demos, LR, **kw) as state:
        return [d.detach().float().cpu() for d in state.deltas], "in place"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], v) for k, v in snap.items())


def tiny_part(device: torch.device, dtype: torch.dtype) -> bool:
    """Part 1. Returns whether every check passed."""
    ok = True
    print(f"== part 1: tiny checkpoints, {dtype} on {device} vs float32 on cpu ==")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            path = build_tiny_checkpoint(arch, Path(tmp) / arch)
            ref = load_model(path, progress=False, processing="none")
            round_to_halves(ref)
            dev = load_model(path, progress=False, processing="none", dtype=dtype, device=device)
            with torch.no_grad():
                for p, q in zip(dev.parameters(), ref.parameters(), strict=True):
                    p.copy_(q.to(dtype))
            snap = _state(dev)
            floor = rel_l2(first_step_updates(dev, DEMOS, LR, train_dtype="model"),
                           first_step_updates(ref, DEMOS, LR))  # fmt: skip
            bound = max(0.02, 2 * floor)
            print(f"  {arch:6s} the dtype's floor (first-step updates vs fp32) {floor:.4f}; "
                  f"bound max(2%, 2x floor) = {bound:.4f}")  # fmt: skip
            for mode in ("standard", "layer_causal"):
                want, _ = _deltas(ref, mode, False)
                for sbs, train in itertools.product((False, True), ("float32", "model")):
                    got, how = _deltas(dev, mode, sbs, train_dtype=train)
                    err = rel_l2(got, want)
                    flag = "ok" if err <= bound else "ABOVE THE BOUND"
                    ok &= err <= bound
                    print(f"  {arch:6s} {mode:12s} {how:12s} trained in {train:7s} FT update rel "
                          f"L2 vs fp32 {err:.4f} {flag}")  # fmt: skip
            restored = _same(dev, snap)
            ok &= restored
            print(f"  {arch:6s} restore after FT bit exact on {device}: {restored}")
            _sync(device)
            start = time.perf_counter()
            try:
                res = _toy_run(dev)
            except Exception as e:  # noqa: BLE001 - report and go on to the next architecture
                ok = False
                print(f"  {arch:6s} run_experiment FAILED: {type(e).__name__}: {e}")
                continue
            prov = res.runs[0].provenance
            ft = prov.get("fast_paths", {}).get("ft", {})
            paths = {k: v for k, v in ft.items() if not isinstance(v, dict)}
            paths["trained_in"] = ft.get("train_dtype", {}).get("computed_in")
            print(f"  {arch:6s} run_experiment with every default baseline: "
                  f"{time.perf_counter() - start:.1f}s; FT fast paths {paths}")  # fmt: skip
    return ok


def _toy_run(model):
    """``run_experiment`` with every default baseline on a toy episode (as the conformance
    suite runs it)."""
    from icl_lens.data import TaskData
    from icl_lens.experiment import run_experiment
    from icl_lens.toy import ToyTokenizer, toy_episode, toy_task

    task = toy_task(2)
    pool, evals = toy_episode(seed=2, n_demos=12, n_eval=6, tokenizer=ToyTokenizer())
    data = TaskData(task, evals, pool, "toy", {"source": "toy_episode", "seed": 2})
    return run_experiment(model, task, n_demos=8, n_eval=6, seeds=(0,), data=data,
                          tokenizer=model.tokenizer, lr_grid=(1e-3, 1e-2), n_heldout=4,
                          n_boot=20, progress=False)  # fmt: skip


def model_part(args, device: torch.device, dtype: torch.dtype) -> bool:
    """Part 2. Returns whether it ran (a skip prints its reason)."""
    from icl_lens.data import load_task_data
    from icl_lens.experiment import run_experiment

    default = ROOT / "results" / "reference" / args.model / args.task / f"seed{args.seed}.json"
    ref_path = Path(args.reference) if args.reference else default
    print(f"== part 2: {args.model} {args.task} seed {args.seed}, {dtype} on {device} ==")
    ref = json.loads(ref_path.read_text()) if ref_path.is_file() else None
    cfg = (ref or {}).get("provenance", {}).get("config", {})
    n_demos = args.n_demos or cfg.get("n_demos", 32)
    n_eval = args.n_eval or cfg.get("n_eval", 500)
    try:
        model = load_model(args.model, dtype=dtype, device=device, progress=False)
    except Exception as e:  # noqa: BLE001 - the one-line reason is the report
        print(f"  SKIPPED: {args.model} does not load here: {type(e).__name__}: {e}")
        return False
    data = load_task_data(args.task)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    res = run_experiment(model, args.task, n_demos, n_eval, seeds=(args.seed,), data=data,
                         model_name=args.model, progress=False)  # fmt: skip
    _sync(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(f"  wall {wall:.1f}s; peak device memory "
          f"{'n/a (not cuda)' if peak is None else f'{peak:.0f} MiB'}; "
          f"n_demos {n_demos} n_eval {n_eval}; lr {res.runs[0].provenance['lr']:g}")  # fmt: skip
    if ref is None:
        print(f"  no reference file at {ref_path}: no metric differences")
        return True
    from icl_lens.results import RunResult

    if (n_demos, n_eval) != (cfg.get("n_demos"), cfg.get("n_eval")):
        print(f"  NOTE: the reference ran n_demos {cfg.get('n_demos')} n_eval {cfg.get('n_eval')}: "
              "other demonstrations and queries, so the differences below are not a precision "
              "check")  # fmt: skip
    theirs = _headline_rows(RunResult.from_json(ref))
    ours = _headline_rows(res.runs[0])
    shown = ref_path.relative_to(ROOT) if ref_path.is_relative_to(ROOT) else ref_path
    print(f"  headline metrics vs {shown} (fp32 cpu; * = difference above the smaller CI "
          "half-width):")  # fmt: skip
    for line in headline_diffs(theirs, ours, "cpu fp32", device.type):
        print(f"    {line}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", default=None,
                    help="the CPU fp32 run file to compare with (default: the committed "
                    "results/reference/MODEL/TASK/seedSEED.json)")  # fmt: skip
    ap.add_argument("--tiny-only", action="store_true", help="part 1 only")
    ap.add_argument(
        "--n-demos",
        type=int,
        default=None,
        help="default: the reference file's (a smaller run compares other numbers)",
    )
    ap.add_argument("--n-eval", type=int, default=None, help="default: the reference file's")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible; use --device cpu for a dry run")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
              f"{B.BACKEND} (TL {B.TL_VERSION})")  # fmt: skip
    ok = tiny_part(device, dtype)
    if not args.tiny_only:
        model_part(args, device, dtype)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
