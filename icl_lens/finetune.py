"""Finetune K/V in place on the demonstrations (the paper's FT protocol), then restore exactly.

Protocol (DESIGN §2): plain SGD (no momentum, no weight decay), constant learning rate, batch
size 1, one epoch over the demonstrations in ICL order, causal-LM loss averaged over all tokens
of "formatted input + label word". Only the parameters from ``backend.kv_parameters`` train.

``mode="layer_causal"`` (Deutch et al. 2024): each layer's input is detached and each layer's
residual output goes through the final norm and unembedding to its own LM loss; the per-layer
losses are summed, so each layer's K/V learn only from their own loss.

Half precision (bf16/fp16 models) keeps the science: by default the training runs on an exact
float32 copy of the model (``train_dtype="float32"``, ``backend.full_precision``); with
``train_dtype="model"`` it runs in the model's dtype and SGD steps fp32 master deltas (the
training forward uses ``round(W_orig + delta)``; ``_MasterDeltas``; side by side the deltas are
fp32 rows), so no step is rounded away. Inside the block the model runs its original weights
plus the exact update as ``x·deltaᵀ`` on the K/V projections (``_update_applied``), since
``round(W + delta)`` would drop most of it; losses are computed in fp32; every run-time
check's tolerance comes from the dtype the computation runs in (``checks.tolerance``).
``FTState.deltas`` are the updates themselves (fp32).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from icl_lens import backend as B
from icl_lens.capture import recording_sites
from icl_lens.checks import (
    PrecisionWarning,
    master_dtype,
    model_dtype,
    refuse_autocast,
    tolerance,
    warn,
)
from icl_lens.memory import release_memory
from icl_lens.progress import tqdm

MODES = ("standard", "layer_causal")
# what FT's training computes in: float32 (a half-precision model is converted for the training
# and gets its own tensors back after), or the model's own dtype (no float32 copy in memory)
TRAIN_DTYPES = ("float32", "model")
VOCAB_CHUNK = 2048  # unembedding columns per step of the loss's vocabulary pass (~5 MB fp32)


# A finite loss has exploded (diverged, like NaN) when it is more than EXPLODE_MARGIN nats
# above, and both EXPLODE_FACTOR times the first step's loss and EXPLODE_CONFIRM times the
# untouched model's loss on the same demonstration (computed only when the first test trips).
# Each step's loss is of another demonstration, so the first test alone is tripped by their
# spread: on the reference run (Gemma-3-270m, MR seed 0, lr 1e-4) one demonstration's loss was
# 1.99x the first's with nothing diverging, and a re-initialised toy (the untrained baseline)
# reaches 1.8x at lr 1e-6. The same demonstration has no such spread, hence the lower factor,
# which a bounded loss needs: Gemma-3-270m at lr 1e9 takes a demonstration from 7.5 to 13.8
# nats (1.8x), not to infinity.
# A loss more than EXPLODE_MARGIN above a uniform guess's, ln(vocabulary size), also trips the
# first test (then confirmed the same way): FT that leaves the model worse than guessing has
# wrecked it. Gemma-3-270m at lr 1e9 over 32 SST-2 demonstrations stays below 2x its first
# loss (9.95 -> at most 16.7 nats) but passes ln(262144) = 12.5 at step 4.
EXPLODE_FACTOR = 2.0
EXPLODE_CONFIRM = 1.5
EXPLODE_MARGIN = 1.0


class FinetuneDivergedError(FloatingPointError):
    """The loss became NaN or infinite, or exploded (see ``EXPLODE_FACTOR``); the model has
    been restored."""


class SideBySideUnavailable(NotImplementedError):
    """Side-by-side FT cannot run here or failed its step-0 check (``report``: what the check
    measured, if it ran); the grid trains each rate in place instead."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class FTState:
    """What a finetune produced, besides the changed weights (which are restored on exit)."""

    lr: float
    mode: str
    param_names: list[str]
    losses: list[float] = field(default_factory=list)
    # Scaled query vectors (all heads) of every trained token (BOS excluded), every layer,
    # captured in the forward pass of the step that trained on it: the Kendall FT side.
    # ``train_q`` is site "q_pre" (``hook_q``, the query as projected: the default);
    # ``train_q_post`` site "q_post" (after q-norm and RoPE, as attention scores with), the
    # same tensor as ``train_q`` on models without either, None where the model does not
    # expose it or its hook never fired (``q_post_unavailable`` says why).
    train_q: Float[Tensor, "layer train_tok d_q"] | None = None
    train_q_post: Float[Tensor, "layer train_tok d_q"] | None = None
    q_post_unavailable: str | None = None
    train_token_demo: Int[Tensor, " train_tok"] | None = None
    # which fast paths trained it and what their run-time checks measured
    fast_paths: dict = field(default_factory=dict)
    # The update of every trained tensor (same order as ``param_names``), at least fp32 (for a
    # half-precision model, the float32 training's update or the fp32 master deltas; inside
    # the block its weights stay W and these enter its K/V activations); analyses that need
    # the update itself should read these.
    deltas: list[Tensor] | None = None

    @property
    def n_steps(self) -> int:
        return len(self.losses)


