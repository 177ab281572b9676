"""How close is `icl-lens reproduce` to its FLOP lower bound, and how much memory does it use?

Runs one (task, seed) of the default protocol (32 demonstrations, the learning-rate grid, every
baseline) through ``run_experiment`` and prints, measured side by side in this one process:

* wall time / FLOP lower bound. The bound is the FLOPs the protocol cannot avoid divided by
  the best fp32 matmul throughput measured here (the model's own shapes and a large square,
  before and after the run and briefly after every stage; the best is kept, which makes the
  bound smallest; the between-stage readings' time is not counted in the wall time):
  - every token the protocol must run, forward, at 2·N FLOPs (N = non-embedding parameters):
    the zero-shot prompts once per condition that needs them (ZS, each FT, the untrained
    model), each ICL prefix once plus every query's own tokens, the held-out prompts once per
    grid learning rate, and every FT training token;
  - FT backward at 2·N (activation gradients) + 2·N_kv (the K/V weight gradients) per token.
  ``+vocab`` adds the vocabulary projections the protocol needs on top (the paper's FT loss is
  an LM loss over the full vocabulary at every training token, 4·V·d FLOPs forward and
  backward; layer-causal FT has one such loss per layer). Attention-score FLOPs are left out,
  so both bounds are lower bounds; a third line adds them too (q·k and pattern·v over every
  key each token sees, sliding windows included; FT backward at twice the forward), which for
  the ICL captures, whose every query attends over the whole demonstration prefix, is most of
  what the first two leave out. (Counts assume the ICL prefix is cached, as it is for
  every model ``backend.supports_prefix_cache`` accepts.)
* peak RSS / model size, of the protocol alone (Linux: the peak is reset after the model has
  loaded, through ``/proc/self/clear_refs``), and the loading's own peak beside it; elsewhere
  the process's peak so far.
* the matmul floor: the same FLOPs, each at the rate this machine reaches on its own matmul
  shapes and row counts (measured after the run), i.e. what no implementation with these
  kernels can beat; ``floor / bound`` is the machine's share of the ratio, ``wall / floor``
  the implementation's.

With ``--dtypes float32 bfloat16`` the same (task, seed) runs once per dtype, one after the
other in this process (the model loaded in that dtype; matmul rates measured in it), and a
last table sets them side by side: the wall-time ratio, each dtype's FLOP bound and matmul
floor, and every headline metric's difference from the first dtype next to the bootstrap CI
half-widths of both (a difference inside them is noise the protocol already reports).

    python benchmarks/bench_flops.py                       # sst2, 500 queries (~10 min)
    python benchmarks/bench_flops.py --n-eval 100 --task mr
    python benchmarks/bench_flops.py --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import time

import torch

from icl_lens import backend as B
from icl_lens import experiment as E
from icl_lens import finetune as F
from icl_lens.checks import model_dtype
from icl_lens.data import load_task_data
from icl_lens.experiment import ExperimentConfig, run_experiment
from icl_lens.models import load_model
from icl_lens.tasks import build_prompt, build_train_sequence

DTYPES = ("float32", "bfloat16", "float16")
DEVICE = torch.device("cpu")  # where the matmul rates are measured (--device)
SQUARE = 2048  # the large square matmul of the throughput readings (--square)


def _sync() -> None:
    """Wait for the device's queued work (timings of asynchronous devices)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# (metric, variant) of the layer-mean rows compared across dtypes
HEADLINE = (
    ("accuracy", "zs"), ("accuracy", "icl"), ("accuracy", "ft"), ("rec2ftp", "ft"),
    ("simaou", "ft"), ("simaou_orthogonal", "ft"), ("simaou_null", "ft"),
    ("simam_before", "icl_vs_zs"), ("simam_after", "ft"), ("simam_delta", "ft"),
    ("kendall_token", "ft"), ("simaou", "untrained"), ("simaou", "ft_shuffled"),
    ("simaou", "ft_layer_causal"), ("simaou", "uniform"),
)  # fmt: skip


