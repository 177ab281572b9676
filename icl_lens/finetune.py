"""Finetune K/V in place on the demonstrations (the paper's FT protocol), then restore exactly.

Protocol (DESIGN §2): plain SGD (no momentum, no weight decay), constant learning rate, batch
size 1, one epoch over the demonstrations in ICL order, causal-LM loss averaged over all tokens
of "formatted input + label word". Only the parameters from ``backend.kv_parameters`` train.

``mode="layer_causal"`` (Deutch et al. 2024): each layer's input is detached and each layer's
residual output goes through the final norm and unembedding to its own LM loss; the per-layer
losses are summed, so each layer's K/V learn only from their own loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from tqdm.auto import tqdm

from icl_lens import backend as B
from icl_lens.memory import release_memory

MODES = ("standard", "layer_causal")
VOCAB_CHUNK = 2048  # unembedding columns per step of the loss's vocabulary pass (~5 MB fp32)


class FinetuneDivergedError(FloatingPointError):
    """The loss became NaN or infinite; the model has been restored."""


@dataclass
class FTState:
    """What a finetune produced, besides the changed weights (which are restored on exit)."""

    lr: float
    mode: str
    param_names: list[str]
    losses: list[float] = field(default_factory=list)
    # Scaled query vectors (all heads) of every trained token (BOS excluded), every layer,
    # captured in the forward pass of the step that trained on it: the Kendall FT side.
    train_q: Float[Tensor, "layer train_tok d_q"] | None = None
    train_token_demo: Int[Tensor, " train_tok"] | None = None

    @property
    def n_steps(self) -> int:
        return len(self.losses)


class _ChunkedVocabCE(torch.autograd.Function):
    """Σ_rows weight · CE(logits(h), target) with logits = h @ W_U + b_U (optionally soft-capped).

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
        loss = ((lse - picked) * w).sum()
        grad = ((acc / run_sum[:, None] - e_t) * w[:, None]).to(h.dtype)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None, None, None


def _vocab_loss(model: nn.Module, normed: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    """Σ_rows weight · LM loss of final-normed rows ``normed`` [row, d_model], computed the way
    the model computes its logits (unembedding, bias, output soft-cap) without full logits."""
    w_u = model.unembed.W_U
    b_u = getattr(model.unembed, "b_U", None)
    b_u = b_u.detach() if isinstance(b_u, Tensor) else None
    dtype = torch.promote_types(w_u.dtype, torch.float32)
    return _ChunkedVocabCE.apply(normed.to(w_u.device), w_u.detach(), b_u,
                                 targets.to(w_u.device), weight.to(w_u.device, dtype),
                                 VOCAB_CHUNK, B.logit_soft_cap(model))  # fmt: skip


def _lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of the model's own logits [1, pos, vocab]."""
    return F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])


def _final_norm_loss(model: nn.Module, normed: Tensor, tokens: Tensor) -> Tensor:
    """The mean LM loss of ``tokens`` [1, pos] from their final-normed residual [1, pos, d],
    by the one-pass vocabulary loss."""
    n_pos = tokens.shape[1] - 1
    weight = torch.full((n_pos,), 1.0 / n_pos)
    return _vocab_loss(model, normed[0, :-1], tokens[0, 1:], weight)


def _vocab_pass_matches(model: nn.Module, tokens: Tensor, trained: Sequence[Tensor]) -> bool:
    """Whether the one-pass vocabulary loss is the model's own loss here: no trained tensor is
    (a view of) the unembedding, and on ``tokens`` it equals the CE of the model's logits, so
    logit transforms it does not know (e.g. a logit scale) are caught, not assumed away.
    One forward pass gives both: the logits and, by a hook, the final-normed residual."""
    unembed = [t for t in (model.unembed.W_U, getattr(model.unembed, "b_U", None))
               if isinstance(t, Tensor)]  # fmt: skip
    shared = {t.untyped_storage().data_ptr() for t in unembed}
    if any(p.untyped_storage().data_ptr() in shared for p in trained):
        return False
    final: dict[str, Tensor] = {}

    def keep_final(t, hook):
        final["x"] = t

    with torch.no_grad(), model.hooks(fwd_hooks=[(B.final_norm_hook_name(model), keep_final)]):
        want = _lm_loss(model(tokens), tokens)
        got = _final_norm_loss(model, final["x"], tokens)
    return bool(torch.isclose(got.float(), want, rtol=1e-4, atol=1e-5))


