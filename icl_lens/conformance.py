"""Architecture conformance: does icl-lens compute the right numbers on the installed TL?

For each architecture in ``ARCHITECTURES``, ``build_tiny_checkpoint`` writes a tiny random HF
checkpoint (2-3 layers, GQA and sliding windows where the architecture has them) with a
word-level tokenizer, and ``check_architecture`` runs every check against the model's own
forward pass on the installed TransformerLens backend:

- ``load``: ``models.load_model(directory)`` builds it, with the HF model's log-probs;
- ``shared_prefix``: shared-prefix records equal full-prompt records and a naive per-prompt run;
- ``split_attention``: where the backend has split-prefix attention
  (``backend.split_attention_unsupported``), capture's self-check accepts it and its records
  equal full-prompt records; ``"n/a: <reason>"`` where it does not run;
- ``pre_softmax``: the scores of ``backend.attn_scores_hooks`` softmax to ``hook_pattern`` and
  equal what the HF model's own eager attention feeds its softmax (a shift softmax cannot see);
- ``label_logits``: captured label-word logits equal the model's own logits (soft caps, biases);
- ``windows``: ``backend.dims(model).windows`` equals the HF model's sliding windows, and the
  visible-key masks are the pattern's non-zeros;
- ``ft_restore``: ``finetune.finetuned`` changes exactly the K/V parameters and restores every
  parameter and buffer bit for bit;
- ``experiment``: ``experiment.run_experiment`` runs and every value is finite or undefined
  for a stated reason;
- ``kv_params``: the trained K/V tensors are the checkpoint's own (no bias it lacks), with the
  same number of trained scalars (``kv_scalars``) on both backends.

Each check reads ``"pass"``, ``"fail: <reason>"``, ``"refused: <one-line error>"`` (a clean
refusal names the architecture) or, for a check that does not apply, ``"n/a: <reason>"``.
``python -m icl_lens.conformance`` prints the table.
"""

from __future__ import annotations

import inspect
import math
import re
import tempfile
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from icl_lens import backend as B
from icl_lens.checks import tolerance

ARCHITECTURES: tuple[str, ...] = (
    "gpt2", "gpt_neox", "llama", "qwen2", "opt", "gemma2", "gemma3", "mistral", "phi", "phi3",
)  # fmt: skip
CHECKS: tuple[str, ...] = (
    "load", "shared_prefix", "split_attention", "pre_softmax", "label_logits", "windows",
    "ft_restore", "experiment", "kv_params",
)  # fmt: skip
WINDOW = 8  # sliding window of gemma2/gemma3/mistral: prompts are ~30-40 tokens
N_DEMOS = 8
N_EVAL = 4
LR = 0.05
# relative to the reference's magnitude; the tiny checkpoints are built in fp32
TOL = tolerance(torch.float32)

_SLIDE, _FULL = "sliding_attention", "full_attention"
_HF_CLASSES = {
    "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM", "mistral": "MistralForCausalLM", "phi": "PhiForCausalLM",
    "phi3": "Phi3ForCausalLM",
}  # fmt: skip


# --------------------------------------------------------------------------- checkpoints


