"""The TL 4 (``TransformerBridge``) adapter.

Reads bridges; builds models only when TL 4 is installed. Holds the bridge's K/V
``nn.Linear`` s, the HF key-value cache handling (the cache's keyword, its alias for the
attention bridges, cheap per-row copies), the rebuilding of pre-softmax scores where TL 4.3
hooks the pattern instead (OPT, TL's native toy attention) and the native toys' checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import einops
import torch
from torch import Tensor, nn

from icl_lens.backend import tl4_split
from icl_lens.backend.adapter import Adapter
from icl_lens.backend.common import (
    TL_MAJOR,
    PrefixCache,
    PrefixCacheError,
    _encodes_differently,
    _hf_windows,
    _row_term,
    _transformers_version,
    _zero_bias,
    architecture,
    attn_scale,
    dims,
    hook_name,
    run_until,
)

if TL_MAJOR >= 4:  # (absent from TL 3)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge


class BridgeAdapter(Adapter):
    """TL 4's ``TransformerBridge``: TL's hooks around an HF (or TL-native) module."""

    backend = "bridge"
    default_folds = False  # boot_transformers keeps raw HF weights
    caches_converted = False  # the bridge wraps the HF module: its cache is the HF dir
    ln_out_hook = "hook_out"

    # ---- building

    def native_class(self) -> type:
        return TransformerBridge

    def toy_model(self, config: dict[str, Any], seed: int, device: str | torch.device) -> nn.Module:
        cfg = TransformerBridgeConfig(**config, seed=seed)
        return TransformerBridge.boot_native(cfg, device=device)

    def build_from_hf(
        self,
        hf_model: nn.Module,
        tokenizer: object,
        tl_name: str,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
        fold: bool,
    ) -> nn.Module:
        model = TransformerBridge.boot_transformers(
            tl_name, hf_model=hf_model.to(device), tokenizer=tokenizer, device=device, dtype=dtype
        )
        if fold:
            model.enable_compatibility_mode(disable_warnings=True)
        if tokenizer is not None and _encodes_differently(model.tokenizer, tokenizer):
            # TL re-loads the tokenizer by name (add_bos_token=True); AutoTokenizer may pick
            # the architecture's own class, which splits text differently: keep ours (past
            # the bridge's setter, which would re-load it the same way)
            object.__setattr__(model, "_tokenizer", tokenizer)
            model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
        model.eval()
        return model

    def load_tl_name(
        self, name: str, *, device: str | torch.device, dtype: torch.dtype, fold: bool
    ) -> nn.Module:
        model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
        if fold:
            model.enable_compatibility_mode(disable_warnings=True)
        return model

    def is_tl_name(self, name: str) -> bool:
        from transformer_lens.supported_models import get_official_model_name

        try:
            get_official_model_name(name)
            return True
        except ValueError:
            pass
        try:
            from transformer_lens.tools.model_registry.api import is_model_supported

            return bool(is_model_supported(name))
        except Exception:  # registry data missing: be conservative
            return False

    def save_converted(self, model: nn.Module, directory: str) -> list[str]:
        raise NotImplementedError("TransformerBridge models are cached as HF checkpoints")

    def load_converted(
        self,
        directory: str,
        tokenizer: object,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> nn.Module:
        raise NotImplementedError("TransformerBridge models are cached as HF checkpoints")

    # ---- reading a model

    def fallback_windows(self, model: nn.Module, n_layers: int) -> Sequence[int | None]:
        # TL 4's bridge config omits them: read the HF config
        hf_config = getattr(getattr(model, "original_model", None), "config", None)
        return _hf_windows(hf_config, n_layers)

    def kv_leaves(
        self, model: nn.Module, include_bias: bool, layers: Sequence[int]
    ) -> list[tuple[str, nn.Parameter]]:
        out: list[tuple[str, nn.Parameter]] = []
        for layer in layers:
            attn = model.blocks[layer].attn
            for proj in ("k", "v"):
                sub = getattr(attn, proj, None)
                if sub is None:
                    raise NotImplementedError(
                        f"{architecture(model)}: blocks.{layer}.attn has no separate '{proj}' "
                        "projection; K/V finetuning needs split K and V weights"
                    )
                for name, p in sub.named_parameters():
                    if name.endswith("bias") and not include_bias:
                        continue
                    out.append((f"blocks.{layer}.attn.{proj}.{name.split('.')[-1]}", p))
        return out

    def kv_delta_hooks(self, model: nn.Module, by_param: dict) -> list:
        """K/V are ``nn.Linear`` s inside ``attn.k``/``attn.v``; add ``x Δwᵀ + Δb`` to them."""
        handles = []
        for layer in range(dims(model).n_layers):
            for proj in ("k", "v"):
                linear = getattr(model.blocks[layer].attn, proj)
                inner = [m for m in linear.modules() if isinstance(m, nn.Linear)]
                if len(inner) != 1 or not any(id(p) in by_param for p in inner[0].parameters()):
                    raise NotImplementedError(
                        f"blocks.{layer}.attn.{proj} is not one nn.Linear; cannot run K/V deltas"
                    )
                lin = inner[0]
                w = by_param.get(id(lin.weight), (None, None))[1]
                b = by_param.get(id(lin.bias), (None, None))[1] if lin.bias is not None else None

                def add(mod, args, out, w=w, b=b):
                    return out + _row_term(args[0], w, b, "b...i,boi->b...o")

                handles.append(lin.register_forward_hook(add))
        return handles

    def unembed_bias(self, unembed: nn.Module) -> Tensor | None:
        return getattr(unembed, "b_U", None)

    def module_attn_scale(self, attn: nn.Module) -> float | None:
        inner = getattr(attn, "original_component", None)
        hf_scaling = getattr(inner, "scaling", None)
        if isinstance(hf_scaling, (int, float)) and hf_scaling > 0:
            return 1.0 / float(hf_scaling)
        native = getattr(inner, "scale", None)
        if isinstance(native, (int, float)) and native > 0:
            return float(native)
        return None

    def fallback_logit_soft_cap(self, model: nn.Module) -> object:
        # the HF config's final_logit_softcapping: what the wrapped HF model applies
        hf_config = getattr(getattr(model, "original_model", None), "config", None)
        cap = getattr(hf_config, "final_logit_softcapping", None)
        text = getattr(hf_config, "get_text_config", None)
        if cap is None and callable(text):
            cap = getattr(text(), "final_logit_softcapping", None)
        return cap

    def attn_weights(self, model: nn.Module, layer: int) -> dict[str, Tensor]:
        d = dims(model)
        attn = model.blocks[layer].attn
        out = {}
        for proj, heads in (("q", d.n_heads), ("k", d.n_kv_heads), ("v", d.n_kv_heads)):
            lin = getattr(attn, proj, None)
            if lin is None or getattr(lin, "weight", None) is None:
                raise NotImplementedError(f"blocks.{layer}.attn has no split '{proj}' projection")
            out[f"W_{proj.upper()}"] = einops.rearrange(lin.weight, "(h e) m -> h m e", h=heads)
            bias = getattr(lin, "bias", None)
            out[f"b_{proj.upper()}"] = (
                einops.rearrange(bias, "(h e) -> h e", h=heads) if bias is not None else None
            )
        o = attn.o
        # HF Conv1D (GPT-2's c_proj) stores its weight as [in, out], nn.Linear as [out, in]
        conv1d = type(getattr(o, "original_component", None)).__name__ == "Conv1D"
        pattern = "(h e) m -> h e m" if conv1d else "m (h e) -> h e m"
        out["W_O"] = einops.rearrange(o.weight, pattern, h=d.n_heads)
        out["b_O"] = getattr(o, "bias", None)
        return {n: _zero_bias(t, out, n, d) for n, t in out.items()}

    def attn_scores_hooks(
        self, model: nn.Module, layer: int, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        """TL 4.3's bridge fires ``hook_attn_scores`` with the post-softmax pattern for its
        native toys, so there the scores are rebuilt from ``hook_q``/``hook_k`` with the
        module's own rotary, scale and soft-cap (exactly what it computes before its softmax).

        TL 4.3's generic ``AttentionBridge`` (OPT, GPT-J, ...) also fires it with the HF
        module's returned probabilities. For the attention classes in ``_SCORES_FROM_PATTERN``
        the scores are rebuilt from the pattern P and the key at the query's own position,
        whose score q_t·k_t/scale needs neither the cache nor the position:
        s_j = log P_j − log P_t + s_t (masked keys: P = 0, so -inf). Other such classes pass
        the probabilities through, and capture's run-time check refuses them.
        """
        if _scores_from_pattern(model, layer):
            return _scores_from_pattern_hooks(model, layer, fn)
        native = _native_attention(model, layer)
        if native is None:
            return [(hook_name("attn_scores", layer), lambda t, hook: fn(t))]
        return _native_scores_hooks(native, layer, fn)

    # ---- prefix KV cache

    def supports_prefix_cache(self, model: nn.Module) -> bool:
        return _hf_model(model) is not None

    def prefix_cache(self, model: nn.Module, prefix: Tensor) -> PrefixCache:
        from transformers import DynamicCache

        hf = _hf_model(model)
        # Our own cache object, filled in place by the HF model: no reliance on what the bridge
        # or transformers call it on the way out (transformers 5.24 renamed ``past_key_values``
        # to ``cache`` in outputs, and TL 4.3's bridge then returned None).
        past = DynamicCache(config=hf.config)
        kwargs = {hf_cache_kwarg(hf): past, "use_cache": True}
        with torch.no_grad(), _cache_alias(model):
            try:  # logits of the last position only: the prefix's full-vocabulary logits
                model(prefix, return_type=None, logits_to_keep=1, **kwargs)
            except TypeError as e:  # (1800 x 262k floats on Gemma) would dominate peak memory
                if "logits_to_keep" not in str(e):
                    raise
                model(prefix, return_type=None, **kwargs)
        held = past.get_seq_length()
        if held != prefix.shape[1]:
            raise PrefixCacheError(
                f"the model filled {held} of {prefix.shape[1]} prefix positions of the key-value "
                f"cache (transformers {_transformers_version()}); run with shared_prefix=False"
            )
        return PrefixCache("hf", past, prefix.shape[1])

    def run_with_prefix(
        self,
        model: nn.Module,
        cache: PrefixCache,
        tokens: Tensor,
        attention_mask: Tensor,
        full_mask: Tensor,
        fwd_hooks: Sequence[tuple[str, object]],
        stop_at: str | None,
        split: bool = False,
    ) -> Tensor | None:
        past = _expanded_hf_cache(cache.state, tokens.shape[0])
        kwargs = {hf_cache_kwarg(_hf_model(model)): past, "use_cache": True}
        split_ctx = tl4_split.split_attention(model, cache.state) if split else nullcontext()
        with _cache_alias(model), split_ctx:
            return run_until(
                model, tokens, fwd_hooks, stop_at=stop_at, attention_mask=full_mask, **kwargs
            )

    def split_attention_unsupported(self, model: nn.Module) -> str | None:
        if _hf_model(model) is None:
            return "not a bridge over a transformers model (no HF key-value cache)"
        return tl4_split.unsupported(model)

    # ---- checkpoints

    def neutral_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        d = dims(model)
        h = d.n_heads
        out: dict[str, Tensor] = {}
        inner = model.original_model if hasattr(model, "original_model") else None
        if inner is None:
            raise NotImplementedError("neutral_state_dict supports TL-native toy bridges only")
        sd = {_clean(k): v.detach().clone() for k, v in inner.state_dict().items()}
        out["embed.W_E"] = sd["tok_embed.weight"]
        if "pos.weight" in sd:
            out["pos_embed.W_pos"] = sd["pos.weight"]
        for layer in range(d.n_layers):
            p = f"layers.{layer}."
            t = f"blocks.{layer}."
            if f"{p}ln1.weight" in sd:
                out[t + "ln1.w"] = sd[f"{p}ln1.weight"]
                out[t + "ln1.b"] = sd[f"{p}ln1.bias"]
            for proj in "qkv":
                out[t + f"attn.W_{proj.upper()}"] = einops.rearrange(
                    sd[f"{p}attn.{proj}.weight"], "(h dh) dm -> h dm dh", h=h
                )
                out[t + f"attn.b_{proj.upper()}"] = einops.rearrange(
                    sd[f"{p}attn.{proj}.bias"], "(h dh) -> h dh", h=h
                )
            out[t + "attn.W_O"] = einops.rearrange(
                sd[f"{p}attn.o.weight"], "dm (h dh) -> h dh dm", h=h
            )
            out[t + "attn.b_O"] = sd[f"{p}attn.o.bias"]
            if f"{p}ln2.weight" in sd:
                out[t + "ln2.w"] = sd[f"{p}ln2.weight"]
                out[t + "ln2.b"] = sd[f"{p}ln2.bias"]
            if f"{p}mlp.fc_in.weight" in sd:
                out[t + "mlp.W_in"] = sd[f"{p}mlp.fc_in.weight"].T.contiguous()
                out[t + "mlp.b_in"] = sd[f"{p}mlp.fc_in.bias"]
                out[t + "mlp.W_out"] = sd[f"{p}mlp.fc_out.weight"].T.contiguous()
                out[t + "mlp.b_out"] = sd[f"{p}mlp.fc_out.bias"]
        if "ln_out.weight" in sd:
            out["ln_final.w"] = sd["ln_out.weight"]
            out["ln_final.b"] = sd["ln_out.bias"]
        out["unembed.W_U"] = sd["head.weight"].T.contiguous()
        out["unembed.b_U"] = sd.get("head.bias", torch.zeros(d.d_vocab))
        return out

    def load_neutral_state_dict(self, model: nn.Module, neutral: dict[str, Tensor]) -> None:
        d = dims(model)
        inner = model.original_model
        sd: dict[str, Tensor] = {"tok_embed.weight": neutral["embed.W_E"]}
        if "pos_embed.W_pos" in neutral:
            sd["pos.weight"] = neutral["pos_embed.W_pos"]
        for layer in range(d.n_layers):
            p = f"layers.{layer}."
            t = f"blocks.{layer}."
            if t + "ln1.w" in neutral:
                sd[f"{p}ln1.weight"] = neutral[t + "ln1.w"]
                sd[f"{p}ln1.bias"] = neutral[t + "ln1.b"]
            for proj in "qkv":
                sd[f"{p}attn.{proj}.weight"] = einops.rearrange(
                    neutral[t + f"attn.W_{proj.upper()}"], "h dm dh -> (h dh) dm"
                )
                sd[f"{p}attn.{proj}.bias"] = neutral[t + f"attn.b_{proj.upper()}"].flatten()
            sd[f"{p}attn.o.weight"] = einops.rearrange(
                neutral[t + "attn.W_O"], "h dh dm -> dm (h dh)"
            )
            sd[f"{p}attn.o.bias"] = neutral[t + "attn.b_O"]
            if t + "ln2.w" in neutral:
                sd[f"{p}ln2.weight"] = neutral[t + "ln2.w"]
                sd[f"{p}ln2.bias"] = neutral[t + "ln2.b"]
            if t + "mlp.W_in" in neutral:
                sd[f"{p}mlp.fc_in.weight"] = neutral[t + "mlp.W_in"].T
                sd[f"{p}mlp.fc_in.bias"] = neutral[t + "mlp.b_in"]
                sd[f"{p}mlp.fc_out.weight"] = neutral[t + "mlp.W_out"].T
                sd[f"{p}mlp.fc_out.bias"] = neutral[t + "mlp.b_out"]
        if "ln_final.w" in neutral:
            sd["ln_out.weight"] = neutral["ln_final.w"]
            sd["ln_out.bias"] = neutral["ln_final.b"]
        sd["head.weight"] = neutral["unembed.W_U"].T
        own: dict[str, Tensor] = {}
        for k, v in inner.state_dict(keep_vars=True).items():
            own.setdefault(_clean(k), v)
        if "head.bias" in own:
            sd["head.bias"] = neutral["unembed.b_U"]
        elif neutral.get("unembed.b_U") is not None and neutral["unembed.b_U"].abs().max() > 0:
            raise ValueError(
                "checkpoint has a non-zero unembedding bias, which this TL 4 toy lacks"
            )
        unknown = [k for k in sd if k not in own]
        if unknown:
            raise ValueError(f"checkpoint mismatch: the model has no {unknown}")
        with torch.no_grad():
            for k, v in sd.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"checkpoint mismatch at {k}: {tuple(v.shape)} vs model")
                own[k].copy_(v)

    # ---- circuit sites

    def post_attn_norm(self, model: nn.Module, layer: int) -> str | None:
        """``blocks.{l}.ln1_post`` when ``hook_attn_out`` is that norm's output (Gemma-2/3),
        None when it is the attention module's own output."""
        canonical = model.hook_dict[hook_name("attn_out", layer)].name
        if canonical == f"blocks.{layer}.attn.hook_out":
            return None
        norm = f"blocks.{layer}.ln1_post"
        if canonical == f"{norm}.hook_out" and f"{norm}.hook_in" in model.hook_dict:
            return norm
        raise NotImplementedError(
            f"{architecture(model)}: blocks.{layer}.hook_attn_out is {canonical}, neither the "
            "attention output nor a post-attention norm's; site 'attention' is unknown here"
        )

    def attn_pre_norm_hooks(
        self, model: nn.Module, layer: int, norm: str, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        return [(f"{norm}.hook_in", lambda t, hook: fn(t))]

    def attended_q_hooks(
        self, model: nn.Module, layer: int, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        """HF bridges: ``hook_rot_q`` (after q-norm and RoPE) where it exists, else ``hook_q``.
        TL's native toys fire no ``hook_rot_q``: their rotary is applied to ``hook_q`` here,
        as the module does."""
        native = _native_attention(model, layer)
        if native is not None:
            if native.rotary is None:
                return [(hook_name("q", layer), lambda t, hook: fn(t))]

            def rotate(t: Tensor, hook: object) -> None:
                q = t.transpose(1, 2)
                fn(native.rotary.apply_rope(q, q)[0].transpose(1, 2))

            return [(hook_name("q", layer), rotate)]
        rot = f"blocks.{layer}.attn.hook_rot_q"
        if rot in model.hook_dict:
            return [(rot, lambda t, hook: fn(t))]
        if f"blocks.{layer}.attn.q_norm.hook_out" in model.hook_dict or (
            dims(model).positional == "rotary"
        ):
            raise NotImplementedError(
                f"{architecture(model)}: site 'q_post' (queries after q-norm and RoPE) is not "
                "hooked by this TransformerBridge (no hook_rot_q)"
            )
        return [(hook_name("q", layer), lambda t, hook: fn(t))]


ADAPTER = BridgeAdapter()


def _clean(key: str) -> str:
    """Strip the bridge's wrapper segments from a state-dict key."""
    return key.replace("._original_component", "").replace("_original_component.", "")


# --------------------------------------------------------------------------- attention scores


def _native_attention(model: nn.Module, layer: int) -> nn.Module | None:
    """TL 4's own attention module for ``boot_native`` toys, else None."""
    inner = getattr(model.blocks[layer].attn, "original_component", None)
    return inner if type(inner).__name__ == "NativeAttention" else None


def _native_scores_hooks(
    native: nn.Module, layer: int, fn: Callable[[Tensor], None]
) -> list[tuple[str, Callable]]:
    """A native toy's pre-softmax scores from ``hook_q``/``hook_k``, computed as it does."""
    store: dict[str, Tensor] = {}

    def keep_q(t: Tensor, hook: object) -> None:
        store["q"] = t

    def on_k(t: Tensor, hook: object) -> None:
        q = store.pop("q").transpose(1, 2)  # [batch, head, pos, d_head]
        k = t.transpose(1, 2)
        if native.rotary is not None:
            q, k = native.rotary.apply_rope(q, k)
        if native.kv_repeats > 1:
            k = k.repeat_interleave(native.kv_repeats, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / native.scale
        if native.attn_scores_soft_cap > 0:
            cap = native.attn_scores_soft_cap
            scores = cap * torch.tanh(scores / cap)
        seq = scores.shape[-1]
        if native.causal:
            scores = scores.masked_fill(native.causal_mask[:seq, :seq], float("-inf"))
        fn(scores)

    return [(hook_name("q", layer), keep_q), (hook_name("k", layer), on_k)]


# HF attention classes whose score is (q_proj(x)·k_proj(x)) / scale with no rotary, soft cap,
# qk-norm or position bias: the self-key score of a row is then known from hook_q/hook_k.
_SCORES_FROM_PATTERN = frozenset({"OPTAttention"})


def _scores_from_pattern(model: nn.Module, layer: int) -> bool:
    """A generic ``AttentionBridge`` whose scores ``attn_scores_hooks`` rebuilds."""
    attn = model.blocks[layer].attn
    inner = getattr(attn, "original_component", None)
    return (
        type(attn).__name__ == "AttentionBridge"
        and not getattr(attn, "requires_relative_position_bias", False)
        and type(inner).__name__ in _SCORES_FROM_PATTERN
    )


def _scores_from_pattern_hooks(
    model: nn.Module, layer: int, fn: Callable[[Tensor], None]
) -> list[tuple[str, Callable]]:
    store: dict[str, Tensor] = {}
    scale = attn_scale(model, layer)

    def keep(kind: str) -> Callable:
        def hook(t: Tensor, hook: object) -> None:
            store[kind] = t

        return hook

    def on_pattern(p: Tensor, hook: object) -> None:
        q, k = store.pop("q"), store.pop("k")  # [batch, new pos, head, d_head]
        if q.dim() != 4 or k.dim() != 4 or q.shape[1] != p.shape[-2]:
            raise NotImplementedError(
                f"{architecture(model)}: cannot rebuild blocks.{layer} pre-softmax scores "
                f"(q {tuple(q.shape)}, k {tuple(k.shape)}, pattern {tuple(p.shape)})"
            )
        if k.shape[2] != q.shape[2]:
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        own = ((q.double() * k.double()).sum(-1) / scale).transpose(1, 2)  # [batch, head, new]
        n_new, n_keys = p.shape[-2], p.shape[-1]
        rows = torch.arange(n_new, device=p.device)
        log_p = p.double().log()
        log_own = log_p[..., rows, rows + (n_keys - n_new)]
        if not bool(torch.isfinite(log_own).all()):
            raise NotImplementedError(
                f"{architecture(model)}: blocks.{layer} gives a query's own key zero attention; "
                "its pre-softmax scores cannot be rebuilt from the pattern"
            )
        fn((log_p - log_own[..., None] + own[..., None]).to(p.dtype))

    return [
        (hook_name("q", layer), keep("q")),
        (hook_name("k", layer), keep("k")),
        (hook_name("pattern", layer), on_pattern),
    ]


# --------------------------------------------------------------------------- HF key-value cache


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The underlying HF model of a bridge built from transformers, else None."""
    inner = getattr(model, "original_model", None)
    if inner is not None and hasattr(inner, "config") and hasattr(inner.config, "model_type"):
        return inner
    return None


def hf_cache_kwarg(hf_model: nn.Module) -> str:
    """The name under which this HF model's ``forward`` takes a KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works,
    deprecated, until 5.40); the bridge passes unknown keywords straight through.
    """
    import inspect

    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextmanager
def _cache_alias(model: nn.Module) -> Iterator[None]:
    """Hand each attention bridge the cache under the name it reads.

    transformers >= 5.24 passes the cache to attention as ``cache=``; TL 4.3's attention
    bridges read only ``past_key_values``/``layer_past`` and silently ran without it.
    """
    if hf_cache_kwarg(_hf_model(model)) != "cache":
        yield
        return

    def alias(mod, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs

    handles = [b.attn.register_forward_pre_hook(alias, with_kwargs=True) for b in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _expanded_hf_cache(state: object, batch: int) -> object:
    """A copy of a one-row transformers cache that ``batch`` rows can extend.

    Each layer's keys/values become broadcast views of the shared prefix (no copy): a
    layer's update concatenates new keys onto them into fresh tensors, so the shared cache
    is never written. Unknown cache layouts fall back to a deep copy repeated per row.
    """

    plain = tl4_split.plain_cache_layers()
    layers = getattr(state, "layers", None)
    # only layers whose update is a pure concatenation (others keep per-row or in-place state)
    if layers is None or not all(type(ly) in plain for ly in layers):
        past = copy.deepcopy(state)
        if hasattr(past, "batch_repeat_interleave"):
            past.batch_repeat_interleave(batch)
        return past
    past = copy.copy(state)
    past.layers = []
    for layer in layers:
        mine = copy.copy(layer)
        if isinstance(layer.keys, Tensor) and layer.keys.numel():
            mine.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
            mine.values = layer.values.expand(batch, *layer.values.shape[1:])
        past.layers.append(mine)
    return past
