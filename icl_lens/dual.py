"""The dual form made concrete (Dai et al. 2022 §3; DESIGN §1): meta-gradients ΔW_ICL, ΔW_FT.

Linear layer. One GD step on ``y = W x`` with any loss gives ``ΔW = Σ_i e_i x_i^T`` with
``e_i = −lr ∂L/∂y_i``, so ``(W0 + ΔW) x = W0 x + Σ_i e_i (x_i·x)``
(:func:`check_linear_dual_form`).

Attention. Relax softmax to linear attention: the recorded row's output in one head is
``Σ_j v_j (k_j·q)`` over every position it attends to (``q`` divided by the layer's score
scale when ``scaled``, so ``k_j·q`` is exactly the pre-softmax score). Group the sum:

    W_ZSL   = Σ_{j ∈ query} v_j k_j^T       query input tokens + the recorded (label) token
    ΔW_ICL  = Σ_{i ∈ demos} v_i k_i^T       demo input and label tokens: the meta-gradients
    W_other = Σ_{j ∈ other} v_j k_j^T       BOS and separators
    (W_ZSL + ΔW_ICL + W_other) q = Σ_j v_j (k_j·q)      (exact; :meth:`DualForm.residual`)

Operators live in the head's value×key space ([d_head, d_head]): since ``v_j = W_V x_j`` and
``k_j = W_K x_j`` (plus biases), ``W_ZSL = W_V X (W_K X)^T`` is the paper's zero-shot operator.
Keys and queries are the ones attention scores with (rotary applied; checked against
``hook_pattern``); GQA maps query head h to KV head ``h // (n_heads / n_kv_heads)``;
sliding-window layers keep only the visible tokens.

Finetuning. ``ΔW_FT = W_ZSL[FT model, ZS prompt] − W_ZSL[base model, ZS prompt]``: the change
of the query-token operator after ``finetune.finetuned`` trained K/V on the same
demonstrations (BOS excluded, as it is from ΔW_ICL). :func:`dual_analysis` compares the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from icl_lens import backend as B
from icl_lens.baselines import shuffle_labels
from icl_lens.checks import rel_l2, tolerance
from icl_lens.progress import tqdm

GROUPS = ("query", "demos", "other")

# --------------------------------------------------------------------------- linear layer


def check_linear_dual_form(
    w0: Float[Tensor, "d_out d_in"],
    x_train: Float[Tensor, "n d_in"],
    targets: Float[Tensor, "n d_out"] | None,
    x_test: Float[Tensor, "m d_in"],
    lr: float,
    *,
    loss: Callable[[Tensor], Tensor] | None = None,
    tol: float | None = None,
) -> float:
    """Max abs error of ``(W0 + ΔW) x = W0 x + Σ_i e_i (x_i·x)`` after one real GD step.

    In float64. ``ΔW = −lr ∇_W L`` comes from autograd on the weights and ``e_i = −lr ∂L/∂y_i``
    from autograd on the outputs. ``loss(Y)`` maps outputs [n, d_out] to a scalar; default
    ``½ Σ ||y_i − t_i||²``. With ``tol``, raises AssertionError if the error exceeds it.
    """
    w0, x_train, x_test = (t.detach().double() for t in (w0, x_train, x_test))
    if loss is None:
        if targets is None:
            raise ValueError("pass targets=... for the squared loss, or loss=callable(Y)")
        t = targets.detach().double()
        loss = lambda y: 0.5 * ((y - t) ** 2).sum()
    w = w0.clone().requires_grad_(True)
    (grad_w,) = torch.autograd.grad(loss(x_train @ w.T), w)
    delta_w = -lr * grad_w
    y = (x_train @ w0.T).requires_grad_(True)
    (grad_y,) = torch.autograd.grad(loss(y), y)
    e = -lr * grad_y  # meta-gradients, one per training input
    x = x_test.reshape(-1, w0.shape[1])
    direct = x @ (w0 + delta_w).T
    dual = x @ w0.T + (x @ x_train.T) @ e
    err = float((direct - dual).abs().max())
    if tol is not None and err > tol:
        raise AssertionError(f"linear dual form broken: max error {err:.3g} > tol {tol:.3g}")
    return err


# --------------------------------------------------------------------------- attention


def token_groups(spans, window: int | None = None) -> dict[str, list[int]]:
    """Positions the recorded row attends to: query (input..record), demos, other (BOS, SEP)."""
    rec = spans.record_pos
    lo = 0 if window is None else max(0, rec - window + 1)
    query = set(range(spans.query[0], rec + 1))
    demos = set(spans.demo_token_positions())
    groups: dict[str, list[int]] = {g: [] for g in GROUPS}
    for j in range(lo, rec + 1):
        groups["query" if j in query else "demos" if j in demos else "other"].append(j)
    return groups


def operator(
    k: Float[Tensor, "pos head d_head"], v: Float[Tensor, "pos head d_head"], positions: list[int]
) -> Float[Tensor, "head d_head d_head"]:
    """``Σ_{j ∈ positions} v_j k_j^T`` per head ([value dim, key dim]); zeros if empty."""
    idx = torch.as_tensor(positions, dtype=torch.long, device=k.device)
    return torch.einsum("phe,phd->hed", v[idx], k[idx])


@dataclass
class DualForm:
    """The linear-attention dual form of one prompt's recorded row, per chosen layer and head.

    ``w`` maps each group (``GROUPS``) to operators [layer, head, d_head, d_head]. ``q`` is the
    (scaled) query; ``relaxed`` = Σ_j v_j (k_j·q); ``softmax_z`` is the real ``hook_z`` row.
    ``demo_k``/``demo_v`` [layer, demo_tok, head, d_head] are the per-token meta-gradient pairs:
    ``ΔW_ICL = Σ_i demo_v[i] ⊗ demo_k[i]``.
    """

    layers: list[int]
    q: Float[Tensor, "layer head d_head"]
    w: dict[str, Float[Tensor, "layer head d_head d_head"]]
    relaxed: Float[Tensor, "layer head d_head"]
    softmax_z: Float[Tensor, "layer head d_head"]
    demo_k: list[Tensor]
    demo_v: list[Tensor]
    groups: list[dict[str, list[int]]] = field(repr=False)

    @property
    def w_zsl(self) -> Tensor:
        return self.w["query"]

    @property
    def dw_icl(self) -> Tensor:
        return self.w["demos"]

    def residual(self) -> float:
        """Max abs of ``(W_ZSL + ΔW_ICL + W_other) q − Σ_j v_j (k_j·q)`` (0 up to rounding)."""
        total = sum(self.w.values())
        return float((torch.einsum("lhed,lhd->lhe", total, self.q) - self.relaxed).abs().max())

    def meta_gradient_terms(self, i: int) -> Float[Tensor, "demo_tok head d_head d_head"]:
        """The per-token terms ``v_i k_i^T`` of the ``i``-th chosen layer (memory: tok·h·d²)."""
        return torch.einsum("phe,phd->phed", self.demo_v[i], self.demo_k[i])


def _capture(model: nn.Module, tokens: Tensor, layers: list[int]) -> dict[str, Tensor]:
    """q, k, v, z, pattern (and rot_q/rot_k where they fire) of ``layers``, batch 1."""
    got: dict[str, Tensor] = {}
    hooks = []
    for layer in layers:
        for kind in ("q", "k", "v", "z", "pattern", "rot_q", "rot_k"):
            name = f"blocks.{layer}.attn.hook_{kind}"
            if name in model.hook_dict:
                hooks.append((name, lambda t, hook, key=(kind, layer): got.__setitem__(key, t[0])))
    B.run_until(model, tokens, hooks, stop_at=B.hook_name("z", max(layers)))
    return got


def dual_form(
    model: nn.Module,
    prompt,
    layers: Sequence[int] | None = None,
    *,
    scaled: bool = True,
    check_tol: float | None = None,
) -> DualForm:
    """The dual form of ``prompt`` (a ``tasks.Prompt``) at its recorded position.

    Checks that the captured keys reproduce ``hook_pattern`` (within ``check_tol``; default
    ``checks.tolerance`` of the model's dtype), so the keys are the ones attention really uses.
    """
    B.check_model(model)
    d = B.dims(model)
    layers = list(range(d.n_layers)) if layers is None else [int(x) for x in layers]
    param = next(model.parameters())
    if check_tol is None:
        check_tol = tolerance(param.dtype)
    tokens = torch.tensor([list(prompt.tokens)], device=param.device)
    if tokens.shape[1] > d.n_ctx:
        raise ValueError(f"prompt has {tokens.shape[1]} tokens but the context is {d.n_ctx}")
    with torch.no_grad():
        got = _capture(model, tokens, layers)
    rec = prompt.spans.record_pos
    rep = d.n_heads // d.n_kv_heads
    out: dict[str, list] = {k: [] for k in ("q", "relaxed", "z", "dk", "dv", "groups")}
    w: dict[str, list[Tensor]] = {g: [] for g in GROUPS}
    for layer in layers:
        if ("rot_q", layer) in got:
            q, k = got["rot_q", layer], got["rot_k", layer]
        else:
            q, k = B.attended_qk(model, layer, got["q", layer][None], got["k", layer][None])
            q, k = q[0], k[0]
        v = got["v", layer]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q_rec = q[rec] / (B.attn_scale(model, layer) if scaled else 1.0)
        groups = token_groups(prompt.spans, d.windows[layer])
        visible = sorted(sum(groups.values(), []))
        _check_pattern(got["pattern", layer][:, rec], q[rec], k, visible, model, layer, check_tol)
        for g in GROUPS:
            w[g].append(operator(k, v, groups[g]))
        scores = torch.einsum("phd,hd->ph", k[visible], q_rec)
        out["relaxed"].append(torch.einsum("ph,phe->he", scores, v[visible]))
        out["q"].append(q_rec)
        out["z"].append(got["z", layer][rec])
        out["dk"].append(k[groups["demos"]])
        out["dv"].append(v[groups["demos"]])
        out["groups"].append(groups)
    return DualForm(
        layers=layers,
        q=torch.stack(out["q"]),
        w={g: torch.stack(w[g]) for g in GROUPS},
        relaxed=torch.stack(out["relaxed"]),
        softmax_z=torch.stack(out["z"]),
        demo_k=out["dk"],
        demo_v=out["dv"],
        groups=out["groups"],
    )


def _check_pattern(pattern_row, q, k, visible, model, layer, tol) -> None:
    """Raise if softmax(q·k / scale) over ``visible`` differs from the model's pattern row."""
    scores = torch.einsum("phd,hd->hp", k[visible], q) / B.attn_scale(model, layer)
    ours = scores.softmax(-1)
    err = float((ours - pattern_row[:, visible]).abs().max())
    if err > tol:
        raise RuntimeError(
            f"blocks.{layer}: keys from the hooks do not reproduce hook_pattern (error {err:.2g});"
            " this architecture transforms q/k after hook_q/hook_k (norms, soft-caps?), so the "
            "dual form cannot be read from hooks here"
        )


# --------------------------------------------------------------------------- comparisons


def frobenius_cosine(
    a: Float[Tensor, "*batch m n"], b: Float[Tensor, "*batch m n"], eps: float = 1e-30
) -> Float[Tensor, "*batch"]:
    """Cosine of two matrices as flattened vectors: ⟨A, B⟩_F / (‖A‖_F ‖B‖_F); NaN if either is 0."""
    a, b = a.flatten(-2).double(), b.flatten(-2).double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.full_like(num, float("nan")))


