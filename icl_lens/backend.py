"""The only module that knows TL 3 (``HookedTransformer``) from TL 4 (``TransformerBridge``).

Everything else in icl-lens speaks hook names (shared by both versions) and the few adapter
calls defined here. Functions accept any hooked model, whether icl-lens built it or the user did.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import einops
import torch
import transformer_lens
from torch import Tensor, nn

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])
BACKEND: str = "bridge" if TL_MAJOR >= 4 else "hooked"

if BACKEND == "hooked":
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    NATIVE_CLASS: type = HookedTransformer
else:  # pragma: no cover - exercised in the TL4 CI leg
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    NATIVE_CLASS = TransformerBridge


def is_bridge(model: nn.Module) -> bool:
    """True for a TL 4 ``TransformerBridge`` (or anything built like one)."""
    return hasattr(model, "adapter") or type(model).__name__ == "TransformerBridge"


def architecture(model: nn.Module) -> str:
    """The model's architecture name, for messages and provenance (e.g. "LlamaForCausalLM")."""
    arch = getattr(model.cfg, "original_architecture", None)
    if not arch:
        hf = getattr(getattr(model, "original_model", None), "config", None)
        arch = (getattr(hf, "architectures", None) or [None])[0]
    return str(arch or type(model).__name__)


def check_model(model: object) -> None:
    """Raise a one-line error unless ``model`` is a hooked TransformerLens model."""
    if not (hasattr(model, "hook_dict") and hasattr(model, "cfg") and hasattr(model, "blocks")):
        raise TypeError(
            f"expected a TransformerLens HookedTransformer or TransformerBridge, got "
            f"{type(model).__name__}; load one with icl_lens.models.load_model(...)"
        )


# --------------------------------------------------------------------------- dimensions


@dataclass(frozen=True)
class ModelDims:
    """Shapes the analyses need, read from a model's config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int
    positional: str
    windows: tuple[int | None, ...]  # per layer: sliding-window size, or None for global

    @property
    def d_q(self) -> int:
        return self.n_heads * self.d_head


def dims(model: nn.Module) -> ModelDims:
    """Read the dimensions of any hooked model."""
    check_model(model)
    cfg = model.cfg
    n_layers = int(cfg.n_layers)
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    windows: list[int | None] = [None] * n_layers
    attn_types = getattr(cfg, "attn_types", None)
    window = getattr(cfg, "window_size", None)
    if attn_types is not None and window:
        windows = [int(window) if t == "local" else None for t in attn_types]
    elif getattr(cfg, "use_local_attn", False) and window:
        windows = [int(window)] * n_layers
    elif is_bridge(model):  # TL 4's bridge config omits them: read the HF config
        hf_config = getattr(getattr(model, "original_model", None), "config", None)
        windows = list(_hf_windows(hf_config, n_layers))
    return ModelDims(
        n_layers=n_layers,
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(n_kv),
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        positional=str(getattr(cfg, "positional_embedding_type", "standard") or "standard"),
        windows=tuple(windows),
    )


def _hf_windows(hf_config: object, n_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows from an HF config: ``sliding_window`` on the layers that
    ``layer_types`` marks "sliding_attention", or on every layer when the config has no
    ``layer_types`` (Mistral, Phi-3: one window for all layers unless ``use_sliding_window``
    is false)."""

    def get(key: str) -> object:
        try:  # transformers >= 5.15 per-layer configs may raise on some global reads
            return getattr(hf_config, key, None)
        except Exception:
            return None

    layer_types = get("layer_types")
    window = get("sliding_window")
    if not window:
        return (None,) * n_layers
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if get("use_sliding_window") is False:
        return (None,) * n_layers
    return (int(window),) * n_layers


# --------------------------------------------------------------------------- toy models


