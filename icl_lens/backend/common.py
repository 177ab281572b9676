"""The TL-agnostic part of the backend, and the public functions other modules call.

Everything here speaks hook names (shared by TL 3 and TL 4) and plain attributes; what
differs between the two lines is asked of ``adapter_for(model)`` (see ``adapter.Adapter``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import transformer_lens
from torch import Tensor, nn

if TYPE_CHECKING:
    from icl_lens.backend.adapter import Adapter

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])
BACKEND: str = "bridge" if TL_MAJOR >= 4 else "hooked"


def is_bridge(model: nn.Module) -> bool:
    """True for a TL 4 ``TransformerBridge`` (or anything built like one)."""
    return hasattr(model, "adapter") or type(model).__name__ == "TransformerBridge"


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s TL line: TL 4's for a bridge, else TL 3's."""
    from icl_lens.backend import tl3, tl4  # (they import this module)

    return tl4.ADAPTER if is_bridge(model) else tl3.ADAPTER


def installed() -> Adapter:
    """The adapter of the installed TL line: the one that builds models."""
    from icl_lens.backend import tl3, tl4

    return tl4.ADAPTER if BACKEND == "bridge" else tl3.ADAPTER


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


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "absent"


def tl_version_info() -> dict[str, str]:
    """Versions recorded in every results file."""
    return {
        "transformer_lens": TL_VERSION,
        "backend": BACKEND,
        "torch": torch.__version__,
        "transformers": _transformers_version(),
    }


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
    attn_types = getattr(cfg, "attn_types", None)
    window = getattr(cfg, "window_size", None)
    if attn_types is not None and window:
        windows = [int(window) if t == "local" else None for t in attn_types]
    elif getattr(cfg, "use_local_attn", False) and window:
        windows = [int(window)] * n_layers
    else:  # (TL 4's bridge config omits them)
        windows = list(adapter_for(model).fallback_windows(model, n_layers))
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
        model = installed().toy_model(kwargs, seed, device)
    model.eval()
    return model


# --------------------------------------------------------------------------- parameters


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
    out = adapter_for(model).kv_leaves(model, include_bias, layers)
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
        handles += adapter_for(model).kv_delta_hooks(model, by_param)
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def full_precision(model: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block ``model`` computes in float32: every bf16/fp16 parameter and buffer
    holds a float32 copy of itself (exact), and the config's ``dtype`` says float32 (TL reads
    it, e.g. to cast attention patterns). On exit each tensor gets its own storage back, the
    very tensor it had, so the model is restored bit for bit whatever the block did to the
    copies. Yields the parameters that were converted (none for a full-precision model)."""
    half = (torch.float16, torch.bfloat16)
    params = [p for p in model.parameters() if p.dtype in half]
    buffers = [b for b in model.buffers() if b.dtype in half]
    if not params and not buffers:
        yield []
        return
    saved = [t.data for t in params + buffers]
    cfg = getattr(model, "cfg", None)
    had_dtype = cfg is not None and hasattr(cfg, "dtype")
    old_dtype = cfg.dtype if had_dtype else None
    try:
        with torch.no_grad():
            for t in params + buffers:
                t.data = t.data.float()
        if had_dtype:
            cfg.dtype = torch.float32
        yield params
    finally:
        for t, data in zip(params + buffers, saved, strict=True):
            t.data = data
        if had_dtype:
            cfg.dtype = old_dtype


def _row_term(x: Tensor, w: Tensor | None, b: Tensor | None, eq: str) -> Tensor:
    """Σ_in x·w (+ b) per batch row, with ``x``'s batch = delta rows × per-row copies."""
    rows = (w if w is not None else b).shape[0]
    if x.shape[0] % rows:
        raise ValueError(f"batch of {x.shape[0]} is not a multiple of the {rows} delta rows")
    per = x.shape[0] // rows
    if per > 1 and rows == 1:  # one delta for the whole batch: a view, no copies
        w = None if w is None else w.expand(x.shape[0], *w.shape[1:])
        b = None if b is None else b.expand(x.shape[0], *b.shape[1:])
    elif per > 1:  # (no copies in the usual one-sequence-per-row case: autograd keeps them)
        w = None if w is None else w.repeat_interleave(per, 0)
        b = None if b is None else b.repeat_interleave(per, 0)
    out = 0 if w is None else torch.einsum(eq, x, w.to(x.dtype))
    if b is not None:
        out = out + b.to(x.dtype).view(b.shape[0], *([1] * (x.dim() - 2)), *b.shape[1:])
    return out


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
    w = unembed.W_U
    b = adapter_for(model).unembed_bias(unembed)
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
    if cap is None or not cap > 0:
        cap = adapter_for(model).fallback_logit_soft_cap(model)
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
    scale = adapter_for(model).module_attn_scale(attn)
    if scale is not None:
        return scale
    cfg_scale = getattr(model.cfg, "attn_scale", -1.0)
    if isinstance(cfg_scale, (int, float)) and cfg_scale > 0:
        return float(cfg_scale)
    return float(model.cfg.d_head) ** 0.5