def tiny_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``icl_lens.toy``'s vocabulary.

    Words split on spaces, ``"\\n"`` is its own token; label words (``" A"``, ``" B"``) and
    items (``w0..w47``) are single tokens. BOS is ``<bos>`` (also EOS), PAD ``<pad>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from icl_lens.toy import ToyTokenizer

    vocab = {t: i for i, t in enumerate(ToyTokenizer().vocab)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def _hf_config(arch: str, vocab: int) -> Any:
    """The tiny ``transformers`` config of ``arch``."""
    import transformers as T

    ids = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, **ids,
    )  # fmt: skip
    if arch == "gpt2":
        return T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=128,
                            initializer_range=0.2, **ids)  # fmt: skip
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128,
                               rotary_pct=0.5, initializer_range=0.2, **ids)  # fmt: skip
    if arch == "llama":
        return T.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return T.Qwen2Config(**llama_like)
    if arch == "mistral":
        return T.MistralConfig(**llama_like, sliding_window=WINDOW)
    if arch == "phi3":
        return T.Phi3Config(**llama_like)
    if arch == "opt":
        return T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=32, max_position_embeddings=128, init_std=0.2,
                           **ids)  # fmt: skip
    if arch == "phi":  # no GQA, as every released Phi-1/1.5/2 (TL 3 refuses a GQA Phi)
        kw = {k: v for k, v in llama_like.items() if k != "num_key_value_heads"}
        return T.PhiConfig(**kw, partial_rotary_factor=0.5)
    if arch == "gemma2":
        return T.Gemma2Config(
            **{**llama_like, "num_hidden_layers": 3}, head_dim=8, query_pre_attn_scalar=8,
            sliding_window=WINDOW, layer_types=[_SLIDE, _FULL, _SLIDE],
            final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
        )  # fmt: skip
    if arch == "gemma3":
        return T.Gemma3TextConfig(
            **{**llama_like, "num_hidden_layers": 3}, head_dim=8, query_pre_attn_scalar=8,
            sliding_window=WINDOW, layer_types=[_SLIDE, _SLIDE, _FULL],
        )  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def build_tiny_checkpoint(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight HF checkpoint of ``arch`` and its tokenizer to ``directory``.

    Weights are drawn from the architecture's own initialiser, then every tensor (biases and
    norm weights included) gets noise, so that no parameter is trivially zero or one.
    """
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = _hf_config(arch, len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    hf.config.architectures = [type(hf).__name__]
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------- helpers


class _Fail(Exception):
    """A check found a wrong number."""


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _names_arch(message: str, names: Sequence[str]) -> bool:
    """Whether ``message`` names the architecture: its HF class name, or its key as a word."""
    low = message.lower()
    for name in names:
        if len(name) > 12 and _norm(name) in _norm(message):  # e.g. "Qwen2ForCausalLM"
            return True
        if re.search(rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])", low):
            return True
    return False


def _arch_names(arch: str) -> tuple[str, ...]:
    """How a message may name ``arch``: its key, HF model type and HF class."""
    return (arch, _hf_config(arch, 8).model_type, _HF_CLASSES[arch])


def _rel(a: Tensor, b: Tensor) -> float:
    """``max|a - b|`` relative to ``b``'s magnitude (at least 1)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise _Fail(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def _capture(model, prompts, label_ids, **kw):
    """``capture`` with its own self-checks off (when it has them): the raw paths are checked."""
    from icl_lens.capture import capture

    if "self_check" in inspect.signature(capture).parameters:
        kw.setdefault("self_check", False)
    return capture(model, prompts, label_ids, progress=False, **kw)


def _hf_kv_bias(hf_model: nn.Module) -> bool:
    """Whether the HF model's attention K/V projections have biases (the reference for
    ``backend.named_kv_parameters``, kept independent of it)."""
    kv = ("k_proj", "v_proj", "key", "value", "c_attn", "query_key_value", "qkv_proj", "Wqkv")
    for name, _ in hf_model.named_parameters():
        parts = name.split(".")
        if parts[-1] == "bias" and any(p in kv for p in parts[:-1]):
            return True
    return False


def _hf_kv_scalars(hf_model: nn.Module) -> int:
    """The number of K and V projection scalars (weights + biases) of the HF checkpoint."""
    c = hf_model.config
    get = c.get_text_config() if hasattr(c, "get_text_config") else c
    d_model = get.hidden_size
    heads = get.num_attention_heads
    kv = getattr(get, "num_key_value_heads", None) or heads
    d_head = getattr(get, "head_dim", None) or d_model // heads
    per = d_model * kv * d_head + (kv * d_head if _hf_kv_bias(hf_model) else 0)
    return 2 * per * get.num_hidden_layers