class _ChunkedVocabCE(torch.autograd.Function):
    """Per row, weight · CE(logits(h), target) with logits = h @ W_U + b_U (optionally
    soft-capped).

    One pass over the vocabulary in chunks of ``chunk`` columns, with an online softmax: each
    chunk's logits update the running max/sum of every row and, while the chunk's unembedding
    columns are still in cache, the running ``Σ_v exp(l_v − max) · ∂l_v/∂h``. So W_U is read
    from memory once per call (autograd reads it twice: logits, then their gradient), and no
    row's full-vocabulary logits ever exist. Backward returns the gradient w.r.t. ``h`` that
    forward already computed; W_U gets none. Same FLOPs as autograd.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w_u: Tensor, b_u: Tensor | None, targets: Tensor,
                weight: Tensor, chunk: int, soft_cap: float | None = None) -> Tensor:  # fmt: skip
        dtype = torch.promote_types(h.dtype, torch.float32)  # half inputs: fp32 softmax
        x = h.to(dtype)
        emb = w_u.T  # [vocab, d]: contiguous rows when W_U is a tied embedding's transpose
        n_rows, n_vocab = x.shape[0], emb.shape[0]
        run_max = x.new_full((n_rows,), float("-inf"))
        run_sum = x.new_zeros(n_rows)
        acc = x.new_zeros(x.shape)  # Σ_v exp(l_v − run_max) · ∂l_v/∂h, rescaled as max grows
        for j in range(0, n_vocab, chunk):
            e_c = emb[j : j + chunk].to(dtype)
            logits = x @ e_c.T
            if b_u is not None:
                logits += b_u[j : j + chunk].to(dtype)
            if soft_cap:
                logits.div_(soft_cap).tanh_()
                slope = 1.0 - logits * logits  # ∂(cap·tanh(l/cap))/∂l
                logits.mul_(soft_cap)
            # a row whose logits so far are all -inf keeps a finite reference (no -inf - -inf)
            new_max = torch.maximum(run_max, logits.amax(1)).clamp_min(torch.finfo(dtype).min)
            rescale = torch.exp(run_max - new_max)
            probs = logits.sub_(new_max[:, None]).exp_()
            run_sum = run_sum * rescale + probs.sum(1)
            if soft_cap:
                probs *= slope
            acc.mul_(rescale[:, None]).addmm_(probs, e_c)
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        e_t = emb[targets].to(dtype)  # [row, d]: each row's target column
        picked = (x * e_t).sum(1)
        if b_u is not None:
            picked += b_u[targets].to(dtype)
        if soft_cap:
            picked = soft_cap * torch.tanh(picked / soft_cap)
            e_t *= (1.0 - (picked / soft_cap) ** 2)[:, None]
        w = weight.to(dtype)
        loss = (lse - picked) * w
        grad = ((acc / run_sum[:, None] - e_t) * w[:, None]).to(h.dtype)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out[:, None].to(grad.dtype), None, None, None, None, None, None


def _vocab_loss(model: nn.Module, normed: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    """Per row, weight · LM loss of final-normed rows ``normed`` [row, d_model], computed the
    way the model computes its logits (unembedding, bias, output soft-cap) without full logits."""
    w_u = model.unembed.W_U
    b_u = getattr(model.unembed, "b_U", None)
    b_u = b_u.detach() if isinstance(b_u, Tensor) else None
    dtype = torch.promote_types(w_u.dtype, torch.float32)
    return _ChunkedVocabCE.apply(normed.to(w_u.device), w_u.detach(), b_u,
                                 targets.to(w_u.device), weight.to(w_u.device, dtype),
                                 VOCAB_CHUNK, B.logit_soft_cap(model))  # fmt: skip


def _lm_loss(logits: Tensor, tokens: Tensor) -> Float[Tensor, " seq"]:
    """Each sequence's mean next-token cross-entropy of the model's own logits [seq, pos, vocab]."""
    n_seq, n_pos = tokens.shape[0], tokens.shape[1] - 1
    rows = logits[:, :-1].flatten(0, 1)  # half-precision logits: the loss in fp32
    ce = F.cross_entropy(rows.to(master_dtype(rows.dtype)), tokens[:, 1:].flatten(),
                         reduction="none")  # fmt: skip
    return ce.view(n_seq, n_pos).mean(1)


def _final_norm_loss(model: nn.Module, normed: Tensor, tokens: Tensor) -> Float[Tensor, " seq"]:
    """Each sequence's mean LM loss of ``tokens`` [seq, pos] from their final-normed residual
    [seq, pos, d], by the one-pass vocabulary loss."""
    n_seq, n_pos = tokens.shape[0], tokens.shape[1] - 1
    weight = torch.full((n_seq * n_pos,), 1.0 / n_pos, dtype=torch.float64)
    rows = normed[:, :-1].reshape(n_seq * n_pos, -1)
    return _vocab_loss(model, rows, tokens[:, 1:].reshape(-1), weight).view(n_seq, n_pos).sum(1)


def _vocab_pass_check(model: nn.Module, tokens: Tensor, trained: Sequence[Tensor]) -> dict:
    """Whether the one-pass vocabulary loss is the model's own loss here (``"ok"``): no
    trained tensor is (a view of) the unembedding, and on ``tokens`` it equals the CE of the
    model's logits within the tolerance of the model's dtype (``checks.tolerance``: the model's
    own half-precision logits are rounded, the one-pass loss's are not), so logit transforms
    it does not know (e.g. a logit scale) are caught, not assumed away. One forward pass
    gives both: the logits and, by a hook, the final-normed residual."""
    unembed = [t for t in (model.unembed.W_U, getattr(model.unembed, "b_U", None))
               if isinstance(t, Tensor)]  # fmt: skip
    shared = {t.untyped_storage().data_ptr() for t in unembed}
    if any(p.untyped_storage().data_ptr() in shared for p in trained):
        return {"ok": False, "reason": "the unembedding is trained"}
    final: dict[str, Tensor] = {}

    def keep_final(t, hook):
        final["x"] = t

    with torch.no_grad(), model.hooks(fwd_hooks=[(B.final_norm_hook_name(model), keep_final)]):
        want = _lm_loss(model(tokens), tokens).double()
        got = _final_norm_loss(model, final["x"], tokens).double()
    tol = tolerance(model_dtype(model))
    diff = float(((got - want).abs() / want.abs().clamp_min(1.0)).max())
    report = {"ok": diff <= tol, "loss_rel_diff": diff, "tolerance": tol}
    if not report["ok"]:
        report["reason"] = (
            f"the one-pass vocabulary loss differs from the model's own loss by {diff:.3g} "
            f"(relative; tolerance {tol:g})"
        )
    return report


def _layer_causal_loss(model: nn.Module, resids: list[Tensor], tokens: Tensor) -> Tensor:
    """Per sequence, the sum over layers of each layer's own mean LM loss (final norm, then
    unembedding); ``resids`` are the layers' outputs [seq, pos, d].

    All layers' rows go through one vocabulary pass, which reads the (large) unembedding once
    per step instead of twice per layer (DESIGN: peak RSS and the FLOP bound).
    """
    n_layers, (n_seq, n_pos) = len(resids), (tokens.shape[0], tokens.shape[1] - 1)
    norm_param = next(model.ln_final.parameters(), None)
    device = norm_param.device if norm_param is not None else resids[-1].device
    stacked = torch.stack([r.to(device) for r in resids])[:, :, :-1]  # [layer, seq, pos, d]
    normed = model.ln_final(stacked.flatten(0, 1)).reshape(n_layers * n_seq * n_pos, -1)
    targets = tokens[:, 1:].expand(n_layers, -1, -1).reshape(-1)
    weight = torch.full((n_layers * n_seq * n_pos,), 1.0 / n_pos, dtype=torch.float64)
    losses = _vocab_loss(model, normed, targets, weight)
    return losses.view(n_layers, n_seq, n_pos).sum((0, 2))


def _step_losses(model: nn.Module, tokens: Tensor, mode: str, vocab_pass: bool,
                 hooks: list) -> Float[Tensor, " seq"]:  # fmt: skip
    """One forward pass over ``tokens`` [seq, pos] (with ``hooks``): each sequence's FT loss."""
    if mode == "layer_causal":
        resid: dict[int, Tensor] = {}
        hooks = list(hooks)
        for layer in range(B.dims(model).n_layers):

            def keep_resid(t, hook, layer=layer):
                resid[layer] = t

            hooks.append((B.hook_name("resid_post", layer), keep_resid))
            if layer > 0:
                hooks.append((B.hook_name("resid_pre", layer), lambda t, hook: t.detach()))
        B.run_until(model, tokens, hooks, stop_at=B.final_norm_hook_name(model))
        return _layer_causal_loss(model, [resid[layer] for layer in sorted(resid)], tokens)
    if vocab_pass:  # stop before the model's own unembedding
        final: dict[str, Tensor] = {}

        def keep_final(t, hook):
            final["x"] = t

        stop = B.final_norm_hook_name(model)
        B.run_until(model, tokens, [*hooks, (stop, keep_final)], stop_at=stop)
        return _final_norm_loss(model, final["x"], tokens)
    with model.hooks(fwd_hooks=hooks):
        return _lm_loss(model(tokens), tokens)


