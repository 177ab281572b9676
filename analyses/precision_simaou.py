"""Why does SimAOU move in bf16? Take bf16's roundings apart, one at a time, in float32.

SimAOU compares two updates of the same zero-shot activations, cos(ICL - ZS, FT - ZS) on unit
vectors. A bf16 run differs from float32 in three roundings: the model's weights (round(W)),
FT's written weights (round(W + delta), however exact the fp32 master delta), and every
activation. This script runs one (task, seed, examples, lr) in float32 compute and adds them
one at a time, so it runs on any CPU (bf16 kernels are not needed):

- ``fp32``: the float32 model, as the reference run;
- ``W``: every weight rounded to bf16 (held in float32), FT's delta added exactly;
- ``W+write``: as W, and FT's weights are round_bf16(W + delta), as bf16 FT writes them;
- ``W+write+acts``: as W+write, and in the three captures (not in FT's training) every hook
  point's output is rounded to bf16 (activations stored in bf16; matmuls still accumulate in
  float32, as bf16 kernels do);
- ``W+hooks+acts``: as W+write+acts, but FT's weights stay W and the exact delta enters as
  ``x delta^T`` added to the K/V projections' outputs (``backend.kv_deltas``), as
  ``finetuned`` now does for half-precision models;
- ``W+hooks+acts+train``: as W+hooks+acts, and FT trains with rounded activations too;
- ``W+hooks+acts+scores``: as W+hooks+acts, and the captures also round the attention scores
  and pattern (full prompts, self-checks off).

For each it prints the mean SimAOU (as run_experiment: per example over layers, then over
examples) and the shared-origin null; then SimAOU with ZS, ICL and FT taken from different
variants (is it the origin's rounding, shared by both updates?); and the sizes: mean |hat(a) -
hat(b)| of each update and of each record's difference from float32. ``--real`` also runs a
true bf16 model (needs fast bf16 matmuls: AVX512-BF16/AMX or a GPU), twice: FT trained in bf16
(``train_dtype="model"``, as every variant here) and in float32 (``finetuned``'s default for
half-precision models). The "mixed" table then says which record carries bf16's shift.
``--bf16-model`` runs the bf16 model as ``--real`` does
(bf16 weights, every elementwise op, norm, softmax, residual add and FT's backward in bf16),
but each matmul-class op (linear, matmul, bmm, einsum, SDPA) takes its bf16 inputs exactly in
float32, accumulates there and rounds its output to bf16: what bf16 GEMM kernels do on
GPUs and on CPUs with AMX/AVX512-BF16 (fp32 accumulation), up to the order of summation, at
float32 speed on any CPU. ``--run-experiment`` instead runs the whole protocol
(``run_experiment``, every default baseline) on the float32 model and on that bf16 model and
prints every headline value side by side with its CI half-widths.

    python analyses/precision_simaou.py --n-eval 96 --out precision_simaou.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from contextlib import ExitStack, contextmanager, nullcontext

import torch

import icl_lens as il
from icl_lens import backend as B
from icl_lens.metrics import shared_origin_null, simaou
from icl_lens.tasks import fit_demos

BF16 = torch.bfloat16


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)


def _size(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over (example, layer) of |hat(a) - hat(b)|."""
    return float((_unit(a) - _unit(b)).norm(dim=-1).mean())


def _mean(x: torch.Tensor) -> float:
    """Per example over layers, then over examples (NaN: undefined, left out)."""
    per_example = torch.nanmean(x, dim=1)
    return float(per_example[~torch.isnan(per_example)].mean())


def _sim(zs, icl, ft) -> float:
    """Mean SimAOU of float32 records, with run_experiment's rule for undefined entries."""
    return _mean(simaou(zs, icl, ft, on_undefined="nan"))


def _null(zs, icl, ft) -> float:
    return _mean(shared_origin_null(zs, icl, ft, on_undefined="nan"))


def _round(t):
    """``t`` rounded to bf16 and back; anything but a floating-point tensor (token ids, masks)
    unchanged."""
    if not (torch.is_tensor(t) and t.is_floating_point()):
        return t
    return t.to(BF16).to(t.dtype)


