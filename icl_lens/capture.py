"""One hooked pass per condition (ZS, ICL, FT): keep only what the analyses need.

For every prompt, ``capture`` records at the recorded position (DESIGN §2):
the attention output of every layer (``hook_attn_out``), the pre-softmax score row of every
layer and head sliced to the query's own tokens and to the demonstration tokens, and the
scaled query vector (all heads concatenated); at the prediction position it scores only the
label words (final norm + the label words' unembedding columns, never the full vocabulary).

With the same demonstrations for every query (the paper's setting), the demonstration prefix
runs once and its keys/values are reused for padded batches of queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from icl_lens import backend as B
from icl_lens.memory import release_memory

CONDITIONS = ("zs", "icl", "ft")


@dataclass
class Records:
    """What one condition's pass kept, per example. All tensors live on the CPU.

    Score rows are padded to the longest query; ``query_mask``/``demo_mask`` mark the keys
    that are real and visible to the recorded row in that layer (sliding windows hide some).
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


def capture(
    model: nn.Module,
    prompts: Sequence,
    label_token_ids: Sequence[int],
    condition: str = "icl",
    *,
    batch_size: int = 8,
    shared_prefix: bool | None = None,
    detail_limit: int | None = None,
    progress: bool = True,
) -> Records:
    """Run ``prompts`` (from ``tasks.build_prompt``) through ``model`` and keep the records.

    ``shared_prefix=None`` reuses the demonstration prefix's keys/values whenever all prompts
    share it and the model supports it; ``False`` always runs full prompts.
    ``detail_limit=N`` keeps the two large per-example fields, ``q`` and ``demo_scores``, for
    the first N prompts only (Kendall reads no more); everything else, ``demo_mask`` included,
    is kept for all, so pair ``demo_scores`` with ``demo_mask[: len(demo_scores)]``.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; use one of {CONDITIONS}")
    record = prompts[0].record if len(prompts) else "label"
    if any(p.record != record for p in prompts):
        raise ValueError("prompts mix recorded positions; build them with one record=...")
    if len(prompts) == 0:
        raise ValueError("no prompts to run; check that the evaluation set is not empty")
    if detail_limit is not None and detail_limit < 0:
        raise ValueError(f"detail_limit must be >= 0 or None, got {detail_limit}")
    d = B.dims(model)
    longest = max(len(p.tokens) for p in prompts)
    if longest > d.n_ctx:
        raise ValueError(
            f"prompt has {longest} tokens but the model's context is {d.n_ctx}; "
            "use fewer demonstrations (n_demos) or shorter examples"
        )
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
    label_ids = list(label_token_ids)
    w_u, b_u = B.unembed_rows(model, label_ids)
    w_u, b_u = w_u.detach(), None if b_u is None else b_u.detach()
    scales = [B.attn_scale(model, layer) for layer in range(d.n_layers)]

    cache = None
    if prefix_len:
        prefix = torch.tensor(prompts[0].tokens[:prefix_len], device=B.input_device(model))
        cache = B.prefix_cache(model, prefix)

    # Batches of similar length waste little compute on padding. Each batch writes its rows
    # straight into the preallocated outputs, at the prompts' own indices (input order).
    n, n_demo = len(prompts), len(demo_pos)
    n_detail = n if detail_limit is None else min(n, detail_limit)
    q_len = max(p.spans.record_pos + 1 - p.spans.query[0] for p in prompts)
    out = {
        "logits": torch.empty(n, len(label_ids)),
        "attn_out": torch.empty(n, d.n_layers, d.d_model),
        "q": torch.empty(n_detail, d.n_layers, d.d_q),
        "qs": torch.zeros(n, d.n_layers, d.n_heads, q_len),
        "qm": torch.zeros(n, d.n_layers, q_len, dtype=torch.bool),
        "ds": torch.zeros(n_detail, d.n_layers, d.n_heads, n_demo),
        "dm": torch.zeros(n, d.n_layers, n_demo, dtype=torch.bool),
    }
    order = sorted(range(n), key=lambda i: len(prompts[i].tokens))
    bar = tqdm(total=n, desc=f"capture {condition}", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        idx = torch.tensor(order[start : start + batch_size])
        batch = [prompts[i] for i in idx.tolist()]
        _run_batch(model, batch, idx, out, n_detail, d, label_ids, w_u, b_u, scales, demo_pos,
                   prefix_len, cache)  # fmt: skip
        bar.update(len(batch))
    bar.close()
    # Scores of padded query slots stay masked out; queries are right-padded, so the
    # recorded row never attends to padding (causal attention).
    out["qs"].masked_fill_(~out["qm"].unsqueeze(2), 0.0)
    del cache
    release_memory()
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
    )


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


@torch.no_grad()
def _run_batch(model, batch, idx, out, n_detail, d, label_ids, w_u, b_u, scales, demo_pos,
               prefix_len, cache) -> None:  # fmt: skip
    """One padded forward pass over ``batch``; writes rows ``idx`` of the CPU tensors ``out``
    (rows ``idx < n_detail`` only for ``q`` and ``demo_scores``)."""
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
    demo_idx = torch.tensor(demo_pos, dtype=torch.long)
    detail = idx < n_detail  # batch rows whose q / demo scores are kept

    def attn_out_hook(layer):
        def hook(t, hook):
            out["attn_out"][idx, layer] = _at(t, rows, rec).float().cpu()

        return hook

    def q_hook(layer):
        def hook(t, hook):
            if detail.any():
                q = _at(t, rows[detail], rec[detail]).flatten(-2) / scales[layer] ** 0.5
                out["q"][idx[detail], layer] = q.float().cpu()

        return hook

    def scores_hook(layer):
        def hook(t):
            # keys are the prefix (possibly trimmed to a sliding window by the cache) + new ones
            offset = prefix_len + t.shape[2] - t.shape[3]
            row = t[rows.to(t.device), :, rec.to(t.device)].float().cpu()
            row = _pad_left(row, offset)  # [batch, head, absolute key], on the CPU
            for i in range(n):
                s, e = q_start[i], q_end[i]
                own = row[i, :, s:e]
                out["qs"][idx[i], layer, :, : e - s] = own
                out["qm"][idx[i], layer, : e - s] = _visible(own).all(0)
            if len(demo_pos):
                demo = row[:, :, demo_idx]
                seen = _visible(demo)
                out["ds"][idx[detail], layer] = torch.where(seen, demo, torch.zeros(()))[detail]
                out["dm"][idx, layer] = seen.all(1)

        return hook

    final = {}

    def final_hook(t, hook):
        final["x"] = _at(t, rows, pred).to(w_u.device)

    hooks = []
    for layer in range(d.n_layers):
        hooks += [
            (B.hook_name("attn_out", layer), attn_out_hook(layer)),
            (B.hook_name("q", layer), q_hook(layer)),
        ]
        hooks += B.attn_scores_hooks(model, layer, scores_hook(layer))
    stop = B.final_norm_hook_name(model)
    hooks.append((stop, final_hook))
    tokens, mask = tokens.to(B.input_device(model)), mask.to(B.input_device(model))
    if cache is not None:
        B.run_with_prefix(model, cache, tokens, mask, hooks, stop_at=stop)
    else:
        # right padding needs no mask: under causal attention no real row sees a pad
        B.run_until(model, tokens, hooks, stop_at=stop)
    logits = final["x"].to(w_u.dtype) @ w_u
    if b_u is not None:
        logits = logits + b_u
    out["logits"][idx] = logits.float().cpu()