# ---- attention weights (dual form)


def attn_weights(model: nn.Module, layer: int) -> dict[str, Tensor]:
    """``W_Q/W_K/W_V`` [head, d_model, d_head], ``W_O`` [head, d_head, d_model], biases in TL 3
    layout (K/V with ``n_kv_heads`` heads), from either backend. Differentiable views; a missing
    bias is zeros. Used by icl_lens.dual to check that hook_k/hook_v are ``W_K x``/``W_V x``."""
    return adapter_for(model).attn_weights(model, layer)


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
    return f"blocks.{layer}.ln1.{adapter_for(model).ln_out_hook}"


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


def attn_scores_hooks(
    model: nn.Module, layer: int, fn: Callable[[Tensor], None]
) -> list[tuple[str, Callable]]:
    """Forward hooks that call ``fn(scores)`` with layer's pre-softmax scores [batch, head, q, k].

    Masked keys hold -inf (or a huge negative). Where TL's ``hook_attn_scores`` does not hold
    them (TL 4.3's native toys and generic ``AttentionBridge``), the TL 4 adapter rebuilds
    them; see ``tl4.BridgeAdapter.attn_scores_hooks``.
    """
    return adapter_for(model).attn_scores_hooks(model, layer, fn)


# --------------------------------------------------------------------------- prefix KV cache


class PrefixCache:
    """Keys and values of a shared prompt prefix, reusable for any batch of continuations."""

    def __init__(self, kind: str, state: object, length: int):
        self.kind = kind
        self.state = state
        self.length = length


class PrefixCacheError(RuntimeError):
    """The key-value cache of a shared prefix was not filled or not used as expected."""


def supports_prefix_cache(model: nn.Module) -> bool:
    """Whether ``prefix_cache`` can reuse a prefix's keys/values on this model."""
    return adapter_for(model).supports_prefix_cache(model)


def prefix_cache(model: nn.Module, prefix: Tensor) -> PrefixCache:
    """Run ``prefix`` ([pos] token ids) once and keep its keys/values."""
    if not supports_prefix_cache(model):
        raise NotImplementedError("this model cannot reuse a key-value cache")
    return adapter_for(model).prefix_cache(model, prefix.reshape(1, -1))


def run_with_prefix(
    model: nn.Module,
    cache: PrefixCache,
    tokens: Tensor,
    attention_mask: Tensor,
    fwd_hooks: Sequence[tuple[str, object]],
    stop_at: str | None = None,
    split: bool = False,
) -> Tensor | None:
    """Run right-padded continuations ``tokens`` [batch, pos] after the cached prefix.

    Hooks see only the new positions; attention-score rows span prefix + new keys.
    Returns the new positions' logits when the pass runs to the end, else None.
    ``split=True`` runs split-prefix attention (``split_attention_unsupported``): the same
    hooks and tensors, the prefix's keys read once for the whole batch.
    """
    batch = tokens.shape[0]
    full_mask = torch.cat(
        [torch.ones(batch, cache.length, dtype=attention_mask.dtype), attention_mask], dim=1
    )
    return adapter_for(model).run_with_prefix(
        model, cache, tokens, attention_mask, full_mask, fwd_hooks, stop_at, split=split
    )


def split_attention_unsupported(model: nn.Module) -> str | None:
    """Why ``run_with_prefix(..., split=True)`` cannot run on ``model`` (None when it can).

    Split-prefix attention (TL 4 bridges of the Llama/Gemma family) multiplies the new queries
    of every row by the one shared prefix copy in one product, instead of copying the prefix
    into every row (``backend.tl4_split``). Callers check it against full prompts first.
    """
    return adapter_for(model).split_attention_unsupported(model)


# --------------------------------------------------------------------------- checkpoints


