"""The operations that differ between TL lines: one ``Adapter`` subclass per line.

``tl3.HookedAdapter`` serves ``HookedTransformer`` models (TL 3), ``tl4.BridgeAdapter``
``TransformerBridge`` models (TL 4). The public functions in ``common`` do the TL-agnostic part
and call ``adapter_for(model)`` (or ``installed()`` to build a model) for the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from icl_lens.backend.common import PrefixCache


class Adapter(ABC):
    """One TL line's way of building, reading and running a hooked model."""

    backend: str  # the value of ``BACKEND`` on this line: "hooked" (TL 3) or "bridge" (TL 4)
    default_folds: bool  # whether processing="default" folds norms and centres weights
    caches_converted: bool  # whether models are cached as converted TL weights (else as HF)
    ln_out_hook: str  # hook of a norm's output, affine included: "blocks.{l}.ln1.<this>"

    # ---- building (only the installed line's adapter builds)

    @abstractmethod
    def native_class(self) -> type:
        """The hooked model class of this line."""

    @abstractmethod
    def toy_model(self, config: dict[str, Any], seed: int, device: str | torch.device) -> nn.Module:
        """A randomly initialised model from TL config keys (the caller seeds and forks the RNG)."""

    @abstractmethod
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
        """Wrap a loaded (checked) HF causal LM; see ``common.build_from_hf``."""

    @abstractmethod
    def load_tl_name(
        self, name: str, *, device: str | torch.device, dtype: torch.dtype, fold: bool
    ) -> nn.Module:
        """Load a TL-supported model by name through TL's own loader."""

    @abstractmethod
    def is_tl_name(self, name: str) -> bool:
        """Whether ``name`` is a model name (or alias) this line knows."""

    @abstractmethod
    def save_converted(self, model: nn.Module, directory: str) -> list[str]:
        """Write a built model's weights and config; returns the file names."""

    @abstractmethod
    def load_converted(
        self,
        directory: str,
        tokenizer: object,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> nn.Module:
        """Rebuild a model written by ``save_converted``."""

    # ---- reading a model

    @abstractmethod
    def fallback_windows(self, model: nn.Module, n_layers: int) -> Sequence[int | None]:
        """Per-layer sliding windows of a model whose TL config names none."""

    @abstractmethod
    def kv_leaves(
        self, model: nn.Module, include_bias: bool, layers: Sequence[int]
    ) -> list[tuple[str, nn.Parameter]]:
        """``layers``' K/V projection parameters with stable names (checked by the caller)."""

    @abstractmethod
    def kv_delta_hooks(self, model: nn.Module, by_param: dict) -> list:
        """Register the hooks of ``common.kv_deltas``; ``by_param``: id(param) -> (name, delta)."""

    @abstractmethod
    def unembed_bias(self, unembed: nn.Module) -> Tensor | None:
        """The unembedding's bias ``b_U``, or None."""

    @abstractmethod
    def module_attn_scale(self, attn: nn.Module) -> float | None:
        """The q·k divisor an attention module holds beyond ``attn.attn_scale``, or None."""

    @abstractmethod
    def fallback_logit_soft_cap(self, model: nn.Module) -> object:
        """The output-logit soft cap when the TL config has none (any value; > 0 is a cap)."""

    @abstractmethod
    def attn_weights(self, model: nn.Module, layer: int) -> dict[str, Tensor]:
        """See ``common.attn_weights``."""

    @abstractmethod
    def attn_scores_hooks(
        self, model: nn.Module, layer: int, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        """See ``common.attn_scores_hooks``."""

    # ---- prefix KV cache

    @abstractmethod
    def supports_prefix_cache(self, model: nn.Module) -> bool:
        """Whether a prefix's keys/values can be reused on this model."""

    @abstractmethod
    def prefix_cache(self, model: nn.Module, prefix: Tensor) -> PrefixCache:
        """Run ``prefix`` ([1, pos] token ids) once and keep its keys/values."""

    @abstractmethod
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
        """See ``common.run_with_prefix``; ``full_mask`` covers prefix + new positions."""

    @abstractmethod
    def split_attention_unsupported(self, model: nn.Module) -> str | None:
        """See ``common.split_attention_unsupported``."""

    # ---- checkpoints

    @abstractmethod
    def neutral_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """See ``common.neutral_state_dict``."""

    @abstractmethod
    def load_neutral_state_dict(self, model: nn.Module, neutral: dict[str, Tensor]) -> None:
        """See ``common.load_neutral_state_dict``."""

    # ---- circuit sites (icl_lens.circuit.sites)

    @abstractmethod
    def post_attn_norm(self, model: nn.Module, layer: int) -> str | None:
        """See ``common.post_attn_norm``."""

    @abstractmethod
    def attn_pre_norm_hooks(
        self, model: nn.Module, layer: int, norm: str, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        """Hooks calling ``fn`` with the input of post-attention norm ``norm`` [batch, pos, d]."""

    @abstractmethod
    def attended_q_hooks(
        self, model: nn.Module, layer: int, fn: Callable[[Tensor], None]
    ) -> list[tuple[str, Callable]]:
        """See ``common.attended_q_hooks``."""
