"""checks: the warnings name the user's line, however deep inside icl-lens they start."""

from __future__ import annotations

import textwrap
import warnings

import torch

from icl_lens import checks
from icl_lens.checks import FastPathWarning, PrecisionWarning


def _icl_lens_function():
    """A function that runs as icl-lens code (module ``icl_lens._fake``): a torch.no_grad
    decorator and a generator-based context manager between it and its caller, as in
    ``capture`` and ``finetuned``."""
    source = textwrap.dedent(
        """
        import contextlib
        import torch
        from icl_lens.checks import warn, PrecisionWarning

        @torch.no_grad()
        def inner():
            warn("deep inside", PrecisionWarning)

        @contextlib.contextmanager
        def block():
            inner()
            yield
        """
    )
    namespace = {"__name__": "icl_lens._fake"}
    exec(compile(source, "<icl_lens._fake>", "exec"), namespace)
    return namespace["block"]


def test_a_warning_deep_inside_icl_lens_names_the_users_line():
    block = _icl_lens_function()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with block():  # the line the warning must name
            pass
    assert len(seen) == 1 and seen[0].category is PrecisionWarning
    assert seen[0].filename == __file__
    lines = open(__file__).read().splitlines()
    assert "the line the warning must name" in lines[seen[0].lineno - 1]


def test_warn_defaults_to_a_fast_path_warning_at_the_callers_line():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        checks.warn("plain path instead")
    assert seen[0].category is FastPathWarning and seen[0].filename == __file__
    assert torch.is_grad_enabled()


def test_entry_points_refuse_autocast_before_touching_the_model():
    """Inside one ``torch.autocast`` block torch reuses its first cast of each weight, so a
    K/V update written in place there is invisible (shown below on an ``nn.Linear``, so the
    test documents why the refusal exists), and the FT records would silently equal ZS's. Every
    entry point refuses under autocast with a one-line error naming the fix, and leaves the
    model as it was."""
    import pytest

    from icl_lens import experiment as E
    from icl_lens.capture import capture
    from icl_lens.circuit import circuit_records
    from icl_lens.data import TaskData
    from icl_lens.dual import dual_analysis
    from icl_lens.finetune import finetuned, finetuned_grid
    from icl_lens.tasks import build_prompt, label_token_ids
    from icl_lens.toy import load_toy, toy_episode

    model, tok, task = load_toy()
    demos, evals = toy_episode(seed=0, n_demos=4, n_eval=3, tokenizer=tok)
    prompts = [build_prompt(task, tok, q) for q in evals]
    icl_prompts = [build_prompt(task, tok, q, demos) for q in evals]
    ids = label_token_ids(task, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TaskData(task, evals, demos, "toy", {"source": "toy_episode"})
    calls = {
        "capture": lambda: capture(model, prompts, ids, "zs", progress=False),
        "finetuned": lambda: finetuned(model, demos, 0.1, task=task, tokenizer=tok).__enter__(),
        "finetuned_grid": lambda: finetuned_grid(
            model, demos, [0.1, 0.2], task=task, tokenizer=tok
        ).__enter__(),  # fmt: skip
        "run_experiment": lambda: E.run_experiment(
            model, task, data=data, tokenizer=tok, n_demos=2, n_eval=3, progress=False
        ),
        "circuit_records": lambda: circuit_records(
            model, data, lr=0.1, n_eval=3, n_demos=2, tokenizer=tok
        ),
        "dual_analysis": lambda: dual_analysis(model, icl_prompts, prompts, demos, 0.1, task, tok),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match=f"^{name} cannot run under torch.autocast"):
                call()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    checks.refuse_autocast("outside")  # no autocast: nothing raised

    # why: inside one autocast block an in-place weight change is not seen (the cast is kept)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = lin(x)
        with torch.no_grad():
            lin.weight.add_(1.0)
        stale = lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = lin(x)
    if torch.equal(first, stale):  # the hazard, as torch 2.x behaves
        assert not torch.equal(first, fresh)