def vector_cosine(a: Tensor, b: Tensor, eps: float = 1e-30) -> Tensor:
    """Cosine over the last dim; NaN if either vector is 0."""
    a, b = a.double(), b.double()
    den = a.norm(dim=-1) * b.norm(dim=-1)
    num = (a * b).sum(-1)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.full_like(num, float("nan")))


@dataclass
class DualAnalysis:
    """Output of :func:`dual_analysis`.

    ``tensors``: name -> float64 [example, layer, head] (names, kinds, definitions: ``METRICS``);
    the object is also a read-only mapping over them (``result["cos_icl_ft"]``, ``.items()``).
    ``frame``: one row per (example, layer, head): ``example``, ``example_id``, ``layer``,
    ``head`` and one column per metric. ``info``: settings and definitions.
    """

    tensors: dict[str, Tensor]
    frame: pd.DataFrame
    info: dict

    # dict-like access to ``tensors``: ``for name, t in result.items()``
    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    def kind(self, name: str) -> str:
        """The metric's kind: result, baseline or diagnostic (see ``METRICS``)."""
        return METRICS[name][0]

    def summary(self) -> pd.DataFrame:
        """Per-layer means over examples and heads (NaN-aware), plus an ``all`` row."""
        cols = [c for c in self.frame.columns if c not in ("example", "example_id", "head")]
        per_layer = self.frame[cols].groupby("layer").mean()
        per_layer.loc["all"] = per_layer.mean()
        return per_layer


