"""Attn-only toy models, a word-level toy tokenizer and a synthetic in-context classification task.

The task gives every sequence a FRESH random mapping from item words to labels, so only the
demonstrations in the context can tell the model a query's label: zero-shot accuracy is chance
by construction, and whatever a toy scores above chance is in-context learning. A 2-layer
attn-only toy solves it with an induction-like circuit and is small enough to commit.

Text form (what ``tasks.build_prompt`` renders with ``toy_task()``)::

    <bos> w7 : A \\n w3 : B \\n ... \\n w7 : A      (template "{x} :", label words " A", " B")

The model predicts the label at the query's ":" (position -2) and the label sits at -1.
The committed toy (``load_toy()``: 2 layers, d_model 64, n_ctx 192) is trained on 1-47
demonstrations, i.e. every length its context holds.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from icl_lens import backend
from icl_lens.progress import tqdm
from icl_lens.tasks import Example, TaskSpec

ASSET_DIR = Path(__file__).parent / "assets"
DEFAULT_PATH = ASSET_DIR / "toy_icl.safetensors"
FORMAT = "icl_lens.toy/1"
SPECIALS = ("<bos>", "<pad>", "<unk>")
PUNCT = ("\n", ":")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WORD = re.compile(r"\n|[^\s]+")
_LN_EPS = 1e-5  # TL's LayerNorm eps, both versions

# --------------------------------------------------------------------------- tokenizer


class ToyTokenizer:
    """Word-level tokenizer over a fixed vocabulary (HF-like surface: encode/decode/ids).

    Splits on whitespace; ``"\\n"`` is its own token and spaces are dropped, so ``" A"`` is one
    token. Vocabulary: ``<bos> <pad> <unk>``, ``"\\n"``, ``":"``, the label words, ``w0..w{N-1}``.
    Unknown words raise ``ValueError`` (``strict=True``, the default: a silent ``<unk>`` would
    corrupt an experiment) or map to ``<unk>`` (``strict=False``). There is no separate EOS:
    ``eos_token_id`` is the BOS id, as in GPT-2.
    """

    def __init__(
        self, n_items: int = 48, label_words: Sequence[str] = ("A", "B"), strict: bool = True
    ) -> None:
        labels = tuple(w.strip() for w in label_words)
        if n_items < 1 or len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"need n_items >= 1 and >= 2 distinct label words, got {labels}")
        self.n_items = n_items
        self.label_tokens = labels
        self.strict = strict
        self.vocab: list[str] = [*SPECIALS, *PUNCT, *labels, *(f"w{i}" for i in range(n_items))]
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError(f"label words {labels} clash with the fixed vocabulary")
        self._ids = {t: i for i, t in enumerate(self.vocab)}
        self.bos_token, self.pad_token, self.unk_token = SPECIALS
        self.eos_token = self.bos_token
        self.padding_side = "right"

    # ids of the fixed tokens
    bos_token_id = property(lambda self: self._ids["<bos>"])
    pad_token_id = property(lambda self: self._ids["<pad>"])
    unk_token_id = property(lambda self: self._ids["<unk>"])
    eos_token_id = property(lambda self: self._ids["<bos>"])
    newline_id = property(lambda self: self._ids["\n"])
    colon_id = property(lambda self: self._ids[":"])

    @property
    def label_ids(self) -> list[int]:
        """Ids of the label words, in label order."""
        return [self._ids[w] for w in self.label_tokens]

    @property
    def item_ids(self) -> list[int]:
        """Ids of the item words ``w0..w{N-1}``."""
        return [self._ids[f"w{i}"] for i in range(self.n_items)]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token string(s) to id(s); a leading space is ignored (``" A"`` is ``"A"``)."""
        if isinstance(tokens, str):
            return self._id(tokens)
        return [self._id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int | np.integer):
            return self.vocab[int(ids)]
        return [self.vocab[int(i)] for i in ids]

    def _id(self, token: str) -> int:
        tid = self._ids.get(token if token in self._ids else token.lstrip(" "))
        if tid is None:
            if self.strict:
                raise ValueError(
                    f"unknown word {token!r} for the toy tokenizer (items are w0..w"
                    f"{self.n_items - 1}, labels {', '.join(self.label_tokens)})"
                )
            return self.unk_token_id
        return tid

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of ``text``; ``add_special_tokens=True`` prepends ``<bos>``."""
        ids = [self._id(t) for t in self.tokenize(text)]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | Tensor, skip_special_tokens: bool = False) -> str:
        """Inverse of ``encode``: words joined by spaces, ``"\\n"`` without spaces around it."""
        if isinstance(ids, Tensor):
            ids = ids.flatten().tolist()
        out = ""
        for i in ids:
            tok = self.vocab[int(i)]
            if skip_special_tokens and tok in SPECIALS:
                continue
            out += tok if tok == "\n" or not out or out.endswith("\n") else " " + tok
        return out

    def __call__(
        self,
        text: str | list[str],
        add_special_tokens: bool = False,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Minimal HF-style call -> ``{"input_ids", "attention_mask"}`` (no padding)."""
        batch = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens) for t in batch]
        if return_tensors == "pt":
            if len({len(x) for x in ids}) > 1:
                raise ValueError("ToyTokenizer does not pad; pass texts of equal token length")
            t = torch.tensor(ids, dtype=torch.long)
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} unsupported; use 'pt' or None")
        ids_out: Any = ids[0] if isinstance(text, str) else ids
        mask = [[1] * len(x) for x in ids]
        return {"input_ids": ids_out, "attention_mask": mask[0] if isinstance(text, str) else mask}

    def to_config(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "label_words": list(self.label_tokens),
            "vocab": self.vocab,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ToyTokenizer:
        tok = cls(cfg["n_items"], cfg["label_words"])
        if "vocab" in cfg and cfg["vocab"] != tok.vocab:
            raise ValueError("toy tokenizer config: stored vocab differs from the rebuilt one")
        return tok


def toy_task(n_labels: int = 2) -> TaskSpec:
    """The synthetic task's ``TaskSpec``: template ``"{x} :"``, label words ``" A"``, ``" B"``..."""
    if not 2 <= n_labels <= len(LETTERS):
        raise ValueError(f"n_labels must be in 2..{len(LETTERS)}, got {n_labels}")
    return TaskSpec(
        name="toy_icl",
        template="{x} :",
        label_words=tuple(f" {c}" for c in LETTERS[:n_labels]),
        text_fields=("x",),
        separator="\n",
    )


# --------------------------------------------------------------------------- synthetic data


class ToyBatch(NamedTuple):
    """Token sequences ``<bos> (item : label \\n)* item : label`` and their label bookkeeping.

    ``label_mask[b, t]``: ``tokens[b, t]`` is a label (predicted from position ``t - 1``).
    ``seen_mask[b, t]``: that label's item appeared earlier in the sequence (so it is solvable).
    """

    tokens: Int[Tensor, "batch pos"]
    label_mask: Bool[Tensor, "batch pos"]
    seen_mask: Bool[Tensor, "batch pos"]


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _n_items_per_seq(
    n_items: int | tuple[int, int] | None, n_demos: int, n_labels: int
) -> tuple[int, int]:
    """Range of distinct items per sequence; default: enough for about two repeats each."""
    if n_items is None:
        k = max(n_labels, min(8, max(1, n_demos // 2)))
        return k, k
    lo, hi = (n_items, n_items) if isinstance(n_items, int) else n_items
    if not 1 <= lo <= hi:
        raise ValueError(f"n_items must be >= 1 (or a range lo <= hi), got {n_items}")
    return lo, hi


def generate_batch(
    n_seq: int,
    n_demos: int,
    seed: int | np.random.Generator = 0,
    *,
    tokenizer: ToyTokenizer | None = None,
    n_labels: int = 2,
    n_items: int | tuple[int, int] | None = None,
    query_seen: bool = True,
    balanced: bool = False,
) -> ToyBatch:
    """``n_seq`` sequences of ``n_demos`` demonstrations plus one query, ``4 (n_demos + 1)`` tokens.

    Each sequence draws a few items (``n_items``, an int or an inclusive range) from the pool
    and a fresh uniform item->label mapping; every pair samples one of those items, so items
    repeat. With ``query_seen`` the query's item is one that occurs in the demonstrations.
    """
    tok = tokenizer or ToyTokenizer()
    if not 2 <= n_labels <= len(tok.label_ids):
        raise ValueError(f"n_labels={n_labels} but the tokenizer has {len(tok.label_ids)} labels")
    if n_demos < 0 or n_seq < 1:
        raise ValueError(f"need n_seq >= 1 and n_demos >= 0, got {n_seq}, {n_demos}")
    rng = _rng(seed)
    pool = tok.n_items
    lo, hi = _n_items_per_seq(n_items, n_demos, n_labels)
    if hi > pool:
        raise ValueError(f"n_items up to {hi} exceeds the item pool of {pool}")
    n_pairs = n_demos + 1
    k = rng.integers(lo, hi + 1, size=n_seq)
    chosen = np.argsort(rng.random((n_seq, pool)), axis=1)  # first k[b] columns: b's items
    if balanced:  # label r-th chosen item (r + offset) mod n_labels: a random balanced labelling
        offset = rng.integers(0, n_labels, size=(n_seq, 1))
        mapping = np.empty((n_seq, pool), dtype=np.int64)
        np.put_along_axis(mapping, chosen, (np.arange(pool) + offset) % n_labels, axis=1)
    else:  # fresh iid uniform labels
        mapping = rng.integers(0, n_labels, size=(n_seq, pool))
    slot = np.floor(rng.random((n_seq, n_pairs)) * k[:, None]).astype(np.int64)
    items = np.take_along_axis(chosen, slot, axis=1)
    if query_seen and n_demos > 0:
        j = rng.integers(0, n_demos, size=n_seq)
        items[:, -1] = items[np.arange(n_seq), j]
    labels = np.take_along_axis(mapping, items, axis=1)
    seen = ((items[:, :, None] == items[:, None, :]) & np.tri(n_pairs, k=-1, dtype=bool)).any(-1)

    item_ids = np.asarray(tok.item_ids)[items]
    label_ids = np.asarray(tok.label_ids)[labels]
    block = np.stack(
        [
            item_ids,
            np.full_like(item_ids, tok.colon_id),
            label_ids,
            np.full_like(item_ids, tok.newline_id),
        ],
        axis=-1,
    ).reshape(n_seq, 4 * n_pairs)
    tokens = np.concatenate([np.full((n_seq, 1), tok.bos_token_id), block[:, :-1]], axis=1)
    label_mask = np.zeros_like(tokens, dtype=bool)
    label_mask[:, 3::4] = True
    seen_mask = np.zeros_like(label_mask)
    seen_mask[:, 3::4] = seen
    return ToyBatch(
        torch.from_numpy(tokens).long(), torch.from_numpy(label_mask), torch.from_numpy(seen_mask)
    )


def toy_episode(
    seed: int,
    n_demos: int,
    n_eval: int,
    *,
    n_labels: int = 2,
    n_items: int | None = None,
    tokenizer: ToyTokenizer | None = None,
) -> tuple[list[Example], list[Example]]:
    """Demonstrations and evaluation examples sharing ONE fresh item->label mapping.

    ``n_items`` distinct items (default: about two demonstrations each, at most 8) get a
    balanced random labelling; each appears in the demonstrations, and evaluation cycles
    through them, so every evaluation item is solvable in context.
    """
    tok = tokenizer or ToyTokenizer()
    k = _n_items_per_seq(n_items, n_demos, n_labels)[0]
    if n_demos < k or k > tok.n_items or n_labels > len(tok.label_ids):
        raise ValueError(
            f"need n_items={k} <= n_demos={n_demos}, <= pool {tok.n_items}, "
            f"and n_labels={n_labels} <= {len(tok.label_ids)}"
        )
    rng = _rng(seed)
    items = rng.choice(tok.n_items, size=k, replace=False)
    labels = rng.permutation(np.arange(k) % n_labels)
    demo_slots = rng.permutation(np.concatenate([np.arange(k), rng.integers(0, k, n_demos - k)]))
    eval_slots = np.concatenate(
        [rng.permutation(k) for _ in range(math.ceil(n_eval / k))] or [np.zeros(0, int)]
    )[:n_eval]

    def ex(split: str, i: int, s: int) -> Example:
        return Example(f"toy-{seed}-{split}{i}", {"x": f"w{items[s]}"}, int(labels[s]))

    return (
        [ex("demo", i, s) for i, s in enumerate(demo_slots)],
        [ex("eval", i, s) for i, s in enumerate(eval_slots)],
    )


# --------------------------------------------------------------------------- accuracy


@torch.no_grad()
def toy_icl_accuracy(
    model: nn.Module,
    n_seq: int = 512,
    n_demos: int = 16,
    seed: int = 12345,
    with_demos: bool = True,
    *,
    tokenizer: ToyTokenizer | None = None,
    n_items: int | tuple[int, int] | None = None,
    balanced: bool = False,
    batch_size: int = 256,
) -> float:
    """Accuracy (argmax over label words at the query's ":") on fresh synthetic sequences.

    ``with_demos=False`` scores the same queries alone (``<bos> item : label``): zero-shot,
    chance by construction since every sequence has its own mapping.
    """
    tok = tokenizer or ToyTokenizer()
    n_ctx = backend.dims(model).n_ctx
    if with_demos and 4 * (n_demos + 1) > n_ctx:
        raise ValueError(f"{n_demos} demos need {4 * (n_demos + 1)} tokens > n_ctx={n_ctx}")
    batch = generate_batch(n_seq, n_demos, seed, tokenizer=tok, n_items=n_items, balanced=balanced)
    tokens = batch.tokens if with_demos else batch.tokens[:, -4:].clone()
    if not with_demos:
        tokens[:, 0] = tok.bos_token_id
    label_ids = torch.tensor(tok.label_ids)
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, n_seq, batch_size):
        chunk = tokens[i : i + batch_size].to(device)
        logits = model(chunk)[:, -2, label_ids.to(device)]
        target = (chunk[:, -1:] == label_ids.to(device)).float().argmax(-1)
        correct += int((logits.argmax(-1) == target).sum())
    return correct / n_seq


# --------------------------------------------------------------------------- training


def toy_forward(
    weights: dict[str, Tensor],
    tokens: Int[Tensor, "batch pos"],
    n_layers: int,
    resid_post: list[Tensor] | None = None,
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of an attn-only LayerNorm toy from its neutral weights (TL 3 names and shapes).

    The same function as ``backend.toy_model``'s forward (tests check it against both TLs), but
    with fused causal attention: 3-4x faster on CPU, which is what keeps training under 2 min.
    Each layer's residual output is appended to ``resid_post`` if given.
    """
    w = weights
    d_model = w["embed.W_E"].shape[1]
    x = w["embed.W_E"][tokens] + w["pos_embed.W_pos"][: tokens.shape[1]]
    for layer in range(n_layers):
        p = f"blocks.{layer}."
        h = F.layer_norm(x, (d_model,), w[p + "ln1.w"], w[p + "ln1.b"], eps=_LN_EPS)
        q, k, v = (
            einsum(h, w[p + f"attn.W_{c}"], "b t d, h d e -> b h t e")
            + w[p + f"attn.b_{c}"][:, None]
            for c in "QKV"
        )
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + einsum(z, w[p + "attn.W_O"], "b h t e, h e d -> b t d") + w[p + "attn.b_O"]
        if resid_post is not None:
            resid_post.append(x)
    x = F.layer_norm(x, (d_model,), w["ln_final.w"], w["ln_final.b"], eps=_LN_EPS)
    return x @ w["unembed.W_U"] + w["unembed.b_U"]


def _sinusoids(n_ctx: int, d_model: int) -> Float[Tensor, "pos d_model"]:
    """Transformer sinusoidal position codes (Vaswani et al.), unit amplitude."""
    pos = torch.arange(n_ctx, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, d_model, 2) / d_model)
    out = torch.zeros(n_ctx, d_model)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return out


def _curriculum(
    progress: float, n_demos: tuple[int, int], n_items: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Ranges at ``progress`` in [0, 1]: the longest sequence and the most items grow linearly.

    Short two-item sequences give the circuit its first gradient signal; full-length ones
    from the start leave training on a long loss plateau.
    """
    p = min(1.0, max(0.0, progress))
    hi_demos = round(min(n_demos[1], n_demos[0] + 3) * (1 - p) + n_demos[1] * p)
    hi_items = round(min(n_items[1], max(n_items[0], 2)) * (1 - p) + n_items[1] * p)
    return (n_demos[0], max(n_demos[0], hi_demos)), (n_items[0], max(n_items[0], hi_items))


_HINT_BACK = 2


def _hint_loss(
    resid0: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"], readout: Tensor
) -> Tensor:
    """Cross-entropy of throwaway linear readouts of layer 0's output predicting tokens t-1, t-2.

    A training hint, discarded afterwards: it builds layer 0's previous-token heads directly,
    which the induction-style circuit needs and otherwise finds only after a long plateau.
    """
    h = F.layer_norm(resid0, resid0.shape[-1:])
    losses = [
        F.cross_entropy(
            einsum(h[:, b:], readout[b - 1], "b t d, d v -> b t v").flatten(0, 1),
            tokens[:, :-b].flatten(),
        )
        for b in range(1, _HINT_BACK + 1)
    ]
    return sum(losses) / len(losses)


def _check_trainable(cfg: dict[str, Any]) -> None:
    if not (
        cfg["attn_only"]
        and cfg["positional_embedding_type"] == "standard"
        and cfg["normalization_type"] == "LN"
    ):
        raise NotImplementedError(
            f"train_toy supports attn-only, standard-position, LN toys: {cfg}"
        )


def train_toy(
    *,
    seed: int = 0,
    steps: int = 1600,
    batch_size: int = 32,
    lr: float = 1e-2,
    warmup: int = 100,
    weight_decay: float = 0.01,
    n_demos: tuple[int, int] = (1, 47),
    n_items: tuple[int, int] = (2, 10),
    lm_weight: float = 1.0,
    balanced: bool = False,
    curriculum: tuple[float, float] = (0.2, 0.6),
    p_longest: float = 0.25,
    hint_weight: float = 1.0,
    hint_steps: float = 0.8,
    sinusoidal_init: bool = True,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_ctx: int = 192,
    tokenizer: ToyTokenizer | None = None,
    threads: int | None = 1,
    progress: bool = True,
) -> tuple[nn.Module, ToyTokenizer, dict[str, Any]]:
    """Train an attn-only toy (``backend.toy_model``) on the synthetic task, deterministically.

    Loss: cross-entropy on every label token plus ``lm_weight`` x the all-token LM loss. AdamW,
    warmup, cosine decay, on a fused-attention mirror of the TL forward (``toy_forward``). A
    step's sequences have the longest allowed ``n_demos`` with probability ``p_longest``, else a
    uniform draw. Two aids cut the plateau before the induction-style circuit forms:

    - curriculum: two-item sequences of at most ``n_demos[0] + 3`` demonstrations until
      ``curriculum[0]`` x steps, then both ranges grow linearly to full at ``curriculum[1]``;
    - hint: throwaway readouts ask layer 0's output for tokens t-1 and t-2 (weight
      ``hint_weight``, decaying to 0 at ``hint_steps`` x steps; it must outlast the ramp, or
      the last positions never get their previous-token heads).

    ``sinusoidal_init`` starts the learned positions from sinusoids. The unembedding bias stays
    zero (TL 4 toys have none). Same seed and thread count, same weights. Returns
    ``(model, tokenizer, provenance)``; the model is the installed TL's class.
    """
    tok = tokenizer or ToyTokenizer()
    if 4 * (n_demos[1] + 1) > n_ctx:
        raise ValueError(f"n_demos up to {n_demos[1]} needs {4 * (n_demos[1] + 1)} > n_ctx={n_ctx}")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = backend.toy_model(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_vocab=len(tok),
        n_ctx=n_ctx,
        seed=seed,
    )
    _check_trainable(_model_config(model))
    weights = backend.neutral_state_dict(model)
    weights["unembed.b_U"] = torch.zeros_like(weights["unembed.b_U"])
    if sinusoidal_init:
        w_pos = weights["pos_embed.W_pos"]
        weights["pos_embed.W_pos"] = _sinusoids(*w_pos.shape) * w_pos.std() * math.sqrt(2)
    params = {k: v.requires_grad_() for k, v in weights.items() if k != "unembed.b_U"}
    hint = torch.zeros(_HINT_BACK, d_model, len(tok), requires_grad=True)  # discarded readouts
    decay = [v for k, v in params.items() if v.ndim > 1] + [hint]
    no_decay = [v for k, v in params.items() if v.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))),
    )
    losses: list[float] = []
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            bar = tqdm(range(steps), disable=not progress, desc="train toy", mininterval=1.0)
            for step in bar:
                ramp = (step / steps - curriculum[0]) / max(1e-9, curriculum[1] - curriculum[0])
                nd, items = _curriculum(ramp, n_demos, n_items)
                longest = rng.random() < p_longest  # the last positions need training too
                batch = generate_batch(
                    batch_size,
                    nd[1] if longest else int(rng.integers(nd[0], nd[1] + 1)),
                    rng,
                    tokenizer=tok,
                    n_items=items,
                    balanced=balanced,
                )
                resid: list[Tensor] = []
                logits = toy_forward(weights, batch.tokens, n_layers, resid)[:, :-1]
                targets = batch.tokens[:, 1:]
                mask = batch.label_mask[:, 1:]
                label_loss = F.cross_entropy(logits[mask], targets[mask])
                loss = label_loss
                if lm_weight:
                    lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                    loss = loss + lm_weight * lm_loss
                h_w = hint_weight * max(0.0, 1.0 - step / max(1.0, hint_steps * steps))
                if h_w > 0:
                    loss = loss + h_w * _hint_loss(resid[0], batch.tokens, hint)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                opt.step()
                sched.step()
                losses.append(label_loss.item())
                if len(losses) % 50 == 0:
                    bar.set_postfix(label_loss=f"{np.mean(losses[-50:]):.3f}")
    finally:
        torch.set_num_threads(old_threads)
    backend.load_neutral_state_dict(model, {k: v.detach() for k, v in weights.items()})
    model.eval()
    info = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "n_demos": list(n_demos),
        "n_items": list(n_items),
        "lm_weight": lm_weight,
        "balanced": balanced,
        "curriculum": list(curriculum),
        "p_longest": p_longest,
        "hint_weight": hint_weight,
        "hint_steps": hint_steps,
        "sinusoidal_init": sinusoidal_init,
        "threads": threads or old_threads,
        "train_seconds": round(time.perf_counter() - start, 1),
        "label_loss_first50": float(np.mean(losses[:50])),
        "label_loss_last50": float(np.mean(losses[-50:])),
        "losses": losses,
        **backend.tl_version_info(),
    }
    return model, tok, info


