"""The top-level API: ``import icl_lens as il`` and everything through ``il.<name>``."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest

import icl_lens as il

ROOT = Path(__file__).resolve().parents[1]

# module -> the names il re-exports from it (the list)
NAMES = {
    "models": ["load_model"],
    "experiment": ["run_experiment", "ExperimentConfig"],
    "results": ["Results"],
    "capture": ["capture", "Records"],
    "finetune": ["finetuned", "finetuned_grid"],
    "tasks": ["get_task", "TaskSpec", "build_prompt", "label_token_ids"],
    "data": ["load_task_data", "load_file", "sample_demos", "TaskData"],
    "checks": ["FastPathWarning", "SelfCheckError"],
    "circuit": ["circuit_records", "CircuitRecords"],
}
MODULES = ["checks", "circuit", "conformance", "dual", "metrics", "momentum", "plots", "toy"]
PAIRS = [(module, name) for module, names in NAMES.items() for name in names]


def test_all_lists_the_api_and_every_name_resolves():
    expected = {"__version__", *MODULES, *(name for _, name in PAIRS)}
    assert set(il.__all__) == expected
    assert len(il.__all__) == len(set(il.__all__))
    for name in il.__all__:
        assert getattr(il, name) is not None, name
    assert set(il.__all__) <= set(dir(il))
    assert not [n for n in dir(il) if not n.startswith("__") and n not in il.__all__]
    undocumented = [n for n in il.__all__ if n != "__version__" and f"il.{n}" not in il.__doc__]
    assert not undocumented, "list them in icl_lens's docstring"


def test_version():
    assert isinstance(il.__version__, str) and il.__version__.count(".") >= 2


@pytest.mark.parametrize("module, name", PAIRS, ids=[f"{m}.{n}" for m, n in PAIRS])
def test_names_are_their_modules_objects(module, name):
    # import_module, not icl_lens.capture.capture: il.capture is the function, not the module
    assert getattr(il, name) is getattr(importlib.import_module(f"icl_lens.{module}"), name)


@pytest.mark.parametrize("module", MODULES)
def test_modules(module):
    assert getattr(il, module) is importlib.import_module(f"icl_lens.{module}")


def test_toy_module_has_the_quick_example_functions():
    assert callable(il.toy.load_toy) and callable(il.toy.toy_episode)


def test_capture_stays_the_function_after_its_module_is_imported(monkeypatch):
    module = importlib.import_module("icl_lens.capture")  # binds the package attribute
    assert isinstance(il.capture, types.FunctionType)
    assert il.capture is module.capture
    from icl_lens import capture

    assert capture is module.capture
    fake = object()
    monkeypatch.setattr(il, "capture", fake)
    assert il.capture is fake
    monkeypatch.undo()
    assert il.capture is module.capture


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        il.no_such_name  # noqa: B018
    assert not hasattr(il, "no_such_name")


def test_import_is_cheap():
    code = (
        "import sys, icl_lens as il; il.__version__; dir(il); "
        "print(sorted({'matplotlib', 'torch', 'transformer_lens', 'pandas'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_py_typed_is_shipped():
    assert (Path(il.__file__).parent / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["icl_lens"]


def test_toy_end_to_end_through_il_names():
    if not il.toy.DEFAULT_PATH.exists():
        pytest.skip(f"the committed toy {il.toy.DEFAULT_PATH.name} is missing")
    model, tokenizer, task = il.toy.load_toy()
    pool, evals = il.toy.toy_episode(seed=0, n_demos=24, n_eval=48, tokenizer=tokenizer)
    data = il.TaskData(task, evals, pool, "toy", {"source": "toy_episode"})
    results = il.run_experiment(
        model,
        task,
        n_demos=12,
        n_eval=48,
        seeds=(0,),
        data=data,
        tokenizer=tokenizer,
        lr_grid=(0.1,),
        n_boot=50,
        baselines=("uniform", "gaussian"),  # no extra finetunes: fast, and about the API
        progress=False,
    )
    assert isinstance(results, il.Results)
    row = results.summary().loc[task.name]
    assert row["seeds"] == 1
    assert row["ICL acc"] > row["ZSL acc"]  # the toy learns in context
    assert math.isfinite(row["SimAOU"])
