"""ZS / ICL / FT records of one seed at every named site, in one call (:func:`circuit_records`).

Each condition runs its prompts once, as full prompts with hooks (no prefix cache), and keeps
per example, layer and head what the circuit tools need at the recorded position; label-word
logits are read at the prediction position. FT is ``icl_lens.finetune.finetuned`` on the same
demonstrations (the model is restored bit for bit afterwards); with ``shuffled=True`` a second
FT on ``baselines.shuffle_labels`` gives the patching baseline.

Default position: ``record="predict"``, the query's last token, where the prediction is read:
direct logit attribution and patching ask how an update moves that prediction, which an
update at the appended label token (the reference's ``"label"``) cannot do under causal
attention. ``record="label"`` gives the reference position for comparisons with
``run_experiment``; the logit tools refuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from icl_lens import backend as B
from icl_lens.baselines import shuffle_labels
from icl_lens.capture import COMPUTE_DTYPES
from icl_lens.checks import refuse_autocast, warn
from icl_lens.circuit.sites import DEFAULT_SITES, check_sites, head_outputs, site_hooks
from icl_lens.data import TaskData, load_task_data, sample_demos
from icl_lens.finetune import FTState, check_ft_args, finetuned
from icl_lens.progress import tqdm
from icl_lens.tasks import (
    Example,
    Prompt,
    TaskSpec,
    build_prompt,
    fit_demos,
    get_task,
    label_token_ids,
)

CONDITIONS = ("zs", "icl", "ft", "ft_shuffled")
__all__ = ["CONDITIONS", "CircuitRecords", "ConditionRecords", "circuit_records"]


@dataclass
class ConditionRecords:
    """One condition's pass, per example at the recorded position (CPU, float32).

    A site that was not requested is None. ``z``/``heads`` come with the ``heads`` site.
    ``final_scale``/``post_scale`` are the scales of the final norm (at the prediction
    position) and of each layer's post-attention norm (1 where there is none): the DLA holds
    them at the ZS run's values. ``demo_*`` exist for ICL only.
    """

    condition: str
    label_logits: Float[Tensor, "example label"]  # at the prediction position
    final_scale: Float[Tensor, " example"]
    post_scale: Float[Tensor, "example layer"]
    resid: Float[Tensor, "example layer d_model"] | None = None
    residual: Float[Tensor, "example layer d_model"] | None = None
    attention: Float[Tensor, "example layer d_model"] | None = None
    z: Float[Tensor, "example layer head d_head"] | None = None
    heads: Float[Tensor, "example layer head d_model"] | None = None
    q_pre: Float[Tensor, "example layer head d_head"] | None = None
    q_post: Float[Tensor, "example layer head d_head"] | None = None
    demo_scores: Float[Tensor, "example layer head demo_tok"] | None = None  # pre-softmax
    demo_pattern: Float[Tensor, "example layer head demo_tok"] | None = None  # softmax row
    demo_mask: Bool[Tensor, "example layer demo_tok"] | None = None  # visible demo tokens

    @property
    def preds(self) -> Int[Tensor, " example"]:
        return self.label_logits.argmax(-1)

    def site(self, name: str) -> Tensor:
        """The tensor of site ``name``; raises if it was not recorded."""
        value = getattr(self, name, None) if name in DEFAULT_SITES else None
        if value is None:
            raise ValueError(
                f"site {name!r} was not recorded for {self.condition}; pass sites=(..., "
                f"{name!r}) to circuit_records"
            )
        return value


@dataclass
class CircuitRecords:
    """ZS, ICL and FT records of one seed (see :func:`circuit_records`).

    ``readout`` [label, d_model]: the label words' unembedding columns pulled back through the
    final norm at unit scale, so a residual-stream vector v adds ``v · readout[c] / s`` to
    label c's logit when the final norm's scale is held at s. ``attn_readout``
    [layer, label, d_model]: the same pulled back further through each layer's
    post-attention norm at unit scale (equal to ``readout`` where there is none).
    ``icl_tokens``/``zs_tokens``: every prompt's token strings; ``demo_tokens``: the strings
    of the demonstration tokens (inputs and labels, no BOS or separators) that ``demo_*``
    fields index, with ``demo_of_token`` the demonstration of each.
    """

    zs: ConditionRecords
    icl: ConditionRecords
    ft: ConditionRecords
    ft_shuffled: ConditionRecords | None
    labels: Int[Tensor, " example"]
    example_ids: list[str]
    task: TaskSpec
    label_ids: list[int]
    demos: list[Example]
    shuffled_demos: list[Example] | None
    seed: int
    lr: float
    mode: str
    record: str
    sites: tuple[str, ...]
    readout: Float[Tensor, "label d_model"]
    attn_readout: Float[Tensor, "layer label d_model"]
    w_o: Float[Tensor, "layer head d_head d_model"]
    b_o: Float[Tensor, "layer d_model"]
    attn_scale: Float[Tensor, " layer"]  # q·k divisor of each layer
    zs_prompts: list[Prompt] = field(repr=False)
    icl_prompts: list[Prompt] = field(repr=False)
    zs_tokens: list[list[str]] = field(repr=False)
    icl_tokens: list[list[str]] = field(repr=False)
    demo_tokens: list[str] = field(repr=False)
    demo_of_token: Int[Tensor, " demo_tok"] = field(repr=False)
    ft_state: FTState = field(repr=False)
    tokenizer: Any = field(repr=False)
    info: dict = field(default_factory=dict)  # architecture, backend, hooks read per site
    train_dtype: str = "float32"  # what FT's training computed in (``finetuned``)
    update_capture_dtype: str = "float32"  # what the ZS/FT passes computed in (half models)

    def __getitem__(self, condition: str) -> ConditionRecords:
        if condition not in CONDITIONS or getattr(self, condition) is None:
            raise KeyError(f"no {condition!r} records; have {self.conditions}")
        return getattr(self, condition)

    @property
    def conditions(self) -> list[str]:
        return [c for c in CONDITIONS if getattr(self, c) is not None]

    @property
    def n_layers(self) -> int:
        return int(self.w_o.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.w_o.shape[1])

    def __len__(self) -> int:
        return len(self.example_ids)

    def update(self, condition: str, site: str) -> Tensor:
        """``condition``'s update at ``site``: its value minus ZS's (e.g. ΔICL, ΔFT)."""
        return self[condition].site(site) - self.zs.site(site)


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One string per token id (``decode`` of each id alone; the id itself if that fails)."""
    out = []
    for i in ids:
        try:
            out.append(str(tokenizer.decode([int(i)])))
        except Exception:  # noqa: BLE001 - a display string only
            out.append(str(int(i)))
    return out