# --------------------------------------------------------------------------- checkpoints


def _model_config(model: nn.Module) -> dict[str, Any]:
    d = backend.dims(model)
    cfg = model.cfg
    return {
        "n_layers": d.n_layers,
        "d_model": d.d_model,
        "n_heads": d.n_heads,
        "d_head": d.d_head,
        "d_vocab": d.d_vocab,
        "n_ctx": d.n_ctx,
        "attn_only": bool(cfg.attn_only),
        "positional_embedding_type": d.positional,
        "normalization_type": getattr(cfg, "normalization_type", "LN"),
    }


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / DEFAULT_PATH.name if p.is_dir() or not p.suffix else p.with_suffix(".safetensors")
    return p, p.with_suffix(".json")


def save_toy(
    model: nn.Module,
    tokenizer: ToyTokenizer,
    path: str | Path = DEFAULT_PATH,
    training: dict[str, Any] | None = None,
    task: TaskSpec | None = None,
) -> Path:
    """Write ``<path>.safetensors`` (backend-neutral weights) and ``<path>.json`` (config)."""
    from safetensors.torch import save_file

    weights, meta = _paths(path)
    sd = backend.neutral_state_dict(model)
    if sd["unembed.b_U"].abs().max() > 0:
        raise ValueError("unembed.b_U is non-zero; TL 4 toys have no unembedding bias")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(weights))
    weights.chmod(0o644)
    task = task or toy_task(len(tokenizer.label_ids))
    config = {
        "format": FORMAT,
        "model": _model_config(model),
        "tokenizer": tokenizer.to_config(),
        "task": {
            "name": task.name,
            "template": task.template,
            "label_words": list(task.label_words),
            "separator": task.separator,
        },
        "training": training or {},
    }
    meta.write_text(json.dumps(config, indent=1) + "\n")
    return weights