@contextmanager
def _rounded_weights(model):
    """Every floating-point parameter rounded to bf16 (kept in its dtype); restored after."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.copy_(_round(p))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


@contextmanager
def _rounded_activations(model, scores: bool = False):
    """Every hook point's output rounded to bf16, except the attention scores and pattern
    (attention takes its softmax in float32, and capture's self-check holds the pattern to the
    scores' softmax) and the norms' inner ``hook_scale``/``hook_normalized`` (editing those
    makes TL 4 rebuild the norm from them instead of running the model's own; their module's
    ``hook_out`` is rounded). ``scores=True`` rounds the pre-softmax scores and the pattern too,
    as HF's eager attention in bf16 does (capture's self-checks must then be off: the pattern
    is no longer the scores' softmax to fp32 precision)."""
    skip = ("hook_scale", "hook_normalized")
    if not scores:
        skip += ("hook_attn_scores", "hook_pattern")
    points = {id(hp): hp for name, hp in model.hook_dict.items() if not name.endswith(skip)}
    handles = [hp.register_forward_hook(lambda _m, _i, out: _round(out)) for hp in points.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Fp32Matmuls(torch.overrides.TorchFunctionMode):
    """Matmul-class ops on bf16 tensors computed in float32 and rounded back to bf16 (see
    ``--bf16-model``); autograd goes through the casts, so FT's backward matmuls do the same.
    Every other op runs in the tensors' own dtype. SDPA runs wholly in float32 (scores,
    softmax and probabilities), where a fused bf16 kernel rounds the probabilities to bf16
    before the second product. An op not in ``OPS`` whose name looks like a product and that
    gets bf16 inputs ran natively: ``missed`` names it."""

    OPS = frozenset(
        {
            torch.nn.functional.linear,
            torch.nn.functional.bilinear,
            torch.nn.functional.scaled_dot_product_attention,
            torch.matmul,
            torch.mm,
            torch.bmm,
            torch.addmm,
            torch.baddbmm,
            torch.addbmm,
            torch.mv,
            torch.dot,
            torch.einsum,
            torch.tensordot,
            torch.linalg.matmul,
            torch.linalg.multi_dot,
            torch.Tensor.matmul,
            torch.Tensor.__matmul__,
            torch.Tensor.__rmatmul__,
            torch.Tensor.mm,
            torch.Tensor.bmm,
            torch.Tensor.addmm,
            torch.Tensor.baddbmm,
            torch.Tensor.mv,
            torch.Tensor.dot,
        }
    )
    LOOKS_LIKE = re.compile(r"mm|matmul|linear|einsum|dot|attention|conv")

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.missed: set[str] = set()

    @staticmethod
    def _tensors(args, kwargs):
        for a in [*args, *kwargs.values()]:
            if isinstance(a, (list, tuple)):
                yield from (t for t in a if torch.is_tensor(t))
            elif torch.is_tensor(a):
                yield a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(t.dtype == BF16 for t in self._tensors(args, kwargs)):
            return func(*args, **kwargs)
        if func not in self.OPS:
            if self.LOOKS_LIKE.search(getattr(func, "__name__", "")):
                self.missed.add(func.__name__)
            return func(*args, **kwargs)
        self.calls += 1

        def up(t):
            if torch.is_tensor(t) and t.dtype == BF16:
                return t.float()
            if isinstance(t, (list, tuple)):
                return type(t)(up(x) for x in t)
            return t

        out = func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
        return out.to(BF16) if torch.is_tensor(out) and out.dtype == torch.float32 else out


# the variants on bf16-rounded weights: how FT's update enters, and what else is rounded
VARIANTS = {
    "W": {},
    "W+write": {"write": "round"},
    "W+write+acts": {"write": "round", "acts": True},
    "W+hooks+acts": {"write": "hooks", "acts": True},
    "W+hooks+acts+train": {"write": "hooks", "acts": True, "train_acts": True},
    "W+hooks+acts+scores": {"write": "hooks", "acts": "scores"},
}


def _tolerance_report(run, ref) -> dict:
    """How the bf16 zero tolerance of ``run_experiment`` treats ``run`` (a bf16 model's records)
    against float32's ``ref``: SimAOU with the update-norm threshold at float32's default (4
    eps of float32), at bf16's eps and at 4 eps of bf16 (what run_experiment used for a bf16
    model); how many (example, layer) entries each leaves out; float32's own SimAOU on the
    entries each keeps; and the size of bf16's error in each update against its size."""
    eps = torch.finfo(BF16).eps
    z, i, f = (_unit(run[c]) for c in ("zs", "icl", "ft"))
    rz, ri, rf = (_unit(ref[c]) for c in ("zs", "icl", "ft"))
    out = {}
    for name, tol in (("fp32 default", None), ("bf16 eps", eps), ("4 bf16 eps", 4 * eps)):
        # the records are float32, so tol None is 4 eps of float32, as run_experiment now uses
        sim = simaou(run["zs"], run["icl"], run["ft"], on_undefined="nan", zero_tol=tol)
        kept = ~torch.isnan(sim)
        fp32 = simaou(ref["zs"], ref["icl"], ref["ft"], on_undefined="nan")
        fp32 = fp32.masked_fill(~kept, torch.nan)
        out[name] = {
            "zero_tol": tol,
            "simaou": _mean(sim),
            "left out": f"{int((~kept).sum())} of {kept.numel()}",
            "left out by layer": (~kept).sum(0).tolist(),
            "float32 simaou on the kept entries": _mean(fp32),
        }
    for c, own in (("ft", f), ("icl", i)):
        size = (own - z).norm(dim=-1)
        err = ((own - z) - (rf if c == "ft" else ri) + rz).norm(dim=-1)
        out[f"|{c} - zs|: median, 10th percentile"] = [float(size.median()),
                                                        float(size.quantile(0.1))]  # fmt: skip
        out[f"error of bf16's {c} - zs vs fp32's: median, 90th percentile"] = [
            float(err.median()), float(err.quantile(0.9))]  # fmt: skip
    return out


HEADLINE = ("accuracy", "rec2ftp", "simaou", "simaou_orthogonal", "simaou_null", "simam_before",
            "simam_after", "simam_delta", "kendall_token")  # fmt: skip


def _headline(run) -> dict[str, tuple[float | None, float | None]]:
    """'metric variant' -> (value, CI half-width) of the layer-mean rows (no lr grid rows)."""
    out = {}
    for r in run.rows:
        if r["layer"] != "mean" or r["kind"] == "lr_grid" or r["metric"] not in HEADLINE:
            continue
        lo, hi = r.get("ci_low"), r.get("ci_high")
        out[f"{r['metric']} {r['variant']}"] = (r["value"], None if lo is None else (hi - lo) / 2)
    return out


def _run_experiments(args, spec, data) -> dict:
    """``run_experiment`` (every default baseline) on the float32 model and on the bf16 model
    with float32-accumulated matmuls; prints each headline value of both with its CI
    half-width, * where the difference exceeds the smaller half-width."""
    sides = {}
    for name in ("float32", "bfloat16"):
        t = time.perf_counter()
        model = il.load_model(args.model, dtype=getattr(torch, name), progress=False)
        with _Fp32Matmuls() if name == "bfloat16" else nullcontext() as mode:
            res = il.run_experiment(model, spec, args.n_demos, args.n_eval, seeds=(args.seed,),
                                    data=data, model_name=args.model, progress=False)  # fmt: skip
        if mode is not None:
            print(f"  ran natively in bf16: {sorted(mode.missed) or 'none'}")
        sides[name] = _headline(res.runs[0])
        caps = res.runs[0].provenance["fast_paths"].get("captures", {})
        for cond, reports in caps.items():  # a self-check that failed: which capture
            for k, rep in enumerate(reports):
                if not rep.get("windows", {}).get("ok", True):
                    print(f"  {name} capture {cond} #{k}: {rep['windows']['problems']}")
        print(f"run_experiment {name}: {time.perf_counter() - t:.0f}s, lr "
              f"{res.runs[0].provenance['lr']:g}", flush=True)  # fmt: skip
        del model, res
    a, b = sides["float32"], sides["bfloat16"]
    print("headline values, bfloat16 (fp32 matmuls) - float32; CI half-widths float32, bfloat16:")
    for key in a:
        (x, hx), (y, hy) = a[key], b.get(key, (None, None))
        if x is None or y is None:
            print(f"  {key:<32} float32 {x} bfloat16 {y}")
            continue
        star = "*" if None not in (hx, hy) and abs(y - x) > min(hx, hy) else " "
        hw = ", ".join("-" if h is None else f"{h:.4f}" for h in (hx, hy))
        print(f"  {key:<32} {x:8.4f} {y:8.4f} diff {y - x:+.4f}{star} half-widths {hw}")
    return sides


def run_args(doc: str, n_eval: int) -> argparse.ArgumentParser:
    """The (model, task, seed, examples, rate, threads) options of the precision analyses."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=n_eval)
    ap.add_argument("--n-demos", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4, help="both bench_flops legs chose it")
    ap.add_argument("--threads", type=int, default=2)
    return ap


def episode(args, spec, data, model):
    """(tokenizer, demonstrations, label ids, ZS prompts, ICL prompts) of the run's seed."""
    tok = model.tokenizer
    evals = data.eval[: args.n_eval]
    demos = il.sample_demos(data.demo_pool, args.n_demos, args.seed)
    demos = fit_demos(spec, tok, demos, evals, B.dims(model).n_ctx).demos
    ids = il.label_token_ids(spec, tok)
    zs_p = [il.build_prompt(spec, tok, q) for q in evals]
    icl_p = [il.build_prompt(spec, tok, q, demos) for q in evals]
    return tok, demos, ids, zs_p, icl_p


def main(argv=None) -> None:
    ap = run_args(__doc__, n_eval=96)
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                    help="rounded variants beside fp32 (default: all; none if bare)")  # fmt: skip
    ap.add_argument("--real", action="store_true", help="also run a true bf16 model")
    ap.add_argument("--update-compute", action="store_true",
                    help="with --real, also run bf16 with its ZS and FT captures (FT's update) "
                    "computed in float32 on the bf16 weights")  # fmt: skip
    ap.add_argument("--bf16-model", action="store_true",
                    help="also run the bf16 model with float32-accumulated matmuls")  # fmt: skip
    ap.add_argument("--run-experiment", action="store_true",
                    help="only run_experiment, float32 vs the bf16 model with fp32-accumulated "
                    "matmuls, every headline value side by side")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    spec = il.get_task(args.task)
    data = il.load_task_data(spec, "staicc")
    if args.run_experiment:
        sides = _run_experiments(args, spec, data)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"config": vars(args), "headline": sides}, fh, indent=2)
        return
    model = il.load_model(args.model, progress=False)
    tok, demos, ids, zs_p, icl_p = episode(args, spec, data, model)

    def cap(m, prompts, cond, acts=False, compute="model"):
        # with rounded activations the prefix cache may fail its self-check: capture then
        # warns and runs full prompts. compute="float32": a half model's capture computes in
        # float32 (backend.full_precision: exact float32 copies of its weights)
        if compute == "float32":
            with B.full_precision(m):
                return il.capture(m, prompts, ids, cond, progress=False).attn_out
        if acts == "scores":
            with _rounded_activations(m, scores=True):
                return il.capture(m, prompts, ids, cond, progress=False, self_check=False,
                                  shared_prefix=False).attn_out  # fmt: skip
        with _rounded_activations(m) if acts else nullcontext():
            return il.capture(m, prompts, ids, cond, progress=False).attn_out

    def three(
        m,
        write: str | None = None,
        acts: bool = False,
        train_acts: bool = False,
        train_dtype: str = "model",
        update_compute: str = "model",
    ):
        """ZS, ICL, FT records of ``m`` as it stands. FT's update is the trained weights
        (``write=None``), round_bf16(W + delta) (``"round"``), or W with ``x delta^T`` added to
        the K/V projections' outputs (``"hooks"``, backend.kv_deltas). ``acts``: activations
        rounded in the three captures; ``train_acts``: also in FT's training (forward; the
        gradients pass the rounding straight through). ``update_compute="float32"``: the ZS
        and FT captures (whose difference is FT's update) compute in float32, on the model's
        own (half) weights, with FT's float32 delta added exactly; ICL stays in the model's
        dtype."""
        zs = cap(m, zs_p, "zs", acts, update_compute)
        icl = cap(m, icl_p, "icl", acts)
        params = [p for _, p in B.named_kv_parameters(m)]
        orig = [p.detach().clone() for p in params]
        ft_block = il.finetuned(m, demos, args.lr, task=spec, tokenizer=tok,
                                train_dtype=train_dtype)  # fmt: skip
        with _rounded_activations(m) if train_acts else nullcontext():
            st = ft_block.__enter__()  # trains; the block's body below rounds only if acts
        try:
            with ExitStack() as es:
                if write:
                    with torch.no_grad():
                        for p, o, d in zip(params, orig, st.deltas, strict=True):
                            p.copy_(_round(o + d.to(o.dtype)) if write == "round" else o)
                if write == "hooks":
                    es.enter_context(B.kv_deltas(m, [d[None] for d in st.deltas]))
                ft = cap(m, zs_p, "ft", acts, update_compute)
        finally:
            ft_block.__exit__(None, None, None)  # restores the weights
        print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
        return {"zs": zs, "icl": icl, "ft": ft, "delta": [d.float() for d in st.deltas]}

    runs = {}
    print("fp32", flush=True)
    runs["fp32"] = three(model)
    with _rounded_weights(model):
        for name, kw in VARIANTS.items():
            if name in args.variants:
                print(name, flush=True)
                runs[name] = three(model, **kw)
    if args.real:
        print("bf16 (real)", flush=True)
        bf16_model = il.load_model(args.model, dtype=BF16, progress=False)
        runs["bf16"] = three(bf16_model)
        print("bf16 (real), FT trained in float32 (finetuned's default)", flush=True)
        runs["bf16, FT in float32"] = three(bf16_model, train_dtype="float32")
        if args.update_compute:
            print("bf16 (real), FT in float32, ZS and FT captures computed in float32")
            runs["bf16, update in float32"] = three(bf16_model, train_dtype="float32",
                                                    update_compute="float32")  # fmt: skip
    if args.bf16_model:
        print("bf16 model, matmuls accumulated in fp32", flush=True)
        bf16_model = il.load_model(args.model, dtype=BF16, progress=False)
        with _Fp32Matmuls() as mode:
            runs["bf16 (fp32 matmuls)"] = three(bf16_model)
        print(f"  {mode.calls} matmul-class calls on bf16 inputs went through float32; ran "
              f"natively in bf16: {sorted(mode.missed) or 'none'}")  # fmt: skip

    ref = runs["fp32"]
    out = {"config": vars(args), "variants": {}, "mixed": {}}
    for name, r in runs.items():
        out["variants"][name] = {
            "simaou": _sim(r["zs"], r["icl"], r["ft"]),
            "simaou_null": _null(r["zs"], r["icl"], r["ft"]),
            "|icl - zs|": _size(r["icl"], r["zs"]),
            "|ft - zs|": _size(r["ft"], r["zs"]),
            **{f"|{c} - fp32 {c}|": _size(r[c], ref[c]) for c in ("zs", "icl", "ft")},
            "delta rel. to fp32's": il.checks.rel_l2(r["delta"], ref["delta"]),
        }
    # which record's rounding moves it? ZS, ICL, FT each from fp32 or the most rounded variant
    last = "bf16" if "bf16" in runs else list(runs)[-1]
    pairs = [("fp32", o) for o in (last, "bf16, FT in float32", "bf16, update in float32")]
    pairs.append(("bf16, FT in float32", "bf16, update in float32"))  # where the update is computed
    for pair in pairs:
        if not set(pair) <= set(runs):
            continue
        for z, i, f in itertools.product(pair, repeat=3):
            mixed = _sim(runs[z]["zs"], runs[i]["icl"], runs[f]["ft"])
            out["mixed"][f"zs {z}, icl {i}, ft {f}"] = mixed
    if last in ("bf16", "bf16 (fp32 matmuls)"):  # a bf16 model's records
        out["zero_tolerance"] = _tolerance_report(runs[last], ref)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