def _hf_windows_probe(hf_model: nn.Module, tokens: Tensor) -> tuple[int | None, ...]:
    """Per-layer visible keys of the last row of the HF model's own eager attention."""
    impl = getattr(hf_model.config, "_attn_implementation", None)
    hf_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = hf_model(input_ids=tokens, output_attentions=True, use_cache=False)
    finally:
        hf_model.config._attn_implementation = impl
    n = tokens.shape[1]
    seen = [int((a[0, :, -1] > 0).any(0).sum()) for a in out.attentions]
    return tuple(None if s == n else s for s in seen)


# --------------------------------------------------------------------------- the checks


class _Ctx:
    """What every check of one architecture shares."""

    def __init__(self, arch: str, directory: Path):
        from icl_lens.tasks import build_prompt, label_token_ids
        from icl_lens.toy import ToyTokenizer, toy_episode, toy_task

        self.arch, self.directory = arch, directory
        self.names = _arch_names(arch)
        self.model: nn.Module | None = None
        self.task = toy_task(2)
        self.demos, self.evals = toy_episode(seed=1, n_demos=N_DEMOS, n_eval=N_EVAL,
                                             tokenizer=ToyTokenizer())  # fmt: skip
        self._build_prompt, self._label_ids = build_prompt, label_token_ids
        self.extra: dict[str, Any] = {}

    def hf(self) -> nn.Module:
        """The checkpoint as a plain transformers model (eager attention): the reference."""
        if "hf" not in self.extra:
            from icl_lens.models import load_hf_model

            self.extra["hf"] = load_hf_model(str(self.directory))[0]
        return self.extra["hf"]

    def prompts(self, demos: bool = True):
        tok = self.model.tokenizer
        d = self.demos if demos else []
        return [self._build_prompt(self.task, tok, q, d) for q in self.evals]

    @property
    def label_ids(self) -> list[int]:
        return self._label_ids(self.task, self.model.tokenizer)


def _check_load(ctx: _Ctx) -> None:
    from icl_lens.models import load_model, verify_against_hf

    ctx.model = load_model(str(ctx.directory), progress=False)
    if getattr(ctx.model, "tokenizer", None) is None:
        raise _Fail("the loaded model has no tokenizer")
    ctx.label_ids  # noqa: B018 - label words must be single tokens of the loaded tokenizer
    agree = verify_against_hf(ctx.model, ctx.hf(), torch.tensor([ctx.prompts()[0].tokens]))
    if not agree.max_abs_diff <= TOL:
        raise _Fail(f"log-probs off the HF model's by {agree.max_abs_diff:.2g}")


@torch.no_grad()
def _naive(model: nn.Module, prompt, label_ids: list[int]) -> dict[str, Tensor]:
    """One prompt, one plain forward pass, full logits."""
    d = B.dims(model)
    r = prompt.spans.record_pos
    kept: dict[str, dict[int, Tensor]] = {"attn_out": {}, "scores": {}}
    hooks = []
    for layer in range(d.n_layers):
        hooks.append(
            (
                B.hook_name("attn_out", layer),
                lambda t, hook, layer=layer: kept["attn_out"].update({layer: t[0, r]}),
            )
        )
        hooks += B.attn_scores_hooks(
            model, layer, lambda t, layer=layer: kept["scores"].update({layer: t[0]})
        )
    logits = B.run_until(model, torch.tensor([prompt.tokens]), hooks)
    scores = torch.stack([kept["scores"][layer][:, r] for layer in range(d.n_layers)])
    return {
        "label_logits": logits[0, prompt.spans.predict_pos, label_ids],
        "attn_out": torch.stack([kept["attn_out"][layer] for layer in range(d.n_layers)]),
        "row": scores,  # [layer, head, key]
    }


