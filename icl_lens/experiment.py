"""ZS / ICL / FT on one task, every metric beside its baselines, resumable per (task, seed).

``run_experiment(model, task)`` follows the reference protocol (DESIGN §2): the same
demonstrations for every query, FT on those demonstrations in ICL order, activations at the
recorded position. Beside each similarity it reports the controls that make it meaningful:
random vectors (uniform as in the paper, and Gaussian), the shared-origin null, the parts
orthogonal to ZS, an untrained model, FT on shuffled labels, layer-causal FT, and the
similarities across the whole learning-rate grid.

Recording sites (DESIGN §2; ``capture`` module docstring). On modern models "the attention
output" and "the query" each have two sites, so both are reported, the default under the
metric's own name and the other beside it (``SITES``; ``provenance["sites"]`` names the hooks):

- SimAOU (and its shared-origin null and orthogonal variant) at site ``"residual"``,
  ``hook_attn_out``, what the attention block adds to the residual stream:
  ``simaou``, ``simaou_null``, ``simaou_orthogonal``. At site ``"attention"`` (after W_O,
  before any post-attention norm): ``simaou_attention``, ``simaou_null_attention``,
  ``simaou_orthogonal_attention``.
- Kendall with the FT side's queries at site ``"q_pre"``, ``hook_q``, the query as projected:
  ``kendall_token``, ``kendall_example``. At site ``"q_post"`` (after q-norm and RoPE, the
  query attention scores with): ``kendall_token_q_post``, ``kendall_example_q_post``. The
  ICL side (the recorded score row) is the same for both.

The defaults keep the paper's definitions as TL exposes them: the attention output is what the
block adds to the residual stream, and the FT dual form's stored training queries are the
query as projected, the input of the linear layer whose update FT is compared with (Irie et
al.); they are also the sites of the committed reference results, which stay comparable. The
other site is reported beside the default because on Gemma-2/3 (post-attention norms, RoPE,
q-norm) the two differ materially; on a model without a post-attention norm, RoPE or q-norm
they coincide (the same tensor, and equal values). The random baselines and the
learning-rate grid rows are at the default sites only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import icl_lens
from icl_lens import backend as B
from icl_lens import metrics as M
from icl_lens.baselines import shuffle_labels, untrained
from icl_lens.capture import COMPUTE_DTYPES, Records, capture
from icl_lens.checks import (
    PrecisionWarning,
    model_dtype,
    precision_caveat,
    refuse_autocast,
    warn,
)
from icl_lens.data import TaskData, load_task_data, sample_demos
from icl_lens.finetune import TRAIN_DTYPES, FinetuneDivergedError, finetuned, finetuned_grid
from icl_lens.progress import tqdm
from icl_lens.results import Results, RunResult, atomic_write_json
from icl_lens.tasks import Example, TaskSpec, build_prompt, fit_demos, get_task, label_token_ids

log = logging.getLogger(__name__)

ALL_BASELINES = ("uniform", "gaussian", "untrained", "shuffled", "layer_causal")
# analysis -> (default site, other site); the other site's rows carry SITE_SUFFIX[site]
SITES = {"simaou": ("residual", "attention"), "kendall": ("q_pre", "q_post")}
SITE_SUFFIX = {"residual": "", "attention": "_attention", "q_pre": "", "q_post": "_q_post"}


# Left out of ``key()``: the fast-path switches change how records are computed, not what; and
# ``seeds`` says which (task, seed) files a call makes, not what is in any one of them (so a
# run of --seeds 0 is resumed by a later run of --seeds 0 1 2).
_NOT_IN_KEY = ("shared_prefix", "self_checks", "seeds")
# Left out of ``key()`` at these values only (so the keys of results made before these fields
# existed, all fp32 on the CPU, stay valid); any other value is part of the key.
_KEY_DEFAULTS = {"dtype": "float32", "device": "cpu", "layers": None, "patching": False,
                 "patch_examples": 64, "ft_train_dtype": "float32",
                 "update_capture_dtype": "float32"}  # fmt: skip
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines a run's numbers (recorded in every results file)."""

    n_demos: int = 32
    n_eval: int = 500
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float | None = None  # None: choose on a held-out slice from lr_grid
    lr_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    n_heldout: int = 64
    ft_mode: str = "standard"
    baselines: tuple[str, ...] = ALL_BASELINES
    record: str = "label"
    balanced_demos: bool = False
    batch_size: int = 8
    n_boot: int = 1000
    kendall_examples: int | None = 100  # the reference averages Kendall over the first 100
    lr_sensitivity: bool = True
    dual: bool = False
    # Fast-path controls: they change how records are computed, not what (the self-checks
    # hold the fast paths to the plain ones), so they are left out of ``key()`` (_NOT_IN_KEY).
    shared_prefix: bool | None = None  # None: use the prefix KV cache when it passes its check
    self_checks: bool = True
    # What the model computes in and where (``run_experiment`` reads them off the model): a
    # half-precision run's numbers differ from fp32's, so they are part of the key.
    dtype: str = "float32"
    device: str = "cpu"  # the device type ("cpu", "cuda", ...), not its index
    # What FT's training computes in (``finetune.TRAIN_DTYPES``): "float32" (a half-precision
    # model trains on an exact float32 copy of itself), or "model" (its own dtype: no float32
    # copy in memory, but bf16's backward is a few percent off; README, Half precision).
    ft_train_dtype: str = "float32"
    # What the ZS and FT captures compute in (``capture.COMPUTE_DTYPES``): their difference is
    # FT's update, which is small, and two half-precision passes round differently, enough to
    # move SimAOU by more than its CI at 500 examples (README, Half precision). "float32":
    # a bf16/fp16 model runs them on an exact float32 copy of itself; "model": in its own
    # dtype (faster, no float32 copy in memory). The ICL captures always run in the model's.
    update_capture_dtype: str = "float32"
    # The layers whose per-layer metrics are reported, and that the "mean" row averages
    # (None: all). Every layer is still run and FT still trains every layer's K/V: this
    # chooses what is analysed, not the protocol.
    layers: tuple[int, ...] | None = None
    # ICL <-> FT activation patching (``circuit.patch_curves``, residual site, both directions
    # with the shuffled-label, random and zero baselines) on the first ``patch_examples``
    # evaluation examples, with the run's demonstrations and chosen rate. Opt-in: it costs a
    # few more FT trainings and captures, and 2 directions x 4 variants forward passes over
    # those examples per patched layer (``layers``, or all).
    patching: bool = False
    patch_examples: int = 64

    def __post_init__(self) -> None:
        unknown = set(self.baselines) - set(ALL_BASELINES)
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}; known: {ALL_BASELINES}")
        if self.n_demos < 1:
            raise ValueError(
                "n_demos must be >= 1: with no demonstrations ICL equals ZS, the update is zero "
                "and every similarity is undefined"
            )
        if self.n_eval < 1:
            raise ValueError(f"n_eval must be >= 1 (got {self.n_eval})")
        if not self.seeds or any(int(x) != x or x < 0 for x in self.seeds):
            raise ValueError(f"seeds must be one or more integers >= 0 (got {list(self.seeds)})")
        for name, rate in [("lr", self.lr), *(("lr_grid", g) for g in self.lr_grid)]:
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name} must be finite and > 0 (got {rate})")
        for name in ("batch_size", "n_boot", "n_heldout", "patch_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.kendall_examples is not None and self.kendall_examples < 1:
            raise ValueError("kendall_examples must be >= 1, or None for every example")
        if self.lr is None and not self.lr_grid:
            raise ValueError("give lr=... or a non-empty lr_grid to choose it from")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} (got {self.dtype!r})")
        if self.ft_train_dtype not in TRAIN_DTYPES:
            raise ValueError(
                f"ft_train_dtype must be one of {TRAIN_DTYPES} (got {self.ft_train_dtype!r})"
            )
        if self.update_capture_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"update_capture_dtype must be one of {COMPUTE_DTYPES} "
                             f"(got {self.update_capture_dtype!r})")  # fmt: skip
        if self.layers is not None:
            if not self.layers or any(int(x) != x or x < 0 for x in self.layers):
                raise ValueError(
                    f"layers must be one or more layer indices >= 0, or None for all "
                    f"(got {list(self.layers)})"
                )
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))

    @property
    def ft_rates(self) -> list[float]:
        """The learning rates FT runs at: the grid plus ``lr`` (only ``lr`` without sensitivity)."""
        if self.lr is not None and not self.lr_sensitivity:
            return [float(self.lr)]
        rates = {float(g) for g in self.lr_grid} | (
            {float(self.lr)} if self.lr is not None else set()
        )
        return sorted(rates)

    def key(self) -> str:
        """A short hash of the config, to refuse resuming a run made with other settings."""
        fields = {k: v for k, v in asdict(self).items()
                  if k not in _NOT_IN_KEY and _KEY_DEFAULTS.get(k, object()) != v}  # fmt: skip
        if not self.patching:  # how many examples patching would use: moot when it is off
            fields.pop("patch_examples", None)
        if self.dtype in ("bfloat16", "float16"):  # not resumed from a half-precision file made
            fields["undefined_rule"] = "float32 records"  # before one zero rule held for all
            fields["ft_train_dtype"] = self.ft_train_dtype  # nor across what FT trained in
            # nor across what the ZS/FT captures computed in; "model", what every half file
            # made before the field ran, keeps their keys
            if self.update_capture_dtype != "model":
                fields["update_capture_dtype"] = self.update_capture_dtype
            else:
                fields.pop("update_capture_dtype", None)
        else:  # a full-precision model trains and captures in its own precision either way
            fields.pop("ft_train_dtype", None)
            fields.pop("update_capture_dtype", None)
        blob = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_experiment(
    model: nn.Module | str | Path,
    task: str | TaskSpec,
    n_demos: int = 32,
    n_eval: int = 500,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    data: TaskData | None = None,
    source: str = "staicc",
    tokenizer: Any = None,
    model_name: str | None = None,
    out_dir: str | Path | None = None,
    resume: str = "same_versions",
    progress: bool = True,
    **config: Any,
) -> Results:
    """Run ZS, ICL and FT on ``task`` for each seed and compute every metric and baseline.

    ``config`` sets ``ExperimentConfig`` fields (``lr``, ``lr_grid``, ``baselines``, ``record``,
    ...). With ``out_dir``, each (task, seed) is written to ``out_dir/<task>/seed<k>.json`` as
    soon as it finishes and reused on the next call, so a killed run resumes. ``resume``:
    "same_versions" (default) reuses only files made with the same model and package stack,
    "any" reuses any file made with the same settings, "never" recomputes everything; what was
    reused is listed in ``Results.resumed``.

    ``model`` is a hooked model, or a name/path that ``models.load_model`` loads with ``dtype``
    (default float32) on ``device`` (default "cpu"). For a model given as a module, ``dtype``
    and ``device`` (if given) must be what it already is. Either way the model's dtype and
    device type go into the config (and its key: a bfloat16 run is not resumed as a float32
    one) and the provenance. Losses, metrics and bootstrap run in fp32/fp64 whatever the dtype.
    """
    refuse_autocast("run_experiment")
    model = _model_for(model, dtype, device, progress)
    B.check_model(model)
    git_revision()  # pin the revision of the code now imported (see its docstring)
    if resume not in RESUME:
        raise ValueError(f"resume={resume!r}; choose one of {RESUME}")
    if config.get("layers") is not None:
        config["layers"] = tuple(config["layers"])
    cfg = ExperimentConfig(n_demos=n_demos, n_eval=n_eval, seeds=tuple(seeds),
                           dtype=dtype_name(model_dtype(model)),
                           device=B.input_device(model).type, **config)  # fmt: skip
    caveat = precision_caveat(model_dtype(model), cfg.update_capture_dtype)
    if caveat is not None:
        warn(caveat, PrecisionWarning)
    n_layers = B.dims(model).n_layers
    if cfg.layers is not None and max(cfg.layers) >= n_layers:
        raise ValueError(
            f"layers {list(cfg.layers)} out of range: the model has {n_layers} layers "
            f"(0..{n_layers - 1})"
        )
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer; pass tokenizer=...")
    spec = get_task(task) if data is None else data.task
    if data is None:
        data = load_task_data(spec, source=source)
    name = model_name or _model_name(model)
    stack = _stack(B.tl_version_info(), name)
    made_from = _data_identity(data, cfg)
    runs, resumed = [], []
    for seed in tqdm(cfg.seeds, desc=f"{spec.name} seeds", disable=not progress):
        path = run_file(out_dir, spec.name, seed) if out_dir else None
        done = _load_done(path, cfg, resume, stack, made_from)
        if done is not None:
            runs.append(done)
            prov = done.provenance
            resumed.append({"task": spec.name, "seed": seed, "path": str(path),
                            "icl_lens_git": prov.get("icl_lens_git"),
                            **_stack(prov)})  # fmt: skip
            continue
        start = time.perf_counter()
        run = _run_seed(model, data, tok, seed, cfg, name, progress)
        if path is not None:
            atomic_write_json(path, run.to_json())
            _log_timing(Path(out_dir), spec.name, seed, time.perf_counter() - start)
        runs.append(run)
    return Results(runs, resumed=resumed)


