"""Controls that make the similarity metrics mean something (Deutch et al. 2024).

- ``untrained`` / ``untrained_copy``: the same architecture with attention and MLP weights
  re-initialised, keeping embeddings, norms and unembedding, run through the same protocol
  (in place and restored bit for bit, or as a deep copy).
- ``shuffle_labels``: demonstrations with permuted labels, for FT on shuffled labels.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from icl_lens import backend as B
from icl_lens.tasks import Example

_NORM_MARKERS = ("norm", "ln")


def _redraw(model: nn.Module, seed: int, saved: list | None = None) -> None:
    """Re-draw attention/MLP weights in place; appends (parameter, original) to ``saved``
    before each write, so a failure midway can still be undone.

    Each re-drawn matrix is i.i.d. normal with the original matrix's standard deviation, so
    activation scales stay comparable; attention/MLP biases are zeroed; norm weights inside
    the blocks (e.g. Gemma's q/k norms) are kept.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in B.attention_parameters(model):
            leaf = name.split(".")[-1].lower()
            if any(m in part for part in name.lower().split(".")[2:] for m in _NORM_MARKERS):
                continue
            if saved is not None:
                saved.append((p, p.detach().clone()))
            if p.ndim >= 2 and "b_" not in leaf:
                std = float(p.float().std())
                fresh = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
                p.copy_(fresh.to(p.dtype))
            else:
                p.zero_()


def untrained_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy with attention and MLP matrices re-drawn (see ``untrained``).

    The original model is untouched. Costs a second copy of the whole model (embeddings
    included); ``untrained`` does the same in place for the memory of the re-drawn weights.
    """
    clone = copy.deepcopy(model)
    _redraw(clone, seed)
    return clone


@contextmanager
def untrained(model: nn.Module, seed: int = 0) -> Iterator[nn.Module]:
    """Inside the block ``model`` is untrained (the weights ``untrained_copy`` would draw); on
    exit, also on an exception, every re-drawn tensor is restored bit for bit."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        _redraw(model, seed, saved)
        yield model
    finally:
        with torch.no_grad():
            for p, orig in reversed(saved):
                p.copy_(orig)


def shuffle_labels(demos: Sequence[Example], seed: int) -> list[Example]:
    """The same demonstrations with their labels permuted (a label-free FT control).

    A permutation keeps the label counts; with only one distinct label it is a no-op, so the
    function raises rather than return an uninformative control.
    """
    labels = np.array([d.label for d in demos])
    if len(set(labels.tolist())) < 2:
        raise ValueError("shuffled-label FT needs demonstrations with at least two labels")
    perm = np.random.default_rng(int(seed)).permutation(labels)
    return [replace(d, label=int(lab)) for d, lab in zip(demos, perm, strict=True)]