class _Queries:
    """The training queries of one finetune at both sites (``FTState.train_q`` and
    ``train_q_post``): ``hooks()`` keep every layer's scaled queries (all heads) of the
    trained tokens, BOS excluded, for one step, as [seq, pos - 1, d_q] on the CPU (row ``i``
    of a side-by-side batch is its rate's); ``keep(i)`` files row ``i`` of the step under
    ``steps[r]`` for rate ``r``. Site "q_post" is not recorded twice where it is ``hook_q``
    itself, and is dropped with the reason (``unavailable``) where the model does not expose
    it or a hook it lists does not fire (a TL 4 bridge may list one it never calls)."""

    def __init__(self, model: nn.Module, n_rates: int = 1) -> None:
        self.model = model
        self.n_layers = B.dims(model).n_layers
        site = recording_sites(model)["q_post"]
        self.same = site["same_as"] is not None
        self.unavailable: str | None = site["unavailable"]
        self.hook_names = site["hooks"]
        self.steps: list[list[Tensor]] = [[] for _ in range(n_rates)]
        self.steps_post: list[list[Tensor]] = [[] for _ in range(n_rates)]
        self.q: dict[int, Tensor] = {}
        self.q_post: dict[int, Tensor] = {}

    @property
    def separate(self) -> bool:
        """Whether q_post is recorded by hooks of its own."""
        return not self.same and self.unavailable is None

    def hooks(self) -> list:
        self.q, self.q_post = {}, {}
        hooks = []
        for layer in range(self.n_layers):
            scale = B.attn_scale(self.model, layer) ** 0.5

            def save(t, store=self.q, layer=layer, scale=scale):
                store[layer] = (t[:, 1:].detach().flatten(-2) / scale).cpu()

            hooks.append((B.hook_name("q", layer), lambda t, hook, save=save: save(t)))
            if self.separate:
                hooks += B.attended_q_hooks(
                    self.model, layer, functools.partial(save, store=self.q_post)
                )
        return hooks

    def keep(self, row: int, rate: int = 0) -> None:
        """After a step: file batch row ``row``'s queries under rate ``rate``."""
        self.steps[rate].append(torch.stack([self.q[layer][row] for layer in range(self.n_layers)]))
        if not self.separate:
            return
        missing = [layer for layer in range(self.n_layers) if layer not in self.q_post]
        if missing:
            self.unavailable = (
                f"{B.architecture(self.model)} on TL {B.TL_VERSION}: "
                f"{', '.join(self.hook_names)} did not fire in layer(s) {missing} during FT"
            )
            warn(f"FT training queries at site 'q_post' are not recorded: {self.unavailable}",
                 UserWarning)  # fmt: skip
            self.steps_post = [[] for _ in self.steps_post]
            return
        self.steps_post[rate].append(
            torch.stack([self.q_post[layer][row] for layer in range(self.n_layers)])
        )

    def fill(self, state: FTState, rate: int = 0) -> None:
        """Put rate ``rate``'s training queries into ``state``."""
        state.train_q = torch.cat(self.steps[rate], dim=1).float()
        if self.same:
            state.train_q_post = state.train_q
        elif self.unavailable is None:
            state.train_q_post = torch.cat(self.steps_post[rate], dim=1).float()
        state.q_post_unavailable = self.unavailable