def run_file(out_dir: str | Path, task: str, seed: int) -> Path:
    """Where ``run_experiment`` writes (and resumes) one (task, seed) run under ``out_dir``."""
    return Path(out_dir) / task / f"seed{seed}.json"


def dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.bfloat16`` / "bfloat16" / "bf16" -> "bfloat16" (one of ``DTYPES``)."""
    name = str(dtype).removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32", "fp64": "float64", "double": "float64"}.get(name, name)  # fmt: skip
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}")
    return name


def _model_for(model, dtype, device, progress: bool) -> nn.Module:
    """The hooked model to run: ``model`` itself (checked against ``dtype``/``device``), or
    the one ``load_model`` loads from a name or path."""
    want = None if dtype is None else getattr(torch, dtype_name(dtype))
    if isinstance(model, (str, Path)):
        from icl_lens.models import load_model

        return load_model(model, dtype=want or torch.float32, device=device or "cpu",
                          progress=progress)  # fmt: skip
    if not isinstance(model, nn.Module):
        return model  # check_model explains
    if want is not None and model_dtype(model) != want:
        raise ValueError(
            f"dtype={dtype_name(dtype)} but the model is {dtype_name(model_dtype(model))}; load "
            f"it with load_model(..., dtype=torch.{dtype_name(dtype)}) (or pass its name)"
        )
    if device is not None and B.input_device(model).type != torch.device(device).type:
        raise ValueError(
            f"device={device} but the model is on {B.input_device(model)}; load it with "
            f"load_model(..., device={str(device)!r}) (or pass its name)"
        )
    return model


def _log_timing(out_dir: Path, task: str, seed: int, seconds: float) -> None:
    """Append the wall time of one (task, seed) to ``out_dir/timings.jsonl``.

    Kept out of the results files, which must be identical for identical runs.
    """
    entry = {
        "task": task,
        "seed": seed,
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(out_dir / "timings.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def _model_name(model: nn.Module) -> str:
    name = _model_info(model).get("name")
    return str(name or getattr(model.cfg, "model_name", None) or type(model).__name__)


_VOLATILE = ("seconds", "cache", "device")


def _model_info(model: nn.Module) -> dict[str, Any]:
    """Model provenance without the parts that change between identical runs (load time...)."""
    from icl_lens.models import model_info

    return {k: v for k, v in model_info(model).items() if not any(m in k for m in _VOLATILE)}


RESUME = ("same_versions", "any", "never")
_STACK_KEYS = ("transformer_lens", "transformers", "torch", "backend")


def _stack(provenance: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """What must match for a finished run to be reused: the model and the package stack."""
    stack = {k: provenance.get(k) for k in _STACK_KEYS}
    stack["model"] = provenance.get("model") if model is None else model
    return stack


# What must match, besides the config, for a finished run to be reused: the template and label
# words, the data file's content (sha256) and how it was read (columns, label values), and the
# evaluation examples (a different carve or split). Keys a source does not record are None
# on both sides (built-in tasks have no columns; HF data has no sha256).
_DATA_KEYS = ("sha256", "columns", "labels")
_DATA_WHAT = {"sha256": "data file sha256", "columns": "columns", "labels": "label values",
              "template": "template", "label_words": "label words"}  # fmt: skip


def _data_identity(data: TaskData, cfg: ExperimentConfig) -> dict[str, Any]:
    """The data a run of ``cfg`` on ``data`` is made from, as its provenance records it."""
    return _recorded_data(
        {
            "template": data.task.template,
            "label_words": list(data.task.label_words),
            "data": data.provenance,
            "eval_ids": [x.id for x in data.eval[: cfg.n_eval]],
        }
    )


def _recorded_data(provenance: dict[str, Any]) -> dict[str, Any]:
    """The data identity recorded in a run's provenance (JSON-normalised)."""
    source = provenance.get("data") or {}
    found = {
        "template": provenance.get("template"),
        "label_words": provenance.get("label_words"),
        **{k: source.get(k) for k in _DATA_KEYS},
        "eval_ids": provenance.get("eval_ids"),
    }
    return json.loads(json.dumps(found, default=list))