def _check_shared_prefix(ctx: _Ctx) -> None:
    prompts = ctx.prompts()
    full = _capture(ctx.model, prompts, ctx.label_ids, shared_prefix=False, batch_size=3)
    fast = _capture(ctx.model, prompts, ctx.label_ids, shared_prefix=True, batch_size=3)
    if not fast.prefix_cached:
        raise _Fail("shared_prefix=True did not use the prefix cache")
    _same_records(fast, full, "shared prefix")
    demo = prompts[0].spans.demo_token_positions()
    for i, p in enumerate(prompts):
        ref = _naive(ctx.model, p, ctx.label_ids)
        q0, r = p.spans.query[0], p.spans.record_pos
        pairs = {
            "label_logits": (full.label_logits[i], ref["label_logits"]),
            "attn_out": (full.attn_out[i], ref["attn_out"]),
        }
        qm, dm = full.query_mask[i, :, : r + 1 - q0], full.demo_mask[i]
        q_ref = ref["row"][:, :, q0 : r + 1]
        d_ref = ref["row"][:, :, demo]
        qm, dm = qm[:, None].expand_as(q_ref), dm[:, None].expand_as(d_ref)
        pairs["query_scores"] = (full.query_scores[i, :, :, : r + 1 - q0][qm], q_ref[qm])
        pairs["demo_scores"] = (full.demo_scores[i][dm], d_ref[dm])
        for name, (got, want) in pairs.items():
            diff = _rel(got.float().cpu(), want.float().cpu())
            if not diff <= TOL:
                raise _Fail(f"naive full forward: {name} off by {diff:.2g}")


def _scores_and_pattern(model: nn.Module, tokens: Tensor) -> tuple[dict, dict]:
    scores, pattern = {}, {}
    hooks = []
    for layer in range(B.dims(model).n_layers):
        hooks += B.attn_scores_hooks(model, layer, lambda t, layer=layer: scores.update({layer: t}))
        hooks.append((B.hook_name("pattern", layer),
                      lambda t, hook, layer=layer: pattern.update({layer: t})))  # fmt: skip
    with torch.no_grad():
        B.run_until(model, tokens, hooks)
    return scores, pattern


class _NotApplicable(Exception):
    """The check does not apply to this architecture on this backend (the reason)."""


