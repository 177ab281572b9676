"""icl-lens: does in-context learning look like gradient descent? A TransformerLens plugin.

Reproduces Dai et al. 2022 (ICL as implicit finetuning) with honest baselines. Public API::

    import icl_lens as il

    il.load_model                                         # models: offline bundles, TL, HF
    il.run_experiment, il.ExperimentConfig, il.Results    # ZS / ICL / FT, metrics, baselines
    il.capture, il.Records                                # one hooked pass per condition
    il.finetuned, il.finetuned_grid                       # K/V finetuning, restored exactly
    il.get_task, il.TaskSpec, il.build_prompt, il.label_token_ids          # tasks, prompts
    il.load_task_data, il.load_file, il.sample_demos, il.TaskData          # data
    il.checks, il.FastPathWarning, il.SelfCheckError      # run-time self-checks
    il.metrics, il.plots, il.dual, il.momentum, il.conformance   # modules
    il.toy                                                # il.toy.load_toy, il.toy.toy_episode
    il.circuit, il.circuit_records, il.CircuitRecords     # per-layer/head circuit tools
    il.__version__

Every name is also importable from its module (``icl_lens.experiment.run_experiment``).
Names are imported on first use (PEP 562), so ``import icl_lens`` loads neither torch,
TransformerLens nor matplotlib. ``il.capture`` is the function; the module is
``icl_lens.capture`` in ``from icl_lens.capture import ...`` or ``sys.modules``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the submodule that defines it
_ATTRS = {
    "load_model": "models",
    "run_experiment": "experiment",
    "ExperimentConfig": "experiment",
    "Results": "results",
    "capture": "capture",
    "Records": "capture",
    "finetuned": "finetune",
    "finetuned_grid": "finetune",
    "get_task": "tasks",
    "TaskSpec": "tasks",
    "build_prompt": "tasks",
    "label_token_ids": "tasks",
    "load_task_data": "data",
    "load_file": "data",
    "sample_demos": "data",
    "TaskData": "data",
    "FastPathWarning": "checks",
    "SelfCheckError": "checks",
    "circuit_records": "circuit",
    "CircuitRecords": "circuit",
}
# submodules exposed as il.<name>
_MODULES = ("checks", "circuit", "conformance", "dual", "metrics", "momentum", "plots", "toy")

__all__ = [  # literal, for static tools; the same names as _ATTRS and _MODULES
    "__version__",
    "load_model",
    "run_experiment",
    "ExperimentConfig",
    "Results",
    "capture",
    "Records",
    "finetuned",
    "finetuned_grid",
    "get_task",
    "TaskSpec",
    "build_prompt",
    "label_token_ids",
    "load_task_data",
    "load_file",
    "sample_demos",
    "TaskData",
    "FastPathWarning",
    "SelfCheckError",
    "circuit_records",
    "CircuitRecords",
    "checks",
    "circuit",
    "conformance",
    "dual",
    "metrics",
    "momentum",
    "plots",
    "toy",
]

if TYPE_CHECKING:  # what static type checkers and IDEs see (py.typed)
    from icl_lens import checks, circuit, conformance, dual, metrics, momentum, plots, toy
    from icl_lens.capture import Records, capture
    from icl_lens.checks import FastPathWarning, SelfCheckError
    from icl_lens.circuit import CircuitRecords, circuit_records
    from icl_lens.data import TaskData, load_file, load_task_data, sample_demos
    from icl_lens.experiment import ExperimentConfig, run_experiment
    from icl_lens.finetune import finetuned, finetuned_grid
    from icl_lens.models import load_model
    from icl_lens.results import Results
    from icl_lens.tasks import TaskSpec, build_prompt, get_task, label_token_ids


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _ATTRS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_ATTRS[name]}"), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:  # the public API (tab completion), not the helpers above
    return sorted({*__all__, *(n for n in globals() if n.startswith("__"))})


class _Package(types.ModuleType):
    """Keeps ``il.capture`` the function.

    Importing the submodule ``icl_lens.capture`` (which ``run_experiment`` does) binds the
    module to the package's attribute of the same name, so a plain lazy name would turn into
    the module; this data descriptor wins over that binding. An explicit assignment (say,
    monkeypatching) of anything but a module is returned as set.
    """

    @property
    def capture(self) -> Any:
        value = self.__dict__.get("capture")
        if value is None or isinstance(value, types.ModuleType):
            from icl_lens.capture import capture as value
        return value

    @capture.setter
    def capture(self, value: Any) -> None:
        self.__dict__["capture"] = value

    @capture.deleter
    def capture(self) -> None:
        self.__dict__.pop("capture", None)


sys.modules[__name__].__class__ = _Package