def _data_difference(theirs: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """What differs between two data identities, in words, or None."""
    why = []
    for key, now in ours.items():
        was = theirs.get(key)
        if was == now:
            continue
        if key == "eval_ids":
            why.append("other evaluation examples")
        elif key == "sha256":
            why.append(f"{_DATA_WHAT[key]} {str(was)[:12]} (now {str(now)[:12]})")
        else:
            why.append(f"{_DATA_WHAT[key]} {was!r} (now {now!r})")
    return "; ".join(why) or None


def _load_done(path: Path | None, cfg: ExperimentConfig, resume: str = "any",
               stack: dict[str, Any] | None = None,
               data: dict[str, Any] | None = None) -> RunResult | None:  # fmt: skip
    """A finished run file made with the same config and a valid checksum, else None.

    A file that is unreadable, was edited or damaged after it was written (its checksum does
    not match), or has no checksum (written by an older icl-lens) is recomputed, with a warning
    that names it and says why. So is one made from other data than ``data`` (see
    :func:`_data_identity`: file content, columns, template, label words, evaluation examples),
    whatever ``resume`` says. With ``resume="same_versions"`` a run made with another model or
    package stack than ``stack`` is recomputed too; ``"never"`` recomputes everything.
    """
    if path is None or not path.exists() or resume == "never":
        return None
    try:
        run = Results.load(path, require_checksum=True).runs[0]
    except (ValueError, KeyError, TypeError, OSError, IndexError) as e:
        why = str(e) if str(path) in str(e) else f"{path}: {type(e).__name__}: {e}"
        log.warning("not resuming %s; recomputing it", why)
        return None
    if run.provenance.get("config_key") != cfg.key():
        log.warning("%s was made with other settings; recomputing it", path)
        return None
    if data is not None:
        differ = _data_difference(_recorded_data(run.provenance), data)
        if differ:
            log.warning("not resuming %s: made from other data (%s); recomputing it", path,
                        differ)  # fmt: skip
            return None
    if resume == "same_versions" and stack is not None:
        theirs = _stack(run.provenance)
        differ = {k: (theirs[k], v) for k, v in stack.items() if theirs[k] != v}
        if differ:
            what = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in differ.items())
            log.warning("not resuming %s: made with %s; recomputing it (resume='any' / "
                        "--resume-any reuses it)", path, what)  # fmt: skip
            return None
    return run


