"""The shared-prefix self-check on Gemma-3-270m, SST-2, seeds 0 and 1, trained and untrained.

    python scripts/prefix_check.py    # ~1 CPU-minute after the model cache is warm

Prints, per seed and model, what the prefix-cache check measured on the first 4 evaluation
prompts (32 demonstrations, as the reference run): bit-identical below the 512-token sliding
window, rounding-level above it, and above the fp32 tolerance for the untrained baseline.
"""

import json
import warnings

import torch

import icl_lens as il
from icl_lens import backend as B
from icl_lens.baselines import untrained
from icl_lens.capture import capture
from icl_lens.data import load_task_data, sample_demos
from icl_lens.tasks import build_prompt, fit_demos, label_token_ids

torch.set_num_threads(1)
model = il.load_model("gemma-3-270m", progress=False)
tok = model.tokenizer
data = load_task_data("sst2")
spec = data.task
evals = data.eval[:4]
ids = label_token_ids(spec, tok)
for seed in (0, 1):
    demos = sample_demos(data.demo_pool, 32, seed)
    demos = fit_demos(spec, tok, demos, data.eval[:500], B.dims(model).n_ctx).demos
    prompts = [build_prompt(spec, tok, q, demos, record="label") for q in evals]
    print(
        "seed",
        seed,
        "n_demos",
        len(demos),
        "prompt lens",
        [len(p.tokens) for p in prompts],
        "prefix",
        prompts[0].spans.__dict__.get("prefix_len", None),
    )
    for name in ("trained", "untrained"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            if name == "untrained":
                with untrained(model, seed) as m:
                    rec = capture(m, prompts, ids, "icl", progress=False)
            else:
                rec = capture(model, prompts, ids, "icl", progress=False)
        print(
            " ", name, json.dumps(rec.checks.get("prefix_cache")), [str(x.message)[:200] for x in w]
        )