def _to_sequences(model, demos, task, tokenizer) -> list[list[int]]:
    """Token lists for the training steps: either given, or built from Examples."""
    if len(demos) == 0:
        raise ValueError("no demonstrations to finetune on; pass at least one")
    first = demos[0]
    if isinstance(first, (list, tuple)) or isinstance(first, Tensor):
        return [list(map(int, d)) for d in demos]
    if task is None:
        raise ValueError("finetuning on Examples needs task=...; or pass token lists")
    from icl_lens.tasks import build_train_sequence

    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("model has no tokenizer; pass tokenizer=...")
    return [build_train_sequence(task, tok, d) for d in demos]


@contextmanager
def _restoring(model: nn.Module, trained: Sequence[Tensor]) -> Iterator[list[Tensor]]:
    """Keep the originals of ``trained`` (yielded), their grads and the train/eval mode; put
    all of them back on exit, even on errors."""
    originals = [p.detach().clone() for p in trained]
    grads = [p.grad for p in trained]
    was_training = model.training
    try:
        yield originals
    finally:
        with torch.no_grad():
            for p, orig, g in zip(trained, originals, grads, strict=True):
                p.copy_(orig)
                p.grad = g
        model.train(was_training)
        release_memory()


@contextmanager
def _train_precision(model: nn.Module, train_dtype: str) -> Iterator[dict]:
    """The block (FT's training) computes in float32 for ``train_dtype="float32"`` (a
    half-precision model is converted and gets its own tensors back, ``full_precision``),
    else in the model's dtype. Yields what ran, for the states' ``fast_paths["train_dtype"]``."""
    own = str(model_dtype(model)).removeprefix("torch.")
    with B.full_precision(model) if train_dtype == "float32" else nullcontext() as converted:
        yield {"computed_in": "float32" if converted else own, "model_dtype": own,
               "asked": train_dtype}  # fmt: skip