def _layer_causal_loss(model: nn.Module, resids: list[Tensor], tokens: Tensor) -> Tensor:
    """Sum over layers of each layer's own mean LM loss (final norm, then unembedding).

    All layers' rows go through one vocabulary pass, which reads the (large) unembedding once
    per step instead of twice per layer (DESIGN: peak RSS and the FLOP bound).
    """
    n_layers, n_pos = len(resids), tokens.shape[1] - 1
    norm_param = next(model.ln_final.parameters(), None)
    device = norm_param.device if norm_param is not None else resids[-1].device
    stacked = torch.cat([r.to(device) for r in resids], dim=0)[:, :-1]
    normed = model.ln_final(stacked)
    targets = tokens[:, 1:].expand(n_layers, -1).reshape(-1)
    weight = torch.full((n_layers * n_pos,), 1.0 / n_pos)
    return _vocab_loss(model, normed.reshape(-1, normed.shape[-1]), targets, weight)


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
) -> Iterator[FTState]:
    """Inside the block, ``model`` is the finetuned model; on exit it is restored bit for bit.

    ``demos`` are token lists ([BOS] + input + label word each) or ``Example`` s with ``task``.
    ``params`` defaults to ``backend.named_kv_parameters(model)``. Restoration also happens on
    an exception or KeyboardInterrupt; only the trained tensors' originals are kept.
    """
    if mode not in MODES:
        raise ValueError(f"unknown finetune mode {mode!r}; use one of {MODES}")
    if not (lr > 0):
        raise ValueError(f"learning rate must be positive, got {lr}")
    sequences = _to_sequences(model, demos, task, tokenizer)
    named = list(params) if params is not None else B.named_kv_parameters(model)
    trained = [p for _, p in named]
    originals = [p.detach().clone() for p in trained]
    grads = [p.grad for p in trained]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    state = FTState(lr=lr, mode=mode, param_names=[n for n, _ in named])
    try:
        with torch.enable_grad():
            _train(model, sequences, trained, state, record_queries, progress)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        yield state
    finally:
        with torch.no_grad():
            for p, orig, g in zip(trained, originals, grads, strict=True):
                p.copy_(orig)
                p.grad = g
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
        release_memory()


def _train(model, sequences, trained, state: FTState, record_queries: bool, progress: bool):
    """The SGD loop: one step per demonstration, in order."""
    d = B.dims(model)
    trained_ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    for p in trained:
        p.grad = None
    opt = torch.optim.SGD(trained, lr=state.lr, momentum=0.0, weight_decay=0.0)
    device = B.input_device(model)
    scales = [B.attn_scale(model, layer) for layer in range(d.n_layers)]
    q_steps: list[Tensor] = []
    token_demo: list[int] = []
    model.eval()  # no dropout in TL models; eval keeps any stochastic layer off
    vocab_pass = _vocab_pass_matches(model, torch.tensor([sequences[0]], device=device), trained)
    if state.mode == "layer_causal" and not vocab_pass:
        raise NotImplementedError(
            "layer-causal FT needs logits = unembed(final_norm(resid)) (optionally soft-capped) "
            "and an untrained unembedding; this model or parameter list differs: use "
            "mode='standard'"
        )
    for step, seq in enumerate(tqdm(sequences, desc="finetune", disable=not progress)):
        tokens = torch.tensor([seq], device=device)
        if tokens.shape[1] > d.n_ctx:
            raise ValueError(
                f"training sequence has {tokens.shape[1]} tokens but the context is {d.n_ctx}"
            )
        qs: dict[int, Tensor] = {}
        resid: dict[int, Tensor] = {}
        hooks = []
        if record_queries:
            for layer in range(d.n_layers):

                def save_q(t, hook, layer=layer, qs=qs):
                    qs[layer] = (t[0, 1:].detach().flatten(-2) / scales[layer] ** 0.5).cpu()

                hooks.append((B.hook_name("q", layer), save_q))
        if state.mode == "layer_causal":
            for layer in range(d.n_layers):

                def keep_resid(t, hook, layer=layer, resid=resid):
                    resid[layer] = t

                hooks.append((B.hook_name("resid_post", layer), keep_resid))
                if layer > 0:
                    hooks.append((B.hook_name("resid_pre", layer), lambda t, hook: t.detach()))
            B.run_until(model, tokens, hooks, stop_at=B.final_norm_hook_name(model))
            loss = _layer_causal_loss(model, [resid[layer] for layer in sorted(resid)], tokens)
        elif vocab_pass:  # stop before the model's own unembedding
            final: dict[str, Tensor] = {}

            def keep_final(t, hook, final=final):
                final["x"] = t

            stop = B.final_norm_hook_name(model)
            B.run_until(model, tokens, [*hooks, (stop, keep_final)], stop_at=stop)
            loss = _final_norm_loss(model, final["x"], tokens)
        else:
            with model.hooks(fwd_hooks=hooks):
                loss = _lm_loss(model(tokens), tokens)
        value = float(loss.detach())
        if not torch.isfinite(loss.detach()):
            raise FinetuneDivergedError(
                f"finetune loss became {value} at step {step} with lr={state.lr}; "
                "use a lower learning rate (the model has been restored)"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.losses.append(value)
        if record_queries:
            q_steps.append(torch.stack([qs[layer] for layer in range(d.n_layers)]))
            token_demo += [step] * (len(seq) - 1)
    for p in trained:
        p.grad = None
    if record_queries:
        state.train_q = torch.cat(q_steps, dim=1).float()
        state.train_token_demo = torch.tensor(token_demo)
