"""Shared test setup: deterministic seeds, few threads, session-scoped toy models."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - seeds legacy global RNG users
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    yield


@pytest.fixture(scope="session")
def toy():
    """A random 2-layer attn-only toy (standard positions) of the installed TL's class."""
    from icl_lens.backend import toy_model

    return toy_model(n_layers=2, d_model=32, n_heads=4, d_vocab=50, n_ctx=128, seed=0)


@pytest.fixture(scope="session")
def rotary_toy():
    """A random 2-layer attn-only toy with rotary positions."""
    from icl_lens.backend import toy_model

    return toy_model(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_vocab=50,
        n_ctx=128,
        seed=0,
        positional_embedding_type="rotary",
    )