METRICS = {  # name: (kind, definition); kind is "result", "baseline" or "diagnostic"
    "cos_icl_ft": ("result", "Frobenius cosine of ΔW_ICL and ΔW_FT"),
    "cos_icl_ft_shuffled": ("baseline", "Frobenius cosine of ΔW_ICL and shuffled-label ΔW_FT"),
    "cos_icl_uniform": ("baseline", "Frobenius cosine of ΔW_ICL and a U[0,1) matrix (paper's)"),
    "cos_icl_gaussian": ("baseline", "Frobenius cosine of ΔW_ICL and an N(0,1) matrix"),
    "cos_icl_zsl": ("baseline", "Frobenius cosine of ΔW_ICL and W_ZSL (ZS prompt): any v k^T sum"),
    "act_icl_ft": ("result", "cos(ΔW_ICL q_zs, ΔW_FT q_zs): actions on the base ZS query"),
    "act_icl_ft_shuffled": ("baseline", "cos(ΔW_ICL q_zs, ΔW_FT^shuffled q_zs)"),
    "act_icl_uniform": ("baseline", "cos(ΔW_ICL q_zs, U q_zs)"),
    "act_icl_gaussian": ("baseline", "cos(ΔW_ICL q_zs, G q_zs)"),
    "act_icl_ft_own": ("result", "cos(ΔW_ICL q_icl, ΔW_FT q_ft): each on its own query"),
    "norm_icl": ("diagnostic", "‖ΔW_ICL‖_F"),
    "norm_ft": ("diagnostic", "‖ΔW_FT‖_F"),
    "norm_zsl": ("diagnostic", "‖W_ZSL‖_F of the base model on the ZS prompt"),
    "linear_vs_softmax": ("diagnostic", "cos(linear-attention output, real hook_z), ICL prompt"),
    "dual_residual": ("diagnostic", "max abs error of the dual-form identity, ICL prompt"),
}


