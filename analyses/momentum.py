"""Does momentum attention help? A controlled from-scratch experiment (Dai et al. 2022, §5).

Small attn-only transformers are trained from scratch with and without momentum attention
(``icl_lens.momentum``), same seeds, same data order, same steps; only the attention differs.

(a) ``toy``: the synthetic in-context classification task of ``icl_lens.toy`` (a fresh
    item->label mapping per sequence, so all accuracy above chance is in-context learning).
    Metrics: ICL accuracy at the query vs the number of demonstrations; label-token
    validation perplexity.
(b) ``text``: byte-level LM (256 bytes + BOS) on the StaICC texts (rotten_tomatoes, subjective,
    part of agnews; read with the safe unpickler; a fixed md5-of-text split into train and
    validation). 1 in 4 training sequences is a word->label episode in natural words
    (``"chair: good\\nriver: bad\\n..."``, a fresh mapping per sequence, words from the
    corpus), so that the tiny models have some in-context task to learn. Metrics: validation
    perplexity per byte on held-out text; ICL accuracy vs demonstrations on episodes built from
    validation-split words (first label byte scored, ``g`` vs ``b``).

Conditions (all layers): ``baseline``; ``momentum`` (fixed η = 0.1); ``momentum_long``
(η = 0.5, a longer memory); ``token_shift`` (control: only η·v_{t−1}, the first term of the
momentum sum, so any gain it matches is local token mixing, not an EMA); ``learnable``
(LearnableEMA initialised at η = 0.1). CIs: 95% percentile bootstrap over seeds and
evaluation sequences (two-level; differences paired by seed and sequence). Deterministic for
a given thread count.

    python analyses/momentum.py            # full run (~10 min on 2 idle CPU cores)
    python analyses/momentum.py --quick    # ~1 min smoke run (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import icl_lens
from icl_lens import backend as B
from icl_lens.data import read_staicc_file, staicc_file
from icl_lens.experiment import git_revision
from icl_lens.momentum import LearnableEMA, momentum_hooks, token_shift_hooks
from icl_lens.toy import ToyTokenizer, generate_batch

FIGURES = Path(__file__).resolve().parents[1] / "figures"
CONDITIONS = ("baseline", "momentum", "momentum_long", "token_shift", "learnable")
BOS = 256
LABEL_WORDS = ("good", "bad")  # first bytes differ: the label is scored on its first byte


@dataclass
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    eta: float = 0.1
    eta_long: float = 0.5
    conditions: tuple[str, ...] = CONDITIONS
    # toy task
    toy_steps: int = 400
    toy_d_model: int = 64
    toy_demos: tuple[int, int] = (1, 31)
    toy_ks: tuple[int, ...] = (1, 2, 4, 8, 16, 31)
    toy_eval: int = 512
    # text task
    text_steps: int = 300
    text_d_model: int = 96
    text_ctx: int = 128
    text_icl_frac: float = 0.25
    text_ks: tuple[int, ...] = (1, 2, 4, 8)
    text_eval_windows: int = 256
    text_eval: int = 512
    agnews_docs: int = 8000
    # shared
    n_layers: int = 2
    n_heads: int = 4
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    n_boot: int = 1000
    threads: int = 2
    extra: dict = field(default_factory=dict)


def quick(cfg: Config) -> Config:
    """A ~1 minute smoke configuration (numbers are meaningless; it exercises every path)."""
    return Config(
        seeds=(0, 1), toy_steps=8, text_steps=6, batch=16, toy_eval=48, text_eval=48,
        text_eval_windows=24, toy_ks=(2, 8), text_ks=(1, 4), agnews_docs=500, n_boot=200,
        toy_d_model=32, text_d_model=32, warmup=5, threads=cfg.threads,
    )  # fmt: skip


# --------------------------------------------------------------------------- training


def attention_context(model, condition: str, cfg: Config):
    """(context manager, extra parameters) for a condition."""
    hooks = {
        "baseline": lambda: [],
        "momentum": lambda: momentum_hooks(model, cfg.eta),
        "momentum_long": lambda: momentum_hooks(model, cfg.eta_long),
        "token_shift": lambda: token_shift_hooks(model, cfg.eta),
    }
    if condition in hooks:
        return model.hooks(fwd_hooks=hooks[condition]()), []
    if condition == "learnable":
        ema = LearnableEMA(model, eta0=cfg.eta)
        return ema.attached(model), list(ema.parameters())
    raise ValueError(f"unknown condition {condition!r}; use {CONDITIONS}")


def train(model, extra_params, batches, steps: int, cfg: Config, desc: str) -> list[float]:
    """AdamW, linear warmup + cosine decay, grad-clip 1; ``batches(step)`` -> (tokens, mask)."""
    params = [p for n, p in model.named_parameters() if not n.endswith(("b_U", "head.bias"))]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.endswith(("b_U", "head.bias")))
    opt = torch.optim.AdamW(params + extra_params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=2.0):
        tokens, mask = batches(step)
        logits = model(tokens)[:, :-1]
        targets = tokens[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + extra_params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
    model.eval()
    return losses


# --------------------------------------------------------------------------- (a) toy task


def run_toy(seed: int, condition: str, cfg: Config) -> dict:
    tok = ToyTokenizer()
    model = B.toy_model(
        n_layers=cfg.n_layers, d_model=cfg.toy_d_model, n_heads=cfg.n_heads, d_vocab=len(tok),
        n_ctx=4 * (max(cfg.toy_demos[1], *cfg.toy_ks) + 1), seed=seed,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    label_ids = torch.tensor(tok.label_ids)

    def batches(step):
        nd = int(rng.integers(cfg.toy_demos[0], cfg.toy_demos[1] + 1))
        b = generate_batch(cfg.batch, nd, rng, tokenizer=tok, n_items=(2, 12))
        weight = torch.full(b.tokens.shape, 0.1)  # all-token LM loss at weight 0.1 ...
        weight[b.label_mask] += 1.0  # ... plus the label-token loss
        return b.tokens, weight

    ctx, extra = attention_context(model, condition, cfg)
    out: dict = {"acc": {}}
    with ctx:
        losses = train(model, extra, batches, cfg.toy_steps, cfg, f"toy {condition} s{seed}")
        with torch.no_grad():
            for k in cfg.toy_ks:
                b = generate_batch(cfg.toy_eval, k, 10_000 + k, tokenizer=tok)
                logits = model(b.tokens)
                pred = logits[:, -2, label_ids].argmax(-1)
                gold = (b.tokens[:, -1:] == label_ids).float().argmax(-1)
                out["acc"][k] = (pred == gold).double().tolist()
            b = generate_batch(cfg.toy_eval, max(cfg.toy_ks), 20_000, tokenizer=tok)
            logp = model(b.tokens)[:, :-1].log_softmax(-1)
            nll = -logp.gather(-1, b.tokens[:, 1:, None])[..., 0]
            mask = b.label_mask[:, 1:] & b.seen_mask[:, 1:]
            out["nll"] = ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).double().tolist()
    out["train_loss_last"] = float(np.mean(losses[-20:]))
    return out


# --------------------------------------------------------------------------- (b) text task


def load_corpus(cfg: Config) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Train/val byte streams and word lists from StaICC texts (md5-of-text split, 1 in 20 val)."""
    texts: list[str] = []
    for name, cap in (("rotten_tomatoes", None), ("subjective", None), ("agnews", cfg.agnews_docs)):
        records = read_staicc_file(staicc_file(name))
        texts += [" ".join(t).strip() for t, _ in records[:cap]]
    texts = sorted(set(t for t in texts if t))
    is_val = [int(hashlib.md5(t.encode()).hexdigest(), 16) % 20 == 0 for t in texts]
    order = np.random.default_rng(0).permutation(len(texts))
    train = [texts[i] for i in order if not is_val[i]]
    val = [texts[i] for i in order if is_val[i]]

    def stream(docs):
        return np.frombuffer("\n".join(docs).encode("utf-8"), dtype=np.uint8).copy()

    def words(docs):
        ws = {w.lower() for d in docs for w in d.split() if w.isalpha() and 3 <= len(w) <= 6}
        return sorted(ws)

    return stream(train), stream(val), words(train), words(val)