def _check_split_attention(ctx: _Ctx) -> None:
    why = B.split_attention_unsupported(ctx.model)
    if why is not None:
        raise _NotApplicable(why)
    from icl_lens.capture import capture

    prompts = ctx.prompts()
    full = _capture(ctx.model, prompts, ctx.label_ids, shared_prefix=False, batch_size=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = capture(ctx.model, prompts, ctx.label_ids, batch_size=3, progress=False)
    used = fast.checks.get("prefix_cache", {}).get("attention")
    if used != "split":
        said = "; ".join(str(w.message) for w in caught) or "no warning"
        raise _Fail(f"the self-check did not accept split-prefix attention ({said})")
    _same_records(fast, full, "split attention", extra=("q",))


def _same_records(fast, full, path: str, extra: tuple[str, ...] = ()) -> None:
    """``fast``'s records equal ``full``'s (values within TOL, visible-key masks exactly)."""
    for name in ("label_logits", "attn_out", "query_scores", "demo_scores", *extra):
        diff = _rel(getattr(fast, name), getattr(full, name))
        if not diff <= TOL:
            raise _Fail(f"{path}: {name} off by {diff:.2g}")
    for name in ("query_mask", "demo_mask"):
        if not torch.equal(getattr(fast, name), getattr(full, name)):
            raise _Fail(f"{path}: {name} differs")


@torch.no_grad()
def _hf_softmax_inputs(hf_model: nn.Module, tokens: Tensor) -> list[Tensor]:
    """What the HF model's own eager attention feeds its softmax, layer by layer."""
    import torch.nn.functional as F

    seen: list[Tensor] = []
    softmax = F.softmax

    def recording(x, *args, **kwargs):
        if isinstance(x, Tensor) and x.dim() == 4:
            seen.append(x.detach().clone())
        return softmax(x, *args, **kwargs)

    impl = getattr(hf_model.config, "_attn_implementation", None)
    hf_model.config._attn_implementation = "eager"
    F.softmax = recording
    try:
        hf_model(input_ids=tokens, use_cache=False)
    finally:
        F.softmax = softmax
        hf_model.config._attn_implementation = impl
    return seen


def _check_pre_softmax(ctx: _Ctx) -> None:
    tokens = torch.tensor([ctx.prompts()[0].tokens])
    scores, pattern = _scores_and_pattern(ctx.model, tokens)
    n_layers = B.dims(ctx.model).n_layers
    if len(pattern) != n_layers or len(scores) != n_layers:
        raise _Fail("hook_pattern or the score hooks did not fire in every layer")
    worst = max(float((s.double().softmax(-1) - pattern[layer].double()).abs().max())
                for layer, s in scores.items())  # fmt: skip
    if worst > 1e-5:
        why = f"softmax(scores) differs from hook_pattern by {worst:.2g}"
        try:  # capture's own run-time check should refuse such a model
            from icl_lens.capture import capture

            capture(ctx.model, ctx.prompts()[:2], ctx.label_ids, progress=False)
        except Exception as e:  # noqa: BLE001
            if _names_arch(str(e), ctx.names) and "\n" not in str(e).strip():
                raise RuntimeError(str(e)) from None
            raise _Fail(f"{why}; capture raised {_one_line(e)}") from None
        raise _Fail(f"{why}, and capture did not refuse")
    # the same scores as the HF model's own softmax input (softmax cannot see a row shift)
    ref = _hf_softmax_inputs(ctx.hf(), tokens)
    if len(ref) != n_layers:
        raise _Fail(f"the HF reference ran {len(ref)} softmaxes for {n_layers} layers")
    for layer in range(n_layers):
        want = ref[layer][0].double()
        got = scores[layer][0].double().cpu()
        visible = want.softmax(-1) > 0
        if not torch.equal(visible, torch.isfinite(got) & (got > -1e30)):
            raise _Fail(f"layer {layer}: masked keys differ from the HF model's")
        diff = _rel(got[visible], want[visible])
        if not diff <= TOL:
            raise _Fail(f"layer {layer}: scores off the HF model's pre-softmax ones by {diff:.2g}")


def _check_label_logits(ctx: _Ctx) -> None:
    prompts = ctx.prompts()
    rec = _capture(ctx.model, prompts, ctx.label_ids, shared_prefix=False)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            logits = ctx.model(torch.tensor([p.tokens]))
            want = logits[0, p.spans.predict_pos, ctx.label_ids].float().cpu()
            diff = _rel(rec.label_logits[i], want)
            if not diff <= TOL:
                raise _Fail(f"label logits off the model's own by {diff:.2g}")


def _check_windows(ctx: _Ctx) -> None:
    prompts = ctx.prompts()
    want = _hf_windows_probe(ctx.hf(), torch.tensor([prompts[0].tokens]))
    have = B.dims(ctx.model).windows
    if tuple(have) != tuple(want):
        raise _Fail(f"dims().windows {list(have)} but the HF model's are {list(want)}")
    if ctx.arch in ("gemma2", "gemma3", "mistral") and all(w is None for w in want):
        raise _Fail("the checkpoint has no sliding window")
    rec = _capture(ctx.model, prompts, ctx.label_ids, shared_prefix=False)
    demo = prompts[0].spans.demo_token_positions()
    for i, p in enumerate(prompts):
        _, pattern = _scores_and_pattern(ctx.model, torch.tensor([p.tokens]))
        q0, r = p.spans.query[0], p.spans.record_pos
        for layer, pat in pattern.items():
            seen = (pat[0, :, r] > 0).all(0).cpu()
            if not torch.equal(rec.demo_mask[i, layer], seen[demo]):
                raise _Fail(f"layer {layer}: demo_mask differs from the pattern's non-zeros")
            if not torch.equal(rec.query_mask[i, layer, : r + 1 - q0], seen[q0 : r + 1]):
                raise _Fail(f"layer {layer}: query_mask differs from the pattern's non-zeros")
            w = have[layer]
            if int(seen.sum()) != (r + 1 if w is None else min(r + 1, w)):
                raise _Fail(f"layer {layer}: {int(seen.sum())} visible keys, window {w}")
    if any(w is not None for w in want) and bool(rec.demo_mask.all()):
        raise _Fail("no demonstration token is hidden by the sliding windows")


def _state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)}
    return params, buffers


