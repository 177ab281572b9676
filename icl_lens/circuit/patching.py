"""ICL ↔ FT activation patching at the prediction position.

``icl_to_ft``: in the ICL run, layer l's (or head h's) ICL update ΔICL = ICL − ZS at the
recorded position is replaced by the FT update ΔFT, rescaled to ΔICL's norm:
the attention output becomes ``ZS + (‖ΔICL‖/‖ΔFT‖) ΔFT``. What survives is the fraction of
ICL's label-logit change that remains,

    fraction = mean_e(ld_patched − ld_ZS) / mean_e(ld_ICL − ld_ZS),

with ld the label-word logit difference (gold minus the mean of the other labels) at the
prediction position, a ratio of means over examples (per-example ratios explode where ICL
barely moves the logits). ``ft_to_icl`` is the converse: in the FT run (the FT model on the ZS
prompt), FT's update is replaced by ΔICL rescaled to ‖ΔFT‖, and the fraction is of FT's change.

Baselines, patched the same way: ``ft_shuffled`` (the update of FT on shuffled labels),
``random`` (a Gaussian direction of the same norm; at the ``attention`` site a random
direction of head outputs, z ~ N(0, I) through W_O) and ``zero`` (the update removed: the
ZS value). Sites: ``residual`` patches ``hook_attn_out``; ``attention`` patches every head's
``hook_z`` (the update before any post-attention norm, in the span of W_O); ``heads=True``
patches one head's ``hook_z`` at a time. Norms are matched in output space (d_model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from icl_lens import backend as B
from icl_lens import metrics as M
from icl_lens.checks import master_dtype, model_dtype, warn
from icl_lens.circuit.records import CircuitRecords, forward_label_logits
from icl_lens.circuit.sites import head_outputs
from icl_lens.finetune import finetuned
from icl_lens.progress import tqdm
from icl_lens.tasks import Prompt

DIRECTIONS = {  # direction: (the run patched, the variants put into it)
    "icl_to_ft": ("icl", ("ft", "ft_shuffled", "random", "zero")),
    "ft_to_icl": ("ft", ("icl", "ft_shuffled", "random", "zero")),
}
PATCH_SITES = ("residual", "attention")
__all__ = [
    "DIRECTIONS",
    "PatchResult",
    "label_logit_diff",
    "patch_curves",
    "patched_label_logits",
    "survival",
]


def label_logit_diff(
    logits: Float[Tensor, "example label"], labels: Int[Tensor, " example"]
) -> Float[Tensor, " example"]:
    """Gold label's logit minus the mean of the other labels' logits, per example."""
    logits = logits.double()
    gold = logits.gather(1, labels.long()[:, None])[:, 0]
    others = (logits.sum(1) - gold) / (logits.shape[1] - 1)
    return gold - others


def survival(
    moved: Float[Tensor, "example ..."],
    base: Float[Tensor, " example"],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``mean_e(moved) / mean_e(base)`` per unit, with a percentile bootstrap CI over examples
    (``metrics.bootstrap_ci``, resampling the examples of numerator and denominator
    together). Returns (fraction, low, high); NaN where ``mean(base)`` is 0."""
    moved = moved.double()
    flat = moved.reshape(moved.shape[0], -1)
    both = torch.stack([flat, base.double()[:, None].expand_as(flat)], dim=1)  # [e, 2, u]

    def ratio(a: np.ndarray, axis: int) -> np.ndarray:
        num, den = np.take(a, 0, axis=axis + 1), np.take(a, 1, axis=axis + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return num.mean(axis) / den.mean(axis)

    frac = torch.as_tensor(ratio(both.numpy()[None], 1)[0])
    if n_boot:
        low, high = M.bootstrap_ci(both, n_boot=n_boot, alpha=alpha, seed=seed, stat=ratio)
    else:
        low = high = torch.full_like(frac, float("nan"))
    shape = moved.shape[1:]
    return frac.reshape(shape), low.reshape(shape), high.reshape(shape)


def patched_label_logits(
    model: nn.Module,
    prompts: Sequence[Prompt],
    label_ids: Sequence[int],
    layer: int,
    value: Tensor,
    *,
    site: str = "residual",
    head: int | None = None,
    batch_size: int = 8,
) -> Float[Tensor, "example label"]:
    """Label-word logits (prediction position) with ``layer``'s attention output at each
    prompt's recorded position set to ``value[e]``.

    ``site="residual"``: ``hook_attn_out`` := value [example, d_model]. ``site="attention"``:
    ``hook_z`` := value, all heads [example, head, d_head], or one ``head`` [example, d_head].
    """
    if site not in PATCH_SITES:
        raise ValueError(f"patch site must be one of {PATCH_SITES}, not {site!r}")
    if head is not None and site != "attention":
        raise ValueError("heads are patched at site='attention' (their hook_z)")
    name = B.hook_name("attn_out" if site == "residual" else "z", layer)
    value = value.detach()

    def make_hooks(idx, rows, rec, pred):
        v = value[idx]

        def patch(t: Tensor, hook: object) -> Tensor:
            t = t.clone()
            r, p = rows.to(t.device), rec.to(t.device)
            if head is None:
                t[r, p] = v.to(t.device, t.dtype)
            else:
                t[r, p, head] = v.to(t.device, t.dtype)
            return t

        return [(name, patch)]

    return forward_label_logits(model, prompts, label_ids, make_hooks, batch_size)


@dataclass
class PatchResult:
    """Output of :func:`patch_curves`.

    ``frame``: one row per (direction, variant, layer, head): ``fraction`` of the base run's
    label-logit change that survives, its bootstrap CI (``ci_low``, ``ci_high``), ``n``
    examples, and the base run's mean change and its standard error (``base_mean``,
    ``base_se``; a fraction means little where the mean is within noise of 0, and
    :func:`patch_curves` warns then); ``head`` is -1 for whole-layer patches.
    ``moved[(direction, variant)]``: ld_patched − ld_ZS [example, layer] (or
    [example, layer, head]); ``base[direction]``: ld_base − ld_ZS [example].
    """

    frame: pd.DataFrame
    moved: dict[tuple[str, str], Tensor] = field(repr=False)
    base: dict[str, Tensor] = field(repr=False)
    info: dict = field(default_factory=dict)

    def curve(self, direction: str = "icl_to_ft") -> pd.DataFrame:
        """The rows of one direction (variants × layers, or × heads)."""
        return self.frame[self.frame.direction == direction].reset_index(drop=True)


def is_unstable(mean: float, se: float) -> bool:
    """A base change within 2 standard errors of 0: the surviving fractions (ratios to it)
    are unstable (``patch_curves`` warns; ``run_experiment`` notes it on the rows)."""
    return not abs(mean) > 2 * se


def _units(records: CircuitRecords, site: str, heads: bool) -> dict[str, Tensor]:
    """Per condition: the patch-space value (residual vector or z) and output-space vector."""
    out = {}
    for c in records.conditions:
        r = records[c]
        if site == "residual":
            out[c] = (r.site("residual"), r.site("residual"))
        elif heads:
            out[c] = (r.z, r.site("heads"))
        else:
            out[c] = (r.z, r.site("heads").sum(2))  # z of all heads; Σ_h head outputs
    return out


def _mean_se(x: Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D sample."""
    n = x.numel()
    se = float(x.double().std() / n**0.5) if n > 1 else float("inf")
    return float(x.double().mean()), se


def _norms(x: Tensor, unit_dims: int) -> Tensor:
    """Norm over the trailing output dims beyond [example, layer(, head)]."""
    return x.flatten(unit_dims).norm(dim=-1)


def patch_curves(
    model: nn.Module,
    records: CircuitRecords,
    *,
    directions: Sequence[str] = ("icl_to_ft", "ft_to_icl"),
    site: str = "residual",
    heads: bool = False,
    layers: Sequence[int] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    batch_size: int = 8,
    progress: bool = False,
) -> PatchResult:
    """ICL ↔ FT patching curves per layer (or per head with ``heads=True``) with baselines.

    ``records`` from ``circuit_records(..., record="predict")`` on this ``model`` (sites
    ``residual``, or ``heads`` for ``site="attention"``/``heads=True``). The FT run re-trains
    FT with the records' demonstrations and rate (``finetune.finetuned``; restored after).
    The ``ft_shuffled`` variant needs records made with ``shuffled=True``. Random directions
    come from a generator seeded per (``records.seed``, direction, layer, head), so a layer's
    values do not depend on which other layers are patched.
    """
    if records.record != "predict":
        raise ValueError(
            "patching reads the label-word logits where it patches: build the records with "
            f"record='predict' (these are at {records.record!r})"
        )
    if site not in PATCH_SITES:
        raise ValueError(f"patch site must be one of {PATCH_SITES}, not {site!r}")
    own = model_dtype(model)
    if master_dtype(own) != own and records.update_capture_dtype == "float32":
        raise ValueError(
            "patching runs its passes in the model's dtype, but these records' ZS/FT passes "
            "ran in float32: build them with circuit_records(..., update_capture_dtype='model')"
        )
    if heads:
        site = "attention"
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; use {list(DIRECTIONS)}")
    need = "residual" if site == "residual" else "heads"
    if need not in records.sites:
        raise ValueError(f"patching at {site!r} needs site {need!r} in the records")
    layers = list(range(records.n_layers)) if layers is None else [int(x) for x in layers]
    head_list: list[int | None] = list(range(records.n_heads)) if heads else [None]
    units = _units(records, site, heads)
    unit_dims = 3 if heads else 2
    zs_val = units["zs"][0]
    labels = records.labels
    ld_zs = label_logit_diff(records.zs.label_logits, labels)
    moved: dict[tuple[str, str], Tensor] = {}
    base: dict[str, Tensor] = {}
    rows = []
    for direction in directions:
        base_cond, variants = DIRECTIONS[direction]
        variants = [v for v in variants if v in ("random", "zero") or v in records.conditions]
        if len(variants) < len(DIRECTIONS[direction][1]):
            warn(
                f"{direction}: no shuffled-label FT in the records (shuffled=False?); "
                "that baseline is left out",
                UserWarning,
            )
        base[direction] = label_logit_diff(records[base_cond].label_logits, labels) - ld_zs
        base_mean, base_se = _mean_se(base[direction])
        if is_unstable(base_mean, base_se):
            warn(
                f"{direction}: {base_cond.upper()}'s mean change of the label-logit difference "
                f"({base_mean:.3g}) is within 2 standard errors ({base_se:.3g}) of 0, so the "
                "surviving fractions (ratios to it) are unstable",
                UserWarning,
            )
        target = _norms(units[base_cond][1] - units["zs"][1], unit_dims)  # ‖Δbase‖
        prompts = records.icl_prompts if base_cond == "icl" else records.zs_prompts
        shape = (len(records), len(layers), *([len(head_list)] if heads else []))
        got = {v: torch.zeros(shape, dtype=torch.float64) for v in variants}
        with _run_state(model, records, base_cond):
            todo = [(li, hi, v) for li in range(len(layers)) for hi in range(len(head_list))
                    for v in variants]  # fmt: skip
            for li, hi, v in tqdm(todo, desc=f"patch {direction}", disable=not progress):
                layer, head = layers[li], head_list[hi]
                gen = _generator(records.seed, direction, layer, head)
                new = _new_update(records, units, v, layer, head, target, unit_dims, gen)
                value = zs_val[:, layer] if head is None else zs_val[:, layer, head]
                value = value + new
                logits = patched_label_logits(
                    model, prompts, records.label_ids, layer, value, site=site, head=head,
                    batch_size=batch_size,
                )  # fmt: skip
                moved_e = label_logit_diff(logits, labels) - ld_zs
                if heads:
                    got[v][:, li, hi] = moved_e
                else:
                    got[v][:, li] = moved_e
        for v in variants:
            moved[(direction, v)] = got[v]
            frac, low, high = survival(got[v], base[direction], n_boot=n_boot, alpha=alpha,
                                       seed=records.seed)  # fmt: skip
            for li, layer in enumerate(layers):
                for hi, head in enumerate(head_list):
                    at = (li, hi) if heads else (li,)
                    rows.append({
                        "direction": direction, "variant": v, "layer": layer,
                        "head": -1 if head is None else head,
                        "fraction": float(frac[at]), "ci_low": float(low[at]),
                        "ci_high": float(high[at]), "n": len(records),
                        "base_mean": base_mean, "base_se": base_se,
                    })  # fmt: skip
    info = {
        "site": site,
        "heads": heads,
        "layers": layers,
        "seed": records.seed,
        "lr": records.lr,
        "fraction": "mean_e(ld_patched - ld_zs) / mean_e(ld_base - ld_zs); ld = gold logit "
        "minus the mean of the other labels' at the prediction position",
        "norm_matched": "the inserted update is rescaled to the base update's norm (d_model)",
    }
    return PatchResult(pd.DataFrame(rows), moved, base, info)


def _generator(seed: int, direction: str, layer: int, head: int | None) -> torch.Generator:
    """The random baseline's generator for one patched unit (independent of the others)."""
    digest = hashlib.sha256(f"{seed}/{direction}/{layer}/{head}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@contextmanager
def _run_state(model: nn.Module, records: CircuitRecords, base_cond: str) -> Iterator[None]:
    """The model as the base run needs it: untouched for ICL; for FT, finetuned again as the
    records' FT was (same demonstrations, rate and mode), restored on exit."""
    if base_cond != "ft":
        yield
        return
    r = records
    with finetuned(model, r.demos, r.lr, mode=r.mode, task=r.task, tokenizer=r.tokenizer,
                   record_queries=False, train_dtype=r.train_dtype):  # fmt: skip
        yield


def _new_update(
    records: CircuitRecords,
    units: dict[str, tuple[Tensor, Tensor]],
    variant: str,
    layer: int,
    head: int | None,
    target: Tensor,
    unit_dims: int,
    gen: torch.Generator,
) -> Tensor:
    """The update put in (patch space), rescaled to ``target``'s output-space norm."""

    def at(x: Tensor) -> Tensor:
        return x[:, layer] if head is None else x[:, layer, head]

    want = at(target)  # [example]
    zs_patch = at(units["zs"][0])
    if variant == "zero":
        return torch.zeros_like(zs_patch)
    if variant == "random":
        patch = torch.randn(zs_patch.shape, generator=gen, dtype=zs_patch.dtype)
        if head is not None:
            output = head_outputs(patch[:, None], records.w_o[layer, head][None])[:, 0]
        elif zs_patch.ndim == 3:  # z of every head: output = Σ_h z_h W_O^h
            output = head_outputs(patch, records.w_o[layer]).sum(1)
        else:
            output = patch
    else:
        patch = at(units[variant][0]) - zs_patch
        output = at(units[variant][1]) - at(units["zs"][1])
    have = output.flatten(1).norm(dim=-1)
    factor = torch.where(have > 0, want / have.clamp_min(1e-30), torch.zeros_like(have))
    return patch * factor.view(-1, *([1] * (patch.ndim - 1))).to(patch.dtype)