# --------------------------------------------------------------------------- one seed


@dataclass
class _Ctx:
    """What one seed's run accumulates."""

    task: str
    model: str
    seed: int
    cfg: ExperimentConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    # the metrics' UndefinedMetricWarning messages, in order; each metric is computed right
    # before its rows are added, so the messages since the last add explain those rows
    undefined: list[str] = field(default_factory=list)
    _seen: int = 0

    def _why(self) -> str | None:
        """The explanations emitted since the previous add (None if there were none)."""
        new, self._seen = self.undefined[self._seen :], len(self.undefined)
        return "; ".join(dict.fromkeys(new)) or None

    def add(self, metric, variant, value, *, kind="result", layer="mean", ci=(None, None), n=None,
            lr=None, note=None) -> None:  # fmt: skip
        if note is None and _f(value) is None:
            note = self._why() or "undefined"
        self.rows.append(
            {
                "task": self.task,
                "model": self.model,
                "seed": self.seed,
                "metric": metric,
                "variant": variant,
                "kind": kind,
                "layer": str(layer),
                "value": _f(value),
                "ci_low": _f(ci[0]),
                "ci_high": _f(ci[1]),
                "n": None if n is None else int(n),
                "lr": lr,
                "note": note,
            }
        )

    def add_layered(self, metric, variant, per_ex_layer: torch.Tensor, *, kind="result", lr=None):
        """Per-layer means (over examples) and their mean, each with a bootstrap CI; with
        ``layers`` in the config, only those layers and the mean over them.

        Undefined entries (NaN, e.g. a zero update) are left out; ``n`` says how many were used.
        """
        x = per_ex_layer.double()
        ok = ~torch.isnan(x)
        layers = self.cfg.layers if self.cfg.layers is not None else range(x.shape[1])
        why = self._why()
        for layer in layers:
            col = x[ok[:, layer], layer]
            self._add_mean(metric, variant, col, kind, layer, lr, len(x), why)
        # overall: per example, mean over its defined (chosen) layers; then over examples
        per_ex = torch.nanmean(x[:, list(layers)], dim=1)
        per_ex = per_ex[~torch.isnan(per_ex)]
        self._add_mean(metric, variant, per_ex, kind, "mean", lr, len(x), why)

    def _add_mean(self, metric, variant, col, kind, layer, lr, total, why):
        """A mean with its CI; entries left out as undefined are explained in ``note``."""
        note = None
        if col.numel() < total:
            note = (
                f"{total - col.numel()} of {total} examples undefined: {why or 'no reason given'}"
            )
        if col.numel() == 0:
            self.add(metric, variant, None, kind=kind, layer=layer, n=0, lr=lr, note=note)
            return
        lo, hi = M.bootstrap_ci(col, n_boot=self.cfg.n_boot, seed=self.seed)
        self.add(metric, variant, col.mean(), kind=kind, layer=layer, ci=(lo, hi),
                 n=col.numel(), lr=lr, note=note)  # fmt: skip


def _f(x: Any) -> float | None:
    if x is None:
        return None
    v = float(x)
    return v if np.isfinite(v) else None


def _run_seed(model, data, tok, seed, cfg, name, progress) -> RunResult:
    """One (task, seed). Undefined metric entries become NaN (left out of the means, counted
    in the rows' ``n``), and the metric's own explanation goes into the rows' ``note``; other
    warnings (e.g. a fast path that failed its check) are shown as they happen."""
    undefined: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", M.UndefinedMetricWarning)
        show = warnings.showwarning

        def keep(message, category, *args, **kwargs):
            if issubclass(category, M.UndefinedMetricWarning):
                undefined.append(str(message))
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = keep
        run = _run_seed_inner(model, data, tok, seed, cfg, name, progress, undefined)
    # rows whose value, or some of whose examples, are undefined (not a caution like patching's)
    noted = sorted(
        {r["metric"] for r in run.rows
         if r.get("note") and (r["value"] is None or "undefined" in r["note"])}
    )  # fmt: skip
    if noted:
        log.warning(
            "%s seed %d: some entries of %s are undefined and left out; the reasons are in "
            "the rows' 'note' column",
            data.task.name,
            seed,
            ", ".join(noted),
        )
    return run


