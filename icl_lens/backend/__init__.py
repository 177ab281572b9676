"""The only package that knows TL 3 (``HookedTransformer``) from TL 4 (``TransformerBridge``).

Everything else in icl-lens speaks hook names (shared by both versions) and the few adapter
calls re-exported here. Functions accept any hooked model, whether icl-lens built it or the
user did.

Layout: ``common`` holds the TL-agnostic code and the public functions, which ask
``adapter_for(model)`` (or ``installed()``, to build a model) for what differs; ``adapter``
defines that interface; ``tl3`` and ``tl4`` implement it, one module per TL line. Other
modules call these names through the package (``B.kv_deltas(...)``), so tests can
monkeypatch them here.
"""

# Re-exports (hence the noqa): the names other modules and tests use.
from icl_lens.backend.adapter import Adapter  # noqa: F401
from icl_lens.backend.common import (  # noqa: F401
    BACKEND,
    PROCESSING,
    TL_MAJOR,
    TL_VERSION,
    ModelDims,
    PrefixCache,
    PrefixCacheError,
    _check_processing,
    _hf_windows,
    _row_term,
    _StopForward,
    _transformers_version,
    adapter_for,
    architecture,
    attended_q_hooks,
    attended_qk,
    attention_parameters,
    attn_input_hook,
    attn_pre_norm_hooks,
    attn_scale,
    attn_scores_hooks,
    attn_weights,
    build_from_hf,
    canonical_hook_name,
    check_model,
    dims,
    final_norm_hook_name,
    frozen_norm_linear,
    full_precision,
    hook_name,
    input_device,
    installed,
    is_bridge,
    is_tl_name,
    kv_deltas,
    kv_parameters,
    load_converted,
    load_neutral_state_dict,
    load_tl_name,
    logit_soft_cap,
    named_kv_parameters,
    neutral_state_dict,
    post_attn_norm,
    prefix_cache,
    run_until,
    run_with_prefix,
    save_converted,
    split_attention_unsupported,
    stop_after,
    supports_converted_cache,
    supports_prefix_cache,
    tl_version_info,
    toy_model,
    unembed_rows,
)
from icl_lens.backend.tl3 import KV_BIAS_ATTR  # noqa: F401
from icl_lens.backend.tl4 import hf_cache_kwarg  # noqa: F401

NATIVE_CLASS: type = installed().native_class()

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