def _check_ft_restore(ctx: _Ctx) -> None:
    from icl_lens.finetune import finetuned

    model = ctx.model
    kv = B.named_kv_parameters(model)
    named = dict(model.named_parameters(remove_duplicate=False))
    if not {id(p) for _, p in kv} <= {id(p) for p in named.values()}:
        raise _Fail("named_kv_parameters returned tensors that are not model parameters")
    before, buffers = _state(model)
    kv_before = [p.detach().clone() for _, p in kv]
    tokens = torch.tensor([ctx.prompts()[0].tokens])
    with torch.no_grad():
        logits = model(tokens)
    with finetuned(model, ctx.demos, LR, task=ctx.task, tokenizer=model.tokenizer) as st:
        if not all(math.isfinite(v) for v in st.losses):
            raise _Fail("FT loss is not finite")
        still = [n for (n, p), p0 in zip(kv, kv_before, strict=True)
                 if p.dim() > 1 and torch.equal(p, p0)]  # fmt: skip
        if still:
            raise _Fail(f"FT left K/V weights unchanged: {still[:3]}")
        with torch.no_grad():
            if (model(tokens) - logits).abs().max() <= 1e-6:
                raise _Fail("FT changed the K/V tensors but not the model's output")
            # every change is a K/V tensor's (fused QKV storage included): put the K/V values
            # back and nothing else may differ
            trained = [p.detach().clone() for _, p in kv]
            for (_, p), p0 in zip(kv, kv_before, strict=True):
                p.copy_(p0)
            stray = [n for n, p in named.items() if not torch.equal(p, before[n])]
            for (_, p), p1 in zip(kv, trained, strict=True):
                p.copy_(p1)
        if stray:
            raise _Fail(f"FT changed non-K/V parameters: {stray[:3]}")
    after, after_buf = _state(model)
    bad = [n for n in before if not torch.equal(before[n], after[n])]
    bad += [n for n in buffers if not torch.equal(buffers[n], after_buf[n])]
    if bad:
        raise _Fail(f"not restored bit for bit: {bad[:3]}")


def _check_experiment(ctx: _Ctx) -> None:
    from icl_lens.data import TaskData
    from icl_lens.experiment import run_experiment
    from icl_lens.toy import ToyTokenizer, toy_episode

    pool, evals = toy_episode(seed=2, n_demos=12, n_eval=6, tokenizer=ToyTokenizer())
    data = TaskData(ctx.task, evals, pool, "toy", {"source": "toy_episode", "seed": 2})
    res = run_experiment(ctx.model, ctx.task, n_demos=N_DEMOS, n_eval=6, seeds=(0,), data=data,
                         tokenizer=ctx.model.tokenizer, lr=LR, lr_sensitivity=False, n_boot=20,
                         progress=False)  # fmt: skip
    frame = res.to_frame()
    undefined = 0
    for row in frame.itertuples():
        value = row.value
        if value is not None and value == value and math.isfinite(value):
            continue
        if row.n == 0:  # undefined on an empty set: no example where ZS is wrong and FT right
            undefined += 1  # (Rec2FTP), a zero update (rotary layer 0), < 2 visible demos
            continue
        raise _Fail(f"{row.metric}/{row.variant} layer {row.layer} is {value} with n={row.n}")
    ctx.extra["experiment_rows"] = len(frame)
    ctx.extra["experiment_undefined"] = undefined