def dual_analysis(
    model: nn.Module,
    prompts_icl: Sequence,
    prompts_zs: Sequence,
    demos: Sequence,
    lr: float,
    task=None,
    tokenizer=None,
    layers: Sequence[int] | None = None,
    *,
    mode: str = "standard",
    shuffled: bool = True,
    scaled: bool = True,
    seed: int = 0,
    progress: bool = False,
    train_dtype: str = "float32",
) -> DualAnalysis:
    """Compare ΔW_ICL with ΔW_FT per (example, layer, head), with random baselines.

    ``prompts_icl[e]`` and ``prompts_zs[e]`` are the same query with and without ``demos``;
    FT trains K/V on ``demos`` (``finetune.finetuned``, ``mode``) and is undone on return.
    ``shuffled`` adds an FT on ``baselines.shuffle_labels(demos, seed)`` (needs ``Example``
    demos with at least two labels; skipped otherwise). Random matrices come from
    ``torch.Generator().manual_seed(seed)``, one per (example, layer, head). ``train_dtype``:
    what FT trains in (``finetuned``).
    """
    from icl_lens.checks import refuse_autocast
    from icl_lens.finetune import check_ft_args, finetuned

    check_ft_args(mode, [lr], train_dtype)
    refuse_autocast("dual_analysis")
    if len(prompts_icl) != len(prompts_zs) or not prompts_icl:
        raise ValueError("need equally many (>= 1) ICL and ZS prompts, one pair per example")
    for pi, pz in zip(prompts_icl, prompts_zs, strict=True):
        if pi.example_id != pz.example_id or pz.n_demos != 0:
            raise ValueError(
                f"prompt pair {pi.example_id!r}/{pz.example_id!r}: not the same query, or the "
                "ZS prompt has demos; build both from one Example"
            )
    layers = list(range(B.dims(model).n_layers)) if layers is None else list(layers)
    kw = dict(layers=layers, scaled=scaled)
    bar = dict(disable=not progress)
    icl = [dual_form(model, p, **kw) for p in tqdm(prompts_icl, desc="dual ICL", **bar)]
    zs = [dual_form(model, p, **kw) for p in tqdm(prompts_zs, desc="dual ZS", **bar)]
    ft_kw = dict(mode=mode, task=task, tokenizer=tokenizer, record_queries=False,
                 train_dtype=train_dtype)  # fmt: skip
    kv = B.kv_parameters(model)
    kv0 = [p.detach().clone() for p in kv]
    with finetuned(model, demos, lr, **ft_kw) as state:
        ft = [dual_form(model, p, **kw) for p in tqdm(prompts_zs, desc="dual FT", **bar)]
        # how much of FT's update (its fp32 deltas) the FT model loses to rounding: none where
        # the update enters as x·deltaᵀ (half precision, finetune._update_applied), else what
        # the weights lose (round(W + delta)); the FT side below is read from the model
        if state.fast_paths.get("update_applied", {}).get("how") == "kv_deltas":
            rounding = 0.0
        else:
            rounding = rel_l2([p.detach() - w for p, w in zip(kv, kv0, strict=True)],
                              state.deltas)  # fmt: skip
    del kv0
    sh = None
    if shuffled and demos and len({getattr(d, "label", None) for d in demos}) > 1:
        with finetuned(model, shuffle_labels(demos, seed), lr, **ft_kw):
            sh = [dual_form(model, p, **kw) for p in prompts_zs]

    def stack(forms, fn):
        return torch.stack([fn(f) for f in forms]).double()

    dw_icl = stack(icl, lambda f: f.dw_icl)
    w_zsl = stack(zs, lambda f: f.w_zsl)
    dw_ft = stack(ft, lambda f: f.w_zsl) - w_zsl
    q_zs = stack(zs, lambda f: f.q)
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(dw_icl.shape, generator=gen, dtype=torch.float64)
    gauss = torch.randn(dw_icl.shape, generator=gen, dtype=torch.float64)

    def act(w, q):
        return torch.einsum("xlhed,xlhd->xlhe", w, q)

    a_icl = act(dw_icl, q_zs)
    t = {
        "cos_icl_ft": frobenius_cosine(dw_icl, dw_ft),
        "cos_icl_uniform": frobenius_cosine(dw_icl, uniform),
        "cos_icl_gaussian": frobenius_cosine(dw_icl, gauss),
        "cos_icl_zsl": frobenius_cosine(dw_icl, w_zsl),
        "act_icl_ft": vector_cosine(a_icl, act(dw_ft, q_zs)),
        "act_icl_uniform": vector_cosine(a_icl, act(uniform, q_zs)),
        "act_icl_gaussian": vector_cosine(a_icl, act(gauss, q_zs)),
        "act_icl_ft_own": vector_cosine(
            act(dw_icl, stack(icl, lambda f: f.q)), act(dw_ft, stack(ft, lambda f: f.q))
        ),
        "norm_icl": dw_icl.flatten(-2).norm(dim=-1),
        "norm_ft": dw_ft.flatten(-2).norm(dim=-1),
        "norm_zsl": w_zsl.flatten(-2).norm(dim=-1),
        "linear_vs_softmax": vector_cosine(
            stack(icl, lambda f: f.relaxed), stack(icl, lambda f: f.softmax_z)
        ),
        "dual_residual": torch.tensor([f.residual() for f in icl], dtype=torch.float64)[
            :, None, None
        ].expand(dw_icl.shape[:3]),
    }
    if sh is not None:
        dw_sh = stack(sh, lambda f: f.w_zsl) - w_zsl
        t["cos_icl_ft_shuffled"] = frobenius_cosine(dw_icl, dw_sh)
        t["act_icl_ft_shuffled"] = vector_cosine(a_icl, act(dw_sh, q_zs))
    t = {k: v.contiguous() for k, v in t.items()}
    n_ex, n_l, n_h = dw_icl.shape[:3]
    ex, li, hi = np.meshgrid(np.arange(n_ex), np.arange(n_l), np.arange(n_h), indexing="ij")
    frame = pd.DataFrame(
        {
            "example": ex.ravel(),
            "example_id": np.asarray([p.example_id for p in prompts_icl])[ex.ravel()],
            "layer": np.asarray(layers)[li.ravel()],
            "head": hi.ravel(),
            **{k: v.reshape(-1).numpy() for k, v in t.items()},
        }
    )
    info = {
        "lr": lr,
        "mode": mode,
        "scaled": scaled,
        "layers": layers,
        "seed": seed,
        "n_examples": n_ex,
        "record": prompts_icl[0].record,
        "groups": "query = query input..recorded token; demos = demo inputs+labels; "
        "other = BOS+separators",
        "dw_ft": "W_ZSL[FT model, ZS prompt] - W_ZSL[base, ZS prompt]",
        "ft_weight_rounding": rounding,
        "ft_weight_rounding_means": "||(weights after FT - before) - FT's fp32 K/V deltas|| / "
        "||deltas||: the share of the update the model's dtype rounds away (0 in fp32, and 0 "
        "where the update enters the K/V activations exactly: finetune's update_applied)",
        "metrics": {k: METRICS[k][1] for k in t},
        "kinds": {k: METRICS[k][0] for k in t},
    }
    return DualAnalysis(tensors=t, frame=frame, info=info)


__all__ = [
    "GROUPS",
    "METRICS",
    "DualAnalysis",
    "DualForm",
    "check_linear_dual_form",
    "dual_analysis",
    "dual_form",
    "frobenius_cosine",
    "operator",
    "token_groups",
    "vector_cosine",
]
