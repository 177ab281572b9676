"""The CLI's defaults, and copies of names from modules that import torch (so that ``--help``
and the checks of the arguments stay fast; tests/test_cli.py keeps them equal to the originals)."""

from __future__ import annotations

DEFAULT_TASKS = ("sst2", "sst5", "mr", "subj", "agnews")
DEFAULTS = {"n_demos": 32, "n_eval": 500, "seeds": [0, 1, 2]}
QUICK = {"tasks": ["sst2"], "n_eval": 24, "n_demos": 4, "seeds": [0], "lr_grid": [1e-3, 1e-2]}
BASELINES = ("uniform", "gaussian", "untrained", "shuffled", "layer_causal")  # experiment
BUNDLES = ("gemma-3-270m", "smollm2-135m")  # models.BUNDLES
LR_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # ExperimentConfig.lr_grid