@contextmanager
def _training(model: nn.Module) -> Iterator[None]:
    """Gradients on for the block; every parameter's ``requires_grad`` (which training sets to
    train only the K/V tensors) is put back on exit, even on errors."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])


def _token_demo(sequences: Sequence[list[int]]) -> Tensor:
    """The demonstration (training step) of every trained token, BOS excluded."""
    return torch.tensor([step for step, seq in enumerate(sequences) for _ in range(len(seq) - 1)])


def check_ft_args(mode: str, lrs: Sequence[float], train_dtype: str = "float32") -> None:
    """Raise a one-line ValueError for an unknown mode or train dtype or a rate that is not
    positive (callers that run passes before FT check first, so nothing is wasted)."""
    if mode not in MODES:
        raise ValueError(f"unknown finetune mode {mode!r}; use one of {MODES}")
    if train_dtype not in TRAIN_DTYPES:
        raise ValueError(f"unknown train_dtype {train_dtype!r}; use one of {TRAIN_DTYPES}")
    for lr in lrs:
        if not (lr > 0):
            raise ValueError(f"learning rate must be positive, got {lr}")


@contextmanager
def finetuned(
    model: nn.Module,
    demos: Sequence,
    lr: float,
    *,
    mode: str = "standard",
    task=None,
    tokenizer=None,
    params: Sequence[tuple[str, nn.Parameter]] | None = None,
    record_queries: bool = True,
    progress: bool = False,
    train_dtype: str = "float32",
) -> Iterator[FTState]:
    """Inside the block, ``model`` is the finetuned model; on exit it is restored bit for bit.

    ``demos`` are token lists ([BOS] + input + label word each) or ``Example`` s with ``task``.
    ``params`` defaults to ``backend.named_kv_parameters(model)``. Restoration also happens on
    an exception or KeyboardInterrupt; only the trained tensors' originals are kept. For a
    half-precision model the update is added to the K/V activations inside the block rather
    than lost to round(W + delta) (``_update_applied``); ``state.deltas`` holds every
    tensor's update (at least fp32). ``train_dtype="float32"``
    (default) trains a half-precision model in float32 (``backend.full_precision``: an exact
    float32 copy for the training, the model's own tensors back after): bf16's own backward
    pass is a few percent off fp32's (3.5% of the update on Gemma-3-270m, SST-2), and its
    updates move SimAM_Δ and the FT baselines further from fp32 than float32-trained ones
    (``README``, Half precision). ``"model"`` trains in the model's dtype with fp32 master
    deltas (no float32 copy of the model in memory).
    """
    check_ft_args(mode, [lr], train_dtype)
    refuse_autocast("finetuned")
    sequences = _to_sequences(model, demos, task, tokenizer)
    named = list(params) if params is not None else B.named_kv_parameters(model)
    trained = [p for _, p in named]
    state = FTState(lr=lr, mode=mode, param_names=[n for n, _ in named])
    with _restoring(model, trained) as originals:
        with _training(model), _train_precision(model, train_dtype) as precision:
            state.fast_paths["train_dtype"] = precision
            _train(model, sequences, trained, state, record_queries, progress, originals)
        with _update_applied(model, named, originals, state.deltas, state.fast_paths):
            yield state


@contextmanager
def _update_applied(model: nn.Module, named, originals: Sequence[Tensor], deltas,
                    fast_paths: dict) -> Iterator[None]:  # fmt: skip
    """Run the block with the trained update ``deltas``.

    In fp32 the weights already hold ``W + ΔW`` (the caller put them there). Half-precision
    weights are set here, whatever training left in them: ``round(W + ΔW)`` would drop every
    entry of ΔW below half an ulp of W (bf16: 2⁻⁹ |W|) and round the rest to whole ulps (on
    Gemma-3-270m at lr 1e-4 that shrinks FT's move of the attention output by a tenth: mean
    |unit FT - unit ZS| 0.090 -> 0.081, ``analyses/precision_simaou.py``, emulated in fp32).
    So the weights go back to W and the exact ΔW enters as ``x·ΔWᵀ + Δb`` added to the K/V
    projections' outputs (``backend.kv_deltas``, one delta for every row), where the update
    is far above the activations' rounding. Where the model's layout cannot take those hooks,
    or the trained tensors are not its K/V, the weights get ``round(W + ΔW)``, with a
    ``PrecisionWarning``.
    ``fast_paths["update_applied"]`` says which ran and why.
    """
    trained = [p for _, p in named]
    if deltas is None or not any(master_dtype(p.dtype) != p.dtype for p in trained):
        fast_paths["update_applied"] = {"how": "weights", "reason": "full-precision weights"}
        yield
        return
    kv = B.named_kv_parameters(model)
    reason = None
    if [id(p) for _, p in kv] != [id(p) for p in trained]:
        reason = "the trained tensors are not exactly the model's K/V projections"
    with ExitStack() as stack:
        if reason is None:
            try:
                stack.enter_context(B.kv_deltas(model, [d.detach()[None] for d in deltas]))
            except NotImplementedError as e:
                reason = f"{type(e).__name__}: {e}"
        if reason is None:
            with torch.no_grad():
                for p, orig in zip(trained, originals, strict=True):
                    p.copy_(orig)
            fast_paths["update_applied"] = {
                "how": "kv_deltas",
                "reason": "half-precision weights would round the update (round(W + ΔW))",
            }
        else:
            with torch.no_grad():
                for p, orig, d in zip(trained, originals, deltas, strict=True):
                    if master_dtype(p.dtype) != p.dtype:
                        p.copy_(orig.to(d.dtype) + d)  # round(W + ΔW)
            fast_paths["update_applied"] = {"how": "weights (rounded)", "reason": reason}
            warn(f"the FT update is applied as round(W + ΔW) in {trained[0].dtype}, which loses "
                 f"its entries below half an ulp of W ({reason}); compare with a float32 run",
                 PrecisionWarning)  # fmt: skip
        yield


def first_step_updates(model: nn.Module, demos: Sequence, lr: float, **kwargs: Any) -> list[Tensor]:
    """The sum over ``demos`` of each one's FT update alone from the untouched weights (one
    ``finetuned`` per demonstration; ``kwargs`` as there): FT's update without its trajectory.
    With ``train_dtype="model"``, its error in a half-precision model against fp32 is the
    floor that the dtype's own gradients set, the yardstick the half-precision checks hold FT
    trained in that dtype to."""
    steps = []
    for demo in demos:
        with finetuned(model, [demo], lr, record_queries=False, **kwargs) as state:
            steps.append([d.detach().float().cpu() for d in state.deltas])
    return [torch.stack(parts).sum(0) for parts in zip(*steps, strict=True)]


def _prepare(model: nn.Module, sequences, trained: Sequence[Tensor], mode: str,
             fast_paths: dict | None = None) -> bool:  # fmt: skip
    """Freeze all but ``trained``, eval mode, check lengths; whether the vocabulary pass is
    the model's own loss (layer-causal FT needs it; its check goes into ``fast_paths``)."""
    d = B.dims(model)
    longest = max(len(s) for s in sequences)
    if longest > d.n_ctx:
        raise ValueError(f"training sequence has {longest} tokens but the context is {d.n_ctx}")
    trained_ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    model.eval()  # no dropout in TL models; eval keeps any stochastic layer off
    device = B.input_device(model)
    check = _vocab_pass_check(model, torch.tensor([sequences[0]], device=device), trained)
    if fast_paths is not None:
        fast_paths["one_pass_vocabulary_check"] = check
    if mode == "layer_causal" and not check["ok"]:
        raise NotImplementedError(
            "layer-causal FT needs logits = unembed(final_norm(resid)) (optionally soft-capped) "
            f"and an untrained unembedding; this model or parameter list differs ({check['reason']}"
            "): use mode='standard'"
        )
    if "loss_rel_diff" in check and not check["ok"]:
        warn(f"{check['reason']}; FT uses the model's own logits instead (slower)")
    return check["ok"]


def _diverged(value: float, step: int, lr: float, first: float | None = None,
              untouched: float | None = None,
              chance: float = math.inf) -> FinetuneDivergedError:  # fmt: skip
    what = f"became {value}"
    if first is not None and untouched is not None and math.isfinite(value):
        guess = f"; a uniform guess {chance:.4g}" if math.isfinite(chance) else ""
        what = (
            f"exploded to {value:.4g} (first step {first:.4g}; the untouched model's loss on "
            f"this demonstration {untouched:.4g}{guess})"
        )
    return FinetuneDivergedError(
        f"finetune loss {what} at step {step} with lr={lr}; "
        "use a lower learning rate (the model has been restored)"
    )


def _above(value: float, reference: float, factor: float) -> bool:
    return value > max(factor * reference, reference + EXPLODE_MARGIN)


def _check_loss(value: float, step: int, lr: float, losses: Sequence[float],
                untouched: Callable[[], float],
                chance: float = math.inf) -> FinetuneDivergedError | None:  # fmt: skip
    """The error for a NaN/inf or exploded loss ``value`` at ``step`` (after ``losses``);
    ``untouched()`` gives the untouched model's loss on this step's demonstration; ``chance``
    is a uniform guess's loss, ln(vocabulary size)."""
    if not math.isfinite(value):
        return _diverged(value, step, lr)
    first = losses[0] if losses and math.isfinite(losses[0]) else math.inf
    if _above(value, first, EXPLODE_FACTOR) or value > chance + EXPLODE_MARGIN:
        reference = untouched()
        if _above(value, reference, EXPLODE_CONFIRM):
            return _diverged(value, step, lr, first, reference, chance)
    return None