def word_episode(rng, words, k: int, ctx: int) -> tuple[list[int], int]:
    """``BOS w: label\\n ... q:`` bytes (query's item seen in the demos) and the gold label."""
    n_items = max(2, min(6, k // 2 + 1))
    items = rng.choice(len(words), size=n_items, replace=False)
    labels = rng.permutation(np.arange(n_items) % 2)
    slots = np.concatenate(
        [np.arange(min(n_items, k)), rng.integers(0, n_items, max(0, k - n_items))]
    )
    slots = rng.permutation(slots)
    q = int(rng.choice(slots))
    text = "".join(f"{words[items[s]]}: {LABEL_WORDS[labels[s]]}\n" for s in slots)
    seq = [BOS, *f"{text}{words[items[q]]}:".encode()]
    if len(seq) + 2 > ctx:
        raise ValueError(f"{k} demonstrations do not fit a {ctx}-byte context; lower text_ks")
    return seq, int(labels[q])


def train_icl_sequence(rng, words, ctx: int) -> tuple[list[int], list[float]]:
    """A training episode (label bytes included), newline-padded to ``ctx``; loss mask."""
    k = int(rng.integers(2, 12))
    while True:
        seq, label = word_episode(rng, words, k, 10**6)
        seq += f" {LABEL_WORDS[label]}\n".encode()
        if len(seq) <= ctx or k == 1:
            seq = seq[:ctx]
            pad = ctx - len(seq)
            return seq + [ord("\n")] * pad, [1.0] * len(seq) + [0.0] * pad
        k -= 1


def run_text(seed: int, condition: str, cfg: Config, corpus) -> dict:
    train_bytes, val_bytes, train_words, val_words = corpus
    make = dict(n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_vocab=257, n_ctx=cfg.text_ctx)
    model = B.toy_model(d_model=cfg.text_d_model, seed=seed, **make)
    rng = np.random.default_rng(seed)
    n = cfg.text_ctx - 1

    def batches(step):
        rows, masks = [], []
        for _ in range(cfg.batch):
            if rng.random() < cfg.text_icl_frac:
                row, mask = train_icl_sequence(rng, train_words, cfg.text_ctx)
            else:
                start = int(rng.integers(0, len(train_bytes) - n))
                row, mask = [BOS, *train_bytes[start : start + n].tolist()], [1.0] * cfg.text_ctx
            rows.append(row)
            masks.append(mask)
        return torch.tensor(rows), torch.tensor(masks)

    ctx, extra = attention_context(model, condition, cfg)
    out: dict = {"acc": {}}
    with ctx:
        losses = train(model, extra, batches, cfg.text_steps, cfg, f"text {condition} s{seed}")
        with torch.no_grad():
            vr = np.random.default_rng(30_000)
            starts = vr.integers(0, len(val_bytes) - n, cfg.text_eval_windows)
            toks = torch.tensor([[BOS, *val_bytes[s : s + n].tolist()] for s in starts])
            nll = []
            for i in range(0, len(toks), 64):
                chunk = toks[i : i + 64]
                logp = model(chunk)[:, :-1].log_softmax(-1)
                nll.append(-logp.gather(-1, chunk[:, 1:, None])[..., 0])
            nll = torch.cat(nll)
            out["nll"] = nll.mean(1).double().tolist()  # per validation window, nats per byte
            out["nll_by_pos"] = nll.mean(0).double().tolist()
            first = torch.tensor([ord(w[0]) for w in LABEL_WORDS])
            for k in cfg.text_ks:
                er = np.random.default_rng(40_000 + k)
                eps = [word_episode(er, val_words, k, cfg.text_ctx) for _ in range(cfg.text_eval)]
                correct = []
                for length in sorted({len(s) for s, _ in eps}):
                    group = [(s + [ord(" ")], y) for s, y in eps if len(s) == length]
                    x = torch.tensor([s for s, _ in group])
                    pred = model(x)[:, -1, first].argmax(-1)
                    correct += (pred == torch.tensor([y for _, y in group])).double().tolist()
                out["acc"][k] = correct
    out["train_loss_last"] = float(np.mean(losses[-20:]))
    return out


# --------------------------------------------------------------------------- statistics


def boot(x: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% CI of x[seed, sequence], resampling seeds then sequences (shared indices)."""
    rng = np.random.default_rng(seed)
    n_s, n_i = x.shape
    stats = np.empty(n_boot)
    for b in range(n_boot):
        s = rng.integers(0, n_s, n_s)
        i = rng.integers(0, n_i, n_i)
        stats[b] = x[s][:, i].mean()
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(x.mean()), float(lo), float(hi)


def summarise(raw: dict, cfg: Config) -> dict:
    """Per task and condition: ppl and ICL accuracy (mean over k and per k), Δ vs baseline."""
    out: dict = {}
    for task, ks in (("toy", cfg.toy_ks), ("text", cfg.text_ks)):
        res = raw[task]
        arr = {c: _arrays(res[c], ks) for c in cfg.conditions}
        rows: dict = {}
        for c in cfg.conditions:
            nll, acc = arr[c]
            row = {
                "nll": boot(nll, cfg.n_boot),
                "ppl": tuple(math.exp(v) for v in boot(nll, cfg.n_boot)),
                "acc_mean": boot(acc.mean(-1), cfg.n_boot),
                "acc_by_k": {k: boot(acc[..., j], cfg.n_boot) for j, k in enumerate(ks)},
            }
            if c != "baseline":
                nb, ab = arr["baseline"]
                row["delta_nll"] = boot(nll - nb, cfg.n_boot)
                row["delta_acc_mean"] = boot(acc.mean(-1) - ab.mean(-1), cfg.n_boot)
                row["delta_acc_by_k"] = {
                    k: boot(acc[..., j] - ab[..., j], cfg.n_boot) for j, k in enumerate(ks)
                }
            if c not in ("baseline", "token_shift") and "token_shift" in arr:
                row["delta_nll_vs_token_shift"] = boot(nll - arr["token_shift"][0], cfg.n_boot)
            rows[c] = row
        out[task] = rows
    return out


def _arrays(runs: list[dict], ks) -> tuple[np.ndarray, np.ndarray]:
    """nll [seed, seq], acc [seed, seq, k]."""
    nll = np.array([r["nll"] for r in runs])
    acc = np.stack([np.array([r["acc"][k] for k in ks]).T for r in runs])
    return nll, acc


def verdict(summary: dict, cfg: Config) -> list[str]:
    lines = []
    for task, rows in summary.items():
        for c, row in rows.items():
            if c == "baseline":
                continue
            m, lo, hi = row["delta_nll"]
            ppl_word = "lower" if hi < 0 else "higher" if lo > 0 else "no detectable change in"
            am, alo, ahi = row["delta_acc_mean"]
            acc_word = "higher" if alo > 0 else "lower" if ahi < 0 else "no detectable change in"
            lines.append(
                f"{task}/{c}: {ppl_word} perplexity (Δnll {m:+.4f} [{lo:+.4f}, {hi:+.4f}]); "
                f"{acc_word} ICL accuracy (Δ {100 * am:+.1f} [{100 * alo:+.1f}, {100 * ahi:+.1f}] "
                "points)"
            )
            if "delta_nll_vs_token_shift" in row:
                m, lo, hi = row["delta_nll_vs_token_shift"]
                word = "beats" if hi < 0 else "is worse than" if lo > 0 else "does not beat"
                lines.append(
                    f"    {c} {word} the token-shift control on nll (Δ {m:+.4f} [{lo:+.4f}, "
                    f"{hi:+.4f}])"
                )
    return lines


# --------------------------------------------------------------------------- output


def table(summary: dict, cfg: Config) -> str:
    head = f"{'task':5} {'condition':13} {'val ppl [95% CI]':28} {'ICL acc % (mean k) [CI]':26}"
    lines = [head, "-" * len(head)]
    for task, rows in summary.items():
        for c, row in rows.items():
            p, plo, phi = row["ppl"]
            a, alo, ahi = row["acc_mean"]
            lines.append(
                f"{task:5} {c:13} {p:8.4f} [{plo:.4f}, {phi:.4f}]   "
                f"{100 * a:5.1f} [{100 * alo:.1f}, {100 * ahi:.1f}]"
            )
    for task, ks in (("toy", cfg.toy_ks), ("text", cfg.text_ks)):
        lines.append(f"{task} accuracy % by k: " + "  ".join(f"k={k}" for k in ks))
        for c, row in summary[task].items():
            vals = "  ".join(f"{100 * row['acc_by_k'][k][0]:.1f}" for k in ks)
            lines.append(f"   {c:13} {vals}")
    return "\n".join(lines)


def _k_axis(ax, ks) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("demonstrations k")


def plot(summary: dict, cfg: Config, stem: Path) -> None:
    """Per task: accuracy vs k; paired Δaccuracy vs k; paired Δ validation nll (all 95% CIs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "baseline": "tab:gray", "momentum": "tab:blue", "momentum_long": "tab:purple",
        "token_shift": "tab:green", "learnable": "tab:orange",
    }  # fmt: skip
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for r, (task, ks) in enumerate((("toy", cfg.toy_ks), ("text", cfg.text_ks))):
        rows = summary[task]
        ax = axes[r, 0]
        for c, row in rows.items():
            m, lo, hi = (np.array([100 * row["acc_by_k"][k][i] for k in ks]) for i in range(3))
            ax.plot(ks, m, "o-", color=colors[c], label=c)
            ax.fill_between(ks, lo, hi, color=colors[c], alpha=0.15)
        ax.axhline(50, color="k", lw=0.8, ls=":")
        _k_axis(ax, ks)
        ax.set_ylabel("ICL accuracy (%)")
        ax.set_title(f"{task}: ICL accuracy")
        ax.legend(fontsize=8)
        ax = axes[r, 1]
        for j, (c, row) in enumerate((c, row) for c, row in rows.items() if c != "baseline"):
            d = row["delta_acc_by_k"]
            m, lo, hi = (np.array([100 * d[k][i] for k in ks]) for i in range(3))
            x = np.array(ks) * (1 + 0.04 * j)
            ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="o-", color=colors[c], capsize=3, label=c)
        ax.axhline(0, color="k", lw=0.8)
        _k_axis(ax, ks)
        ax.set_ylabel("Δ accuracy vs baseline (points)")
        ax.set_title(f"{task}: paired Δ ICL accuracy")
        ax.legend(fontsize=8)
        ax = axes[r, 2]
        names = [c for c in rows if c != "baseline"]
        for i, c in enumerate(names):
            m, lo, hi = rows[c]["delta_nll"]
            ax.errorbar([i], [m], yerr=[[m - lo], [hi - m]], fmt="o", color=colors[c], capsize=5)
            ax.annotate(f"ppl {rows[c]['ppl'][0]:.3f}", (i, m), textcoords="offset points",
                        xytext=(8, 0), fontsize=8)  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        base = rows["baseline"]["ppl"][0]
        unit = "label-token" if task == "toy" else "per-byte"
        ax.set(xticks=range(len(names)), xlim=(-0.5, len(names) - 0.5))
        ax.set_xticklabels([n.replace("_", "\n") for n in names])
        ax.set_ylabel(f"Δ validation nll ({unit}, nats)")
        ax.set_title(f"{task}: paired Δ nll (baseline ppl {base:.3f})")
    fig.suptitle(
        f"Momentum attention (η={cfg.eta}; long η={cfg.eta_long}) vs baseline: "
        f"{len(cfg.seeds)} seeds, 95% bootstrap CIs over seeds and sequences"
    )
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + ".png"), dpi=130)
    fig.savefig(stem.with_name(stem.name + ".pdf"))
    plt.close(fig)