def _run_seed_inner(model, data: TaskData, tok, seed: int, cfg, name: str, progress,
                    undefined: list[str]):  # fmt: skip
    spec = data.task
    d = B.dims(model)
    label_ids = label_token_ids(spec, tok)
    evals = data.eval[: cfg.n_eval]
    if not evals:
        raise ValueError(f"task {spec.name} has no evaluation examples; check the data source")
    demos = sample_demos(data.demo_pool, cfg.n_demos, seed, balanced=cfg.balanced_demos)
    fit = fit_demos(spec, tok, demos, evals, d.n_ctx)
    demos = fit.demos
    if not demos:
        raise ValueError(f"no demonstration fits the context of {d.n_ctx} tokens")
    ctx = _Ctx(spec.name, name, seed, cfg, undefined=undefined)
    zs_prompts = [build_prompt(spec, tok, q, record=cfg.record) for q in evals]
    fast_paths: dict[str, list[dict]] = {}  # every capture's self-check report, by condition
    icl_prompts = [build_prompt(spec, tok, q, demos, record=cfg.record) for q in evals]

    def run(m, prompts, cond):
        compute = cfg.update_capture_dtype if cond in ("zs", "ft") else "model"
        rec = capture(m, prompts, label_ids, cond, batch_size=cfg.batch_size,
                      detail_limit=cfg.kendall_examples, shared_prefix=cfg.shared_prefix,
                      self_check=cfg.self_checks, progress=progress,
                      compute_dtype=compute)  # fmt: skip
        fast_paths.setdefault(cond, []).append(rec.checks)
        return rec

    stages = tqdm(total=6, desc=f"{spec.name} seed {seed}", disable=not progress, leave=False)
    zs, icl = run(model, zs_prompts, "zs"), run(model, icl_prompts, "icl")
    stages.update(1)

    held = _heldout(data, demos, seed, cfg)
    held_prompts = [build_prompt(spec, tok, q, record=cfg.record) for q in held]
    grid = cfg.ft_rates
    ft_by_lr: dict[float, Records] = {}
    states: dict[float, Any] = {}
    held_acc: dict[float, float] = {}
    # every grid rate trains side by side (one batch row each), then is applied in turn
    with finetuned_grid(model, demos, grid, task=spec, tokenizer=tok, mode=cfg.ft_mode,
                        train_dtype=cfg.ft_train_dtype,
                        progress=progress) as ft_grid:  # fmt: skip
        for g in tqdm(grid, desc="FT learning rates", disable=not progress, leave=False):
            try:
                with ft_grid.applied(g) as st:
                    ft_by_lr[g] = run(model, zs_prompts, "ft")
                    if cfg.lr is None:
                        rec = run(model, held_prompts, "ft")
                        held_acc[g] = M.accuracy(rec.preds, rec.labels)
            except FinetuneDivergedError:
                if g == cfg.lr:  # the user's own rate: nothing to fall back on
                    raise
                continue
            states[g] = st
        diverged = dict(ft_grid.diverged)
    for message in diverged.values():
        log.warning("%s seed %d: %s; rate left out", spec.name, seed, message)
    lr, heldout = _pick_lr(cfg, held_acc, held, diverged)
    ft_state = states[lr]
    for g, st in states.items():  # only the chosen rate's training queries feed Kendall
        if g != lr:
            _release(st)
    stages.update(2)
    ft = ft_by_lr[lr]

    _classification(ctx, zs, icl, ft, spec.n_labels)
    _similarities(ctx, zs, icl, ft, ft_state, "ft", lr)
    _loss_rise(ctx, "ft", ft_state)
    _release(ft_state)
    _random_baselines(ctx, zs, icl, seed)
    if cfg.lr_sensitivity:
        for g, rec in ft_by_lr.items():
            _sensitivity(ctx, zs, icl, rec, g)
    # the other grid rates' records and states are done with: free them early
    del ft_by_lr, states
    rec = st = None

    extra: dict[str, Records] = {}
    if "layer_causal" in cfg.baselines:
        with _baseline_ft(ctx, "ft_layer_causal", lr):
            with finetuned(model, demos, lr, task=spec, tokenizer=tok, mode="layer_causal",
                           train_dtype=cfg.ft_train_dtype) as st:  # fmt: skip
                extra["ft_layer_causal"] = run(model, zs_prompts, "ft")
            _similarities(ctx, zs, icl, extra["ft_layer_causal"], st, "ft_layer_causal", lr)
            _loss_rise(ctx, "ft_layer_causal", st)
            _release(st)
    if "shuffled" in cfg.baselines and len({x.label for x in demos}) > 1:
        shuffled = shuffle_labels(demos, seed)
        with _baseline_ft(ctx, "ft_shuffled", lr):
            with finetuned(model, shuffled, lr, task=spec, tokenizer=tok, mode=cfg.ft_mode,
                           train_dtype=cfg.ft_train_dtype) as st:  # fmt: skip
                extra["ft_shuffled"] = run(model, zs_prompts, "ft")
            _similarities(ctx, zs, icl, extra["ft_shuffled"], st, "ft_shuffled", lr)
            _loss_rise(ctx, "ft_shuffled", st)
            _release(st)
    for variant, rec in extra.items():
        ctx.add("accuracy", variant, M.accuracy(rec.preds, rec.labels), kind="baseline",
                n=len(rec), lr=lr)  # fmt: skip
    stages.update(1)

    if "untrained" in cfg.baselines:
        with _baseline_ft(ctx, "untrained", lr):
            _untrained(ctx, model, seed, demos, spec, tok, zs_prompts, icl_prompts, lr, run)
    if cfg.patching:
        _patching(ctx, model, data, demos, lr, tok, progress, "ft_shuffled" in extra)
    stages.update(1)
    if cfg.dual:
        _dual(ctx, model, icl_prompts, zs_prompts, demos, lr, spec, tok)
    stages.update(1)
    stages.close()

    ctx.diagnostics.update(
        {
            "label_distribution": {
                c: M.label_distribution(r.preds, spec.n_labels).tolist()
                for c, r in {"zs": zs, "icl": icl, "ft": ft, **extra}.items()
            },
            "visible_demo_tokens_per_layer": icl.demo_mask.sum(-1).float().mean(0).tolist(),
            "n_demo_tokens": int(icl.demo_mask.shape[-1]),
            "sliding_windows": list(d.windows),
            "ft_losses": ft_state.losses if ft_state else [],
            "prefix_cached": icl.prefix_cached,
        }
    )
    for layer, v in enumerate(ctx.diagnostics["visible_demo_tokens_per_layer"]):
        if cfg.layers is None or layer in cfg.layers:
            ctx.add("visible_demo_tokens", "icl", v, kind="diagnostic", layer=layer)
    provenance = _provenance(model, data, ctx, cfg, evals, demos, fit, lr, heldout)
    provenance["fast_paths"] = {
        "captures": fast_paths,
        "ft": {"lr": lr, **ft_state.fast_paths} if ft_state else {},
    }
    provenance["sites"] = _sites_provenance(icl.sites, ft_state)
    return RunResult(spec.name, seed, ctx.rows, provenance, ctx.diagnostics)


# --------------------------------------------------------------------------- pieces


def _heldout(data: TaskData, demos, seed: int, cfg: ExperimentConfig) -> list[Example]:
    """A slice of the demo pool for choosing the learning rate.

    Disjoint from the evaluation set (a different pool) and from the chosen demonstrations.
    """
    if cfg.lr is not None:
        return []
    used = {x.id for x in demos}
    rest = [x for x in data.demo_pool if x.id not in used]
    order = np.random.default_rng(10_000 + seed).permutation(len(rest))
    held = [rest[i] for i in order[: cfg.n_heldout]]
    if not held:
        raise ValueError("no held-out examples left to choose the learning rate; pass lr=...")
    return held


def _pick_lr(cfg: ExperimentConfig, accs: dict[float, float], held: list[Example],
             diverged: dict[float, str]):  # fmt: skip
    """The grid rate with the best held-out FT accuracy (ties: the smaller rate); rates whose
    FT loss diverged are left out and listed."""
    gone = {repr(g): message for g, message in diverged.items()}
    if cfg.lr is not None:
        return float(cfg.lr), {"chosen_by": "user", "lr": float(cfg.lr), "diverged": gone}
    if not accs:
        raise FinetuneDivergedError(
            f"FT diverged at every rate of lr_grid {list(cfg.lr_grid)}; pass a grid with lower "
            "learning rates (lr_grid=...)"
        )
    best = max(accs.values())
    lr = min(g for g, a in accs.items() if a == best)
    return lr, {
        "chosen_by": "heldout_accuracy",
        "lr": lr,
        "heldout_accuracy": {repr(g): a for g, a in accs.items()},
        "heldout_ids": [x.id for x in held],
        "diverged": gone,
    }