def _chance_loss(model: nn.Module, mode: str) -> float:
    """A uniform guess's FT loss, ln(vocabulary size), the ceiling a sane FT stays under; none
    (inf) for layer-causal FT, whose loss sums every layer's own LM loss read through the final
    norm and unembedding: the early layers' are above a guess's from the start (on Gemma-3-270m
    every step passed the test, and each paid for an untouched pass, doubling the run's time).
    Its explosions are still caught against the first step and the untouched model."""
    if mode == "layer_causal":
        return math.inf
    return math.log(B.dims(model).d_vocab)


def _untouched_loss(model: nn.Module, tokens: Tensor, mode: str, vocab_pass: bool,
                    trained: Sequence[Tensor] = (),
                    originals: Sequence[Tensor] = ()) -> float:  # fmt: skip
    """The loss of ``tokens`` [1, pos] under the model with ``trained`` set to ``originals``
    for one no-grad pass (then put back exactly); with none given, the model as it is. The
    in-place copies would invalidate a pending backward: call it after ``backward``."""
    with torch.no_grad():
        current = [p.detach().clone() for p in trained]
        try:
            for p, orig in zip(trained, originals, strict=True):
                p.copy_(orig)
            return float(_step_losses(model, tokens, mode, vocab_pass, [])[0])
        finally:
            for p, cur in zip(trained, current, strict=True):
                p.copy_(cur)


class _MasterDeltas:
    """What in-place SGD steps: for a tensor of at least fp32, the tensor itself (as plain
    SGD); for a half-precision one, an fp32 master delta, written into the model as
    ``round(W_orig + delta)`` after every step, so no update is lost to rounding (in-place
    half-precision SGD rounds away every step below half an ulp of W, and biases the rest).
    ``originals`` (the untrained tensors) are kept exactly, so the restore is bit for bit."""

    def __init__(self, trained: Sequence[Tensor], originals: Sequence[Tensor]) -> None:
        self.trained, self.originals = list(trained), list(originals)
        self.half = [master_dtype(p.dtype) != p.dtype for p in self.trained]
        self.masters = [
            torch.zeros(p.shape, dtype=master_dtype(p.dtype), device=p.device) if h else None
            for p, h in zip(self.trained, self.half, strict=True)
        ]
        self.stepped = [m if h else p for p, m, h in zip(self.trained, self.masters, self.half,
                                                         strict=True)]  # fmt: skip

    def take_grads(self) -> None:
        """Move the half-precision tensors' gradients to their masters (in fp32)."""
        for p, m in zip(self.trained, self.masters, strict=True):
            if m is not None:
                m.grad = None if p.grad is None else p.grad.to(m.dtype)
                p.grad = None

    @torch.no_grad()
    def write(self) -> None:
        """Put ``round(W_orig + delta)`` into the half-precision tensors."""
        for p, orig, m in zip(self.trained, self.originals, self.masters, strict=True):
            if m is not None:
                p.copy_(orig.to(m.dtype).add_(m))

    def deltas(self) -> list[Tensor]:
        """Every tensor's update so far, in at least fp32 (the master for half precision)."""
        return [m.detach().clone() if m is not None else (p.detach() - orig)
                for p, orig, m in zip(self.trained, self.originals, self.masters,
                                      strict=True)]  # fmt: skip


