"""One hooked pass per condition (ZS, ICL, FT): keep only what the analyses need.

For every prompt, ``capture`` records at the recorded position (DESIGN §2):
the attention output of every layer at both recording sites (``circuit.sites``), the
pre-softmax score row of every layer and head sliced to the query's own tokens and to the
demonstration tokens, and the scaled query vector (all heads concatenated) before and after
RoPE/q-norm; at the prediction position it scores only the label words (final norm + the
label words' unembedding columns, never the full vocabulary).

Recording sites (DESIGN §2, "Recording sites on modern architectures"):

- ``attn_out``: site ``"residual"``, ``hook_attn_out``, what the block adds to the residual
  stream. The default for SimAOU: the paper's "attention output" as TL exposes it, and the
  site of the committed reference results.
- ``attn_pre_norm``: site ``"attention"``, after W_O (+ b_O), before any post-attention norm
  (Gemma-2/3's ``ln1_post``). On a model without one it *is* ``attn_out`` (the same tensor,
  recorded once).
- ``q``: site ``"q_pre"``, ``hook_q`` / sqrt(scale), the query as projected. The default for
  Kendall: it is what the FT dual form's stored training queries are (the input of the
  linear layer, Irie et al.), and the reference's site.
- ``q_post``: site ``"q_post"``, the query attention scores with (after q-norm and RoPE),
  scaled the same way. On a model without RoPE or q-norm it *is* ``q``. A site this model
  or TL version does not expose (or whose hook never fires) is ``None``, with the reason in
  ``Records.sites``.

With the same demonstrations for every query (the paper's setting), the demonstration prefix
runs once and its keys/values are reused for padded batches of queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from icl_lens import backend as B
from icl_lens.checks import (
    FastPathWarning,
    SelfCheckError,
    master_dtype,
    model_dtype,
    refuse_autocast,
    rel_diff,
    tolerance,
)
from icl_lens.checks import warn as _warn
from icl_lens.memory import release_memory
from icl_lens.progress import tqdm

CONDITIONS = ("zs", "icl", "ft")
# what a capture computes in: the model's own dtype, or float32 for a half-precision model
# (an exact float32 copy of its weights for the capture, ``backend.full_precision``)
COMPUTE_DTYPES = ("model", "float32")
__all__ = ["CONDITIONS", "FastPathWarning", "Records", "SelfCheckError", "capture",
           "recording_sites"]  # fmt: skip


@dataclass
class Records:
    """What one condition's pass kept, per example. All tensors live on the CPU.

    Score rows are padded to the longest query; ``query_mask``/``demo_mask`` mark the keys
    that are real and visible to the recorded row in that layer (sliding windows hide some).
    ``attn_out``/``attn_pre_norm`` and ``q``/``q_post`` are the two recording sites of the
    attention output and the query (module docstring); where the sites coincide the second is
    the first tensor itself, and where it is unavailable it is None. ``sites`` says which
    hooks each read (``recording_sites``) and why one is missing.
    """

    condition: str
    record: str
    example_ids: list[str]
    labels: Int[Tensor, " example"]
    label_logits: Float[Tensor, "example label"]
    attn_out: Float[Tensor, "example layer d_model"]
    q: Float[Tensor, "detail_example layer d_q"]  # the first detail_limit examples
    query_scores: Float[Tensor, "example layer head query_tok"]
    query_mask: Bool[Tensor, "example layer query_tok"]
    demo_scores: Float[Tensor, "detail_example layer head demo_tok"]
    demo_mask: Bool[Tensor, "example layer demo_tok"]
    demo_of_token: Int[Tensor, " demo_tok"] = field(default_factory=lambda: torch.zeros(0))
    n_tokens: Int[Tensor, " example"] = field(default_factory=lambda: torch.zeros(0))
    prefix_cached: bool = False
    checks: dict = field(default_factory=dict)  # what the run-time self-checks measured
    # the other recording sites (see the module docstring)
    attn_pre_norm: Float[Tensor, "example layer d_model"] | None = None
    q_post: Float[Tensor, "detail_example layer d_q"] | None = None
    sites: dict = field(default_factory=dict)

    @property
    def preds(self) -> Int[Tensor, " example"]:
        return self.label_logits.argmax(-1)

    def __len__(self) -> int:
        return len(self.example_ids)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _shared_prefix(prompts: Sequence) -> int:
    """Length of the demonstration prefix shared by all prompts (0 if none)."""
    first = prompts[0]
    n = first.spans.prefix_len
    if n <= 1:  # BOS only: nothing worth caching
        return 0
    head = first.tokens[:n]
    for p in prompts[1:]:
        if p.spans.prefix_len != n or p.tokens[:n] != head:
            return 0
    return n


def _template(names: Sequence[str]) -> list[str]:
    """Layer 0's hook names with the layer as ``{l}``."""
    return [n.replace("blocks.0.", "blocks.{l}.") for n in names]