def neutral_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Weights in a backend-neutral layout (TL 3 names and shapes), for committed toys.

    Supports the standard-position, LayerNorm, attn-only or GELU-MLP toys of ``toy_model``.
    """
    check_model(model)
    return adapter_for(model).neutral_state_dict(model)


def load_neutral_state_dict(model: nn.Module, neutral: dict[str, Tensor]) -> None:
    """Load weights from ``neutral_state_dict`` layout into a model of the installed TL."""
    adapter_for(model).load_neutral_state_dict(model, neutral)


# --------------------------------------------------------------------------- loading
# TL-version-specific model building, used by ``icl_lens.models``. ``processing``:
#   "default": what the installed TL's own loader does (TL 3 from_pretrained: fold_ln,
#              center_writing_weights, center_unembed, fold_value_biases; TL 4
#              boot_transformers: raw HF weights);
#   "none":    raw weights on both (TL 3 from_pretrained_no_processing);
#   "fold":    HookedTransformer-style processing on both (TL 4: enable_compatibility_mode()).

PROCESSING = ("default", "none", "fold")


def _check_processing(processing: str) -> bool:
    """Validate ``processing``; return whether weights get folded on this backend."""
    if processing not in PROCESSING:
        raise ValueError(f"processing={processing!r}; choose one of {PROCESSING}")
    return processing == "fold" or (processing == "default" and installed().default_folds)


def supports_converted_cache() -> bool:
    """Whether the installed TL caches built models as converted weights (``save_converted``);
    TL 4 bridges wrap the HF module itself, so their cache is the HF checkpoint."""
    return installed().caches_converted


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
    return installed().build_from_hf(
        hf_model, tokenizer, tl_name, device=device, dtype=dtype, fold=fold
    )


_PROBE_TEXT = "Sentence: a great movie!\n Label: Positive 123 w7 : A"


def _encodes_differently(a: object, b: object) -> bool:
    try:
        return list(a.encode(_PROBE_TEXT, add_special_tokens=False)) != list(
            b.encode(_PROBE_TEXT, add_special_tokens=False)
        )
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode the probe differs
        return True


def load_tl_name(
    name: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    processing: str = "default",
) -> nn.Module:
    """Load a TL-supported model by name through TL's own loader (needs the HF hub)."""
    fold = _check_processing(processing)
    model = installed().load_tl_name(name, device=device, dtype=dtype, fold=fold)
    model.eval()
    return model


def is_tl_name(name: str) -> bool:
    """Whether ``name`` is a model name (or alias) the installed TL knows."""
    return installed().is_tl_name(name)


def save_converted(model: nn.Module, directory: str) -> list[str]:
    """TL 3: write a built model's (processed) weights and config; returns the file names.

    TL 4 bridges wrap the HF module itself, so their cache is the HF checkpoint.
    """
    return adapter_for(model).save_converted(model, directory)


def load_converted(
    directory: str,
    tokenizer: object,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """TL 3: rebuild a model written by ``save_converted`` (no processing is re-run)."""
    return installed().load_converted(directory, tokenizer, device=device, dtype=dtype)


# --------------------------------------------------------------------------- circuit sites


def post_attn_norm(model: nn.Module, layer: int) -> str | None:
    """Module name of ``layer``'s post-attention norm (Gemma-2/3's ``blocks.{l}.ln1_post``),
    whose output is ``hook_attn_out``; None when ``hook_attn_out`` is W_O's output itself."""
    return adapter_for(model).post_attn_norm(model, layer)


def attn_pre_norm_hooks(
    model: nn.Module, layer: int, fn: Callable[[Tensor], None]
) -> list[tuple[str, Callable]]:
    """Forward hooks that call ``fn(t)`` with ``layer``'s attention output after W_O (+ b_O),
    before any post-attention norm [batch, pos, d_model]: ``hook_attn_out`` on models without
    one; TL 4: the norm's ``hook_in``; TL 3: its input rebuilt as ``normalized · scale``."""
    norm = post_attn_norm(model, layer)
    if norm is None:
        return [(hook_name("attn_out", layer), lambda t, hook: fn(t))]
    return adapter_for(model).attn_pre_norm_hooks(model, layer, norm, fn)


def attended_q_hooks(
    model: nn.Module, layer: int, fn: Callable[[Tensor], None]
) -> list[tuple[str, Callable]]:
    """Forward hooks that call ``fn(q)`` with the queries attention scores with
    [batch, pos, head, d_head]: after any q-norm and RoPE, before the score scale. Standard
    positions without q-norm: ``hook_q`` itself. The caller checks that ``fn`` was called
    (a TL 4 bridge may list a hook that never fires)."""
    return adapter_for(model).attended_q_hooks(model, layer, fn)


def frozen_norm_linear(model: nn.Module, norm: str, x: Tensor, scale: Tensor) -> Tensor:
    """The linear part of norm module ``norm`` ("ln_final", "blocks.3.ln1_post") with its
    scale held at ``scale``: ``norm(x) − norm(0)`` while ``{norm}.hook_scale`` returns
    ``scale`` (broadcastable to [..., 1]). Centring, division by the scale and the affine
    weight apply; the bias cancels. A model without that module: ``x`` unchanged."""
    try:
        module = model.get_submodule(norm)
    except AttributeError:
        return x
    if isinstance(module, nn.Identity):
        return x
    name = f"{norm}.hook_scale"
    if name not in model.hook_dict:
        raise NotImplementedError(f"{architecture(model)}: {norm} has no hook_scale to hold fixed")
    import warnings

    fixed = scale.to(x.dtype)
    with warnings.catch_warnings(), model.hooks(fwd_hooks=[(name, lambda t, hook: fixed)]):
        warnings.simplefilter("ignore")  # TL 4: "a forward hook edited hook_scale" (intended)
        return module(x) - module(torch.zeros_like(x))


_ = transformer_lens  # imported for its side effects on TL 4 (registers boot_native)
