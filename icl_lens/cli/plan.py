"""What ``reproduce`` will run, decided and checked before any model loads."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icl_lens.cli.checks import (
    _check_model,
    _check_names,
    _check_writable,
    _offline_env,
    _offline_reason,
)
from icl_lens.cli.defaults import BASELINES, DEFAULT_TASKS, DEFAULTS, QUICK
from icl_lens.cli.errors import UsageError
from icl_lens.cli.user_data import _user_data
from icl_lens.tasks import TASKS


def _task_data(task: str, source: str) -> Any:
    """A built-in task's data; a problem that stops it (no StaICC, offline) is a UsageError."""
    from icl_lens.data import load_task_data

    try:
        return load_task_data(task, source=source)
    except OSError as e:  # datasets' ConnectionError, a missing file
        offline = _offline_env()
        if source == "hf" and offline:
            raise UsageError(
                f"--source hf: {task} is not in your Hugging Face cache and {offline} (offline "
                "mode); unset it and connect to the internet, or use --source staicc"
            ) from None
        if source == "hf":  # online: a failure while downloading
            raise
        raise UsageError(f"{task}: {e}") from None
    except (ValueError, ImportError) as e:
        raise UsageError(f"{task}: {e}") from None


@dataclass
class _Plan:
    """What ``reproduce`` will run, once every check that needs no model has passed."""

    data: list[Any]
    n_demos: int
    n_eval: int
    seeds: list[int]
    out: Path


def _check_device(name: str) -> str:
    """``--device``, parsed and checked to exist here (before the model loads)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        msg = f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N"
        raise UsageError(msg) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch has no usable CUDA device; use cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {name}: use cpu, cuda[:N], mps or xpu")
    if device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise UsageError(f"--device {name}: no such device here; use cpu")
    return str(device)


def _run_dir_name(model: str, dtype: str, device: str) -> str:
    """OUT/<model>/ for float32 on the CPU; another dtype or device gets its own directory, so
    a bfloat16 run never recomputes over (or is resumed from) a float32 run."""
    name = model.replace("/", "--")
    if dtype != "float32":
        name += f"-{dtype}"
    if not device.startswith("cpu"):
        name += f"-{device.split(':')[0]}"
    return name


def _plan(args: argparse.Namespace) -> _Plan:
    """Check every argument, the output directory, the model name and the data, before any
    model loads; a value the user gave is used as given (never replaced by a default)."""
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None and not (key == "tasks" and args.data):
                setattr(args, key, value)
    given = {k: getattr(args, k) for k in DEFAULTS}
    n_demos, n_eval, seeds = (v if v is not None else DEFAULTS[k] for k, v in given.items())
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {' '.join(map(str, seeds))}: give each seed once")
    if args.baselines is not None:
        _check_names(args.baselines, BASELINES, "baseline")
    data_flags = ("text_column", "label_column", "template", "label_words")
    if args.data is None:
        stray = [f"--{f.replace('_', '-')}" for f in data_flags if getattr(args, f) is not None]
        if stray:
            verb = "describes" if len(stray) == 1 else "describe"
            raise UsageError(f"{', '.join(stray)} {verb} a --data file; add --data PATH")
    else:
        if args.tasks:
            raise UsageError("--data runs the one task in your file; drop --tasks")
        if args.source is not None:
            raise UsageError("--source picks where built-in tasks come from; drop it with --data")
    tasks = list(args.tasks or DEFAULT_TASKS)
    _check_names(tasks, list(TASKS), "task")
    source = args.source or "staicc"
    if source == "staicc" and "cb" in tasks and not args.data:
        raise UsageError("cb is not available offline; use --source hf (needs internet)")
    device = _check_device(args.device)
    out = Path(args.out) / _run_dir_name(args.model, args.dtype, device)
    _check_writable(out, "--out")
    _check_model(args.model)
    if args.data:
        datas = [_user_data(args)]
    else:
        if source == "hf":
            offline = _offline_reason()
            if offline is not None and _offline_env() is None:  # else: try the HF cache
                raise UsageError(
                    f"--source hf needs the Hugging Face hub, but {offline}; connect to the "
                    "internet, use --source staicc (the offline copies), or set "
                    "HF_DATASETS_OFFLINE=1 to use datasets already in your Hugging Face cache"
                )
        datas = [_task_data(t, source) for t in tasks]
    for data in datas:
        name = data.provenance["file"] if args.data else data.task.name
        pool = len(data.demo_pool)
        default = " (the default)" if given["n_demos"] is None else ""
        if n_demos > pool:
            raise UsageError(
                f"{name}: the demonstration pool has {pool} examples, fewer than --n-demos "
                f"{n_demos}{default}; pass --n-demos {pool} or fewer"
            )
        if args.lr is None and pool == n_demos:
            raise UsageError(
                f"{name}: no demonstration-pool example is left to choose the learning rate on "
                f"({pool} in the pool, --n-demos {n_demos}{default}); pass --lr, or a smaller "
                "--n-demos"
            )
        if n_eval > len(data.eval):
            print(
                f"icl-lens: note: {name} has {len(data.eval)} evaluation examples; evaluating on "
                f"all of them (--n-eval {n_eval})",
                file=sys.stderr,
            )
    return _Plan(datas, n_demos, n_eval, list(seeds), out)
