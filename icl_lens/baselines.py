"""Controls that make the similarity metrics mean something (Deutch et al. 2024).

- ``untrained_copy``: the same architecture with attention and MLP weights re-initialised,
  keeping embeddings, norms and unembedding, run through the same protocol.
- ``shuffle_labels``: demonstrations with permuted labels, for FT on shuffled labels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from icl_lens import backend as B
from icl_lens.tasks import Example

_NORM_MARKERS = ("norm", "ln")


def untrained_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy whose attention and MLP matrices are re-drawn, everything else kept.

    Each re-drawn matrix is i.i.d. normal with the original matrix's standard deviation, so
    activation scales stay comparable; attention/MLP biases are zeroed; norm weights inside
    the blocks (e.g. Gemma's q/k norms) are kept. The original model is untouched.
    """
    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in B.attention_parameters(clone):
            leaf = name.split(".")[-1].lower()
            if any(m in part for part in name.lower().split(".")[2:] for m in _NORM_MARKERS):
                continue
            if p.ndim >= 2 and "b_" not in leaf:
                std = float(p.float().std())
                fresh = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
                p.copy_(fresh.to(p.dtype))
            else:
                p.zero_()
    return clone


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