def _classification(ctx: _Ctx, zs: Records, icl: Records, ft: Records, n_labels: int) -> None:
    for variant, rec in (("zs", zs), ("icl", icl), ("ft", ft)):
        correct = (rec.preds == rec.labels).double()
        lo, hi = M.bootstrap_ci(correct, n_boot=ctx.cfg.n_boot, seed=ctx.seed)
        ctx.add("accuracy", variant, correct.mean(), ci=(lo, hi), n=len(rec))
    r2 = M.rec2ftp(zs.preds, icl.preds, ft.preds, zs.labels, n_labels, on_undefined="nan")
    denom = (zs.preds != zs.labels) & (ft.preds == ft.labels)
    icl_right = (icl.preds == icl.labels)[denom].double() * 100
    ci = M.bootstrap_ci(icl_right, n_boot=ctx.cfg.n_boot, seed=ctx.seed) if len(icl_right) else (
        None, None)  # fmt: skip
    ctx.add("rec2ftp", "ft", r2.value, ci=ci, n=r2.n_zs_wrong_ft_right)
    ctx.add("rec2ftp", "chance", r2.chance, kind="baseline", n=r2.n_zs_wrong_ft_right)
    ca = M.change_agreement(zs.preds, icl.preds, ft.preds, on_undefined="nan")
    ctx.add("change_agreement", "ft", ca.value, n=ca.n_denominator)
    ctx.diagnostics["rec2ftp_counts"] = {
        "zs_wrong_ft_right": r2.n_zs_wrong_ft_right,
        "also_icl_right": r2.n_also_icl_right,
    }
    ctx.diagnostics["change_agreement_counts"] = {
        "icl_changed": ca.n_icl_changed,
        "ft_changed": ca.n_ft_changed,
        "same": ca.n_same,
    }


@contextmanager
def _baseline_ft(ctx: _Ctx, variant: str, lr: float) -> Iterator[None]:
    """A baseline whose FT diverges at the chosen rate (e.g. the untrained model, whose loss
    can explode where the trained model's does not) is reported, not fatal: its SimAOU row
    is undefined, with the divergence as the reason."""
    try:
        yield
    except FinetuneDivergedError as e:
        log.warning("%s seed %d: the %s baseline's FT diverged (%s); left out", ctx.task,
                    ctx.seed, variant, e)  # fmt: skip
        for site in SITES["simaou"]:
            ctx.add(f"simaou{SITE_SUFFIX[site]}", variant, None, kind="baseline", n=0, lr=lr,
                    note=f"{variant} FT diverged at lr={lr:g}: {e}")  # fmt: skip


def _loss_rise(ctx: _Ctx, variant: str, state) -> None:
    """How far an FT's loss rose above its first step's, as a diagnostic row.

    Each step's loss is of another demonstration, so this mixes their spread (1.2-2x on the
    trained model with nothing wrong) with instability; it is data to read, not a test. Near
    the edge of stability (the untrained baseline at the trained model's rate) a trajectory
    amplifies rounding: on Gemma-3-270m two fp32 implementations of the same loss (one-pass
    vocabulary vs autograd log-softmax, equal to 1e-4 at step 0) gave untrained SimAOU 0.40
    vs 0.48, so that variant's values carry more than their bootstrap CI says.
    """
    losses = [float(x) for x in (state.losses if state is not None else [])]
    if len(losses) < 2 or not all(math.isfinite(x) for x in losses) or losses[0] <= 0:
        return
    ctx.add("ft_loss_max_over_first", variant, max(losses) / losses[0], kind="diagnostic",
            lr=state.lr, n=len(losses))  # fmt: skip


def _release(state) -> None:
    """Drop an FT state's per-token queries (once Kendall has used them) and its K/V deltas
    (memory)."""
    if state is not None:
        state.train_q = state.train_q_post = state.train_token_demo = state.deltas = None


def _qmask(rec: Records):
    return rec.query_mask.unsqueeze(2).expand_as(rec.query_scores)


_SITE_FIELD = {"residual": "attn_out", "attention": "attn_pre_norm", "q_pre": "q",
               "q_post": "q_post"}  # fmt: skip


def _sites_provenance(sites: dict[str, dict], ft_state) -> dict[str, Any]:
    """``provenance["sites"]``: each analysis's default and other site, the hooks each site
    read on this model (layer as ``{l}``), which other site coincides with its default here,
    and why one was not recorded."""
    out: dict[str, Any] = {}
    for analysis, (default, other) in SITES.items():
        out[analysis], out[f"{analysis}_other"] = default, other
    names = [s for pair in SITES.values() for s in pair]
    out["hooks"] = {s: list(sites.get(s, {}).get("hooks", [])) for s in names}
    out["same_as_default"] = {other: sites.get(other, {}).get("same_as") is not None
                              for _, other in SITES.values()}  # fmt: skip
    out["metric_suffix"] = {s: SITE_SUFFIX[s] for s in names}
    missing = {s: sites[s]["unavailable"] for s in names if sites.get(s, {}).get("unavailable")}
    if ft_state is not None and ft_state.q_post_unavailable and "q_post" not in missing:
        missing["q_post"] = ft_state.q_post_unavailable
    if missing:
        out["unavailable"] = missing
    return out


def _site_missing(site: str, *records: Records) -> str | None:
    """Why site ``site`` was not recorded in one of ``records`` (None if it was)."""
    for rec in records:
        if getattr(rec, _SITE_FIELD[site]) is None:
            why = rec.sites.get(site, {}).get("unavailable") or "not recorded"
            return f"site {site!r} unavailable in the {rec.condition} capture: {why}"
    return None


def _simaou_rows(ctx, zs: Records, icl: Records, ft: Records, site: str, variant: str, kind: str,
                 lr) -> None:  # fmt: skip
    """SimAOU, its orthogonal variant and its shared-origin null at recording site ``site``.

    An entry is undefined (left out) only where an update is zero at the stored records'
    precision (float32, whatever the model's dtype), the same rule in every dtype, so a bf16
    run averages the entries the fp32 run does. (A bf16-derived threshold, 4 eps of bf16 on the
    unit-vector updates, once left out FT's small early-layer updates as rounding noise: 427 of
    1152 entries on Gemma-3-270m SST-2, which moved SimAOU from 0.149 to 0.229 by selection.)"""
    suffix = SITE_SUFFIX[site]
    names = {"simaou": kind, "simaou_orthogonal": kind, "simaou_null": "baseline"}
    why = _site_missing(site, zs, icl, ft)
    if why is not None:
        for name, k in names.items():
            ctx.add(f"{name}{suffix}", variant, None, kind=k, n=0, lr=lr, note=why)
        return
    nan = {"on_undefined": "nan"}
    a, b, c = (getattr(r, _SITE_FIELD[site]) for r in (zs, icl, ft))
    ctx.add_layered(f"simaou{suffix}", variant, M.simaou(a, b, c, **nan), kind=kind, lr=lr)
    ctx.add_layered(f"simaou_orthogonal{suffix}", variant,
                    M.simaou_orthogonal(a, b, c, **nan), kind=kind, lr=lr)  # fmt: skip
    ctx.add_layered(f"simaou_null{suffix}", variant, M.shared_origin_null(a, b, c, **nan),
                    kind="baseline", lr=lr)  # fmt: skip