def circuit_records(
    model: nn.Module,
    task_or_data: str | TaskSpec | TaskData,
    seed: int = 0,
    *,
    lr: float,
    n_eval: int = 16,
    n_demos: int = 8,
    tokenizer: Any = None,
    source: str = "staicc",
    sites: Sequence[str] = DEFAULT_SITES,
    record: str = "predict",
    mode: str = "standard",
    shuffled: bool = True,
    balanced_demos: bool = False,
    batch_size: int = 8,
    progress: bool = False,
    demos: Sequence[Example] | None = None,
    train_dtype: str = "float32",
    update_capture_dtype: str = "float32",
) -> CircuitRecords:
    """ZS, ICL and FT (and shuffled-label FT) records of one seed at the named ``sites``.

    ``task_or_data``: a task name or ``TaskSpec`` (data from ``load_task_data(source=...)``)
    or a ``TaskData``. Evaluation: its first ``n_eval`` examples; demonstrations:
    ``sample_demos(pool, n_demos, seed)``, dropped from the end if a prompt would not fit the
    context (``tasks.fit_demos``). FT: ``finetuned(model, demos, lr, mode=mode)``; the
    shuffled-label FT (same rate) is skipped with a warning when the demonstrations have one
    label. The model is left as it was. ``demos``: use these demonstrations as given (no
    sampling or fitting; ``run_experiment(patching=True)`` passes its own), ``n_demos`` unused.
    ``train_dtype``: what FT trains in (``finetuned``). ``update_capture_dtype``: what the ZS
    and FT passes (their difference is FT's update) compute in for a bf16/fp16 model:
    "float32" (an exact float32 copy of it, ``capture(compute_dtype=...)``) or "model".
    """
    check_ft_args(mode, [lr], train_dtype)
    if update_capture_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown update_capture_dtype {update_capture_dtype!r}; use one of "
                         f"{COMPUTE_DTYPES}")  # fmt: skip
    refuse_autocast("circuit_records")
    B.check_model(model)
    sites = check_sites(list(sites))
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer; pass tokenizer=...")
    if isinstance(task_or_data, TaskData):
        data = task_or_data
    else:
        data = load_task_data(get_task(task_or_data), source=source, n_eval=n_eval)
    spec = data.task
    d = B.dims(model)
    evals = list(data.eval[:n_eval])
    if not evals:
        raise ValueError(f"task {spec.name} has no evaluation examples")
    if demos is None:
        demos = sample_demos(data.demo_pool, n_demos, seed, balanced=balanced_demos)
        demos = fit_demos(spec, tok, demos, evals, d.n_ctx).demos
    elif not demos:
        raise ValueError("demos=[] gives no ICL update; pass demonstrations or None to sample")
    label_ids = label_token_ids(spec, tok)
    zs_prompts = [build_prompt(spec, tok, q, record=record) for q in evals]
    icl_prompts = [build_prompt(spec, tok, q, demos, record=record) for q in evals]
    hooks_read: dict[str, str] = {}
    run = dict(label_ids=label_ids, sites=sites, batch_size=batch_size, hooks_read=hooks_read)
    bar = tqdm(total=4 if shuffled else 3, desc="circuit records", disable=not progress)

    def update_pass(condition: str) -> ConditionRecords:  # ZS and FT: FT's update
        with B.full_precision(model) if update_capture_dtype == "float32" else nullcontext():
            return _record(model, zs_prompts, condition, **run)

    zs = update_pass("zs")
    icl = _record(model, icl_prompts, "icl", demo=True, **run)
    bar.update(2)
    ft_kw = dict(mode=mode, task=spec, tokenizer=tok, train_dtype=train_dtype)
    with finetuned(model, demos, lr, **ft_kw) as state:
        ft = update_pass("ft")
    bar.update(1)
    sh, sh_demos = None, None
    if shuffled:
        if len({x.label for x in demos}) < 2:
            warn("the demonstrations have one label: no shuffled-label FT baseline", UserWarning)
        else:
            sh_demos = shuffle_labels(demos, seed)
            with finetuned(model, sh_demos, lr, record_queries=False, **ft_kw):
                sh = update_pass("ft_shuffled")
        bar.update(1)
    bar.close()
    norms = _post_norms(model, sites)
    readout, attn_readout = _readouts(model, label_ids, norms)
    weights = [B.attn_weights(model, layer) for layer in range(d.n_layers)]
    demo_pos = icl_prompts[0].spans.demo_token_positions()
    return CircuitRecords(
        zs=zs,
        icl=icl,
        ft=ft,
        ft_shuffled=sh,
        labels=torch.tensor([int(q.label) for q in evals]),
        example_ids=[str(q.id) for q in evals],
        task=spec,
        label_ids=label_ids,
        demos=list(demos),
        shuffled_demos=sh_demos,
        seed=int(seed),
        lr=float(lr),
        mode=mode,
        train_dtype=train_dtype,
        update_capture_dtype=update_capture_dtype,
        record=record,
        sites=sites,
        readout=readout,
        attn_readout=attn_readout,
        w_o=torch.stack([w["W_O"].detach().float().cpu() for w in weights]),
        b_o=torch.stack([w["b_O"].detach().float().cpu() for w in weights]),
        attn_scale=torch.tensor([B.attn_scale(model, layer) for layer in range(d.n_layers)]),
        zs_prompts=zs_prompts,
        icl_prompts=icl_prompts,
        zs_tokens=[_token_strings(tok, p.tokens) for p in zs_prompts],
        icl_tokens=[_token_strings(tok, p.tokens) for p in icl_prompts],
        demo_tokens=_token_strings(tok, [icl_prompts[0].tokens[i] for i in demo_pos]),
        demo_of_token=torch.tensor(icl_prompts[0].spans.demo_of_position(), dtype=torch.long),
        ft_state=state,
        tokenizer=tok,
        info={
            "architecture": B.architecture(model),
            "backend": B.BACKEND,
            "tl_version": B.TL_VERSION,
            "hooks": hooks_read,
            "post_attn_norm": norms,
            "n_demos": len(demos),
        },
    )