def matmul_gflops(d_model: int, d_mlp: int, seconds: float = 2.0,
                  dtype: torch.dtype = torch.float32) -> float:  # fmt: skip
    """Best ``dtype`` matmul throughput over the model's MLP shape and a large square."""
    best = 0.0
    for m, k, n in ((512, d_model, d_mlp), (512, d_mlp, d_model), (SQUARE, SQUARE, SQUARE)):
        a = torch.randn(m, k, dtype=dtype, device=DEVICE)
        b = torch.randn(k, n, dtype=dtype, device=DEVICE)
        a @ b  # warm-up
        _sync()
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            _sync()
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


def param_counts(model) -> dict[str, int]:
    """Total (unique storages), non-embedding and K/V parameter counts."""
    seen, total, embed = set(), 0, 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        if "embed" in name or "lm_head" in name:  # W_E, W_pos, W_U (TL 3) or HF names
            embed += p.numel()
    kv = sum(p.numel() for p in B.kv_parameters(model))
    return {"total": total, "non_embedding": total - embed, "kv": kv}


def attention_flops(d: B.ModelDims, spans: list[tuple[int, int]]) -> float:
    """Attention-score FLOPs (q·k and the pattern times v, 2 FLOPs a multiply-add each) of
    ``spans`` = [(keys already cached, new tokens)], every layer, each new token over the keys
    it sees (causal, capped by the layer's sliding window)."""
    per_key = 4 * d.n_heads * d.d_head
    total = 0
    for cached, n in spans:
        keys = torch.arange(cached + 1, cached + n + 1, dtype=torch.float64)
        for window in d.windows:
            total += float((keys if window is None else keys.clamp(max=window)).sum())
    return per_key * total