def _kendall_rows(ctx, icl: Records, ft: Records, state, site: str, variant: str, kind: str,
                  lr) -> None:  # fmt: skip
    """Kendall (token and example level) with the FT side's queries at site ``site``."""
    suffix = SITE_SUFFIX[site]
    train_q = state.train_q if site == "q_pre" else state.train_q_post
    why = _site_missing(site, ft)
    if why is None and train_q is None:
        why = f"site {site!r} unavailable in FT training: {state.q_post_unavailable}"
    if why is not None:
        for name in ("kendall_token", "kendall_example"):
            ctx.add(f"{name}{suffix}", variant, None, kind=kind, n=0, lr=lr, note=why)
        return
    k = ctx.cfg.kendall_examples or len(icl)
    q_test = getattr(ft, _SITE_FIELD[site])[:k]
    kd = M.kendall_icl_ft(icl.demo_scores[:k], q_test, train_q, icl.demo_of_token,
                          icl.demo_mask[:k], on_undefined="nan")  # fmt: skip
    ctx.add_layered(f"kendall_token{suffix}", variant, kd.token, kind=kind, lr=lr)
    if kd.example is not None:
        ctx.add_layered(f"kendall_example{suffix}", variant, kd.example, kind=kind, lr=lr)


def _similarities(ctx, zs: Records, icl: Records, ft: Records, state, variant: str, lr) -> None:
    """SimAOU (+orthogonal, +null), SimAM before/after (+centred), SimAM_delta, Kendall;
    SimAOU and Kendall at both recording sites (``SITES``: the default's rows first)."""
    kind = "result" if variant == "ft" else "baseline"
    nan = {"on_undefined": "nan"}
    default, other = SITES["simaou"]
    _simaou_rows(ctx, zs, icl, ft, default, variant, kind, lr)
    mask = _qmask(icl) & _qmask(zs) & _qmask(ft)
    for centered in (False, True):
        suffix = "_centered" if centered else ""
        if variant == "ft":
            before = M.simam(icl.query_scores, zs.query_scores, mask, centered=centered, **nan)
            ctx.add_layered(f"simam_before{suffix}", "icl_vs_zs", before, lr=lr)
        after = M.simam(icl.query_scores, ft.query_scores, mask, centered=centered, **nan)
        ctx.add_layered(f"simam_after{suffix}", variant, after, kind=kind, lr=lr)
        delta = M.simam_delta(zs.query_scores, icl.query_scores, ft.query_scores, mask,
                              centered=centered, **nan)  # fmt: skip
        ctx.add_layered(f"simam_delta{suffix}", variant, delta, kind=kind, lr=lr)
    if state is not None and state.train_q is not None and icl.demo_scores.shape[-1]:
        for site in SITES["kendall"]:
            _kendall_rows(ctx, icl, ft, state, site, variant, kind, lr)
    _simaou_rows(ctx, zs, icl, ft, other, variant, kind, lr)