# --------------------------------------------------------------------------- one pass


def _post_norms(model: nn.Module, sites: Sequence[str]) -> list[str | None]:
    """Each layer's post-attention norm. Only the ``attention``/``heads`` sites (and their
    DLA) depend on it: without them, a layout the backend cannot name counts as none."""
    needed = "attention" in sites or "heads" in sites
    out: list[str | None] = []
    for layer in range(B.dims(model).n_layers):
        try:
            out.append(B.post_attn_norm(model, layer))
        except NotImplementedError:
            if needed:
                raise
            out.append(None)
    return out


def _readouts(
    model: nn.Module, label_ids: list[int], norms: list[str | None]
) -> tuple[Tensor, Tensor]:
    """``readout`` and ``attn_readout`` of :class:`CircuitRecords` (unit-scale norms)."""
    d = B.dims(model)
    w_u, _ = B.unembed_rows(model, label_ids)
    w_u = w_u.detach()
    eye = torch.eye(d.d_model, dtype=w_u.dtype, device=w_u.device)
    ones = torch.ones(d.d_model, 1, dtype=w_u.dtype, device=w_u.device)
    with torch.no_grad():
        final = B.frozen_norm_linear(model, "ln_final", eye, ones) @ w_u  # [d_model, label]
        per_layer = []
        for norm in norms:
            post = eye if norm is None else B.frozen_norm_linear(model, norm, eye, ones)
            per_layer.append((post.to(final.dtype) @ final).T)
    return final.T.float().cpu(), torch.stack(per_layer).float().cpu()