def replot(path: Path, stem: Path | None = None) -> dict:
    """Redraw STEM.png/.pdf (default: beside the json) from a ``*_results.json``."""
    result = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in result["config"].items() if k in known})  # fmt: skip
    summary = result["summary"]
    for rows in summary.values():  # json made the k keys strings
        for row in rows.values():
            for key in ("acc_by_k", "delta_acc_by_k"):
                if key in row:
                    row[key] = {int(k): v for k, v in row[key].items()}
    if stem is None:
        stem = path.with_name(path.name.removesuffix("_results.json"))
    plot(summary, cfg, stem)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 minute smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eta", type=float, default=None)
    ap.add_argument(
        "--out", type=Path, default=None, help="output stem: STEM.png/.pdf/_results.json"
    )
    ap.add_argument(
        "--replot", type=Path, metavar="RESULTS_JSON", help="redraw the figure of a finished run"
    )
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.replot, args.out)
    cfg = Config(threads=args.threads)
    if args.quick:
        cfg = quick(cfg)
    if args.eta is not None:
        cfg.eta = args.eta
    torch.set_num_threads(cfg.threads)
    name = "momentum_quick" if args.quick else "momentum"
    stem = args.out or FIGURES / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    corpus = load_corpus(cfg)
    raw: dict = {"toy": {}, "text": {}}
    timing: dict = {}
    for c in cfg.conditions:
        for task in ("toy", "text"):
            t0 = time.perf_counter()
            raw[task][c] = [
                run_toy(s, c, cfg) if task == "toy" else run_text(s, c, cfg, corpus)
                for s in cfg.seeds
            ]
            timing[f"{task}/{c}"] = round(time.perf_counter() - t0, 1)
            print(f"[{time.perf_counter() - start:6.0f}s] {task}/{c} done", flush=True)
    summary = summarise(raw, cfg)
    lines = verdict(summary, cfg)
    wall = time.perf_counter() - start
    print("\n" + table(summary, cfg))
    print("\nVerdict (95% CIs over seeds and sequences; Δ = condition − baseline):")
    print("\n".join("  " + line for line in lines))
    print(f"\nwall time {wall:.0f} s on {cfg.threads} threads")
    plot(summary, cfg, stem)
    result = {
        "config": asdict(cfg),
        "summary": summary,
        "verdict": lines,
        "train_loss_last": {
            t: {c: [r["train_loss_last"] for r in raw[t][c]] for c in raw[t]} for t in raw
        },
        "text_nll_by_position": {
            c: np.mean([r["nll_by_pos"] for r in raw["text"][c]], 0).tolist() for c in raw["text"]
        },
        "corpus": {"train_bytes": int(len(corpus[0])), "val_bytes": int(len(corpus[1]))},
        "timing_s": timing,
        "wall_s": round(wall, 1),
        "command": " ".join(
            ["python analyses/momentum.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "icl_lens": icl_lens.__version__,
        "icl_lens_git": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **B.tl_version_info(),
    }
    stem.with_name(stem.name + "_results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
