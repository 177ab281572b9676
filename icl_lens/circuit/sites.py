"""Named recording sites: where in a block an activation is read (DESIGN §2, recording sites).

On the paper's pre-norm GPT "the attention output" and "the query" are unambiguous; on modern
models they are not, so every circuit tool names its site:

- ``resid``: the residual stream after the layer (``hook_resid_post``);
- ``residual``: the attention output the block adds to the residual stream
  (``hook_attn_out``): after any post-attention norm;
- ``attention``: the attention output after W_O (+ b_O), before any post-attention norm
  (Gemma-2/3: the input of ``ln1_post``); equal to ``residual`` on models without one;
- ``heads``: per-head outputs ``z_h · W_O^h`` [head, d_model]; they sum (+ b_O) to
  ``attention`` (recorded as ``hook_z``, turned into outputs by :func:`head_outputs`);
- ``q_pre``: the query as projected (``hook_q``), before any q-norm and RoPE;
- ``q_post``: the query attention scores with, after q-norm and RoPE (before the 1/scale).

Only ``icl_lens.backend`` knows how TL 3 and TL 4 expose each; a site an architecture does not
expose raises ``NotImplementedError`` naming the site and the architecture.
"""

from __future__ import annotations

from collections.abc import Callable

import einops
import pandas as pd
from jaxtyping import Float
from torch import Tensor, nn

from icl_lens import backend as B

SITES: dict[str, str] = {
    "resid": "residual stream after the layer (hook_resid_post)",
    "residual": "attention output added to the residual stream (hook_attn_out; after any "
    "post-attention norm)",
    "attention": "attention output after W_O (+ b_O), before any post-attention norm",
    "heads": "per-head outputs z_h W_O^h; sum over heads + b_O = 'attention'",
    "q_pre": "query as projected (hook_q), before q-norm and RoPE",
    "q_post": "query attention scores with (after q-norm and RoPE), unscaled",
}
DEFAULT_SITES: tuple[str, ...] = tuple(SITES)
VECTOR_SITES = ("resid", "residual", "attention")  # [d_model] per layer
__all__ = ["DEFAULT_SITES", "SITES", "check_sites", "describe_sites", "head_outputs", "site_hooks"]


def check_sites(sites: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate site names; returns them as a tuple in ``SITES`` order."""
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise ValueError(f"unknown site(s) {unknown}; known: {list(SITES)}")
    return tuple(s for s in SITES if s in sites)


def site_hooks(
    model: nn.Module, site: str, layer: int, fn: Callable[[Tensor], None]
) -> list[tuple[str, Callable]]:
    """Forward hooks that call ``fn(t)`` with ``site``'s tensor in ``layer`` at every position:
    [batch, pos, d_model] for ``resid``/``residual``/``attention``, ``hook_z``
    [batch, pos, head, d_head] for ``heads`` (see :func:`head_outputs`), and
    [batch, pos, head, d_head] for ``q_pre``/``q_post``."""
    check_sites([site])

    def plain(kind: str) -> list[tuple[str, Callable]]:
        return [(B.hook_name(kind, layer), lambda t, hook: fn(t))]

    if site == "resid":
        return plain("resid_post")
    if site == "residual":
        return plain("attn_out")
    if site == "attention":
        return B.attn_pre_norm_hooks(model, layer, fn)
    if site == "heads":
        return plain("z")
    if site == "q_pre":
        return plain("q")
    return B.attended_q_hooks(model, layer, fn)


def head_outputs(
    z: Float[Tensor, "*batch head d_head"], w_o: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "*batch head d_model"]:
    """Per-head outputs ``z_h · W_O^h``: what each head writes before b_O (and any post-norm)."""
    return einops.einsum(z, w_o.to(z.dtype), "... h e, h e m -> ... h m")


def describe_sites(model: nn.Module, layer: int = 0) -> pd.DataFrame:
    """Which hooks each site reads on this model (``layer``'s names), or why it cannot.

    Columns: ``site``, ``hooks`` (comma-separated), ``description``; a site the architecture
    does not expose shows the refusal in ``hooks``.
    """
    rows = []
    for site, text in SITES.items():
        try:
            names = ", ".join(name for name, _ in site_hooks(model, site, layer, lambda t: None))
        except NotImplementedError as e:
            names = f"unavailable: {e}"
        rows.append({"site": site, "hooks": names, "description": text})
    return pd.DataFrame(rows)