def forward_label_logits(
    model: nn.Module,
    prompts: Sequence[Prompt],
    label_ids: Sequence[int],
    make_hooks,
    batch_size: int = 8,
) -> Float[Tensor, "example label"]:
    """Label-word logits at each prompt's prediction position, from right-padded full-prompt
    batches run with ``make_hooks(idx, rows, rec, pred)`` (idx: the batch's prompt indices,
    rec/pred: positions per row) plus the final-norm hook; soft cap applied as the model does.
    """
    w_u, b_u = B.unembed_rows(model, label_ids)
    w_u = w_u.detach()
    cap = B.logit_soft_cap(model)
    final_name = B.final_norm_hook_name(model)
    device = B.input_device(model)
    out = torch.empty(len(prompts), len(label_ids))
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        batch = [prompts[i] for i in idx]
        width = max(len(p.tokens) for p in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for r, p in enumerate(batch):
            tokens[r, : len(p.tokens)] = torch.tensor(p.tokens)
        rows = torch.arange(len(batch))
        rec = torch.tensor([p.spans.record_pos for p in batch])
        pred = torch.tensor([p.spans.predict_pos for p in batch])
        final: dict[str, Tensor] = {}

        def keep_final(t: Tensor, hook: object, final=final, rows=rows, pred=pred) -> None:
            final["x"] = t[rows.to(t.device), pred.to(t.device)]

        hooks = [*make_hooks(idx, rows, rec, pred), (final_name, keep_final)]
        with torch.no_grad():  # right padding: under causal attention no real row sees a pad
            B.run_until(model, tokens.to(device), hooks, stop_at=final_name)
        logits = final["x"].to(w_u.device, w_u.dtype) @ w_u
        if b_u is not None:
            logits = logits + b_u.detach()
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        out[idx] = logits.float().cpu()
    return out


def _visible(scores: Tensor) -> Tensor:
    """Keys a score row can see: masked keys hold -inf (TL) or a huge negative (HF masks)."""
    return torch.isfinite(scores) & (scores > -1e30)


def _record(
    model: nn.Module,
    prompts: list[Prompt],
    condition: str,
    *,
    label_ids: list[int],
    sites: tuple[str, ...],
    batch_size: int,
    hooks_read: dict[str, str],
    demo: bool = False,
) -> ConditionRecords:
    """One condition's pass over ``prompts`` (see :class:`ConditionRecords`)."""
    d = B.dims(model)
    n, n_l = len(prompts), d.n_layers
    demo_pos = torch.tensor(prompts[0].spans.demo_token_positions(), dtype=torch.long)
    shapes = {
        "resid": (d.d_model,),
        "residual": (d.d_model,),
        "attention": (d.d_model,),
        "heads": (d.n_heads, d.d_head),  # hook_z, turned into outputs below
        "q_pre": (d.n_heads, d.d_head),
        "q_post": (d.n_heads, d.d_head),
    }
    out = {s: torch.zeros(n, n_l, *shapes[s]) for s in sites}
    fired = {s: torch.zeros(n_l, dtype=torch.bool) for s in sites}
    final_scale = torch.ones(n)
    post_scale = torch.ones(n, n_l)
    n_demo = len(demo_pos) if demo else 0
    demo_scores = torch.zeros(n, n_l, d.n_heads, n_demo)
    demo_pattern = torch.zeros(n, n_l, d.n_heads, n_demo)
    demo_mask = torch.zeros(n, n_l, n_demo, dtype=torch.bool)
    norms = _post_norms(model, sites)
    has_final_scale = "ln_final.hook_scale" in model.hook_dict

    def make_hooks(idx, rows, rec, pred):
        idx_t = torch.tensor(idx)

        def at(t: Tensor, pos: Tensor) -> Tensor:
            return t[rows.to(t.device), pos.to(t.device)].float().cpu()

        hooks = []
        for layer in range(n_l):
            for s in sites:

                def keep(t: Tensor, s=s, layer=layer) -> None:
                    out[s][idx_t, layer] = at(t, rec).reshape(len(idx), *shapes[s])
                    fired[s][layer] = True

                named = site_hooks(model, s, layer, keep)
                hooks += named
                if layer == 0:
                    hooks_read[s] = ", ".join(name for name, _ in named)
            if norms[layer] is not None:

                def keep_post(t: Tensor, hook: object, layer=layer) -> None:
                    post_scale[idx_t, layer] = at(t, rec).reshape(len(idx))

                hooks.append((f"{norms[layer]}.hook_scale", keep_post))
            if n_demo:

                def keep_scores(t: Tensor, layer=layer) -> None:  # [batch, head, q, k]
                    row = t[rows.to(t.device), :, rec.to(t.device)].float().cpu()
                    row = row[:, :, demo_pos]
                    seen = _visible(row)
                    demo_scores[idx_t, layer] = torch.where(seen, row, torch.zeros(()))
                    demo_mask[idx_t, layer] = seen.all(1)

                def keep_pattern(t: Tensor, hook: object, layer=layer) -> None:
                    row = t[rows.to(t.device), :, rec.to(t.device)].float().cpu()
                    demo_pattern[idx_t, layer] = row[:, :, demo_pos]

                hooks += B.attn_scores_hooks(model, layer, keep_scores)
                hooks.append((B.hook_name("pattern", layer), keep_pattern))
        if has_final_scale:

            def keep_final_scale(t: Tensor, hook: object) -> None:
                final_scale[idx_t] = at(t, pred).reshape(len(idx))

            hooks.append(("ln_final.hook_scale", keep_final_scale))
        return hooks

    logits = forward_label_logits(model, prompts, label_ids, make_hooks, batch_size)
    for s in sites:
        if not fired[s].all():
            missing = torch.nonzero(~fired[s]).flatten().tolist()
            raise NotImplementedError(
                f"{B.architecture(model)}: site {s!r} ({hooks_read.get(s)}) did not fire in "
                f"layer(s) {missing} on TL {B.TL_VERSION}; this site is unavailable here"
            )
    fields: dict[str, Any] = {s: out[s] for s in sites}
    if "heads" in sites:
        w_o = torch.stack(
            [B.attn_weights(model, layer)["W_O"].detach().float().cpu() for layer in range(n_l)]
        )
        fields["z"] = out["heads"]
        fields["heads"] = torch.stack(
            [head_outputs(out["heads"][:, layer], w_o[layer]) for layer in range(n_l)], dim=1
        )
    if n_demo:
        fields.update(demo_scores=demo_scores, demo_pattern=demo_pattern, demo_mask=demo_mask)
    return ConditionRecords(
        condition=condition,
        label_logits=logits,
        final_scale=final_scale,
        post_scale=post_scale,
        **fields,
    )