def recording_sites(model: nn.Module) -> dict[str, dict]:
    """Which hooks each recorded field reads on this model (layer as ``{l}``).

    ``{"residual": {"field": "attn_out", ...}, "attention": {"field": "attn_pre_norm", ...},
    "q_pre": {"field": "q", ...}, "q_post": {"field": "q_post", ...}}``; each entry has
    ``hooks`` (names), ``same_as`` (the default site it coincides with on this model:
    no post-attention norm, or no RoPE/q-norm; else None) and ``unavailable`` (why the model
    or TL version does not expose it; else None).
    """
    d = B.dims(model)
    noop = lambda t: None  # noqa: E731
    out = {
        "residual": {"field": "attn_out", "hooks": [B.hook_name("attn_out", 0)]},
        "attention": {"field": "attn_pre_norm"},
        "q_pre": {"field": "q", "hooks": [B.hook_name("q", 0)]},
        "q_post": {"field": "q_post"},
    }
    for site in out.values():
        site.update(same_as=None, unavailable=None)
        site.setdefault("hooks", [])
    try:
        norms = [B.post_attn_norm(model, layer) for layer in range(d.n_layers)]
        names = [[n for n, _ in B.attn_pre_norm_hooks(model, layer, noop)]
                 for layer in range(d.n_layers)]  # fmt: skip
        out["attention"]["hooks"] = names[0]
        if all(n is None for n in norms):
            out["attention"]["same_as"] = "residual"
    except NotImplementedError as e:
        out["attention"]["unavailable"] = str(e)
    try:
        names = [[n for n, _ in B.attended_q_hooks(model, layer, noop)]
                 for layer in range(d.n_layers)]  # fmt: skip
        out["q_post"]["hooks"] = names[0]
        plain = all(n == [B.hook_name("q", layer)] for layer, n in enumerate(names))
        if plain and d.positional != "rotary":  # the adapter's own answer: hook_q is attended
            out["q_post"]["same_as"] = "q_pre"
    except NotImplementedError as e:
        out["q_post"]["unavailable"] = str(e)
    for site in out.values():
        site["hooks"] = _template(site["hooks"])
    return out


