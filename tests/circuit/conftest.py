"""Models and records shared by the circuit tests: random toys, tiny GPT-2 and Gemma-3."""

from __future__ import annotations

import pytest
import torch

from icl_lens import backend as B
from icl_lens.data import TaskData
from icl_lens.toy import ToyTokenizer, toy_episode, toy_task

# name -> what it exercises
MODELS = {
    "toy": "standard positions, LayerNorm, no post-norm",
    "rotary": "rotary positions (TL 4: native rotary, no hook_rot_q)",
    "gpt2": "HF GPT-2: fused QKV split by TL, biases",
    "gemma3": "HF Gemma-3: post-attention norms, q/k-norm, RoPE, GQA, sliding windows",
}
NO_POST_NORM = ("toy", "rotary", "gpt2")
ROTARY = ("rotary", "gemma3")


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """``models(name)`` -> (model, tokenizer), built once per session."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            built[name] = _build(name, tmp_path_factory)
        return built[name]

    return get


def _build(name: str, tmp_path_factory):
    if name in ("toy", "rotary", "toy1"):
        tok = ToyTokenizer()
        model = B.toy_model(
            n_layers=1 if name == "toy1" else 2,
            d_model=32,
            n_heads=4,
            d_vocab=tok.vocab_size,
            n_ctx=128,
            seed=3,
            positional_embedding_type="standard" if name == "toy" else "rotary",
        )
        return model, tok
    from icl_lens.conformance import build_tiny_checkpoint
    from icl_lens.models import load_model

    path = build_tiny_checkpoint(name, tmp_path_factory.mktemp(name))
    model = load_model(str(path), progress=False)
    return model, model.tokenizer


def toy_data(tok, n_eval: int = 5, seed: int = 2) -> TaskData:
    toy_tok = tok if isinstance(tok, ToyTokenizer) else None  # (HF: the same words)
    pool, queries = toy_episode(seed=seed, n_demos=12, n_eval=n_eval, tokenizer=toy_tok)
    return TaskData(toy_task(2), queries, pool, "toy", {"source": "toy_episode"})


def toy_records(model, tok, n_eval: int, *, n_demos: int = 4, quiet: bool = True, **kwargs):
    """``circuit_records`` on ``toy_data(tok, n_eval)`` at lr 0.05, with the tiny FT's warnings
    (e.g. an unstable denominator) silenced unless ``quiet=False``: most tests check shapes and
    sites, not them."""
    import warnings

    from icl_lens.circuit import circuit_records

    def run():
        return circuit_records(model, toy_data(tok, n_eval), lr=0.05, n_demos=n_demos,
                               n_eval=n_eval, tokenizer=tok, **kwargs)  # fmt: skip

    if not quiet:
        return run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run()


@pytest.fixture(scope="session")
def records(models):
    """``records(name)`` -> (model, CircuitRecords) of a toy episode, built once."""
    from icl_lens.circuit import circuit_records

    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            model, tok = models(name)
            with torch.random.fork_rng(devices=[]):
                rec = circuit_records(
                    model, toy_data(tok), seed=0, lr=0.05, n_eval=5, n_demos=6, tokenizer=tok
                )
            built[name] = (model, rec)
        return built[name]

    return get


def run_sites(model, tokens: torch.Tensor, sites, extra=()) -> dict:
    """Every layer's tensors of ``sites`` (and the hooks ``extra``) on one plain pass."""
    from icl_lens.circuit.sites import site_hooks

    got: dict = {}
    hooks = []
    for layer in range(B.dims(model).n_layers):
        for s in sites:
            hooks += site_hooks(
                model, s, layer, lambda t, s=s, layer=layer: got.update({(s, layer): t})
            )
        for name in extra:
            full = name.format(l=layer)
            if full in model.hook_dict:
                hooks.append((full, lambda t, hook, full=full: got.update({full: t})))
    with torch.no_grad():
        got["logits"] = B.run_until(model, tokens, hooks)
    return got