def needed_flops(run, data, tok, counts: dict[str, int], d_model: int, vocab: int,
                 n_layers: int, d: B.ModelDims | None = None) -> dict:  # fmt: skip
    """The protocol's unavoidable FLOPs for one finished (task, seed), from its provenance."""
    prov, cfg = run.provenance, run.provenance["config"]
    by_id = {x.id: x for x in [*data.eval, *data.demo_pool]}
    evals = [by_id[i] for i in prov["eval_ids"]]
    demos = [by_id[i] for i in prov["demo_ids"]]
    held = [by_id[i] for i in prov["lr_selection"].get("heldout_ids", [])]
    spec = data.task
    zs_tok = sum(len(build_prompt(spec, tok, q).tokens) for q in evals)
    icl = [build_prompt(spec, tok, q, demos) for q in evals]
    prefix = icl[0].spans.prefix_len
    icl_tok = prefix + sum(len(p.tokens) - prefix for p in icl)
    held_tok = sum(len(build_prompt(spec, tok, q).tokens) for q in held)
    train_tok = sum(len(build_train_sequence(spec, tok, d)) for d in demos)
    grid = ExperimentConfig(**cfg).ft_rates
    base = set(cfg["baselines"])
    if len({d.label for d in demos}) < 2:  # run_experiment skips shuffled-label FT then
        base.discard("shuffled")
    n_ft = len(grid) + ("shuffled" in base) + ("untrained" in base)
    n_lc = int("layer_causal" in base)
    n_zs = 1 + len(grid) + n_lc + ("shuffled" in base) + 2 * ("untrained" in base)
    n_icl = 1 + ("untrained" in base)
    n, n_kv = counts["non_embedding"], counts["kv"]
    fwd_tokens = n_zs * zs_tok + n_icl * icl_tok + len(grid) * held_tok + (n_ft + n_lc) * train_tok
    flops = 2 * n * fwd_tokens + (n_ft + n_lc) * train_tok * (2 * n + 2 * n_kv)
    # the same FLOPs by stage, keyed as StageTimer keys them: (non-embedding, vocabulary)
    n_plain_zs = 1 + ("untrained" in base)  # ZS on the model and on the untrained model
    step, vocab_tok = 4 * n + 2 * n_kv, 4 * vocab * d_model
    ft_layers = n_layers if cfg["ft_mode"] == "layer_causal" else 1
    stages: dict[str, list[float]] = {
        "capture zs": [2 * n * n_plain_zs * zs_tok, 0],
        "capture icl": [2 * n * n_icl * icl_tok, 0],
        "capture ft": [2 * n * ((n_zs - n_plain_zs) * zs_tok + len(grid) * held_tok), 0],
        f"finetune {cfg['ft_mode']}": [
            n_ft * train_tok * step,
            ft_layers * n_ft * train_tok * vocab_tok,
        ],
    }
    if n_lc:
        lc = stages.setdefault("finetune layer_causal", [0, 0])
        lc[0] += n_lc * train_tok * step
        lc[1] += n_layers * n_lc * train_tok * vocab_tok
    assert abs(sum(s[0] for s in stages.values()) - flops) <= 1e-6 * flops
    # attention-score FLOPs by stage (left out of both bounds above); FT backward ~2x forward
    attn: dict[str, float] = {}
    if d is not None:
        zs_a = attention_flops(d, [(0, len(build_prompt(spec, tok, q).tokens)) for q in evals])
        icl_a = attention_flops(d, [(0, prefix)] + [(prefix, len(p.tokens) - prefix) for p in icl])
        held_a = attention_flops(d, [(0, len(build_prompt(spec, tok, q).tokens)) for q in held])
        train_a = 3 * attention_flops(d, [(0, len(build_train_sequence(spec, tok, x)))
                                          for x in demos])  # fmt: skip
        attn = {"capture zs": n_plain_zs * zs_a, "capture icl": n_icl * icl_a,
                "capture ft": (n_zs - n_plain_zs) * zs_a + len(grid) * held_a,
                f"finetune {cfg['ft_mode']}": n_ft * train_a}  # fmt: skip
        if n_lc:
            attn["finetune layer_causal"] = attn.get("finetune layer_causal", 0) + n_lc * train_a
    return {
        "attention": attn,
        "stages": stages,
        "tokens": {"zs": zs_tok, "icl": icl_tok, "heldout": held_tok, "train": train_tok},
        "demos": len(demos),
        "prefix": prefix,
        "n_eval": len(evals),
        "runs": {"zs_like": n_zs, "icl": n_icl, "ft": n_ft, "layer_causal": n_lc},
        "flops": flops,
        "vocab_flops": sum(s[1] for s in stages.values()),
    }


def layer_matmul_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every weight matmul in one transformer block (attention and MLP)."""
    d_model, shapes = B.dims(model).d_model, []
    for name, p in model.blocks[0].named_parameters():
        last = name.split(".")[-1]
        if B.is_bridge(model):  # nn.Linear weights [out, in]
            if last == "weight" and p.dim() == 2:
                shapes.append((p.shape[1], p.shape[0]))
        elif last.lstrip("_").startswith("W_"):  # TL 3 weights (its b_* biases are 2-D too)
            if p.dim() == 2:  # MLP [in, out]
                shapes.append(tuple(p.shape))
            else:  # W_Q/K/V [head, d_model, d_head]; W_O [head, d_head, d_model]
                h, a, b = p.shape
                shapes.append((h * a, b) if b == d_model and a != d_model else (a, h * b))
    return shapes


def _rate(fn, flops: float, seconds: float) -> float:
    """GFLOP/s of ``fn`` (best of repeated calls for ``seconds``)."""
    fn()
    _sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def block_rate(shapes, rows: int, backward: bool, seconds: float = 0.6,
               dtype: torch.dtype = torch.float32) -> float:  # fmt: skip
    """GFLOP/s of one block's weight matmuls at ``rows`` rows (plus, with ``backward``, the
    activation-gradient products dY·Wᵀ), measured here in ``dtype``."""
    kw = dict(dtype=dtype, device=DEVICE)
    mats = [(torch.randn(rows, k, **kw), torch.randn(k, n, **kw), torch.randn(rows, n, **kw))
            for k, n in shapes]  # fmt: skip

    def run():
        for x, w, dy in mats:
            x @ w
            if backward:
                dy @ w.T

    flops = sum(2 * rows * k * n for k, n in shapes) * (2 if backward else 1)
    return _rate(run, flops, seconds)


def vocab_rate(model, rows: int, seconds: float = 0.6) -> float:
    """GFLOP/s of the FT loss's one-pass vocabulary product (logits and their gradient) at
    ``rows`` rows, with the model's own unembedding."""
    d = B.dims(model)
    h = torch.randn(rows, d.d_model, dtype=model.unembed.W_U.dtype, device=B.input_device(model))
    targets = torch.zeros(rows, dtype=torch.long)
    weight = torch.ones(rows)
    return _rate(lambda: F._vocab_loss(model, h, targets, weight),
                 4 * rows * d.d_vocab * d.d_model, seconds)  # fmt: skip