def _random_baselines(ctx: _Ctx, zs: Records, icl: Records, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    nan = {"on_undefined": "nan"}
    d = icl.attn_out
    if "uniform" in ctx.cfg.baselines:
        u = M.uniform_random_like(d, gen)
        ctx.add_layered("simaou", "uniform", M.simaou_random(zs.attn_out, d, u, **nan),
                        kind="baseline")  # fmt: skip
    if "gaussian" in ctx.cfg.baselines:
        g = M.gaussian_random_like(d, gen)
        ctx.add_layered("simaou", "gaussian", M.simaou_random(zs.attn_out, d, g, **nan),
                        kind="baseline")  # fmt: skip
    if icl.demo_scores.shape[-1]:
        k = ctx.cfg.kendall_examples or len(icl)
        kd = M.kendall_random_baseline(icl.demo_scores[:k], icl.demo_of_token, icl.demo_mask[:k],
                                       generator=gen, **nan)  # fmt: skip
        ctx.add_layered("kendall_token", "uniform", kd.token, kind="baseline")
        if kd.example is not None:
            ctx.add_layered("kendall_example", "uniform", kd.example, kind="baseline")


def _sensitivity(ctx: _Ctx, zs: Records, icl: Records, ft: Records, lr: float) -> None:
    """The headline similarities at one grid learning rate (kind='lr_grid')."""
    nan = {"on_undefined": "nan"}
    variant = f"ft@{lr:g}"
    per = {
        "simaou": lambda: M.simaou(zs.attn_out, icl.attn_out, ft.attn_out, **nan),
        "simaou_orthogonal": lambda: M.simaou_orthogonal(
            zs.attn_out, icl.attn_out, ft.attn_out, **nan
        ),  # fmt: skip
        "simaou_null": lambda: M.shared_origin_null(zs.attn_out, icl.attn_out, ft.attn_out, **nan),
        "simam_after": lambda: M.simam(
            icl.query_scores, ft.query_scores, _qmask(icl) & _qmask(ft), **nan
        ),  # fmt: skip
    }
    for metric, compute in per.items():  # each computed right before its row (its notes)
        x = compute()
        v = torch.nanmean(torch.nanmean(x.double(), dim=1))
        ctx.add(metric, variant, v, kind="lr_grid", lr=lr, n=x.shape[0])
    ctx.add("accuracy", variant, M.accuracy(ft.preds, ft.labels), kind="lr_grid", lr=lr,
            n=len(ft))  # fmt: skip


def _untrained(ctx, model, seed, demos, spec, tok, zs_prompts, icl_prompts, lr, run) -> None:
    """The whole protocol with attention/MLP re-initialised (Deutch et al.), in place."""
    with untrained(model, seed) as base:
        zs, icl = run(base, zs_prompts, "zs"), run(base, icl_prompts, "icl")
        with finetuned(base, demos, lr, task=spec, tokenizer=tok, mode=ctx.cfg.ft_mode,
                       train_dtype=ctx.cfg.ft_train_dtype) as st:  # fmt: skip
            ft = run(base, zs_prompts, "ft")
    _similarities(ctx, zs, icl, ft, st, "untrained", lr)
    _loss_rise(ctx, "untrained", st)
    for variant, rec in (("untrained_zs", zs), ("untrained_icl", icl), ("untrained_ft", ft)):
        ctx.add("accuracy", variant, M.accuracy(rec.preds, rec.labels), kind="baseline",
                n=len(rec))  # fmt: skip


def _patching(ctx, model, data: TaskData, demos, lr: float, tok, progress, shuffled: bool) -> None:
    """ICL <-> FT patching curves (rows ``patch_survival``, one per layer, variant
    "<direction>:<what was put in>") and each direction's base change (``patch_base_change``).
    The surviving fraction is a ratio to the base run's mean label-logit change; where that is
    within two standard errors of 0 the rows' ``note`` says the fractions are unstable.
    ``shuffled``: the run's own shuffled-label FT succeeded, so patching may use it."""
    from icl_lens.circuit import circuit_records, patch_curves  # circuit imports this module's deps
    from icl_lens.circuit.patching import DIRECTIONS, is_unstable

    cfg = ctx.cfg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rec = circuit_records(model, data, ctx.seed, lr=lr, n_eval=cfg.patch_examples,
                                  demos=demos, tokenizer=tok, sites=("residual",),
                                  mode=cfg.ft_mode, shuffled=shuffled, batch_size=cfg.batch_size,
                                  progress=progress, train_dtype=cfg.ft_train_dtype,
                                  # patching's own passes run in the model's dtype: so do the
                                  # records it patches from (patch_curves refuses a mix)
                                  update_capture_dtype="model")  # fmt: skip
            res = patch_curves(model, rec, layers=cfg.layers, n_boot=cfg.n_boot,
                               batch_size=cfg.batch_size, progress=progress)  # fmt: skip
        except FinetuneDivergedError as e:
            res, failed = None, f"patching left out: {e}"
    # patch_curves' own cautions start with a direction; every other warning is shown as usual
    own = [str(w.message) for w in caught if str(w.message).split(":")[0] in DIRECTIONS]
    for w in caught:
        if str(w.message) not in own:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if res is None:
        for direction in DIRECTIONS:
            ctx.add("patch_base_change", direction, None, kind="diagnostic", lr=lr, note=failed)
        ctx.diagnostics["patching"] = {"error": failed}
        return
    unstable = {}
    for direction, base in res.base.items():
        ci = M.bootstrap_ci(base.double(), n_boot=cfg.n_boot, seed=ctx.seed)
        b_mean, b_se = (res.frame[res.frame.direction == direction][["base_mean", "base_se"]]
                        .iloc[0].tolist())  # fmt: skip
        if is_unstable(b_mean, b_se):
            unstable[direction] = (
                f"{direction}: the base run's mean label-logit change ({b_mean:.3g}) is within 2 "
                f"standard errors ({b_se:.3g}) of 0, so the surviving fractions are unstable"
            )
        ctx.add("patch_base_change", direction, b_mean, kind="diagnostic", ci=ci,
                n=base.numel(), lr=lr, note=unstable.get(direction))  # fmt: skip
    for r in res.frame.itertuples():
        why = None
        if not np.isfinite(r.fraction):
            why = f"{r.direction}: the base run's mean label-logit change is 0"
        ctx.add("patch_survival", f"{r.direction}:{r.variant}", r.fraction,
                kind="result" if r.variant in ("ft", "icl") else "baseline", layer=r.layer,
                ci=(r.ci_low, r.ci_high), n=r.n, lr=lr,
                note=why or unstable.get(r.direction))  # fmt: skip
    ctx.diagnostics["patching"] = {**res.info, "n_examples": len(rec), "warnings": own}


def _dual(ctx, model, icl_prompts, zs_prompts, demos, lr, spec, tok) -> None:
    """ΔW_ICL vs ΔW_FT in the linear-attention relaxation (optional, see icl_lens.dual).

    Per (example, layer) values are means over heads; kinds follow ``dual.METRICS``.
    """
    from icl_lens import dual

    out = dual.dual_analysis(model, icl_prompts, zs_prompts, demos, lr, spec, tok,
                             mode=ctx.cfg.ft_mode, seed=ctx.seed,
                             train_dtype=ctx.cfg.ft_train_dtype)  # fmt: skip
    for name, per in out.items():
        if per.ndim == 3:  # [example, layer, head]
            ctx.add_layered(f"dual_{name}", "dual", per.double().nanmean(-1),
                            kind=out.kind(name), lr=lr)  # fmt: skip


@functools.cache
def git_revision() -> str | None:
    """The icl-lens source commit when run from a git checkout ('+dirty' if modified).

    Read once per process (``run_experiment`` reads it before any work), so a file written
    hours later still names the code that was imported, not a checkout changed meanwhile.
    """
    import subprocess

    root = Path(icl_lens.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        git = ["git", "-C", str(root)]
        run = dict(capture_output=True, text=True, timeout=10, check=True)
        rev = subprocess.run([*git, "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "-uno", "icl_lens"], **run
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _provenance(model, data, ctx, cfg, evals, demos, fit, lr, heldout) -> dict[str, Any]:
    return {
        "icl_lens": icl_lens.__version__,
        "icl_lens_git": git_revision(),
        **B.tl_version_info(),
        "model": ctx.model,
        "model_info": _model_info(model),
        "task": ctx.task,
        "template": data.task.template,
        "label_words": list(data.task.label_words),
        "data": data.provenance,
        "seed": ctx.seed,
        "demo_seed": ctx.seed,
        "eval_ids": [x.id for x in evals],
        "demo_ids": [x.id for x in demos],
        "n_demos_requested": cfg.n_demos,
        "n_demos_dropped_for_context": fit.n_dropped,
        "longest_prompt_tokens": fit.longest,
        "lr": lr,
        "lr_selection": heldout,
        "record_position": cfg.record,
        "predict_position": "last query-input token (-2)",
        "dtype": cfg.dtype,
        "device": str(B.input_device(model)),
        "config": asdict(cfg),
        "config_key": cfg.key(),
        # half precision only: what is known to differ from fp32 (checks.precision_caveat)
        **(
            {"precision_caveat": c}
            if (c := precision_caveat(getattr(torch, cfg.dtype), cfg.update_capture_dtype))
            else {}
        ),  # fmt: skip
    }


def examples_from(items: Sequence[Example]) -> list[Example]:
    """A defensive copy (so callers' lists are never mutated)."""
    return list(items)