def load_toy(
    path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ToyTokenizer, TaskSpec]:
    """The committed ICL toy (or one written by ``save_toy``) as the installed TL's native class."""
    from safetensors.torch import load_file

    weights, meta = _paths(path)
    if not weights.exists() or not meta.exists():
        raise FileNotFoundError(
            f"toy checkpoint {weights} (+ .json) not found; run scripts/make_toy.py"
        )
    config = json.loads(meta.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{meta} is not an icl_lens toy config (format {config.get('format')!r})")
    mc = config["model"]
    model = backend.toy_model(
        n_layers=mc["n_layers"],
        d_model=mc["d_model"],
        n_heads=mc["n_heads"],
        d_vocab=mc["d_vocab"],
        n_ctx=mc["n_ctx"],
        attn_only=mc["attn_only"],
        d_head=mc["d_head"],
        positional_embedding_type=mc["positional_embedding_type"],
        normalization_type=mc["normalization_type"],
    )
    backend.load_neutral_state_dict(model, load_file(str(weights)))
    model.to(device).eval()
    model.cfg.model_name = config.get("name", "icl-lens-toy")
    tc = config["task"]
    task = TaskSpec(
        name=tc["name"],
        template=tc["template"],
        label_words=tuple(tc["label_words"]),
        separator=tc["separator"],
    )
    return model, ToyTokenizer.from_config(config["tokenizer"]), task


__all__ = [
    "DEFAULT_PATH",
    "ToyBatch",
    "ToyTokenizer",
    "generate_batch",
    "load_toy",
    "save_toy",
    "toy_episode",
    "toy_forward",
    "toy_icl_accuracy",
    "toy_task",
    "train_toy",
]