def matmul_floor(model, need: dict, cfg: dict, grid_rows: int, ft_dtype: torch.dtype,
                 capture_dtypes: dict[str, torch.dtype] | None = None) -> dict:  # fmt: skip
    """Seconds the protocol's FLOPs take at the matmul rates of its own shapes on this machine:
    each stage's non-embedding FLOPs at one block's weight matmuls with that stage's row count,
    its vocabulary FLOPs at the one-pass vocabulary product's rate. No attention scores, norms,
    activations or memory traffic besides the matmuls' own: no implementation can be faster
    with these matmul kernels, so ``floor / bound`` is what this machine allows. FT's stages
    are measured in ``ft_dtype``, the dtype FT trained in (float32 for a half-precision model
    by default); each capture stage in the dtype its captures computed in (``capture_dtypes``,
    condition -> dtype; default the model's: a half-precision model's ZS and FT captures run
    in float32 by default, ``update_capture_dtype``)."""
    shapes = layer_matmul_shapes(model)
    dtype = model_dtype(model)
    train_fp32 = ft_dtype != dtype  # a half-precision model trained in float32
    tok, runs, n_layers = need["tokens"], need["runs"], B.dims(model).n_layers
    n_eval, batch_size = need["n_eval"], cfg["batch_size"]
    train_len = max(1, round(tok["train"] / max(1, need["demos"])))
    zs_rows = batch_size * max(1, round(tok["zs"] / n_eval))
    icl_rows = batch_size * max(1, round((tok["icl"] - need["prefix"]) / n_eval))
    floor: dict[str, float] = {}
    for key, (plain, vocab_flops) in need["stages"].items():
        if key.startswith("capture"):
            rows = icl_rows if key.endswith("icl") else zs_rows
            computed = (capture_dtypes or {}).get(key.split()[-1], dtype)
            floor[key] = plain / (block_rate(shapes, rows, False, dtype=computed) * 1e9)
            continue
        mode = key.split()[-1]
        lc = mode == "layer_causal"
        main = mode == cfg["ft_mode"]  # the protocol's FT mode: the grid, shuffled, untrained
        n_runs = runs["ft"] * main + runs["layer_causal"] * lc
        if not n_runs:
            continue
        # the grid's runs side by side (grid_rows sequences a step), the rest one at a time
        grouped = min(grid_rows, n_runs) if main and grid_rows > 1 else 0
        per_run, per_run_v = plain / n_runs, vocab_flops / n_runs
        seconds = 0.0
        for count, rows in ((grouped, grid_rows * train_len), (n_runs - grouped, train_len)):
            if count:
                v_rows = rows * (n_layers if lc else 1)
                seconds += count * per_run / (block_rate(shapes, rows, True, dtype=ft_dtype) * 1e9)
                with B.full_precision(model) if train_fp32 else contextlib.nullcontext():
                    seconds += count * per_run_v / (vocab_rate(model, v_rows) * 1e9)
        floor[key] = seconds
    return floor