def toy_model(
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_vocab: int = 64,
    n_ctx: int = 256,
    attn_only: bool = True,
    seed: int = 0,
    *,
    d_head: int | None = None,
    d_mlp: int | None = None,
    positional_embedding_type: str = "standard",
    normalization_type: str | None = "LN",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A small randomly initialised model of the installed TL's native class.

    TL 3 gives a ``HookedTransformer``; TL 4 a ``TransformerBridge`` over TL's native module.
    The global RNG is left untouched (TL 3's ``cfg.seed`` would reseed it).
    """
    if d_model % n_heads and d_head is None:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass d_head")
    d_head = d_head or d_model // n_heads
    kwargs = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        attn_only=attn_only,
        act_fn="gelu",
        normalization_type=normalization_type,
        positional_embedding_type=positional_embedding_type,
    )
    if not attn_only:
        kwargs["d_mlp"] = d_mlp or 4 * d_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if BACKEND == "hooked":
            model = HookedTransformer(HookedTransformerConfig(**kwargs, device=str(device)))
        else:
            cfg = TransformerBridgeConfig(**kwargs, seed=seed)
            model = TransformerBridge.boot_native(cfg, device=device)
    model.eval()
    return model


# --------------------------------------------------------------------------- parameters

_TL3_KV_NAMES = {"W_K", "W_V", "b_K", "b_V", "_W_K", "_W_V", "_b_K", "_b_V"}
KV_BIAS_ATTR = "icl_lens_kv_bias"  # set on TL 3 models built from HF: has the HF K/V a bias?
# HF architectures whose attention has no K/V bias by default; TL 3 gives them zero b_K/b_V.
_TL3_ZERO_KV_BIAS_ARCHS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
    "Phi3ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoeForCausalLM", "GPTJForCausalLM",
    "GPTNeoForCausalLM", "ApertusForCausalLM", "StableLmForCausalLM",
})  # fmt: skip


def named_kv_parameters(
    model: nn.Module, include_bias: bool = True, layers: Sequence[int] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Leaf parameters of every layer's K and V projections, with stable names.

    TL 4's stacked ``model.W_K`` is a copy; the leaves live in ``blocks[l].attn.k/v``.
    Only biases the checkpoint has are included: TL 3 adds zero ``b_K``/``b_V`` to bias-free
    architectures (Llama, Mistral, Gemma, Phi-3, ...), which are left out, so both backends
    train the same tensors.
    """
    check_model(model)
    layers = range(dims(model).n_layers) if layers is None else layers
    if include_bias and not is_bridge(model):
        include_bias = _tl3_kv_bias(model)
    out: list[tuple[str, nn.Parameter]] = []
    for layer in layers:
        attn = model.blocks[layer].attn
        if is_bridge(model):
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
        else:
            for name, p in attn.named_parameters(recurse=False):
                if name in _TL3_KV_NAMES and (include_bias or "W_" in name):
                    out.append((f"blocks.{layer}.attn.{name}", p))
    ids = [id(p) for _, p in out]
    if len(set(ids)) != len(ids):
        raise NotImplementedError(
            f"{architecture(model)}: K and V share a parameter tensor (fused QKV); not supported"
        )
    for name, p in out:
        if not p.is_leaf:
            raise RuntimeError(
                f"{architecture(model)}: {name} is not a leaf tensor; cannot be trained in place"
            )
    return out


def _tl3_kv_bias(model: nn.Module) -> bool:
    """Whether a TL 3 model's ``b_K``/``b_V`` are the checkpoint's own (else TL's zeros).

    Models built by icl-lens carry the answer (``KV_BIAS_ATTR``). Otherwise, for an
    architecture that has no K/V bias by default, all-zero ``b_K`` in every layer means TL
    added them; TL 3's own toys and other architectures keep their biases.
    """
    marked = getattr(model, KV_BIAS_ATTR, None)
    if marked is not None:
        return bool(marked)
    if getattr(model.cfg, "original_architecture", None) not in _TL3_ZERO_KV_BIAS_ARCHS:
        return True
    for block in model.blocks:
        for name in ("b_K", "_b_K", "b_V", "_b_V"):
            b = block.attn._parameters.get(name)
            if b is not None and bool(b.detach().abs().max() > 0):
                return True
    return False


def _hf_has_kv_bias(hf_model: nn.Module) -> bool:
    """Whether an HF model's attention K/V projections (split or fused) have biases."""
    kv = {"k_proj", "v_proj", "key", "value", "c_attn", "query_key_value", "qkv_proj", "Wqkv"}
    for name, _ in hf_model.named_parameters():
        parts = name.split(".")
        if parts[-1] == "bias" and kv.intersection(parts[:-1]):
            return True
    return False


def kv_parameters(
    model: nn.Module, include_bias: bool = True, layers: Sequence[int] | None = None
) -> list[nn.Parameter]:
    """The leaf ``nn.Parameter`` s of every layer's K and V projections (and biases, if any)."""
    return [p for _, p in named_kv_parameters(model, include_bias, layers)]


@contextmanager
def kv_deltas(model: nn.Module, deltas: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, batch row ``r`` computes its K/V projections with ``W + deltas[i][r]``.

    ``deltas[i]`` is ``[rows, *p.shape]`` for the i-th tensor of ``named_kv_parameters(model)``,
    so one batched pass runs several K/V-finetuned copies of the model side by side (one per
    row; every other weight shared). Gradients flow to ``deltas``. The extra term is added
    where the projection is computed, before qk-norm, rotary and the hooks added after entering
    (a hook already on TL 3's ``hook_k``/``hook_v`` sees K/V without it).
    Raises NotImplementedError for layouts it cannot patch (split per-head inputs, fused QKV).
    """
    named = named_kv_parameters(model)
    if len(deltas) != len(named):
        raise ValueError(f"need {len(named)} deltas (one per K/V tensor), got {len(deltas)}")
    by_param = {id(p): (name, t) for (name, p), t in zip(named, deltas, strict=True)}
    handles = []
    try:
        if is_bridge(model):
            handles += _bridge_delta_hooks(model, by_param)
        else:
            handles += _tl3_delta_hooks(model, by_param)
        yield
    finally:
        for h in handles:
            h.remove()


def _row_term(x: Tensor, w: Tensor | None, b: Tensor | None, eq: str) -> Tensor:
    """Σ_in x·w (+ b) per batch row, with ``x``'s batch = delta rows × per-row copies."""
    rows = (w if w is not None else b).shape[0]
    if x.shape[0] % rows:
        raise ValueError(f"batch of {x.shape[0]} is not a multiple of the {rows} delta rows")
    per = x.shape[0] // rows
    if per > 1:  # (no copies in the usual one-sequence-per-row case: autograd keeps them)
        w = None if w is None else w.repeat_interleave(per, 0)
        b = None if b is None else b.repeat_interleave(per, 0)
    out = 0 if w is None else torch.einsum(eq, x, w.to(x.dtype))
    if b is not None:
        out = out + b.to(x.dtype).view(b.shape[0], *([1] * (x.dim() - 2)), *b.shape[1:])
    return out


def _bridge_delta_hooks(model: nn.Module, by_param: dict) -> list:
    """TL 4: K/V are ``nn.Linear`` s inside ``attn.k``/``attn.v``; add ``x Δwᵀ + Δb`` to them."""
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


def _tl3_delta_hooks(model: nn.Module, by_param: dict) -> list:
    """TL 3: keep the attention's ``key_input``/``value_input`` (a pre-hook) and add
    ``x·ΔW + Δb`` at ``hook_k``/``hook_v``, where TL writes ``x·W_K + b_K``."""
    handles = []
    for layer in range(dims(model).n_layers):
        attn = model.blocks[layer].attn
        seen: dict[str, Tensor] = {}

        def keep(mod, args, kwargs, seen=seen):
            seen["k"], seen["v"] = kwargs.get("key_input"), kwargs.get("value_input")

        handles.append(attn.register_forward_pre_hook(keep, with_kwargs=True))
        for kind in ("k", "v"):
            w = _param_delta(attn, "W_" + kind.upper(), by_param)
            b = _param_delta(attn, "b_" + kind.upper(), by_param)
            if w is None and b is None:
                continue

            def add(mod, args, out, w=w, b=b, kind=kind, seen=seen):
                x = seen.get(kind)
                if x is None or x.dim() != 3:
                    raise NotImplementedError("K/V deltas need one [batch, pos, d_model] input")
                ww, bb = w, b
                heads = out.shape[2]
                if ww is not None and ww.shape[1] != heads:  # GQA run ungrouped
                    ww = ww.repeat_interleave(heads // ww.shape[1], 1)
                if bb is not None and bb.shape[1] != heads:
                    bb = bb.repeat_interleave(heads // bb.shape[1], 1)
                return out + _row_term(x, ww, bb, "bpd,bhde->bphe")

            handles.append(getattr(attn, f"hook_{kind}").register_forward_hook(add))
    return handles


def _param_delta(attn: nn.Module, name: str, by_param: dict) -> Tensor | None:
    """The delta of TL 3 parameter ``name`` (or its grouped-query ``_name``), if trained."""
    for key in (name, "_" + name):
        p = attn._parameters.get(key)
        if p is not None and id(p) in by_param:
            return by_param[id(p)][1]
    return None


def attention_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """All leaf parameters of attention (Q, K, V, O) and MLP sublayers, for re-initialisation."""
    out = []
    for layer in range(dims(model).n_layers):
        block = model.blocks[layer]
        for sub in ("attn", "mlp"):
            mod = getattr(block, sub, None)
            if mod is None:
                continue
            out += [(f"blocks.{layer}.{sub}.{n}", p) for n, p in mod.named_parameters()]
    return out


# --------------------------------------------------------------------------- hooks


def hook_name(kind: str, layer: int | None = None) -> str:
    """Canonical icl-lens hook names; identical strings on TL 3 and TL 4."""
    names = {
        "attn_out": "blocks.{l}.hook_attn_out",
        "resid_pre": "blocks.{l}.hook_resid_pre",
        "resid_post": "blocks.{l}.hook_resid_post",
        "attn_scores": "blocks.{l}.attn.hook_attn_scores",
        "pattern": "blocks.{l}.attn.hook_pattern",
        "q": "blocks.{l}.attn.hook_q",
        "k": "blocks.{l}.attn.hook_k",
        "v": "blocks.{l}.attn.hook_v",
        "z": "blocks.{l}.attn.hook_z",
    }
    if kind not in names:
        raise KeyError(f"unknown hook kind {kind!r}; known: {sorted(names)}")
    return names[kind].format(l=layer)


def final_norm_hook_name(model: nn.Module) -> str:
    """The hook on the unembedding's input: the final-normed residual stream, affine included.

    (TL 3's ``ln_final.hook_normalized`` fires before the norm's weight and bias.)
    """
    return "unembed.hook_in" if "unembed.hook_in" in model.hook_dict else "ln_final.hook_out"


def canonical_hook_name(model: nn.Module, name: str) -> str:
    """The name a hook reports inside its callback (TL 4 aliases resolve to another name)."""
    point = model.hook_dict.get(name)
    if point is None:
        raise KeyError(f"model has no hook {name!r}")
    return point.name


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early."""


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block, a forward pass ends right after hook ``name`` fires.

    Use ``run_until`` rather than this directly. Skips the unembedding, which on a 262k
    vocabulary is most of a forward pass's cost.
    """

    def stop(tensor: Tensor, hook: object) -> None:
        raise _StopForward

    with model.hooks(fwd_hooks=[(name, stop)]):
        yield


def run_until(
    model: nn.Module,
    tokens: Tensor,
    fwd_hooks: Sequence[tuple[str, object]],
    stop_at: str | None = None,
    **forward_kwargs: object,
) -> Tensor | None:
    """Run a forward pass with ``fwd_hooks``; stop early after hook ``stop_at`` if given.

    Returns the logits when the pass runs to the end, else ``None``.
    """
    hooks = list(fwd_hooks)
    if stop_at is not None:

        def stop(tensor: Tensor, hook: object) -> None:
            raise _StopForward

        hooks.append((stop_at, stop))
    try:
        with model.hooks(fwd_hooks=hooks):
            return model(tokens, **forward_kwargs)
    except _StopForward:
        return None


def unembed_rows(model: nn.Module, token_ids: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """The unembedding columns ``W_U[:, ids]`` and bias ``b_U[ids]`` of a few tokens."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    unembed = model.unembed
    if is_bridge(model):
        w = unembed.W_U
        b = getattr(unembed, "b_U", None)
    else:
        w = unembed.W_U
        b = unembed.b_U
    ids = ids.to(w.device)
    w_rows = w[:, ids]
    b_rows = b[ids] if isinstance(b, Tensor) else None
    return w_rows, b_rows


def logit_soft_cap(model: nn.Module) -> float | None:
    """The soft cap on output logits (``cap · tanh(logits / cap)``, Gemma 2), or None.

    Read from TL's ``cfg.output_logits_soft_cap``; on a bridge whose config lacks it, from the
    HF config's ``final_logit_softcapping`` (what the wrapped HF model applies).
    """
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if (cap is None or not cap > 0) and is_bridge(model):
        hf_config = getattr(getattr(model, "original_model", None), "config", None)
        cap = getattr(hf_config, "final_logit_softcapping", None)
        text = getattr(hf_config, "get_text_config", None)
        if cap is None and callable(text):
            cap = getattr(text(), "final_logit_softcapping", None)
    return float(cap) if isinstance(cap, (int, float)) and cap > 0 else None


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the embedding's device (layers may live on other devices)."""
    return model.embed.W_E.device


def attn_scale(model: nn.Module, layer: int) -> float:
    """The divisor of q·k in ``layer`` (``sqrt(d_head)`` unless the model says otherwise)."""
    attn = model.blocks[layer].attn
    scale = getattr(attn, "attn_scale", None)
    if isinstance(scale, (int, float)) and scale > 0:
        return float(scale)
    if is_bridge(model):
        inner = getattr(attn, "original_component", None)
        hf_scaling = getattr(inner, "scaling", None)
        if isinstance(hf_scaling, (int, float)) and hf_scaling > 0:
            return 1.0 / float(hf_scaling)
        native = getattr(inner, "scale", None)
        if isinstance(native, (int, float)) and native > 0:
            return float(native)
    cfg_scale = getattr(model.cfg, "attn_scale", -1.0)
    if isinstance(cfg_scale, (int, float)) and cfg_scale > 0:
        return float(cfg_scale)
    return float(model.cfg.d_head) ** 0.5


# ---- attention weights (dual form)


def attn_weights(model: nn.Module, layer: int) -> dict[str, Tensor]:
    """``W_Q/W_K/W_V`` [head, d_model, d_head], ``W_O`` [head, d_head, d_model], biases in TL 3
    layout (K/V with ``n_kv_heads`` heads), from either backend. Differentiable views; a missing
    bias is zeros. Used by icl_lens.dual to check that hook_k/hook_v are ``W_K x``/``W_V x``."""
    d = dims(model)
    attn = model.blocks[layer].attn
    if not is_bridge(model):
        names = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
        gqa = hasattr(attn, "_W_K")  # TL 3 GQA: un-repeated K/V leaves behind properties
        out = {n: getattr(attn, "_" + n if gqa and n[-1] in "KV" else n, None) for n in names}
        return {n: _zero_bias(t, out, n, d) for n, t in out.items()}
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
    out["W_O"] = einops.rearrange(o.weight, "m (h e) -> h e m", h=d.n_heads)
    out["b_O"] = getattr(o, "bias", None)
    return {n: _zero_bias(t, out, n, d) for n, t in out.items()}


def _zero_bias(t: Tensor | None, out: dict, name: str, d: ModelDims) -> Tensor:
    if t is not None:
        return t
    ref = out["W_Q"]
    if name == "b_O":
        return ref.new_zeros(d.d_model)
    return ref.new_zeros(out["W_" + name[-1]].shape[0], d.d_head)


def attn_input_hook(model: nn.Module, layer: int) -> str:
    """The hook holding ``layer``'s attention input (the normed residual that W_Q/K/V read)."""
    if getattr(model.cfg, "normalization_type", None) is None:
        return hook_name("resid_pre", layer)
    sub = "hook_out" if is_bridge(model) else "hook_normalized"
    return f"blocks.{layer}.ln1.{sub}"


def attended_qk(model: nn.Module, layer: int, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``hook_q``/``hook_k`` [batch, pos, head, d_head] rotated as attention scores them.

    For rotary models whose ``hook_rot_q/k`` do not fire (TL 4 native bridges); positions are
    0..pos-1 (no KV cache). Standard positions: returned unchanged.
    """
    if dims(model).positional != "rotary":
        return q, k
    inner = getattr(model.blocks[layer].attn, "original_component", None)
    rotary = getattr(inner, "rotary", None)
    if rotary is None or not hasattr(rotary, "apply_rope"):
        raise NotImplementedError(
            f"blocks.{layer}: rotary keys are not exposed (no hook_rot_k, no native rotary); "
            "the dual form needs the keys attention uses"
        )
    q_rot, k_rot = rotary.apply_rope(q.transpose(1, 2), k.transpose(1, 2))
    return q_rot.transpose(1, 2), k_rot.transpose(1, 2)


def _native_attention(model: nn.Module, layer: int) -> nn.Module | None:
    """TL 4's own attention module for ``boot_native`` toys, else None."""
    if not is_bridge(model):
        return None
    inner = getattr(model.blocks[layer].attn, "original_component", None)
    return inner if type(inner).__name__ == "NativeAttention" else None


def attn_scores_hooks(
    model: nn.Module, layer: int, fn: Callable[[Tensor], None]
) -> list[tuple[str, Callable]]:
    """Forward hooks that call ``fn(scores)`` with layer's pre-softmax scores [batch, head, q, k].

    Masked keys hold -inf (or a huge negative). TL 4.3's bridge fires ``hook_attn_scores``
    with the post-softmax pattern for its native toys, so there the scores are rebuilt from
    ``hook_q``/``hook_k`` with the module's own rotary, scale and soft-cap (exactly what it
    computes before its softmax).

    TL 4.3's generic ``AttentionBridge`` (OPT, GPT-J, ...) also fires it with the HF module's
    returned probabilities. For the attention classes in ``_SCORES_FROM_PATTERN`` the scores
    are rebuilt from the pattern P and the key at the query's own position, whose score
    q_t·k_t/scale needs neither the cache nor the position: s_j = log P_j − log P_t + s_t
    (masked keys: P = 0, so -inf). Other such classes pass the probabilities through, and
    capture's run-time check refuses them.
    """
    if _scores_from_pattern(model, layer):
        return _scores_from_pattern_hooks(model, layer, fn)
    native = _native_attention(model, layer)
    if native is None:
        return [(hook_name("attn_scores", layer), lambda t, hook: fn(t))]
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
    """A TL 4 generic ``AttentionBridge`` whose scores ``attn_scores_hooks`` rebuilds."""
    if not is_bridge(model):
        return False
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


# --------------------------------------------------------------------------- prefix KV cache


class PrefixCache:
    """Keys and values of a shared prompt prefix, reusable for any batch of continuations."""

    def __init__(self, kind: str, state: object, length: int):
        self.kind = kind
        self.state = state
        self.length = length


def supports_prefix_cache(model: nn.Module) -> bool:
    """Whether ``prefix_cache`` can reuse a prefix's keys/values on this model."""
    if not is_bridge(model):
        return True
    return _hf_model(model) is not None


class PrefixCacheError(RuntimeError):
    """The key-value cache of a shared prefix was not filled or not used as expected."""


def hf_cache_kwarg(hf_model: nn.Module) -> str:
    """The name under which this HF model's ``forward`` takes a KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works,
    deprecated, until 5.40); the bridge passes unknown keywords straight through.
    """
    import inspect

    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "absent"


def _hf_model(model: nn.Module) -> nn.Module | None:
    """The underlying HF model of a bridge built from transformers, else None."""
    inner = getattr(model, "original_model", None)
    if inner is not None and hasattr(inner, "config") and hasattr(inner.config, "model_type"):
        return inner
    return None


def prefix_cache(model: nn.Module, prefix: Tensor) -> PrefixCache:
    """Run ``prefix`` ([pos] token ids) once and keep its keys/values."""
    if not supports_prefix_cache(model):
        raise NotImplementedError("this model cannot reuse a key-value cache")
    prefix = prefix.reshape(1, -1)
    if not is_bridge(model):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 1)
        with torch.no_grad():
            model(
                prefix.to(model.cfg.device),
                attention_mask=torch.ones_like(prefix),
                past_kv_cache=cache,
                return_type=None,
            )
        cache.freeze()
        return PrefixCache("tl3", cache, prefix.shape[1])
    hf = _hf_model(model)  # pragma: no cover - TL 4 leg
    from transformers import DynamicCache

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
    model: nn.Module,
    cache: PrefixCache,
    tokens: Tensor,
    attention_mask: Tensor,
    fwd_hooks: Sequence[tuple[str, object]],
    stop_at: str | None = None,
) -> Tensor | None:
    """Run right-padded continuations ``tokens`` [batch, pos] after the cached prefix.

    Hooks see only the new positions; attention-score rows span prefix + new keys.
    Returns the new positions' logits when the pass runs to the end, else None.
    """
    batch = tokens.shape[0]
    full_mask = torch.cat(
        [torch.ones(batch, cache.length, dtype=attention_mask.dtype), attention_mask], dim=1
    )
    if cache.kind == "tl3":
        tl_cache = cache.state
        expanded = copy.copy(tl_cache)
        expanded.entries = [
            copy.copy(e) for e in tl_cache.entries
        ]  # frozen entries: no in-place growth
        for e in expanded.entries:
            e.past_keys = e.past_keys.expand(batch, -1, -1, -1)
            e.past_values = e.past_values.expand(batch, -1, -1, -1)
        expanded.previous_attention_mask = full_mask[:, : cache.length].to(
            tl_cache.previous_attention_mask
        )
        return run_until(
            model,
            tokens,
            fwd_hooks,
            stop_at=stop_at,
            attention_mask=attention_mask,
            past_kv_cache=expanded,
        )
    past = _expanded_hf_cache(cache.state, batch)  # pragma: no cover - TL 4 leg
    kwargs = {hf_cache_kwarg(_hf_model(model)): past, "use_cache": True}
    with _cache_alias(model):
        return run_until(
            model, tokens, fwd_hooks, stop_at=stop_at, attention_mask=full_mask, **kwargs
        )


@contextmanager
def _cache_alias(model: nn.Module) -> Iterator[None]:  # pragma: no cover - TL 4 leg
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


def _expanded_hf_cache(state: object, batch: int) -> object:  # pragma: no cover - TL 4 leg
    """A copy of a one-row transformers cache that ``batch`` rows can extend.

    Each layer's keys/values become broadcast views of the shared prefix (no copy): a
    layer's update concatenates new keys onto them into fresh tensors, so the shared cache
    is never written. Unknown cache layouts fall back to a deep copy repeated per row.
    """
    from transformers import cache_utils

    plain = tuple(
        getattr(cache_utils, n) for n in ("DynamicLayer", "DynamicSlidingWindowLayer")
        if hasattr(cache_utils, n)
    )  # fmt: skip
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


# --------------------------------------------------------------------------- checkpoints


def neutral_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Weights in a backend-neutral layout (TL 3 names and shapes), for committed toys.

    Supports the standard-position, LayerNorm, attn-only or GELU-MLP toys of ``toy_model``.
    """
    d = dims(model)
    if not is_bridge(model):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {k: v for k, v in sd.items() if not k.endswith(("IGNORE", ".mask"))}
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
        out[t + "attn.W_O"] = einops.rearrange(sd[f"{p}attn.o.weight"], "dm (h dh) -> h dh dm", h=h)
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


def _clean(key: str) -> str:
    """Strip the bridge's wrapper segments from a state-dict key."""
    return key.replace("._original_component", "").replace("_original_component.", "")


def load_neutral_state_dict(model: nn.Module, neutral: dict[str, Tensor]) -> None:
    """Load weights from ``neutral_state_dict`` layout into a model of the installed TL."""
    if not is_bridge(model):
        missing, unexpected = model.load_state_dict(neutral, strict=False)
        missing = [k for k in missing if not k.endswith(("IGNORE", ".mask"))]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
        return
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
        sd[f"{p}attn.o.weight"] = einops.rearrange(neutral[t + "attn.W_O"], "h dh dm -> dm (h dh)")
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
        raise ValueError("checkpoint has a non-zero unembedding bias, which this TL 4 toy lacks")
    unknown = [k for k in sd if k not in own]
    if unknown:
        raise ValueError(f"checkpoint mismatch: the model has no {unknown}")
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ValueError(f"checkpoint mismatch at {k}: {tuple(v.shape)} vs model")
            own[k].copy_(v)


def tl_version_info() -> dict[str, str]:
    """Versions recorded in every results file."""
    return {
        "transformer_lens": TL_VERSION,
        "backend": BACKEND,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
    }


# --------------------------------------------------------------------------- loading
# TL-version-specific model building, used by ``icl_lens.models``. ``processing``:
#   "default": what the installed TL's own loader does (TL 3 from_pretrained: fold_ln,
#              center_writing_weights, center_unembed, fold_value_biases; TL 4
#              boot_transformers: raw HF weights);
#   "none":    raw weights on both (TL 3 from_pretrained_no_processing);
#   "fold":    HookedTransformer-style processing on both (TL 4: enable_compatibility_mode()).

PROCESSING = ("default", "none", "fold")
_TL3_CFG_FILE = "tl_config.json"
_TL3_WEIGHTS_FILE = "model.safetensors"


def _check_processing(processing: str) -> bool:
    """Validate ``processing``; return whether weights get folded on this backend."""
    if processing not in PROCESSING:
        raise ValueError(f"processing={processing!r}; choose one of {PROCESSING}")
    return processing == "fold" or (processing == "default" and BACKEND == "hooked")


def _tl3_fold_flags(cfg: object, fold: bool) -> dict[str, bool]:
    """The ``load_and_process_state_dict`` flags ``from_pretrained`` would use."""
    softcap = getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0
    return dict(
        fold_ln=fold,
        center_writing_weights=fold,
        center_unembed=fold and softcap <= 0,
        fold_value_biases=fold,
    )


def build_from_hf(
    hf_model: nn.Module,
    tokenizer: object,
    tl_name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    processing: str = "default",
) -> nn.Module:
    """Wrap a loaded HF causal LM in the installed TL's hooked class, without the hub.

    ``tl_name``: the TL official name whose config TL should use (e.g. "google/gemma-3-270m"),
    or a local HF checkpoint directory (its config.json is read; TL 3 supports only the
    architectures its converters know).
    """
    fold = _check_processing(processing)
    if getattr(hf_model.config, "quantization_config", None) is not None:
        raise ValueError("hf_model is quantized; load it dequantized (no quantization_config)")
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    if BACKEND == "bridge":  # pragma: no cover - TL4 leg
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
    return _tl3_build(hf_model, tokenizer, tl_name, device=device, dtype=dtype, fold=fold)


def _tl3_build(
    hf_model: nn.Module,
    tokenizer: object,
    tl_name: str,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    fold: bool,
) -> nn.Module:
    import contextlib
    import tempfile
    from pathlib import Path
    from unittest import mock

    from transformer_lens import loading_from_pretrained as loading

    hf_cfg = hf_model.config.to_dict()
    arch = (getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__])[0]
    local = Path(tl_name).is_dir()
    try:
        shim = (
            mock.patch.object(loading, "AutoConfig", _Tl3ConfigShim(hf_model.config))
            if local
            else contextlib.nullcontext()
        )
        with tempfile.TemporaryDirectory() as tmp, shim:
            name = tl_name
            if local:
                # TL 3 picks some architectures by substrings of the name ("llama", "gemma"):
                # hand it a neutrally named link to the directory instead.
                name = str(Path(tmp) / "checkpoint")
                Path(name).symlink_to(Path(tl_name).resolve(), target_is_directory=True)
            if local and hf_cfg.get("model_type") in _TL3_GEMMA_TEMPLATES:
                cfg = _tl3_gemma3_config(hf_model.config, Path(tl_name).name, fold, device, dtype)
            else:
                cfg = loading.get_pretrained_model_config(
                    name, hf_cfg=hf_cfg, fold_ln=fold, device=str(device), dtype=dtype
                )
            state_dict = loading.get_pretrained_state_dict(name, cfg, hf_model, dtype=dtype)
    except (NotImplementedError, ValueError, KeyError, AttributeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise NotImplementedError(
            f"{arch}: transformer-lens {TL_VERSION} (HookedTransformer) cannot convert this "
            f"checkpoint ({type(e).__name__}: {first}); transformer-lens >= 4 may load it"
        ) from e
    cfg.tokenizer_name = tl_name
    if local:
        cfg.model_name = Path(tl_name).name
    w_in = state_dict.get("blocks.0.mlp.W_in")
    if w_in is not None and cfg.d_mlp != w_in.shape[-1]:  # TL 3 takes GPT-2's as 4 · d_model
        cfg.d_mlp = int(w_in.shape[-1])
    _check_tl3_cfg(cfg, hf_model.config)
    with torch.random.fork_rng(devices=[]):
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    try:
        model.load_and_process_state_dict(state_dict, **_tl3_fold_flags(cfg, fold))
    except RuntimeError as e:  # shapes TL 3's config got wrong
        first = (str(e).strip().splitlines() or [""])[-1].strip()[:200]
        raise NotImplementedError(
            f"{arch}: transformer-lens {TL_VERSION} (HookedTransformer) converted this "
            f"checkpoint with the wrong shapes ({first})"
        ) from e
    _align_rotary_with_hf(model)
    if tokenizer is not None and _encodes_differently(model.tokenizer, tokenizer):
        # TL 3 re-loads the tokenizer by name with add_bos_token=True; AutoTokenizer may then
        # pick the architecture's own tokenizer class (e.g. Qwen2Tokenizer over a saved
        # PreTrainedTokenizerFast), which splits text differently: keep the one we were given.
        model.tokenizer = tokenizer
        model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    # which K/V biases are the checkpoint's own (TL 3 adds zero ones): see named_kv_parameters
    setattr(model, KV_BIAS_ATTR, _hf_has_kv_bias(hf_model))
    model.move_model_modules_to_device()
    model.eval()
    return model


class _Tl3ConfigShim:
    """Stands in for ``AutoConfig`` inside TL 3's loader: the HF model's own config, plus the
    attributes transformers 5 moved that TL 3 still reads (GPT-2's ``n_ctx``, the entries of
    ``rope_parameters`` such as Phi's ``partial_rotary_factor``)."""

    def __init__(self, hf_config: object):
        self.hf_config = hf_config

    def from_pretrained(self, *args: object, **kwargs: object) -> object:
        cfg = copy.deepcopy(self.hf_config)
        rope = getattr(cfg, "rope_parameters", None)
        if isinstance(rope, dict):
            for key, value in rope.items():
                if key != "rope_type" and not isinstance(value, dict) and not hasattr(cfg, key):
                    setattr(cfg, key, value)
        if not hasattr(cfg, "n_ctx") and getattr(cfg, "n_positions", None):
            cfg.n_ctx = cfg.n_positions
        return cfg


_PROBE_TEXT = "Sentence: a great movie!\n Label: Positive 123 w7 : A"


def _encodes_differently(a: object, b: object) -> bool:
    try:
        return list(a.encode(_PROBE_TEXT, add_special_tokens=False)) != list(
            b.encode(_PROBE_TEXT, add_special_tokens=False)
        )
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode the probe differs
        return True


def _align_rotary_with_hf(model: nn.Module) -> None:
    """TL 3: recompute plain-RoPE sin/cos tables the way transformers does.

    TL computes angles as ``pos / base**(2i/d)``, transformers as ``pos * (1 / base**(2i/d))``.
    In fp32 the two differ by up to ~6e-5 in cos at position 1000, which alone moves
    Gemma-3's log-probs by ~1e-3 there. Scaled RoPE variants (NTK, YaRN, factors) are left alone.
    """
    cfg = model.cfg
    plain = (
        cfg.positional_embedding_type == "rotary"
        and not getattr(cfg, "use_NTK_by_parts_rope", False)
        and not getattr(cfg, "use_yarn_rope", False)
        and getattr(cfg, "rotary_scaling_factor", 1.0) in (None, 1.0)
        and not getattr(cfg, "rotary_adjacent_pairs", False)
    )
    if not plain:
        return
    dim = int(cfg.rotary_dim)
    for block in model.blocks:
        attn = block.attn
        cos = attn.rotary_cos
        base = attn._rotary_base()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        angles = torch.arange(cos.shape[0]).float()[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1).to(cos.device)
        with torch.no_grad():
            attn.rotary_cos.copy_(angles.cos().to(cos.dtype))
            attn.rotary_sin.copy_(angles.sin().to(cos.dtype))


_TL3_GEMMA_TEMPLATES = {"gemma2": "google/gemma-2-2b", "gemma3_text": "google/gemma-3-270m"}


def _tl3_gemma3_config(
    hf: object, name: str, fold: bool, device: str | torch.device, dtype: torch.dtype
) -> object:
    """TL 3 config of any Gemma-2 or Gemma-3 text checkpoint (TL 3 only knows them by official
    name: its config for one of them, offline, is the template)."""
    from transformer_lens import loading_from_pretrained as loading

    cfg = loading.convert_hf_model_config(_TL3_GEMMA_TEMPLATES[hf.model_type])
    rope = getattr(hf, "rope_parameters", None) or {}
    if "full_attention" in rope or "sliding_attention" in rope:  # Gemma-3: per layer type
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    else:  # Gemma-2: one rotary for all layers
        full = local = rope
    if any(r.get("rope_type", "default") != "default" for r in (full, local)):
        raise NotImplementedError(
            f"{type(hf).__name__}: scaled-RoPE Gemma checkpoints need TL 4 on icl-lens"
        )
    types = list(hf.layer_types)
    cfg.update(
        model_name=name,
        d_model=hf.hidden_size,
        d_head=hf.head_dim,
        n_heads=hf.num_attention_heads,
        n_key_value_heads=hf.num_key_value_heads,
        d_mlp=hf.intermediate_size,
        n_layers=hf.num_hidden_layers,
        n_ctx=min(int(hf.max_position_embeddings), 8192),
        eps=hf.rms_norm_eps,
        d_vocab=hf.vocab_size,
        act_fn=hf.hidden_activation,
        rotary_base=full.get("rope_theta", cfg["rotary_base"]),
        attn_scale=float(hf.query_pre_attn_scalar) ** 0.5,
        window_size=int(hf.sliding_window),
        use_local_attn="sliding_attention" in types,
        attn_types=["local" if t == "sliding_attention" else "global" for t in types],
        init_weights=False,
        device=str(device),
        dtype=dtype,
        default_prepend_bos=True,
        normalization_type="RMSPre" if fold else "RMS",
    )
    if cfg.get("rotary_base_local") is not None:
        cfg["rotary_base_local"] = local.get("rope_theta", cfg["rotary_base_local"])
    # the template's soft caps (Gemma-2: 50 and 30) are the checkpoint's only if it has them
    attn_cap = getattr(hf, "attn_logit_softcapping", None)
    final_cap = getattr(hf, "final_logit_softcapping", None)
    cfg["attn_scores_soft_cap"] = float(attn_cap) if attn_cap else -1.0
    cfg["output_logits_soft_cap"] = float(final_cap) if final_cap else -1.0
    return HookedTransformerConfig.from_dict(cfg)


def _check_tl3_cfg(cfg: object, hf_config: object) -> None:
    """Raise if a name-based TL 3 config disagrees with the HF model's own config."""
    pairs = {
        "n_layers": "num_hidden_layers",
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "d_vocab": "vocab_size",
    }
    arch = (getattr(hf_config, "architectures", None) or [getattr(cfg, "model_name", "")])[0]
    for tl_key, hf_key in pairs.items():
        want = getattr(hf_config, hf_key, None)
        if want is not None and getattr(cfg, tl_key) != want:
            raise ValueError(
                f"{arch}: TL config {tl_key}={getattr(cfg, tl_key)} but the model has {want}"
            )
    n_layers = int(cfg.n_layers)
    window = list(_hf_windows(hf_config, n_layers))
    tl: list[int | None] = [None] * n_layers
    if cfg.use_local_attn and cfg.window_size:
        types = cfg.attn_types or ["local"] * n_layers
        tl = [int(cfg.window_size) if t == "local" else None for t in types]
    if any(w is not None for w in window) and tl != window:  # (GPT-Neo: HF says it otherwise)
        raise ValueError(f"{arch}: TL sliding windows {tl} disagree with the model's {window}")


def load_tl_name(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    processing: str = "default",
) -> nn.Module:
    """Load a TL-supported model by name through TL's own loader (needs the HF hub)."""
    fold = _check_processing(processing)
    if BACKEND == "bridge":  # pragma: no cover - TL4 leg
        model = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
        if fold:
            model.enable_compatibility_mode(disable_warnings=True)
    else:
        loader = HookedTransformer.from_pretrained
        if not fold:
            loader = HookedTransformer.from_pretrained_no_processing
        model = loader(name, device=str(device), dtype=dtype)
    model.eval()
    return model


def is_tl_name(name: str) -> bool:
    """Whether ``name`` is a model name (or alias) the installed TL knows."""
    if BACKEND == "hooked":
        from transformer_lens.loading_from_pretrained import get_official_model_name
    else:  # pragma: no cover - TL4 leg
        from transformer_lens.supported_models import get_official_model_name
    try:
        get_official_model_name(name)
        return True
    except ValueError:
        pass
    if BACKEND == "bridge":  # pragma: no cover - TL4 leg
        try:
            from transformer_lens.tools.model_registry.api import is_model_supported

            return bool(is_model_supported(name))
        except Exception:  # registry data missing: be conservative
            return False
    return False


def save_converted(model: nn.Module, directory: str) -> list[str]:
    """TL 3: write a built model's (processed) weights and config; returns the file names.

    TL 4 bridges wrap the HF module itself, so their cache is the HF checkpoint.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    if is_bridge(model):
        raise NotImplementedError("TransformerBridge models are cached as HF checkpoints")
    cfg = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in model.cfg.to_dict().items()}
    cfg.pop("device", None)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith(("IGNORE", ".mask"))
    }
    save_file(state, str(Path(directory) / _TL3_WEIGHTS_FILE))
    (Path(directory) / _TL3_CFG_FILE).write_text(json.dumps(cfg, default=str, indent=1))
    return [_TL3_WEIGHTS_FILE, _TL3_CFG_FILE]


def load_converted(
    directory: str,
    tokenizer: object,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """TL 3: rebuild a model written by ``save_converted`` (no processing is re-run)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    cfg_dict = json.loads((Path(directory) / _TL3_CFG_FILE).read_text())
    cfg_dict.update(dtype=dtype, device=str(device), init_weights=False)
    cfg_dict["tokenizer_name"] = None
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    with torch.random.fork_rng(devices=[]):
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    state = load_file(str(Path(directory) / _TL3_WEIGHTS_FILE), device=str(device))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("IGNORE", ".mask"))]
    if missing or unexpected:
        raise ValueError(f"cached weights mismatch: missing={missing[:3]} extra={unexpected[:3]}")
    model.eval()
    return model


__all__ = [
    "BACKEND",
    "NATIVE_CLASS",
    "TL_MAJOR",
    "TL_VERSION",
    "ModelDims",
    "PROCESSING",
    "architecture",
    "attention_parameters",
    "build_from_hf",
    "canonical_hook_name",
    "check_model",
    "dims",
    "final_norm_hook_name",
    "hook_name",
    "is_bridge",
    "is_tl_name",
    "kv_parameters",
    "load_converted",
    "load_neutral_state_dict",
    "load_tl_name",
    "named_kv_parameters",
    "neutral_state_dict",
    "run_until",
    "save_converted",
    "stop_after",
    "tl_version_info",
    "toy_model",
    "unembed_rows",
]
_ = transformer_lens  # imported for its side effects on TL 4 (registers boot_native)
