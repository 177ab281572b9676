"""Split-prefix attention for TL 4 bridges: a shared prefix's keys read once for a whole batch.

With a cached demonstration prefix, the bridge's own attention concatenates the prefix's keys
and values onto every row's new ones (a copy per row), repeats them for every grouped query
head (another copy), and multiplies each row's few new queries by them in small batched
products. Here the new queries of *all* rows and all heads sharing a key head are multiplied by
the one prefix copy in a single matrix product, and the new keys (a handful per row) are
handled per row as before. The score tensor handed to ``hook_attn_scores`` and the pattern
handed to ``hook_pattern`` are the same tensors, of the same shape and meaning, as the
bridge's; masks, soft-capping and softmax are the bridge's own methods. Every hook of the
attention bridge still fires, in the same order.

Only ``PositionEmbeddingsAttentionBridge`` (Llama, Gemma, Qwen, Mistral, ...) in its plain
configuration is covered (``unsupported`` says why another is not); everything else keeps the
bridge's own forward. ``capture`` checks this path against full prompts on the user's own model
before using it (``checks["prefix_cache"]["attention"]``) and falls back to the bridge's own
attention when it disagrees.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

_BRIDGE = "PositionEmbeddingsAttentionBridge"
# what the forward below calls on the bridge: a TL version without one of them is not covered
_NEEDED = ("q", "k", "v", "o", "hook_in", "hook_out", "hook_attn_scores", "hook_pattern",
           "_apply_reconstruct_attention_mask", "_masked_softmax",
           "_scrub_compatibility_pattern_nans", "_apply_position_embedding_hooks",
           "_qk_norm_phase", "_qk_norm_per_head", "submodules", "original_component")  # fmt: skip
# bridge config flags that switch on code paths the forward below does not have
_CONFIG_FLAGS = ("use_split_qkv_input", "use_attn_in", "gated_q_proj", "use_attn_result",
                 "qk_norm_after_rope", "rotary_interleaved_cos_sin",
                 "rotary_adjacent_pairs")  # fmt: skip


def unsupported(model: nn.Module) -> str | None:
    """Why split-prefix attention cannot run on ``model`` (None when it can)."""
    blocks = getattr(model, "blocks", None)
    if not blocks:
        return "the model has no blocks"
    for layer, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        name = type(attn).__name__
        if name != _BRIDGE:
            return f"blocks.{layer}.attn is a {name}, not a plain {_BRIDGE}"
        missing = [a for a in _NEEDED if not hasattr(attn, a)]
        if missing:
            return f"blocks.{layer}.attn lacks {', '.join(missing)} on this TL version"
        flags = [f for f in _CONFIG_FLAGS if getattr(attn.config, f, False)]
        if flags:
            return f"blocks.{layer}.attn uses {', '.join(flags)}"
        hf = attn.original_component
        hf_config = getattr(hf, "config", None)
        rope = getattr(hf_config, "rope_parameters", None)
        extras = {
            "key_multiplier": getattr(hf, "key_multiplier", None) is not None,
            "clip_qkv": getattr(hf_config, "clip_qkv", None) is not None,
            "attention sinks": getattr(hf, "sinks", None) is not None,
            "llama-4 query scaling": isinstance(rope, dict)
            and rope.get("llama_4_scaling_beta") is not None,
            "a gate projection": attn._modules.get("gate") is not None,
            "a pre-reshape qk-norm": attn._qk_norm_phase not in (None, "post_reshape"),
            "no head_dim": not isinstance(getattr(hf, "head_dim", None), int),
            "attention dropout in training mode": attn.training
            and float(getattr(hf, "attention_dropout", 0.0) or 0.0) > 0.0,
        }
        found = [k for k, v in extras.items() if v]
        if found:
            return f"blocks.{layer}.attn has {', '.join(found)}"
    return None


@contextmanager
def split_attention(model: nn.Module, prefix_state: Any) -> Iterator[None]:
    """Run every attention bridge of ``model`` with split-prefix attention over the one-row
    HF cache ``prefix_state`` (which is read, never written) while the context is open."""
    why = unsupported(model)
    if why is not None:
        raise NotImplementedError(f"split-prefix attention: {why}")
    plain = plain_cache_layers()
    layers = prefix_state.layers
    attns = [block.attn for block in model.blocks]
    if len({id(a) for a in attns}) != len(attns) or any("forward" in vars(a) for a in attns):
        raise NotImplementedError("split-prefix attention: attention modules are shared or "
                                  "already have their own forward")  # fmt: skip
    patched = []
    try:
        for index, attn in enumerate(attns):
            layer = getattr(attn, "_layer_idx", None)  # the cache layer the bridge would update
            layer = layer if isinstance(layer, int) else index
            cached = layers[layer] if layer < len(layers) else None
            if type(cached) not in plain or not isinstance(cached.keys, Tensor):
                raise NotImplementedError(f"split-prefix attention: cache layer {layer} is a "
                                          f"{type(cached).__name__}")  # fmt: skip
            if cached.keys.shape[0] != 1:
                raise NotImplementedError(f"layer {layer}: the prefix cache is not one row")
            # An instance attribute, set past the bridge's __setattr__ (which would hand it to
            # the wrapped HF module) and removed below; nn.Module.__call__ then calls it.
            object.__setattr__(attn, "forward", _forward(attn, cached.keys, cached.values))
            patched.append(attn)
        yield
    finally:
        for attn in patched:
            vars(attn).pop("forward", None)


def plain_cache_layers() -> tuple[type, ...]:
    """transformers' cache layer classes whose update is a pure concatenation (no per-row or
    in-place state): the only ones a shared prefix is read from or broadcast over."""
    from transformers import cache_utils

    names = ("DynamicLayer", "DynamicSlidingWindowLayer")
    return tuple(getattr(cache_utils, n) for n in names if hasattr(cache_utils, n))


def _heads_major(t: Tensor, n_kv: int) -> Tensor:
    """[batch, kv*groups, pos, x] -> [kv, batch*groups*pos, x]: every row sharing a key head."""
    b, h, p, x = t.shape
    return t.reshape(b, n_kv, h // n_kv, p, x).transpose(0, 1).reshape(n_kv, -1, x)


def _batch_major(t: Tensor, batch: int, n_heads: int) -> Tensor:
    """The inverse of ``_heads_major``: [kv, batch*groups*pos, x] -> [batch, heads, pos, x]."""
    n_kv, _, x = t.shape
    t = t.reshape(n_kv, batch, n_heads // n_kv, -1, x).transpose(0, 1)
    return t.reshape(batch, n_heads, -1, x)


def _forward(attn: nn.Module, prefix_k: Tensor, prefix_v: Tensor):
    """The bridge's forward with the prefix keys/values ([1, kv, prefix, d_head]) split off."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = attn.original_component
    head_dim = hf.head_dim
    scaling = getattr(hf, "scaling", head_dim**-0.5)
    softcap = getattr(hf, "attn_logit_softcapping", None)
    full_rotation = _rotary_pct(attn.config) == 1.0
    pk, pv = prefix_k[0], prefix_v[0]  # [kv, prefix, d_head]
    n_kv = pk.shape[0]

    def forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if "hidden_states" in kwargs:
            x = kwargs.pop("hidden_states")
        elif args and isinstance(args[0], Tensor):
            x, args = args[0], args[1:]
        else:
            raise ValueError("split-prefix attention: no hidden_states")
        position_embeddings = kwargs.pop("position_embeddings", None)
        attention_mask = kwargs.pop("attention_mask", None)
        x = attn.hook_in(x)
        batch, n_new = x.shape[:2]
        shape = (batch, n_new, -1, head_dim)
        q = attn.q(x).view(shape).transpose(1, 2)  # [batch, head, new, d_head]
        k = attn.k(x).view(shape).transpose(1, 2)
        v = attn.v(x).view(shape).transpose(1, 2)
        if attn._qk_norm_phase == "post_reshape":
            q, k = _qk_norm(attn, q, k)
        if position_embeddings is None:
            raise NotImplementedError("split-prefix attention: no position_embeddings")
        cos, sin = attn._apply_position_embedding_hooks(position_embeddings)
        rotary = cos.shape[-1]
        if rotary * 2 == head_dim and full_rotation:  # half-width cos/sin (GPT-OSS)
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        elif rotary < head_dim:  # Phi, GPT-NeoX style: the first dims only
            q_rot, k_rot = apply_rotary_pos_emb(q[..., :rotary], k[..., :rotary], cos, sin)
            q = torch.cat([q_rot, q[..., rotary:]], dim=-1)
            k = torch.cat([k_rot, k[..., rotary:]], dim=-1)
        else:
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if hasattr(attn, "hook_rot_q"):
            q = attn.hook_rot_q(q)
        if hasattr(attn, "hook_rot_k"):
            k = attn.hook_rot_k(k)
        n_heads = q.shape[1]
        if n_heads % n_kv or k.shape[1] != n_kv:
            raise NotImplementedError("split-prefix attention: head counts do not match")
        # scores: every new query against the shared prefix in one product per key head, and
        # against its own row's new keys (causal within the row) in small ones
        s_pre = _batch_major(torch.matmul(_heads_major(q, n_kv), pk.transpose(-1, -2)),
                             batch, n_heads)  # fmt: skip
        k_rep = k.repeat_interleave(n_heads // n_kv, dim=1)
        s_new = torch.matmul(q, k_rep.transpose(-1, -2))
        scores = torch.cat([s_pre, s_new], dim=-1) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        n_keys = scores.shape[-1]
        scores = attn._apply_reconstruct_attention_mask(
            attn_scores=scores, attention_mask=attention_mask, seq_len=n_keys, q_seq_len=n_new
        )
        scores = attn.hook_attn_scores(scores)
        weights = attn._masked_softmax(scores, dtype=torch.float32).to(q.dtype)
        weights = attn._scrub_compatibility_pattern_nans(weights)
        weights = attn.hook_pattern(weights)
        n_pre = pk.shape[1]
        out_pre = torch.matmul(_heads_major(weights[..., :n_pre], n_kv), pv)
        v_rep = v.repeat_interleave(n_heads // n_kv, dim=1)
        out_new = torch.matmul(weights[..., n_pre:], v_rep)
        # the two halves summed at fp32 at least (the bridge's one product rounds once)
        wide = torch.promote_types(out_new.dtype, torch.float32)
        out = (_batch_major(out_pre, batch, n_heads).to(wide) + out_new.to(wide)).to(q.dtype)
        out = out.transpose(1, 2).reshape(batch, n_new, -1)
        o_weight = getattr(getattr(attn.o, "original_component", None), "weight", None)
        if isinstance(o_weight, Tensor) and o_weight.dtype.is_floating_point:
            out = out.to(o_weight.dtype)
        return attn.hook_out(attn.o(out)), weights

    return forward


def _rotary_pct(config: Any) -> float:
    """The share of rotated dims, read as the bridge reads it (its own helper where it has
    one: the bridge's forward takes a half-width cos/sin for a full rotation only when that
    says 1.0)."""
    try:
        from transformer_lens.utilities.hf_utils import get_rotary_pct_from_config
    except ImportError:
        get_rotary_pct_from_config = None
    if get_rotary_pct_from_config is not None:
        return float(get_rotary_pct_from_config(config))
    rope = getattr(config, "rope_parameters", None)
    value = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
    if value is None and isinstance(rope, dict):
        value = rope.get("partial_rotary_factor")
    return float(value) if value is not None else 1.0


def _qk_norm(attn: nn.Module, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Post-reshape q/k norms (Gemma-3) on [batch, head, pos, d_head], as the bridge applies
    them (per-head weights broadcast on the [batch, pos, head, d_head] layout)."""

    def norm(name: str, t: Tensor) -> Tensor:
        if name not in attn.submodules:
            return t
        module, hook = getattr(attn, name), getattr(attn, f"hook_{name[0]}_normed")
        if attn._qk_norm_per_head:
            return hook(module(t.transpose(1, 2)).transpose(1, 2))
        return hook(module(t))

    return norm("q_norm", q), norm("k_norm", k)