def _check_kv_params(ctx: _Ctx) -> None:
    hf = ctx.hf()
    named = B.named_kv_parameters(ctx.model)
    n = sum(p.numel() for _, p in named)
    ctx.extra["kv_scalars"] = n
    ctx.extra["kv_scalars_hf"] = want = _hf_kv_scalars(hf)
    biases = [name for name, _ in named if "b_" in name.split(".")[-1] or name.endswith("bias")]
    if biases and not _hf_kv_bias(hf):
        raise _Fail(f"trains {len(biases)} K/V bias tensors the checkpoint lacks ({biases[0]})")
    if n != want:
        raise _Fail(f"trains {n} K/V scalars, the checkpoint has {want}")


_RUNNERS: dict[str, Callable[[_Ctx], None]] = {
    "load": _check_load,
    "shared_prefix": _check_shared_prefix,
    "split_attention": _check_split_attention,
    "pre_softmax": _check_pre_softmax,
    "label_logits": _check_label_logits,
    "windows": _check_windows,
    "ft_restore": _check_ft_restore,
    "experiment": _check_experiment,
    "kv_params": _check_kv_params,
}


def _outcome(ctx: _Ctx, check: str) -> str:
    try:
        _RUNNERS[check](ctx)
    except _Fail as e:
        return f"fail: {e}"
    except _NotApplicable as e:
        return f"n/a: {e}"
    except Exception as e:  # noqa: BLE001 - every error is a result here
        line = _one_line(e)
        if "\n" not in str(e).strip() and _names_arch(str(e), ctx.names):
            return f"refused: {line}"
        where = traceback.extract_tb(e.__traceback__)[-1]
        return f"fail: unclean error ({line}) at {Path(where.filename).name}:{where.lineno}"
    return "pass"


def check_architecture(arch: str, directory: str | Path | None = None) -> dict[str, Any]:
    """Run every check on ``arch`` with the installed TL backend.

    ``directory``: where the tiny checkpoint is (written there if it has no config.json);
    None uses a temporary directory. Returns ``{"arch", "backend", <check>: outcome, ...,
    "kv_scalars", "kv_scalars_hf"}``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    try:
        return _check_architecture(arch, directory)
    finally:
        torch.set_num_threads(threads)


def _check_architecture(arch: str, directory: str | Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(directory) if directory is not None else Path(tmp) / arch
        if not (path / "config.json").is_file():
            build_tiny_checkpoint(arch, path)
        ctx = _Ctx(arch, path)
        row: dict[str, Any] = {"arch": arch, "backend": f"{B.BACKEND} (TL {B.TL_VERSION})"}
        for check in CHECKS:
            if ctx.model is None and check != "load":
                row[check] = row["load"] if row["load"].startswith("refused") else "fail: load"
                continue
            row[check] = _outcome(ctx, check)
        row["kv_scalars"] = ctx.extra.get("kv_scalars")
        row["kv_scalars_hf"] = ctx.extra.get("kv_scalars_hf")
        row["undefined_metrics"] = ctx.extra.get("experiment_undefined")
    return row


def conformance_table(archs: Sequence[str] = ARCHITECTURES) -> pd.DataFrame:
    """Architecture × check outcomes on the installed TL backend (one row per architecture)."""
    rows = [check_architecture(a) for a in archs]
    return pd.DataFrame(rows).set_index("arch")


def main(argv: Sequence[str] | None = None) -> None:
    """Print the conformance table of the installed backend as markdown.

    ``python -m icl_lens.conformance [arch ...]`` (default: every architecture).
    """
    import sys

    from icl_lens.results import to_markdown

    archs = list(sys.argv[1:] if argv is None else argv) or list(ARCHITECTURES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = conformance_table(archs)
    print(f"icl-lens conformance on {B.BACKEND} (transformer-lens {B.TL_VERSION})\n")
    print(to_markdown(table[[*CHECKS, "kv_scalars"]], col_formats={"kv_scalars": "g"}))


__all__ = [
    "ARCHITECTURES",
    "CHECKS",
    "build_tiny_checkpoint",
    "check_architecture",
    "conformance_table",
    "main",
    "tiny_tokenizer",
]


if __name__ == "__main__":
    main()
