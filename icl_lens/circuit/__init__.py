"""Circuit tools: where, per layer and head, ICL's update resembles FT's and what it does.

    import icl_lens as il

    rec = il.circuit_records(model, "sst2", seed=0, lr=1e-3)   # ZS / ICL / FT at every site
    il.circuit.describe_sites(model)                           # the hooks each site reads
    il.circuit.head_table(rec)                                 # per-head SimAOU, null, DLA
    il.circuit.layer_table(rec)                                # per-layer similarities, DLA
    res = il.circuit.patch_curves(model, rec)                  # ICL <-> FT patching, baselines
    il.circuit.plot_patching(res); il.circuit.attention_view(rec, example=0, layer=1)
    il.circuit.plot_where(rec)                                 # per-layer sites, per-head maps

Modules: ``sites`` (named recording sites), ``records`` (``circuit_records``),
``attribution`` (per-head SimAOU, update similarity, direct logit attribution),
``patching`` (ICL <-> FT activation patching), ``views`` (attention view, patching plot).
"""

from icl_lens.circuit.attribution import (
    UpdateSimilarity,
    direct_logit_attribution,
    dla,
    head_simaou,
    head_table,
    layer_table,
    logit_diff_direction,
    site_similarity,
    update_similarity,
)
from icl_lens.circuit.patching import (
    PatchResult,
    label_logit_diff,
    patch_curves,
    patched_label_logits,
    survival,
)
from icl_lens.circuit.records import CircuitRecords, ConditionRecords, circuit_records
from icl_lens.circuit.sites import DEFAULT_SITES, SITES, describe_sites, head_outputs, site_hooks
from icl_lens.circuit.views import attention_frame, attention_view, plot_patching, plot_where

__all__ = [
    "DEFAULT_SITES",
    "SITES",
    "CircuitRecords",
    "ConditionRecords",
    "PatchResult",
    "UpdateSimilarity",
    "attention_frame",
    "attention_view",
    "circuit_records",
    "describe_sites",
    "direct_logit_attribution",
    "dla",
    "head_outputs",
    "head_simaou",
    "head_table",
    "label_logit_diff",
    "layer_table",
    "logit_diff_direction",
    "patch_curves",
    "patched_label_logits",
    "plot_patching",
    "plot_where",
    "site_hooks",
    "site_similarity",
    "survival",
    "update_similarity",
]