class StageTimer:
    """Wall seconds inside ``capture`` and inside each finetune's training, by wrapping the
    names ``icl_lens.experiment`` calls (the rest is metrics, baselines and bookkeeping).

    After every stage it also takes a short matmul-throughput reading (``probe``): on a noisy
    machine two readings (before and after) can both land in a slow spell, which would inflate
    the bound. The probes' own time is kept apart (``probe_seconds``) and not charged to the run.
    """

    def __init__(self, probe, rss_windows: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.readings: list[float] = []
        self.probe_seconds = 0.0
        self.grid_rows = 1  # learning rates trained side by side (1: one after another)
        self._probe = probe
        # peak RSS (MB) by stage: the VmHWM window is read and reset as each stage starts and
        # ends, and charged to the stage running then ("everything else" between stages)
        self.peaks: dict[str, float] = {}
        # the same windows in time order: (stage, RSS as it opened, its peak), in MB; a
        # window's peak is at least the RSS it opened at, so the order says where RSS grew
        self.timeline: list[tuple[str, float, float]] = []
        self._rss_windows = rss_windows
        self._open: list[str] = []
        self._window_start = current_rss_mb()

    def _charge_peak(self) -> None:
        if self._rss_windows:
            key = self._open[-1] if self._open else "everything else"
            peak = peak_rss_mb()
            self.peaks[key] = max(self.peaks.get(key, 0.0), peak)
            self.timeline.append((key, self._window_start, peak))
            reset_peak_rss()
            self._window_start = current_rss_mb()

    def _start(self, key: str) -> float:
        self._charge_peak()
        self._open.append(key)
        return time.perf_counter()

    def _add(self, key: str, start: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        self._charge_peak()
        self._open.pop()
        probe_start = time.perf_counter()
        self.readings.append(self._probe())
        self.probe_seconds += time.perf_counter() - probe_start

    @contextlib.contextmanager
    def installed(self):
        """The timed wrappers in place for the block; the originals back afterwards."""
        saved = E.capture, E.finetuned, E.finetuned_grid, F.finetuned
        self.install()
        try:
            yield self
        finally:
            E.capture, E.finetuned, E.finetuned_grid, F.finetuned = saved

    def install(self) -> None:
        capture, finetuned, finetuned_grid = E.capture, E.finetuned, E.finetuned_grid

        def timed_capture(*args, **kwargs):
            key = f"capture {args[3] if len(args) > 3 else kwargs.get('condition')}"
            start = self._start(key)
            try:
                return capture(*args, **kwargs)
            finally:
                self._add(key, start)

        @contextlib.contextmanager
        def timed(make, key):
            """Time ``make()``'s training (its enter); a training that raises (a diverged
            rate, which run_experiment catches) still closes its stage."""
            start = self._start(key)
            try:
                cm = make()
                value = cm.__enter__()
            finally:
                self._add(key, start)
            with contextlib.ExitStack() as stack:
                stack.push(cm)
                yield value

        def timed_finetuned(*args, **kwargs):
            key = f"finetune {kwargs.get('mode', 'standard')}"
            return timed(lambda: finetuned(*args, **kwargs), key)

        @contextlib.contextmanager
        def timed_grid(*args, **kwargs):  # the grid's rates train side by side, before yield
            key = f"finetune {kwargs.get('mode', 'standard')}"
            with timed(lambda: finetuned_grid(*args, **kwargs), key) as grid:
                self.grid_rows = len(grid.states) if grid._run_one is None else 1
                yield grid

        E.capture, E.finetuned, E.finetuned_grid = timed_capture, timed_finetuned, timed_grid
        F.finetuned = timed_finetuned  # a grid that trains each rate when applied calls this


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux's VmHWM); False where the OS has no such reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    """A size field of Linux's /proc/self/status (``VmRSS``, ``VmHWM``) in MB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float:
    """The resident set size now (VmRSS), or 0 where the OS does not say."""
    return _status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """The peak RSS since the last reset (VmHWM), or of the whole process (ru_maxrss)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args, dtype_name: str, data) -> dict:
    """One (task, seed) with the model loaded in ``dtype_name``: prints the report, returns
    what the cross-dtype table needs."""
    dtype = getattr(torch, dtype_name)
    gc.collect()
    windowed = reset_peak_rss()
    model = load_model(args.model, dtype=dtype, device=args.device, progress=False)
    load_peak_mb = peak_rss_mb()
    windowed = windowed and reset_peak_rss()
    d = B.dims(model)
    counts = param_counts(model)
    vocab = d.d_vocab
    d_mlp = int(getattr(model.cfg, "d_mlp", None) or 4 * d.d_model)
    tput = [matmul_gflops(d.d_model, d_mlp, dtype=dtype)]
    timer = StageTimer(lambda: matmul_gflops(d.d_model, d_mlp, seconds=0.6, dtype=dtype),
                       rss_windows=windowed)  # fmt: skip
    with timer.installed():
        start = time.perf_counter()
        res = run_experiment(model, args.task, args.n_demos, args.n_eval, seeds=(args.seed,),
                             data=data, model_name=args.model, progress=False)  # fmt: skip
        wall = time.perf_counter() - start - timer.probe_seconds
    tput.append(matmul_gflops(d.d_model, d_mlp, dtype=dtype))
    need = needed_flops(res.runs[0], data, model.tokenizer, counts, d.d_model, vocab, d.n_layers,
                        d)  # fmt: skip
    vocab_flops = need["vocab_flops"]
    best = max(tput + timer.readings)
    bound = need["flops"] / (best * 1e9)
    bound_v = (need["flops"] + vocab_flops) / (best * 1e9)
    timer._charge_peak()  # the window since the last stage: "everything else"
    rss_mb = max([peak_rss_mb(), *timer.peaks.values()])
    model_mb = counts["total"] * dtype.itemsize / 2**20
    print(f"=== dtype {dtype_name} ===")
    print(
        f"model={args.model} params={counts['total'] / 1e6:.1f}M "
        f"non-embedding={counts['non_embedding'] / 1e6:.1f}M kv={counts['kv'] / 1e6:.2f}M "
        f"task={args.task} seed={args.seed} n_demos={args.n_demos} n_eval={args.n_eval} "
        f"threads={args.threads} dtype={dtype_name} device={args.device}"
    )
    print(f"tokens {need['tokens']} runs {need['runs']}")
    print(f"{dtype_name} matmul throughput (best of model shapes / {SQUARE}^3, before, after): "
          f"{tput[0]:.1f}, {tput[1]:.1f} GFLOP/s; {len(timer.readings)} readings between "
          f"stages: {min(timer.readings):.1f}-{max(timer.readings):.1f}; bound uses "
          f"{best:.1f}")  # fmt: skip
    print(f"(a) wall {wall:.1f}s vs FLOP lower bound {bound:.1f}s "
          f"({need['flops'] / 1e12:.2f} TFLOP, non-embedding): {wall / bound:.2f}x")  # fmt: skip
    print(f"    with the FT losses' vocabulary projections: bound {bound_v:.1f}s "
          f"({(need['flops'] + vocab_flops) / 1e12:.2f} TFLOP): {wall / bound_v:.2f}x")  # fmt: skip
    attn_flops = sum(need["attention"].values())
    bound_a = (need["flops"] + vocab_flops + attn_flops) / (best * 1e9)
    print(f"    with the attention scores too (q·k and pattern·v over every visible key): bound "
          f"{bound_a:.1f}s ({(need['flops'] + vocab_flops + attn_flops) / 1e12:.2f} TFLOP): "
          f"{wall / bound_a:.2f}x")  # fmt: skip
    print("    by stage: wall vs its share of the bound (non-embedding; with vocabulary; with "
          "vocabulary and attention):")  # fmt: skip
    for key, seconds in sorted(timer.seconds.items()):
        plain, vocab_part = need["stages"].get(key, (0.0, 0.0))
        b, bv = plain / (best * 1e9), (plain + vocab_part) / (best * 1e9)
        ba = bv + need["attention"].get(key, 0.0) / (best * 1e9)
        ratios = (f"{seconds / b:.2f}x; {seconds / bv:.2f}x; {seconds / ba:.2f}x" if b
                  else "not in the bound")  # fmt: skip
        print(f"      {key:<22} {seconds:7.1f}s vs {b:6.1f}s; {bv:6.1f}s; {ba:6.1f}s  ({ratios})")
    print(f"      {'everything else':<22} {wall - sum(timer.seconds.values()):7.1f}s")
    if windowed:
        print(f"(b) peak RSS during the run {rss_mb:.0f} MB (model loaded; loading itself peaked "
              f"at {load_peak_mb:.0f} MB); {dtype_name} model {model_mb:.0f} MB: "
              f"{rss_mb / model_mb:.2f}x")  # fmt: skip
        print("    by stage (peak while it ran; 'everything else': metrics, baselines, "
              "bookkeeping between stages):")  # fmt: skip
        for key, mb in sorted(timer.peaks.items(), key=lambda kv: -kv[1]):
            print(f"      {key:<22} {mb:7.0f} MB  {mb / model_mb:.2f}x")
        print("    in time order (RSS as the window opened -> its peak; growth = peak - RSS "
              "at the start of the run):")  # fmt: skip
        base = timer.timeline[0][1] if timer.timeline else 0.0
        for key, opened, peak in timer.timeline:
            print(f"      {key:<22} {opened:7.0f} -> {peak:7.0f} MB  (+{peak - base:.0f})")
    else:
        print(f"(b) peak RSS {rss_mb:.0f} MB (of the process so far, loading included); "
              f"{dtype_name} model {model_mb:.0f} MB: {rss_mb / model_mb:.2f}x")  # fmt: skip
    cfg = res.runs[0].provenance["config"]
    trained_in = res.runs[0].provenance["fast_paths"]["ft"].get("train_dtype", {})
    ft_name = trained_in.get("computed_in", dtype_name)
    # what each condition's captures computed in (their self-check reports say; one dtype each)
    computed = {cond: {r.get("dtype") for r in reports} for cond, reports
                in res.runs[0].provenance["fast_paths"]["captures"].items()}  # fmt: skip
    capture_dtypes = {cond: getattr(torch, names.pop().removeprefix("torch."))
                      for cond, names in computed.items() if len(names) == 1}  # fmt: skip
    floor = matmul_floor(model, need, cfg, timer.grid_rows, getattr(torch, ft_name),
                         capture_dtypes)  # fmt: skip
    total = sum(floor.values())
    in_f32 = [c for c, d in capture_dtypes.items() if d != model_dtype(model)]
    print(f"(c) matmul floor on this machine: {total:.1f}s = {total / bound:.2f}x the bound "
          f"(each FLOP above at the {dtype_name} rate measured for its own matmul "
          f"shapes; FT's at the {ft_name} rate, the dtype it trains in"
          + (f"; the {'/'.join(in_f32)} captures' at the float32 rate" if in_f32 else "")
          + ")")  # fmt: skip
    print(f"    wall / floor {wall / total:.2f}x (what the implementation adds); by stage:")
    for key, seconds in sorted(floor.items()):
        print(f"      {key:<22} floor {seconds:6.1f}s  wall {timer.seconds.get(key, 0.0):6.1f}s")
    out = {"wall": wall, "bound": bound, "bound_vocab": bound_v, "floor": total,
           "gflops": best, "lr": res.runs[0].provenance["lr"],
           "fast_paths": res.runs[0].provenance["fast_paths"]["ft"],
           "rows": _headline_rows(res.runs[0])}  # fmt: skip
    del model, res
    gc.collect()
    return out


def _headline_rows(run) -> dict:
    """(metric, variant) -> (value, CI half-width) of the layer-mean rows in HEADLINE."""
    out = {}
    for row in run.rows:
        key = (row["metric"], row["variant"])
        if row["layer"] != "mean" or key not in HEADLINE or row["kind"] == "lr_grid":
            continue
        lo, hi = row["ci_low"], row["ci_high"]
        half = None if lo is None or hi is None else (hi - lo) / 2
        out[key] = (row["value"], half)
    return out


def _fmt(x, spec: str = "+.4f") -> str:
    return "n/a" if x is None else format(x, spec)


def headline_diffs(a: dict, b: dict, name_a: str, name_b: str) -> list[str]:
    """One line per headline metric in ``a`` or ``b`` (``_headline_rows``): both values, b - a,
    and both CI half-widths; ``*`` marks a difference above the smaller half-width."""
    lines = []
    for key in HEADLINE:
        if key not in a and key not in b:
            continue
        (va, ha), (vb, hb) = a.get(key, (None, None)), b.get(key, (None, None))
        diff = None if va is None or vb is None else vb - va
        widths = [h for h in (ha, hb) if h is not None]
        flag = "*" if diff is not None and widths and abs(diff) > min(widths) else " "
        lines.append(f"{key[0] + ' ' + key[1]:<28} {name_a} {_fmt(va, '.4f'):>7} {name_b} "
                     f"{_fmt(vb, '.4f'):>7} diff {_fmt(diff):>8}{flag} half-widths "
                     f"{_fmt(ha, '.4f')}, {_fmt(hb, '.4f')}")  # fmt: skip
    return lines


def compare(legs: dict[str, dict]) -> None:
    """The dtypes side by side: time, bound, floor, and each headline metric's difference from
    the first dtype next to both bootstrap CI half-widths."""
    names = list(legs)
    ref = names[0]
    print(f"=== {' vs '.join(names)} (reference {ref}) ===")
    print(f"{'dtype':<10} {'wall s':>8} {'vs ' + ref:>10} {'bound s':>8} {'floor s':>8} "
          f"{'GFLOP/s':>8} {'lr':>8} side-by-side")  # fmt: skip
    for name in names:
        leg = legs[name]
        fp = leg["fast_paths"]
        how = "yes" if fp.get("side_by_side") else f"no ({fp.get('side_by_side_fallback')})"
        print(f"{name:<10} {leg['wall']:8.1f} {leg['wall'] / legs[ref]['wall']:9.2f}x "
              f"{leg['bound']:8.1f} {leg['floor']:8.1f} {leg['gflops']:8.1f} "
              f"{leg['lr']:8.0e} {how}")  # fmt: skip
    for name in names[1:]:
        a, b = legs[ref]["rows"], legs[name]["rows"]
        print(f"headline metrics, {name} - {ref} (CI half-widths: {ref}, {name}; * = the "
              "difference exceeds the smaller):")  # fmt: skip
        for line in headline_diffs(a, b, ref, name):
            print(f"  {line}")
        if legs[ref]["lr"] != legs[name]["lr"]:
            print(f"  (the held-out accuracy chose lr {legs[name]['lr']:g} in {name}, "
                  f"{legs[ref]['lr']:g} in {ref}: FT rows compare different rates)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--n-demos", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--square", type=int, default=2048,
                    help="size of the square matmul in the throughput readings (smaller: a "
                    "quicker smoke run on a CPU without bf16 units)")  # fmt: skip
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32"],
        choices=DTYPES,
        help="run the same (task, seed) in each, then compare them to the first",
    )
    args = ap.parse_args()
    global DEVICE, SQUARE
    DEVICE, SQUARE = torch.device(args.device), args.square
    torch.set_num_threads(args.threads)
    data = load_task_data(args.task)
    legs = {name: measure(args, name, data) for name in dict.fromkeys(args.dtypes)}
    if len(legs) > 1:
        compare(legs)


if __name__ == "__main__":
    main()
