"""The TL 3 (``HookedTransformer``) adapter.

Reads any model that is not a bridge; builds models only when TL 3 is installed. Holds TL 3's
config shims for HF checkpoints (transformers 5 configs, Gemma-2/3 by template), the rotary
alignment with transformers, and TL 3's own KV cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from icl_lens.backend.adapter import Adapter
from icl_lens.backend.common import (
    TL_MAJOR,
    TL_VERSION,
    PrefixCache,
    _encodes_differently,
    _hf_windows,
    _row_term,
    _zero_bias,
    architecture,
    dims,
    hook_name,
    run_until,
)

if TL_MAJOR < 4:  # (TL 4 removed them)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

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
_TL3_CFG_FILE = "tl_config.json"
_TL3_WEIGHTS_FILE = "model.safetensors"


class HookedAdapter(Adapter):
    """TL 3's ``HookedTransformer``: TL's own modules, parameters and KV cache."""

    backend = "hooked"
    default_folds = True  # from_pretrained folds norms and centres weights
    caches_converted = True
    ln_out_hook = "hook_normalized"

    # ---- building

    def native_class(self) -> type:
        return HookedTransformer

    def toy_model(self, config: dict[str, Any], seed: int, device: str | torch.device) -> nn.Module:
        return HookedTransformer(HookedTransformerConfig(**config, device=str(device)))

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
        return _tl3_build(hf_model, tokenizer, tl_name, device=device, dtype=dtype, fold=fold)

    def load_tl_name(
        self, name: str, *, device: str | torch.device, dtype: torch.dtype, fold: bool
    ) -> nn.Module:
        loader = HookedTransformer.from_pretrained
        if not fold:
            loader = HookedTransformer.from_pretrained_no_processing
        return loader(name, device=str(device), dtype=dtype)

    def is_tl_name(self, name: str) -> bool:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        try:
            get_official_model_name(name)
            return True
        except ValueError:
            return False

    def save_converted(self, model: nn.Module, directory: str) -> list[str]:
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        cfg = {
            k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in model.cfg.to_dict().items()
        }
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
        self,
        directory: str,
        tokenizer: object,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> nn.Module:
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
            raise ValueError(
                f"cached weights mismatch: missing={missing[:3]} extra={unexpected[:3]}"
            )
        model.eval()
        return model

    # ---- reading a model

    def fallback_windows(self, model: nn.Module, n_layers: int) -> Sequence[int | None]:
        return [None] * n_layers

    def kv_leaves(
        self, model: nn.Module, include_bias: bool, layers: Sequence[int]
    ) -> list[tuple[str, nn.Parameter]]:
        if include_bias:
            include_bias = _tl3_kv_bias(model)
        out: list[tuple[str, nn.Parameter]] = []
        for layer in layers:
            attn = model.blocks[layer].attn
            for name, p in attn.named_parameters(recurse=False):
                if name in _TL3_KV_NAMES and (include_bias or "W_" in name):
                    out.append((f"blocks.{layer}.attn.{name}", p))
        return out

    def kv_delta_hooks(self, model: nn.Module, by_param: dict) -> list:
        return _tl3_delta_hooks(model, by_param)

    def unembed_bias(self, unembed: nn.Module) -> Tensor | None:
        return unembed.b_U

    def module_attn_scale(self, attn: nn.Module) -> float | None:
        return None

    def fallback_logit_soft_cap(self, model: nn.Module) -> object:
        return None

    def attn_weights(self, model: nn.Module, layer: int) -> dict[str, Tensor]:
        d = dims(model)
        attn = model.blocks[layer].attn
        names = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
        gqa = hasattr(attn, "_W_K")  # TL 3 GQA: un-repeated K/V leaves behind properties
        out = {n: getattr(attn, "_" + n if gqa and n[-1] in "KV" else n, None) for n in names}
        return {n: _zero_bias(t, out, n, d) for n, t in out.items()}

    def attn_scores_hooks(
        self, model: nn.Module, layer: int, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        return [(hook_name("attn_scores", layer), lambda t, hook: fn(t))]

    # ---- prefix KV cache

    def supports_prefix_cache(self, model: nn.Module) -> bool:
        return True

    def prefix_cache(self, model: nn.Module, prefix: Tensor) -> PrefixCache:
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
        if split:
            why = self.split_attention_unsupported(model)
            raise NotImplementedError(f"split-prefix attention: {why}")
        batch = tokens.shape[0]
        tl_cache = cache.state
        expanded = copy.copy(tl_cache)
        # frozen entries: no in-place growth
        expanded.entries = [copy.copy(e) for e in tl_cache.entries]
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

    def split_attention_unsupported(self, model: nn.Module) -> str | None:
        return "TL 3's HookedTransformer runs its own attention (no split-prefix path)"

    # ---- checkpoints

    def neutral_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {k: v for k, v in sd.items() if not k.endswith(("IGNORE", ".mask"))}

    def load_neutral_state_dict(self, model: nn.Module, neutral: dict[str, Tensor]) -> None:
        missing, unexpected = model.load_state_dict(neutral, strict=False)
        missing = [k for k in missing if not k.endswith(("IGNORE", ".mask"))]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")

    # ---- circuit sites

    def post_attn_norm(self, model: nn.Module, layer: int) -> str | None:
        # TL 3 builds ``ln1_post`` only with use_normalization_before_and_after (Gemma-2/3)
        return f"blocks.{layer}.ln1_post" if hasattr(model.blocks[layer], "ln1_post") else None

    def attn_pre_norm_hooks(
        self, model: nn.Module, layer: int, norm: str, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        """TL 3 hooks no norm's input: an RMSNorm's is ``hook_normalized · hook_scale``."""
        if type(model.get_submodule(norm)).__name__ not in ("RMSNorm", "RMSNormPre"):
            raise NotImplementedError(
                f"{architecture(model)}: site 'attention' needs the input of {norm}, which TL "
                f"{TL_VERSION} hooks only for RMS norms (this is "
                f"{type(model.get_submodule(norm)).__name__})"
            )
        kept: dict[str, Tensor] = {}

        def keep_scale(t: Tensor, hook: object) -> None:
            kept["scale"] = t

        def on_normalized(t: Tensor, hook: object) -> None:
            fn(t * kept.pop("scale").to(t.dtype))

        return [(f"{norm}.hook_scale", keep_scale), (f"{norm}.hook_normalized", on_normalized)]

    def attended_q_hooks(
        self, model: nn.Module, layer: int, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        """``hook_rot_q`` (after q-norm and RoPE) on rotary models, else ``hook_q``."""
        if dims(model).positional == "rotary":
            return [(f"blocks.{layer}.attn.hook_rot_q", lambda t, hook: fn(t))]
        if getattr(model.blocks[layer].attn, "q_norm", None) is not None:
            raise NotImplementedError(
                f"{architecture(model)}: site 'q_post' (queries after q-norm) is not hooked by "
                f"TL {TL_VERSION} on a model without rotary positions"
            )
        return [(hook_name("q", layer), lambda t, hook: fn(t))]


ADAPTER = HookedAdapter()


# --------------------------------------------------------------------------- K/V parameters


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


# --------------------------------------------------------------------------- building from HF


def _tl3_fold_flags(cfg: object, fold: bool) -> dict[str, bool]:
    """The ``load_and_process_state_dict`` flags ``from_pretrained`` would use."""
    softcap = getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0
    return dict(
        fold_ln=fold,
        center_writing_weights=fold,
        center_unembed=fold and softcap <= 0,
        fold_value_biases=fold,
    )


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