def capture(
    model: nn.Module,
    prompts: Sequence,
    label_token_ids: Sequence[int],
    condition: str = "icl",
    *,
    batch_size: int = 8,
    shared_prefix: bool | None = None,
    split_attention: bool = True,
    detail_limit: int | None = None,
    self_check: bool = True,
    progress: bool = True,
    compute_dtype: str = "model",
) -> Records:
    """Run ``prompts`` (from ``tasks.build_prompt``) through ``model`` and keep the records.

    ``shared_prefix=None`` reuses the demonstration prefix's keys/values whenever all prompts
    share it and the model supports it; ``False`` always runs full prompts. Over that cache,
    ``split_attention=True`` runs split-prefix attention where the model has it
    (``backend.split_attention_unsupported``; TL 4 bridges of the Llama/Gemma family): the
    prefix's keys are read once per batch instead of copied into every row. It is used only
    after it matched full prompts in the self-check (``checks["prefix_cache"]["attention"]``
    says which attention ran); ``False`` keeps the model's own attention.
    ``detail_limit=N`` keeps the large per-example fields, ``q``, ``q_post`` and
    ``demo_scores``, for the first N prompts only (Kendall reads no more); everything else,
    ``demo_mask`` included, is kept for all, so pair ``demo_scores`` with
    ``demo_mask[: len(demo_scores)]``.

    Both recording sites of the attention output and of the query are kept (module
    docstring); a site that coincides with the default on this model is not recorded twice
    (its field is the default's tensor), and one the model does not expose, or whose hook
    never fires, is None with the reason in ``Records.sites``.

    ``self_check=True`` (the default) first verifies the fast paths on this model, cheaply
    (the shortest and the longest prompt): the label-word logits equal the model's own
    logits; the recorded scores are pre-softmax (their softmax is ``hook_pattern``); the
    visible-key masks match the pattern's zeros and the model's sliding windows; and the
    shared-prefix records equal full-prompt records. A failing fast path falls back to the
    plain one with a ``FastPathWarning``; wrong scores raise ``SelfCheckError``. What ran
    and what the checks measured is in ``Records.checks``; the shared-prefix check covers
    every recorded field, the other sites' included.

    ``compute_dtype="float32"`` runs a bf16/fp16 model's capture in float32, on an exact
    float32 copy of its own weights (``backend.full_precision``; the model gets its tensors
    back after, bit for bit). A small difference of two captures, such as FT's update (FT -
    ZS), is otherwise swamped by the roundings of two half-precision passes, which differ
    (README, Half precision). ``checks["dtype"]`` says what the capture computed in and
    ``checks["model_dtype"]`` the model's own dtype.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; use one of {CONDITIONS}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute_dtype {compute_dtype!r}; use one of {COMPUTE_DTYPES}")
    refuse_autocast("capture")
    own = model_dtype(model)
    if compute_dtype == "float32" and master_dtype(own) != own:  # a half-precision model
        _check_prompts(model, prompts, detail_limit)  # bad input fails before the copy
        with B.full_precision(model):
            rec = capture(model, prompts, label_token_ids, condition, batch_size=batch_size,
                          shared_prefix=shared_prefix, split_attention=split_attention,
                          detail_limit=detail_limit, self_check=self_check,
                          progress=progress)  # fmt: skip
        rec.checks["model_dtype"] = str(own)
        return rec
    _check_prompts(model, prompts, detail_limit)
    record = prompts[0].record
    d = B.dims(model)
    prefix_len = _shared_prefix(prompts) if shared_prefix is not False else 0
    if prefix_len and not B.supports_prefix_cache(model):
        if shared_prefix:
            raise NotImplementedError("this model cannot reuse a key-value cache")
        prefix_len = 0
    demo_pos = list(prompts[0].spans.demo_token_positions())
    for p in prompts:
        if list(p.spans.demo_token_positions()) != demo_pos:
            raise ValueError("all prompts of one capture must share the same demonstrations")
    demo_of_token = torch.as_tensor(prompts[0].spans.demo_of_position(), dtype=torch.long)
    run = _Pass(model, d, list(label_token_ids), demo_pos)
    if not split_attention:
        run.split_off = "split_attention=False"
    elif not self_check:
        run.split_off = "self_check=False (split-prefix attention runs only once checked)"
    n, n_demo = len(prompts), len(demo_pos)
    n_detail = n if detail_limit is None else min(n, detail_limit)
    q_len = max(p.spans.record_pos + 1 - p.spans.query[0] for p in prompts)
    # Batches of similar length waste little compute on padding. Each batch writes its rows
    # straight into the preallocated outputs, at the prompts' own indices (input order).
    order = sorted(range(n), key=lambda i: len(prompts[i].tokens))
    checks: dict = {"tolerance": tolerance(run.dtype), "dtype": str(run.dtype)}
    if self_check:
        sample = [prompts[i] for i in sorted({order[0], order[-1]})]
        prefix_len = _self_check(run, sample, q_len, prefix_len, checks)
    else:
        checks["skipped"] = "self_check=False"
    checks["prefix_cache"] = checks.get("prefix_cache") or {
        "used": bool(prefix_len), "attention": "model",
        "split_attention": {"used": False, "reason": run.split_off or "no shared prefix"},
    }  # fmt: skip

    cache = None
    if prefix_len:
        prefix = torch.tensor(prompts[0].tokens[:prefix_len], device=B.input_device(model))
        cache = B.prefix_cache(model, prefix)

    out = _alloc(n, n_detail, d, len(run.label_ids), q_len, n_demo, run.extra)
    bar = tqdm(total=n, desc=f"capture {condition}", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        idx = torch.tensor(order[start : start + batch_size])
        batch = [prompts[i] for i in idx.tolist()]
        run(batch, idx, out, n_detail, prefix_len, cache)
        bar.update(len(batch))
    bar.close()
    # Scores of padded query slots stay masked out; queries are right-padded, so the
    # recorded row never attends to padding (causal attention).
    out["qs"].masked_fill_(~out["qm"].unsqueeze(2), 0.0)
    del cache
    release_memory()
    if n_demo and not out["dm"].any():
        raise SelfCheckError(
            f"no demonstration token is visible to the recorded position in any layer of "
            f"{B.architecture(model)} (prefix cache used: {bool(prefix_len)}): ICL would run "
            "without its demonstrations; run with shared_prefix=False (--no-prefix-cache)"
        )
    return Records(
        condition=condition,
        record=record,
        example_ids=[str(p.example_id) for p in prompts],
        labels=torch.tensor([int(p.label) for p in prompts]),
        label_logits=out["logits"],
        attn_out=out["attn_out"],
        q=out["q"],
        query_scores=out["qs"],
        query_mask=out["qm"],
        demo_scores=out["ds"],
        demo_mask=out["dm"],
        demo_of_token=demo_of_token,
        n_tokens=torch.tensor([len(p.tokens) for p in prompts]),
        prefix_cached=bool(prefix_len),
        checks=checks,
        attn_pre_norm=run.other_site(out, "attention"),
        q_post=run.other_site(out, "q_post"),
        sites=run.sites,
    )


def _check_prompts(model: nn.Module, prompts: Sequence, detail_limit: int | None) -> None:
    """Bad input to ``capture``: a one-line error before any pass."""
    if len(prompts) == 0:
        raise ValueError("no prompts to run; check that the evaluation set is not empty")
    if any(p.record != prompts[0].record for p in prompts):
        raise ValueError("prompts mix recorded positions; build them with one record=...")
    if detail_limit is not None and detail_limit < 0:
        raise ValueError(f"detail_limit must be >= 0 or None, got {detail_limit}")
    longest = max(len(p.tokens) for p in prompts)
    n_ctx = B.dims(model).n_ctx
    if longest > n_ctx:
        raise ValueError(
            f"prompt has {longest} tokens but the model's context is {n_ctx}; "
            "use fewer demonstrations (n_demos) or shorter examples"
        )


def _alloc(n: int, n_detail: int, d: B.ModelDims, n_labels: int, q_len: int, n_demo: int,
           extra: Sequence[str] = ()) -> dict[str, Tensor]:  # fmt: skip
    """The CPU outputs one capture fills (rows in input order); ``extra``: the other sites
    recorded separately on this model ("attention", "q_post")."""
    out = {
        "logits": torch.empty(n, n_labels),
        "attn_out": torch.empty(n, d.n_layers, d.d_model),
        "q": torch.empty(n_detail, d.n_layers, d.d_q),
        "qs": torch.zeros(n, d.n_layers, d.n_heads, q_len),
        "qm": torch.zeros(n, d.n_layers, q_len, dtype=torch.bool),
        "ds": torch.zeros(n_detail, d.n_layers, d.n_heads, n_demo),
        "dm": torch.zeros(n, d.n_layers, n_demo, dtype=torch.bool),
    }
    if "attention" in extra:
        out["attn_pre"] = torch.empty(n, d.n_layers, d.d_model)
    if "q_post" in extra:
        out["q_post"] = torch.empty(n_detail, d.n_layers, d.d_q)
    return out


# --------------------------------------------------------------------------- self-checks


def _self_check(run: _Pass, sample: list, q_len: int, prefix_len: int, checks: dict) -> int:
    """Verify the fast paths on ``sample``; fill ``checks``; return the prefix length to use
    (0 when the shared-prefix path failed its check)."""
    tol = checks["tolerance"]
    arch = B.architecture(run.model)
    # 1. label-word logits (final norm @ W_U[:, labels] + b_U, soft-capped) vs the model's own
    got, want = run.label_logit_pair(sample[-1])
    diff = rel_diff(got, want)
    checks["label_logits"] = {"max_rel_diff": diff, "path": "label_columns"}
    if diff > tol:
        _warn(f"{arch}: label-word logits from the unembedding columns differ from the model's "
              f"own logits by {diff:.3g} (relative; tolerance {tol:g}); reading them from the "
              "model's full logits instead (slower)")  # fmt: skip
        run.from_model_logits = True
        checks["label_logits"]["path"] = "model_logits"

    # 2. one plain (full-prompt) pass over the sample, with the model's pattern beside it
    k = len(sample)
    idx = torch.arange(k)
    n_demo = len(run.demo_pos)
    plain = _alloc(k, k, run.d, len(run.label_ids), q_len, n_demo, run.extra)
    probe: dict = {"scores": {}, "pattern": {}}
    run(sample, idx, plain, k, 0, None, probe=probe)
    checks["scores"] = _check_scores(probe, sample, tol, arch)
    checks["windows"] = _check_windows(probe, sample, run.d.windows, arch)

    # 3. the shared-prefix fast path against the plain pass: with split-prefix attention
    # first where the model has it, then with the model's own attention over the cache
    if not prefix_len:
        return 0
    noise: dict = {}  # the plain path's rounding sensitivity, measured once when needed
    why = run.split_reason()
    split_check = None
    if why is None:
        run.split = True
        try:
            ok, split_check = _check_prefix(run, sample, q_len, prefix_len, plain, tol, noise)
        finally:
            run.split = False
        if ok:
            run.split = True
            split_check.update(attention="split", split_attention={"used": True})
            checks["prefix_cache"] = split_check
            return prefix_len
        why = _prefix_problem(split_check, tol, "split-prefix attention")
        _warn(f"{arch}: {why}; using the model's own attention over the shared-prefix cache "
              "instead")  # fmt: skip
    ok, report = _check_prefix(run, sample, q_len, prefix_len, plain, tol, noise)
    report["attention"] = "model"
    report["split_attention"] = {"used": False, "reason": why}
    if split_check is not None:  # what the failed check of split-prefix attention measured
        report["split_attention"]["check"] = split_check
    checks["prefix_cache"] = report
    if not ok:
        _warn(f"{arch}: {_prefix_problem(report, tol, 'the shared-prefix KV cache')}; running "
              "full prompts instead")  # fmt: skip
        return 0
    return prefix_len


def _prefix_problem(report: dict, tol: float, path: str) -> str:
    """What went wrong in a failed shared-prefix check, as one clause."""
    if report.get("failed"):
        return f"{path} failed ({report['reason']})"
    return (f"shared-prefix records disagree with full prompts ({report['reason']}; tolerance "
            f"{tol:g}, transformers {B.tl_version_info()['transformers']}, {path})")  # fmt: skip


def _check_prefix(run: _Pass, sample: list, q_len: int, prefix_len: int, plain: dict,
                  tol: float, noise: dict) -> tuple[bool, dict]:  # fmt: skip
    """The shared-prefix path as ``run`` is set up (``run.split``) against the plain pass
    ``plain`` on ``sample``: (whether it may be used, the report for ``Records.checks``)."""
    k = len(sample)
    idx = torch.arange(k)
    n_demo = len(run.demo_pos)
    report: dict = {"used": False, "checked_prompts": k, "prefix_tokens": prefix_len}
    try:
        prefix = torch.tensor(sample[0].tokens[:prefix_len], device=B.input_device(run.model))
        cache = B.prefix_cache(run.model, prefix)
        fast = _alloc(k, k, run.d, len(run.label_ids), q_len, n_demo, run.extra)
        run.checking_prefix = True
        run(sample, idx, fast, k, prefix_len, cache)
    except Exception as e:  # noqa: BLE001 - any failure of the fast path means: do not use it
        report["reason"] = f"{type(e).__name__}: {e}"
        report["failed"] = True
        return False, report
    finally:
        run.checking_prefix = False
    diffs = {name: rel_diff(fast[key], plain[key]) for name, key in _COMPARED.items()
             if key in fast and key in plain}  # fmt: skip
    masks = {name: bool(torch.equal(fast[key], plain[key])) for name, key in _MASKS.items()}
    report.update(max_rel_diff=diffs, masks_equal=masks)
    bad = [f"{k} off by {v:.3g}" for k, v in diffs.items() if not v <= tol]
    if bad and all(masks.values()):
        # Above the dtype's tolerance: is that more than the plain path's own rounding? A model
        # that amplifies rounding (an untrained one, a long windowed prompt) is held to what
        # its own plain path does under a rounding-sized change of its input.
        if not noise:
            noise.update(_rounding_sensitivity(run, sample, idx, q_len, n_demo, plain))
        allowed = {name: max(tol, ROUNDING_FACTOR * noise.get(name, 0.0)) for name in diffs}
        report.update(rounding_sensitivity=dict(noise), allowed=allowed)
        bad = [f"{k} off by {v:.3g} (allowed {allowed[k]:.3g})" for k, v in diffs.items()
               if not v <= allowed[k]]  # fmt: skip
        if not bad:
            report["accepted_by"] = "rounding_sensitivity"
    bad += [f"{k} differ" for k, same in masks.items() if not same]
    if bad:
        report["reason"] = "; ".join(bad)
        return False, report
    report["used"] = True
    return True, report


#: The shared-prefix path may differ from full prompts by up to this many times the plain
#: path's own change under a one-ulp perturbation of its input (``_rounding_sensitivity``)
#: where that exceeds the dtype's tolerance: two summation orders differ by rounding of about
#: that size. A wrong fast path (lost demonstrations, a shifted window) is off by orders of
#: magnitude more on a trained model, and lost demonstrations also change the visible-key masks,
#: which must be equal whatever the values.
ROUNDING_FACTOR = 2.0


def _rounding_sensitivity(run: _Pass, sample: list, idx: Tensor, q_len: int, n_demo: int,
                          plain: dict) -> dict[str, float]:  # fmt: skip
    """Per recorded field, how far the plain (full-prompt) pass moves when the residual stream
    entering layer 0 is multiplied by ``1 + eps * N(0, 1)`` (eps of the model's dtype; seeded):
    the model's own amplification of one unit of rounding, the same measure as ``rel_diff``."""
    k = len(sample)
    eps = torch.finfo(run.dtype).eps
    gen = torch.Generator().manual_seed(0)

    def perturb(t: Tensor, hook) -> Tensor:
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        return (t.double() * (1.0 + eps * noise.to(t.device))).to(t.dtype)

    again = _alloc(k, k, run.d, len(run.label_ids), q_len, n_demo, run.extra)
    run.perturb = perturb
    try:
        run(sample, idx, again, k, 0, None)
    finally:
        run.perturb = None
    return {name: rel_diff(again[key], plain[key]) for name, key in _COMPARED.items()
            if key in again and key in plain}  # fmt: skip


# every recorded field (the other sites where they are recorded separately on this model)
_COMPARED = {"label_logits": "logits", "attn_out": "attn_out", "q": "q",
             "query_scores": "qs", "demo_scores": "ds", "attn_pre_norm": "attn_pre",
             "q_post": "q_post"}  # fmt: skip
_MASKS = {"query_mask": "qm", "demo_mask": "dm"}


def _check_scores(probe: dict, sample: list, tol: float, arch: str) -> dict:
    """The recorded score rows must be pre-softmax: their softmax is the model's pattern."""
    if len(probe["pattern"]) != len(probe["scores"]):
        return {"checked": False, "reason": "hook_pattern did not fire on this model"}
    worst = 0.0
    for layer, scores in probe["scores"].items():
        pattern = probe["pattern"][layer]
        for i, p in enumerate(sample):
            end = p.spans.record_pos + 1  # keys the recorded row may see (causal)
            want = pattern[i, :, :end].double()
            got = scores[i, :, :end].double().softmax(-1)
            worst = max(worst, float((got - want).abs().max()))
            if not worst <= tol:
                raise SelfCheckError(
                    f"{arch} on TL {B.TL_VERSION}: blocks.{layer} attention scores are not "
                    f"pre-softmax (their softmax differs from hook_pattern by {worst:.3g}); "
                    "SimAM and Kendall would be computed on the wrong quantity, so icl-lens "
                    "refuses this model on this backend"
                )
    return {"checked": True, "max_abs_diff": worst}


def _check_windows(probe: dict, sample: list, windows: tuple, arch: str) -> dict:
    """Visible keys (finite scores) are where the pattern is non-zero, and their count is the
    one the model's sliding windows give."""
    if len(probe["pattern"]) != len(probe["scores"]):
        return {"checked": False, "reason": "hook_pattern did not fire on this model"}
    problems = []
    for layer, scores in probe["scores"].items():
        pattern = probe["pattern"][layer]
        for i, p in enumerate(sample):
            end = p.spans.record_pos + 1
            seen = _visible(scores[i, :, :end])
            nonzero = pattern[i, :, :end] > 0
            underflow = scores[i, :, :end].float().softmax(-1) == 0  # visible, yet exp -> 0
            if bool(((seen != nonzero) & ~underflow).any()):
                problems.append(f"layer {layer}: masks differ from the pattern's zeros")
                break
            window = windows[layer]
            want = end if window is None else min(end, int(window))
            have = int(seen.all(0).sum())
            if have != want:
                problems.append(f"layer {layer}: {have} visible keys, windows say {want}")
                break
    if problems:
        _warn(f"{arch}: sliding-window check failed ({'; '.join(problems)}); the records use "
              "the model's own masks, but its detected windows are wrong")  # fmt: skip
    return {"checked": True, "ok": not problems, "problems": problems}


# --------------------------------------------------------------------------- one pass


def _visible(scores: Tensor) -> Tensor:
    """Keys a score row can see: masked keys hold -inf (TL) or a huge negative (HF masks)."""
    return torch.isfinite(scores) & (scores > -1e30)


def _at(t: Tensor, rows: Tensor, pos: Tensor) -> Tensor:
    """``t[rows, pos]`` with the indices moved to ``t``'s device (layers may be spread out)."""
    return t[rows.to(t.device), pos.to(t.device)]


def _pad_left(row: Tensor, n: int) -> Tensor:
    """Prepend ``n`` masked (-inf) keys: positions a trimmed cache no longer holds."""
    if n <= 0:
        return row
    return torch.nn.functional.pad(row, (n, 0), value=float("-inf"))


# other site -> (its key in a capture's outputs, the default site's key it may coincide with)
_OTHER_SITES = {"attention": ("attn_pre", "attn_out"), "q_post": ("q_post", "q")}


class _Pass:
    """What every batch of one capture shares: the model, the label words' unembedding, the
    attention scales, the demonstration positions, and which label-logit path to take."""

    def __init__(self, model: nn.Module, d: B.ModelDims, label_ids: list[int], demo_pos: list):
        self.model, self.d, self.label_ids, self.demo_pos = model, d, label_ids, demo_pos
        w_u, b_u = B.unembed_rows(model, label_ids)
        self.dtype = w_u.dtype  # the model's: its self-checks' tolerance
        # the label words' logits in fp32 at least (a half-precision model's own logits are
        # rounded to a few digits: ties and flipped predictions between close label words)
        wide = torch.promote_types(w_u.dtype, torch.float32)
        self.w_u = w_u.detach().to(wide)
        self.b_u = None if b_u is None else b_u.detach().to(wide)
        self.cap = B.logit_soft_cap(model)
        self.scales = [B.attn_scale(model, layer) for layer in range(d.n_layers)]
        self.from_model_logits = False  # set when the label-column path fails its check
        self.checking_prefix = False  # set during the self-check's shared-prefix pass
        self.perturb = None  # a hook on layer 0's input, set while measuring rounding noise
        self.split = False  # split-prefix attention (set once its self-check passed)
        self.split_off: str | None = None  # why the caller turned it off
        self.sites = recording_sites(model)
        # the other sites this model needs recorded separately (not the default's tensor)
        sites = self.sites
        self.extra = [s for s in _OTHER_SITES
                      if not (sites[s]["same_as"] or sites[s]["unavailable"])]  # fmt: skip

    def split_reason(self) -> str | None:
        """Why split-prefix attention may not run here (None when it may: still unchecked)."""
        if self.split_off is not None:
            return self.split_off
        try:
            return B.split_attention_unsupported(self.model)
        except Exception as e:  # noqa: BLE001 - a model the probe cannot read: no split path
            return f"{type(e).__name__}: {e}"

    def other_site(self, out: dict[str, Tensor], site: str) -> Tensor | None:
        """Site ``site``'s records in ``out``: the default's own tensor where they coincide,
        None where unavailable."""
        info = self.sites[site]
        if info["unavailable"]:
            return None
        if info["same_as"]:
            return out[_OTHER_SITES[site][1]]
        return out[_OTHER_SITES[site][0]]

    def _not_fired(self, fired: set, prefix_len: int) -> None:
        """After a pass: an other site whose hooks did not fire in every layer (a TL 4 bridge
        may list a hook it never calls) is unavailable from now on, with the reason; in the
        self-check's shared-prefix pass this raises instead (that path then fails its check,
        and the plain path decides)."""
        for site in list(self.extra):
            missing = [layer for layer in range(self.d.n_layers) if (site, layer) not in fired]
            if not missing:
                continue
            hooks = ", ".join(self.sites[site]["hooks"])
            why = (f"{B.architecture(self.model)} on TL {B.TL_VERSION}: {hooks} did not fire "
                   f"in layer(s) {missing}")  # fmt: skip
            if prefix_len and self.checking_prefix:
                raise B.PrefixCacheError(f"site {site!r}: {why} (shared prefix)")
            self.sites[site]["unavailable"] = why
            self.extra.remove(site)
            _warn(f"site {site!r} is not recorded: {why}", UserWarning)

    def label_logits(self, x: Tensor) -> Tensor:
        """Final-normed residual rows -> the label words' logits (bias, soft cap)."""
        logits = x.to(self.w_u.dtype) @ self.w_u
        if self.b_u is not None:
            logits = logits + self.b_u
        if self.cap is not None:
            logits = self.cap * torch.tanh(logits / self.cap)
        return logits

    @torch.no_grad()
    def label_logit_pair(self, prompt) -> tuple[Tensor, Tensor]:
        """(ours, the model's own) label logits at the end of a short piece of ``prompt``
        ending at its prediction position: one plain forward pass of at most 48 tokens."""
        end = prompt.spans.predict_pos + 1
        tokens = torch.tensor([prompt.tokens[max(0, end - 48) : end]])
        kept = {}

        def keep(t, hook):
            kept["x"] = t[:, -1]

        stop = B.final_norm_hook_name(self.model)
        tokens = tokens.to(B.input_device(self.model))
        logits = B.run_until(self.model, tokens, [(stop, keep)])
        ours = self.label_logits(kept["x"].to(self.w_u.device))[0]
        theirs = logits[0, -1, torch.tensor(self.label_ids, device=logits.device)]
        return ours.float().cpu(), theirs.float().cpu()

    @torch.no_grad()
    def __call__(self, batch, idx, out, n_detail, prefix_len, cache, probe=None) -> None:
        """One padded forward pass over ``batch``; writes rows ``idx`` of the CPU tensors
        ``out`` (rows ``idx < n_detail`` only for ``q`` and ``demo_scores``). With ``probe``,
        also keeps each layer's whole recorded score row and pattern row (absolute keys)."""
        model, d = self.model, self.d
        n = len(batch)
        lengths = [len(p.tokens) - prefix_len for p in batch]
        width = max(lengths)
        tokens = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, p in enumerate(batch):
            tokens[i, : lengths[i]] = torch.tensor(p.tokens[prefix_len:])
            mask[i, : lengths[i]] = 1
        rows = torch.arange(n)
        # positions relative to the tokens actually fed (prefix excluded)
        rec = torch.tensor([p.spans.record_pos - prefix_len for p in batch])
        pred = torch.tensor([p.spans.predict_pos - prefix_len for p in batch])
        q_start = [p.spans.query[0] for p in batch]  # absolute
        q_end = [p.spans.record_pos + 1 for p in batch]  # the recorded row sees itself
        demo_idx = torch.tensor(self.demo_pos, dtype=torch.long)
        detail = idx < n_detail  # batch rows whose q / demo scores are kept

        fired: set[tuple[str, int]] = set()  # (other site, layer) whose hooks were called

        def attn_out_hook(layer, key="attn_out", site=None):
            def hook(t, hook=None):
                out[key][idx, layer] = _at(t, rows, rec).float().cpu()
                fired.add((site, layer))

            return hook

        def q_hook(layer, key="q", site=None):
            def hook(t, hook=None):
                if detail.any():
                    q = _at(t, rows[detail], rec[detail]).flatten(-2) / self.scales[layer] ** 0.5
                    out[key][idx[detail], layer] = q.float().cpu()
                fired.add((site, layer))

            return hook

        def scores_hook(layer):
            def hook(t):
                # keys: the prefix (possibly trimmed to a sliding window by the cache) + new
                offset = prefix_len + t.shape[2] - t.shape[3]
                row = t[rows.to(t.device), :, rec.to(t.device)].float().cpu()
                row = _pad_left(row, offset)  # [batch, head, absolute key], on the CPU
                if probe is not None:
                    probe["scores"][layer] = row
                for i in range(n):
                    s, e = q_start[i], q_end[i]
                    own = row[i, :, s:e]
                    out["qs"][idx[i], layer, :, : e - s] = own
                    out["qm"][idx[i], layer, : e - s] = _visible(own).all(0)
                if len(demo_idx):
                    demo = row[:, :, demo_idx]
                    seen = _visible(demo)
                    out["ds"][idx[detail], layer] = torch.where(seen, demo, torch.zeros(()))[detail]
                    out["dm"][idx, layer] = seen.all(1)

            return hook

        def pattern_hook(layer):
            def hook(t, hook):
                offset = prefix_len + t.shape[2] - t.shape[3]
                row = t[rows.to(t.device), :, rec.to(t.device)].float().cpu()
                probe["pattern"][layer] = torch.nn.functional.pad(row, (offset, 0))

            return hook

        final = {}

        def final_hook(t, hook):
            final["x"] = _at(t, rows, pred).to(self.w_u.device)

        hooks = [] if self.perturb is None else [(B.hook_name("resid_pre", 0), self.perturb)]
        for layer in range(d.n_layers):
            hooks += [
                (B.hook_name("attn_out", layer), attn_out_hook(layer)),
                (B.hook_name("q", layer), q_hook(layer)),
            ]
            hooks += B.attn_scores_hooks(model, layer, scores_hook(layer))
            if "attention" in self.extra:
                hooks += B.attn_pre_norm_hooks(
                    model, layer, attn_out_hook(layer, "attn_pre", "attention")
                )
            if "q_post" in self.extra:
                hooks += B.attended_q_hooks(model, layer, q_hook(layer, "q_post", "q_post"))
            if probe is not None:
                hooks.append((B.hook_name("pattern", layer), pattern_hook(layer)))
        stop = None if self.from_model_logits else B.final_norm_hook_name(model)
        if stop is not None:
            hooks.append((stop, final_hook))
        tokens, mask = tokens.to(B.input_device(model)), mask.to(B.input_device(model))
        if cache is not None:
            logits = B.run_with_prefix(model, cache, tokens, mask, hooks, stop_at=stop,
                                       split=self.split)  # fmt: skip
        else:
            # right padding needs no mask: under causal attention no real row sees a pad
            logits = B.run_until(model, tokens, hooks, stop_at=stop)
        self._not_fired(fired, prefix_len)
        if self.from_model_logits:
            ids = torch.tensor(self.label_ids, device=logits.device)
            label_logits = _at(logits, rows, pred)[:, ids]
        else:
            label_logits = self.label_logits(final["x"])
        out["logits"][idx] = label_logits.float().cpu()
