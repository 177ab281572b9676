"""Engine benchmark: ratios measured side by side in one run (not a timed test).

(a) shared-prefix ICL capture vs the naive per-example full prompt with full logits;
(b) capture with the analysis hooks vs the same batched forward without hooks;
(c) peak RSS against the fp32 model size;
(d) the ICL capture with split-prefix attention (the prefix's keys read once per batch) vs the
    model's own attention over the same cache, alternated (best of ``--repeats`` each), and how
    far their records differ.

    python benchmarks/bench_engine.py [--model toy|gemma-3-270m] [--n-queries 100] [--n-demos 32]

Targets (Gemma-3-270m): (a) >= 20x, (b) <= 1.2x.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from icl_lens import backend as B
from icl_lens.capture import capture
from icl_lens.checks import rel_diff
from icl_lens.data import load_task_data, sample_demos
from icl_lens.tasks import build_prompt, fit_demos, get_task, label_token_ids


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(name: str):
    if name == "toy":
        from icl_lens.data import TaskData
        from icl_lens.toy import load_toy, toy_episode

        model, tok, task = load_toy()
        pool, evals = toy_episode(0, 64, 200, tokenizer=tok)
        return model, tok, TaskData(task, evals, pool, "toy", {})
    from icl_lens.models import load_model

    model = load_model(name)
    return model, model.tokenizer, load_task_data(get_task("sst2"), "staicc")


@torch.no_grad()
def naive_full_logits(model, prompts, label_ids):
    """What a user would write: one full prompt at a time, full-vocabulary logits."""
    preds = []
    for p in prompts:
        logits = model(torch.tensor([p.tokens]))
        preds.append(int(logits[0, p.spans.predict_pos, label_ids].argmax()))
    return torch.tensor(preds)


@torch.no_grad()
def plain_forward(model, prompts, batch_size):
    """The same right-padded batches as capture, no analysis hooks, stopped at the final norm."""
    stop = B.final_norm_hook_name(model)
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p.tokens) for p in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for j, p in enumerate(batch):
            tokens[j, : len(p.tokens)] = torch.tensor(p.tokens)
        B.run_until(model, tokens, [], stop_at=stop)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--n-queries", type=int, default=100)
    ap.add_argument("--n-demos", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="(d): timed runs of each, alternated")
    ap.add_argument(
        "--naive-sample",
        type=int,
        default=20,
        help="naive runs this many queries; its time is scaled to n-queries",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rss0 = peak_rss_mb()
    model, tok, data = load(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    model_mb = n_params * 4 / 2**20
    task = data.task
    ids = label_token_ids(task, tok)
    queries = data.eval[: args.n_queries]
    demos = sample_demos(data.demo_pool, args.n_demos, seed=0)
    demos = fit_demos(task, tok, demos, queries, B.dims(model).n_ctx).demos
    prompts = [build_prompt(task, tok, q, demos) for q in queries]
    n_tok = sum(len(p.tokens) for p in prompts) / len(prompts)
    print(
        f"model={args.model} params={n_params / 1e6:.1f}M queries={len(prompts)} "
        f"demos={len(demos)} mean prompt tokens={n_tok:.0f} threads={args.threads}"
    )

    capture(model, prompts[:2], ids, progress=False)  # warm-up
    t_shared, rec = timed(capture, model, prompts, ids, batch_size=args.batch_size, progress=False)
    k = min(args.naive_sample, len(prompts))
    t_naive_k, naive_preds = timed(naive_full_logits, model, prompts[:k], ids)
    t_naive = t_naive_k * len(prompts) / k
    agree = bool(torch.equal(naive_preds, rec.preds[:k]))
    print(
        f"(a) shared-prefix capture {t_shared:.2f}s vs naive full-logit prompts "
        f"{t_naive:.2f}s (measured on {k}, scaled): {t_naive / t_shared:.1f}x faster; "
        f"predictions agree: {agree}"
    )

    sub = prompts[: max(args.batch_size * 2, min(len(prompts), 32))]
    t_plain, _ = timed(plain_forward, model, sub, args.batch_size)
    t_hooks, _ = timed(
        capture, model, sub, ids, batch_size=args.batch_size, shared_prefix=False, progress=False
    )
    print(
        f"(b) capture with analysis hooks {t_hooks:.2f}s vs same forward without hooks "
        f"{t_plain:.2f}s: {t_hooks / t_plain:.2f}x"
    )
    rss = peak_rss_mb()
    print(
        f"(c) peak RSS {rss:.0f} MB (start {rss0:.0f} MB); fp32 model {model_mb:.0f} MB: "
        f"{rss / model_mb:.2f}x the model size"
    )
    split_vs_own(model, prompts, ids, args)


def split_vs_own(model, prompts, ids, args) -> None:
    """(d): the ICL capture with and without split-prefix attention, side by side."""
    why = B.split_attention_unsupported(model)
    if why is not None:
        print(f"(d) split-prefix attention does not run on this model: {why}")
        return
    times: dict[bool, list[float]] = {True: [], False: []}
    recs = {}
    for _ in range(args.repeats):
        for split in (True, False):
            t, recs[split] = timed(capture, model, prompts, ids, batch_size=args.batch_size,
                                   split_attention=split, progress=False)  # fmt: skip
            times[split].append(t)
    used = recs[True].checks["prefix_cache"].get("attention")
    fields = ("label_logits", "attn_out", "q", "query_scores", "demo_scores")
    diffs = {f: rel_diff(getattr(recs[True], f), getattr(recs[False], f)) for f in fields}
    split, own = min(times[True]), min(times[False])
    print(f"(d) ICL capture, split-prefix attention {split:.2f}s vs the model's own attention "
          f"over the cache {own:.2f}s (best of {args.repeats}): {own / split:.2f}x faster; "
          f"attention used: {used}; records' max relative difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))  # fmt: skip


if __name__ == "__main__":
    main()