def _train(model, sequences, trained, state: FTState, record_queries: bool, progress: bool,
           originals: Sequence[Tensor]):  # fmt: skip
    """The SGD loop: one step per demonstration, in order (``originals``: the untrained K/V)."""
    for p in trained:
        p.grad = None
    vocab_pass = _prepare(model, sequences, trained, state.mode, state.fast_paths)
    masters = _MasterDeltas(trained, originals)
    state.fast_paths.update(side_by_side=False, one_pass_vocabulary_loss=vocab_pass,
                            fp32_master_deltas=any(masters.half))  # fmt: skip
    opt = torch.optim.SGD(masters.stepped, lr=state.lr, momentum=0.0, weight_decay=0.0)
    device = B.input_device(model)
    queries = _Queries(model) if record_queries else None
    chance = _chance_loss(model, state.mode)
    for step, seq in enumerate(tqdm(sequences, desc="finetune", disable=not progress)):
        hooks = queries.hooks() if queries is not None else []
        tokens = torch.tensor([seq], device=device)
        loss = _step_losses(model, tokens, state.mode, vocab_pass, hooks)[0]
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _diverged(value, step, state.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        untouched = functools.partial(_untouched_loss, model, tokens, state.mode, vocab_pass,
                                      trained, originals)  # fmt: skip
        error = _check_loss(value, step, state.lr, state.losses, untouched, chance)
        if error is not None:
            raise error
        masters.take_grads()
        opt.step()
        masters.write()
        state.losses.append(value)
        if queries is not None:
            queries.keep(0)
    for p in masters.stepped:
        p.grad = None
    for p in trained:
        p.grad = None
    state.deltas = masters.deltas()
    if queries is not None:
        queries.fill(state)
        state.train_token_demo = _token_demo(sequences)


# --------------------------------------------------------------------------- learning-rate grid


class FTGrid:
    """Several K/V finetunes of one model on the same demonstrations, one per learning rate.

    ``with grid.applied(lr) as state:`` puts that rate's finetuned K/V into the model for the
    block (restored bit for bit on exit). ``states`` holds each trained rate's ``FTState``;
    ``diverged`` maps a rate whose loss became NaN/inf or exploded to its error message.
    """

    def __init__(self, model: nn.Module, lrs: Sequence[float], named, originals, run_one,
                 fallback: dict | None = None) -> None:  # fmt: skip
        self.model, self.lrs = model, [float(lr) for lr in lrs]
        self.states: dict[float, FTState] = {}
        self.diverged: dict[float, str] = {}
        # why side-by-side FT was not used although it was asked for (None: it was not asked
        # for, or it ran); also in every state's ``fast_paths["side_by_side_fallback"]``
        self.fallback = fallback
        self._named, self._originals, self._run_one = named, originals, run_one
        self._deltas: dict[float, list[Tensor]] = {}
        self._active: float | None = None

    @contextmanager
    def applied(self, lr: float) -> Iterator[FTState]:
        """Inside the block the model is finetuned at ``lr``; raises FinetuneDivergedError
        (model restored) for a rate that diverged. One rate at a time (no nesting)."""
        lr = float(lr)
        if lr not in self.lrs:
            raise ValueError(f"learning rate {lr} is not in this grid {self.lrs}")
        if self._active is not None:
            raise RuntimeError(f"lr={self._active} is still applied: leave its block first")
        self._active = lr
        try:
            with self._applied(lr) as state:
                yield state
        finally:
            self._active = None

    @contextmanager
    def _applied(self, lr: float) -> Iterator[FTState]:
        if self._run_one is not None:  # one after another: train now, in place
            with ExitStack() as stack:
                try:
                    state = stack.enter_context(self._run_one(lr))
                except FinetuneDivergedError as e:  # the training's own (not the block's)
                    self.diverged[lr] = str(e)
                    raise
                if self.fallback is not None:
                    state.fast_paths["side_by_side_fallback"] = self.fallback
                self.states[lr] = state
                yield state
            return
        if lr in self.diverged:
            raise FinetuneDivergedError(self.diverged[lr])
        if lr not in self._deltas:
            raise RuntimeError("this grid's finetunes are gone: use it inside its with-block")
        try:
            with torch.no_grad():
                for (_, p), orig, delta in zip(self._named, self._originals, self._deltas[lr],
                                               strict=True):  # fmt: skip
                    p.copy_(orig + delta)
            state = self.states[lr]
            with _update_applied(self.model, self._named, self._originals, self._deltas[lr],
                                 state.fast_paths):  # fmt: skip
                yield state
        finally:
            with torch.no_grad():
                for (_, p), orig in zip(self._named, self._originals, strict=True):
                    p.copy_(orig)


@contextmanager
def finetuned_grid(
    model: nn.Module,
    demos: Sequence,
    lrs: Sequence[float],
    *,
    mode: str = "standard",
    task=None,
    tokenizer=None,
    record_queries: bool = True,
    side_by_side: bool | None = None,
    progress: bool = False,
    train_dtype: str = "float32",
) -> Iterator[FTGrid]:
    """The paper's FT at every rate of ``lrs``, trained side by side: each step runs one
    batch with a row per rate (per-row K/V deltas, ``backend.kv_deltas``), so the shared
    weights and the unembedding are read once per step for all rates, not once per rate.

    Same protocol and per-rate results as ``finetuned`` up to float rounding: the rows use
    ``x·W + x·ΔW`` where in-place SGD uses ``x·(W + ΔW)``, and ΔW is kept in at least fp32 (so
    for half-precision models small updates are not rounded away, as in-place FT's fp32
    master deltas are with ``train_dtype="model"``; in half precision ``grid.applied`` adds
    ``x·ΔWᵀ`` to the K/V projections rather than rounding W + ΔW to the model's dtype).
    Each state's ``deltas`` are its ΔW while the grid's block runs (freed on exit, like the
    model's copies). A rate whose loss diverges stops there and is reported in
    ``grid.diverged``; the others go on. ``side_by_side=None`` uses it when the model supports
    it and it passes its step-0 check, else trains each rate in place when it is applied,
    with a ``FastPathWarning``; why is in ``grid.fallback`` and every state's
    ``fast_paths["side_by_side_fallback"]``. ``train_dtype`` as in ``finetuned``.
    """
    check_ft_args(mode, lrs, train_dtype)
    refuse_autocast("finetuned_grid")
    if not lrs:
        raise ValueError("no learning rates to finetune at; pass at least one")
    sequences = _to_sequences(model, demos, task, tokenizer)
    named = B.named_kv_parameters(model)
    trained = [p for _, p in named]
    rates = list(dict.fromkeys(float(lr) for lr in lrs))

    def run_one(lr):
        return finetuned(model, sequences, lr, mode=mode, record_queries=record_queries,
                         progress=progress, train_dtype=train_dtype)  # fmt: skip

    if side_by_side is False or len(rates) == 1:
        yield FTGrid(model, rates, named, None, run_one)
        return
    fallback = None
    with _restoring(model, trained) as originals:
        grid = FTGrid(model, rates, named, originals, None)
        try:
            with _training(model), _train_precision(model, train_dtype) as precision:
                _train_side_by_side(model, sequences, grid, mode, record_queries, progress)
            for state in grid.states.values():
                state.fast_paths["train_dtype"] = precision
        except NotImplementedError as e:
            if side_by_side:
                raise
            fallback = {"reason": f"{type(e).__name__}: {e}",
                        "check": getattr(e, "report", None)}  # fmt: skip
            warn(f"side-by-side FT is not used: {e}; training each rate in place instead "
                 "(one after another: slower, same results)")  # fmt: skip
            grid = None
        if grid is not None:
            try:
                yield grid
            finally:  # the deltas (rates × K/V size) go now, even if the caller keeps `grid`
                grid._deltas.clear()
                grid._originals = []
                for state in grid.states.values():
                    state.deltas = None
    if grid is None:  # the model cannot run K/V deltas side by side: one rate at a time
        yield FTGrid(model, rates, named, None, run_one, fallback)


def _check_side_by_side(model, tokens, mode, vocab_pass, trained, loss, grads) -> dict:
    """Step 0 of side-by-side FT against the plain computation: with zero deltas, a row's
    loss and its delta gradients must be the model's own loss and K/V-weight gradients.
    Raises NotImplementedError (the grid then trains rate by rate) when they are not."""
    for p in trained:
        p.requires_grad_(True)
    try:
        plain = _step_losses(model, tokens, mode, vocab_pass, [])[0]
        want = torch.autograd.grad(plain, trained)
    finally:
        for p in trained:
            p.requires_grad_(False)
    tol = tolerance(trained[0].dtype)
    plain = float(plain.detach())
    loss_diff = abs(loss - plain) / max(1.0, abs(plain))
    # relative L2 error over all K/V tensors together (a per-tensor max would let a layer
    # whose gradient is nearly zero dominate with pure rounding noise)
    err = sum(
        float((g.double() - w.double()).pow(2).sum()) for g, w in zip(grads, want, strict=True)
    )
    ref = sum(float(w.double().pow(2).sum()) for w in want)
    grad_diff = (err / ref) ** 0.5 if ref > 0 else float(err > 0)
    # The plain fp32 backward itself is ~4e-4 (relative L2) from float64 on Gemma-3-270m, while
    # a real fault (a delta missing in a layer, counted twice) is off by percents or more.
    grad_tol = min(50 * tol, 0.1)
    report = {"loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff, "tolerance": tol,
              "grad_tolerance": grad_tol}  # fmt: skip
    if not (loss_diff <= tol and grad_diff <= grad_tol):
        raise SideBySideUnavailable(
            f"side-by-side FT disagrees with plain FT at step 0 (loss {loss_diff:.3g}, "
            f"gradients {grad_diff:.3g} relative; tolerances {tol:g}, {grad_tol:g})",
            report,
        )
    return report


def _train_side_by_side(model, sequences, grid: FTGrid, mode: str, record_queries: bool,
                        progress: bool) -> None:  # fmt: skip
    """SGD for every rate of ``grid`` at once, on K/V deltas (one batch row per live rate)."""
    named, rates = grid._named, grid.lrs
    trained = [p for _, p in named]
    checks: dict = {}
    vocab_pass = _prepare(model, sequences, trained, mode, checks)
    if not vocab_pass:
        raise SideBySideUnavailable(
            "side-by-side FT needs the one-pass vocabulary loss, which is not the model's own "
            f"loss here ({checks['one_pass_vocabulary_check'].get('reason')})",
            checks["one_pass_vocabulary_check"],
        )
    for p in trained:  # only the deltas learn; the model's own K/V stay as they are
        p.requires_grad_(False)
    # fp32 at least: a half-precision delta would round the small per-step updates away
    half = any(master_dtype(p.dtype) != p.dtype for p in trained)
    deltas = [torch.zeros(len(rates), *p.shape, device=p.device, requires_grad=True,
                          dtype=torch.promote_types(p.dtype, torch.float32))
              for p in trained]  # fmt: skip
    device = B.input_device(model)
    live = list(range(len(rates)))
    queries = _Queries(model, len(rates)) if record_queries else None
    check = None  # the step-0 check's report
    states = [FTState(lr=lr, mode=mode, param_names=[n for n, _ in named]) for lr in rates]
    chance = _chance_loss(model, mode)
    for step, seq in enumerate(tqdm(sequences, desc="finetune (grid)", disable=not progress)):
        if not live:
            break
        idx = torch.tensor(live)
        rows = deltas if len(live) == len(rates) else [t[idx] for t in deltas]
        hooks = queries.hooks() if queries is not None else []
        tokens = torch.tensor([seq], device=device).expand(len(live), -1)
        with B.kv_deltas(model, rows):
            losses = _step_losses(model, tokens, mode, vocab_pass, hooks)
        values = losses.detach().tolist()
        # the model's own K/V (no deltas); computed at most once per step
        untouched = functools.cache(
            functools.partial(_untouched_loss, model, tokens[:1], mode, vocab_pass)
        )
        errors = [_check_loss(v, step, rates[r], states[r].losses, untouched, chance)
                  for v, r in zip(values, live, strict=True)]  # fmt: skip
        ok = [i for i, e in enumerate(errors) if e is None]
        for i, r in enumerate(live):
            if errors[i] is not None:
                grid.diverged[rates[r]] = str(errors[i])
        if ok:
            keep = [live[i] for i in ok]
            lr = torch.zeros(len(rates), dtype=torch.float64)  # 0 for rows that do not step
            lr[keep] = torch.tensor([rates[r] for r in keep], dtype=torch.float64)
            dead = [r for r in live if r not in keep]  # diverged at this step
            for t in deltas:
                t.grad = None
            torch.autograd.backward(losses[ok].sum(), inputs=deltas)
            if step == 0:  # every delta is still 0: a row must be the plain model's step
                row = live[ok[0]]
                grads = [t.grad[row] for t in deltas]
                check = _check_side_by_side(model, tokens[:1], mode, vocab_pass, trained,
                                            values[ok[0]], grads)  # fmt: skip
            with torch.no_grad():
                for t in deltas:  # in place: no second copy of the rates × K/V gradients
                    g = t.grad
                    if dead:
                        g[dead] = 0.0
                    t.sub_(g.mul_(lr.view(-1, *([1] * (g.dim() - 1))).to(g.device, g.dtype)))
                    t.grad = None
        for i in ok:
            r = live[i]
            states[r].losses.append(values[i])
            if queries is not None:
                queries.keep(i, r)
        live = [live[i] for i in ok]
    for r, (lr, state) in enumerate(zip(rates, states, strict=True)):
        state.fast_paths.update(side_by_side=True, one_pass_vocabulary_loss=vocab_pass,
                                fp32_master_deltas=half, side_by_side_check=check,
                                **checks)  # fmt: skip
        if lr in grid.diverged:
            continue
        if queries is not None:
            queries.fill(state, r)
            state.train_token_demo = _token_demo(sequences)
        grid.states[lr] = state
        grid._deltas[lr] = state.deltas = [t[r].detach() for t in deltas]
