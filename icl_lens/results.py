"""``Results``: tidy rows of every metric, with provenance; JSON in, JSON out, atomic writes.

Each results file carries ``"checksum": "sha256:..."`` over the canonical JSON of the rest of
its content (``content_checksum``), so a file edited or damaged after it was written is noticed:
``Results.load`` raises on a mismatch, and resuming refuses files without a valid checksum.
Files without one (written before checksums) still load for reading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = [
    "task",
    "model",
    "seed",
    "metric",
    "variant",
    "kind",
    "layer",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "lr",
    "note",  # why entries are undefined (left out of the mean), when some are
]
FORMAT = "icl-lens-results/1"
CHECKSUM = "checksum"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file.

    The file gets the mode a plain ``open`` would give (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"cannot store {type(x).__name__} in a results file")


def content_checksum(obj: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON (sorted keys, compact) of ``obj`` less its checksum.

    It is taken over the content as a reader gets it back (after one JSON round trip: tuples are
    lists, keys are strings), so writing and reading a file give the same checksum.
    """
    rest = {k: v for k, v in obj.items() if k != CHECKSUM}
    plain = json.loads(json.dumps(rest, allow_nan=False, default=_jsonable))
    blob = json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _with_checksum(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, CHECKSUM: content_checksum(obj)}


def verify_checksum(obj: dict[str, Any], path: str | Path, *, required: bool = False) -> bool:
    """Whether ``obj`` (read from ``path``) carries a checksum; raises ValueError if it does not
    match the content, or if it is missing and ``required``."""
    if CHECKSUM not in obj:
        if required:
            raise ValueError(
                f"{path} has no checksum (written by an older icl-lens, or rewritten by hand), "
                "so it cannot be trusted for resuming"
            )
        return False
    if obj[CHECKSUM] != content_checksum(obj):
        raise ValueError(
            f"{path} was edited or corrupted after it was written (its checksum does not match "
            "its content); delete it to recompute that run"
        )
    return True


def _clean_value(v: Any) -> Any:
    """Floats for JSON: NaN/inf become None (JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class RunResult:
    """One (task, seed) run: its rows, diagnostics and provenance."""

    task: str
    seed: int
    rows: list[dict[str, Any]]
    provenance: dict[str, Any]
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The content of a run file, with its ``checksum``."""
        rows = [{k: _clean_value(r.get(k)) for k in COLUMNS} for r in self.rows]
        obj = {
            "format": FORMAT,
            "task": self.task,
            "seed": self.seed,
            "rows": rows,
            "provenance": self.provenance,
            "diagnostics": self.diagnostics,
        }
        return _with_checksum(obj)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunResult:
        if obj.get("format") != FORMAT:
            raise ValueError(f"not an icl-lens results file (format {obj.get('format')!r})")
        return cls(
            obj["task"], int(obj["seed"]), obj["rows"], obj["provenance"], obj["diagnostics"]
        )


class Results:
    """All runs of an experiment. ``to_frame`` is tidy; ``summary`` is the paper-style table."""

    def __init__(self, runs: Iterable[RunResult] = (), resumed: Iterable[dict] = ()):
        self.runs: list[RunResult] = list(runs)
        # runs reused from files instead of computed (task, seed, path, versions)
        self.resumed: list[dict] = list(resumed)

    def __len__(self) -> int:
        return len(self.runs)

    def __add__(self, other: Results) -> Results:
        return Results([*self.runs, *other.runs], [*self.resumed, *other.resumed])

    def to_frame(self) -> pd.DataFrame:
        """One row per (task, model, seed, metric, variant, layer) with its CI."""
        rows = [r for run in self.runs for r in run.rows]
        frame = pd.DataFrame(rows, columns=COLUMNS)
        frame = frame.astype({"value": float, "ci_low": float, "ci_high": float, "note": object})
        frame["note"] = frame["note"].where(frame["note"].notna(), None)  # older files: no note
        return frame

    def get(self, metric: str, variant: str, layer: str = "mean", task: str | None = None):
        """Values of one metric/variant/layer, one per (task, seed)."""
        f = self.to_frame()
        sel = (f.metric == metric) & (f.variant == variant) & (f.layer.astype(str) == str(layer))
        if task is not None:
            sel &= f.task == task
        return f[sel]

    def summary(self) -> pd.DataFrame:
        """Paper-style table: rows are tasks (mean over seeds), columns the headline numbers."""
        return summary_table(self.to_frame())

    def _describe(self) -> str:
        frame = self.to_frame()
        if frame.empty:
            return f"{len(self.runs)} runs, no rows"
        seeds = sorted(frame["seed"].unique().tolist())
        tasks = ", ".join(map(str, dict.fromkeys(frame["task"])))
        models = ", ".join(map(str, dict.fromkeys(frame["model"])))
        return f"{len(self.runs)} runs · model {models} · tasks {tasks} · seeds {seeds}"

    def undefined(self) -> pd.DataFrame:
        """The layer-mean rows whose value is undefined (NaN), with the reason each carries;
        for a metric reported per layer only (e.g. ``patch_survival``), its per-layer rows."""
        f = self.to_frame()
        layer = f.layer.astype(str)
        per_layer_only = set(f.metric) - set(f.metric[layer == "mean"])
        f = f[((layer == "mean") | f.metric.isin(per_layer_only)) & f["value"].isna()]
        return f[["task", "seed", "metric", "variant", "note"]].reset_index(drop=True)

    def __repr__(self) -> str:
        return f"<Results: {self._describe()}>"

    def _repr_html_(self) -> str:
        """Jupyter shows the summary table (tasks as columns), and why any value is undefined."""
        import html

        head = f"<p><b>icl-lens Results</b>: {html.escape(self._describe())}</p>"
        if not self.runs:
            return head
        table = self.summary().T.to_html(float_format=lambda v: f"{v:.3f}", na_rep="undefined")
        reasons = self.undefined().dropna(subset=["note"]).drop_duplicates(["metric", "note"])
        notes = "".join(
            f"<li>{html.escape(f'{r.metric} {r.variant}'.strip())}: {html.escape(str(r.note))}</li>"
            for r in reasons.itertuples()
        )
        foot = f"<p>undefined values:</p><ul>{notes}</ul>" if notes else ""
        return head + table + foot

    def to_json(self) -> dict[str, Any]:
        """All runs in one object, with one ``checksum`` over all of them."""
        runs = [{k: v for k, v in r.to_json().items() if k != CHECKSUM} for r in self.runs]
        return _with_checksum({"format": FORMAT, "runs": runs})

    def save(self, path: str | Path) -> Path:
        """Save all runs to one JSON file (atomically)."""
        atomic_write_json(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, require_checksum: bool = False) -> Results:
        """Load a file written by ``save``, a single run file, or a directory of run files.

        A file whose checksum does not match its content raises ValueError; one without a
        checksum (older) loads, unless ``require_checksum``.
        """
        path = Path(path)
        if path.is_dir():
            files = sorted(path.rglob("seed*.json"))
            if not files:
                raise FileNotFoundError(f"no run files (seed*.json) under {path}")
            return cls(RunResult.from_json(_read(f, require_checksum)) for f in files)
        obj = _read(path, require_checksum)
        if "runs" in obj:
            if obj.get("format") != FORMAT:
                raise ValueError(f"{path} is not an icl-lens results file")
            return cls(RunResult.from_json(r) for r in obj["runs"])
        return cls([RunResult.from_json(obj)])


def _read(path: Path, require_checksum: bool = False) -> dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); delete it to recompute that run") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not an icl-lens results file (not a JSON object)")
    verify_checksum(obj, path, required=require_checksum)
    return obj


# (metric, variant, column) of the paper-style summary; values are means over seeds. SimAOU
# and Kendall are at their default recording sites ("residual", "q_pre"), each with the
# other site beside it (experiment.SITES); results made before the other sites were recorded
# lack those columns.
SUMMARY_COLUMNS = [
    ("accuracy", "zs", "ZSL acc"),
    ("accuracy", "ft", "FT acc"),
    ("accuracy", "icl", "ICL acc"),
    ("rec2ftp", "ft", "Rec2FTP"),
    ("rec2ftp", "chance", "Rec2FTP chance"),
    ("simaou", "ft", "SimAOU"),
    ("simaou_attention", "ft", "SimAOU (attention site)"),
    ("simaou", "uniform", "SimAOU uniform"),
    ("simaou", "gaussian", "SimAOU gaussian"),
    ("simaou_null", "ft", "SimAOU null"),
    ("simaou_null_attention", "ft", "SimAOU null (attention site)"),
    ("simaou_orthogonal", "ft", "SimAOU orth"),
    ("simaou_orthogonal_attention", "ft", "SimAOU orth (attention site)"),
    ("simaou", "untrained", "SimAOU untrained"),
    ("simaou", "ft_shuffled", "SimAOU shuffled-FT"),
    ("simaou", "ft_layer_causal", "SimAOU layer-causal"),
    ("simam_before", "icl_vs_zs", "SimAM before"),
    ("simam_after", "ft", "SimAM after"),
    ("simam_delta", "ft", "SimAM delta"),
    ("kendall_token", "ft", "Kendall"),
    ("kendall_token_q_post", "ft", "Kendall (q_post)"),
    ("kendall_token", "uniform", "Kendall random"),
    ("kendall_token", "untrained", "Kendall untrained"),
]
PERCENT = {"accuracy"}


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows are tasks, columns the paper's headline numbers beside their baselines.

    Accuracies are in percent; similarities are means over layers, then over seeds. A column
    whose metric was not run is left out.
    """
    overall = frame[frame.layer.astype(str) == "mean"]
    out = {}
    for metric, variant, column in SUMMARY_COLUMNS:
        sel = overall[(overall.metric == metric) & (overall.variant == variant)]
        if sel.empty:
            continue
        scale = 100.0 if metric in PERCENT else 1.0
        out[column] = sel.groupby("task")["value"].mean() * scale
    table = pd.DataFrame(out)
    table["seeds"] = overall.groupby("task")["seed"].nunique()
    table.index.name = "task"
    return table


def to_markdown(
    table: pd.DataFrame,
    digits: int = 3,
    row_digits: dict | None = None,
    col_formats: dict | None = None,
) -> str:
    """A GitHub-markdown table of ``table`` (index as the first column); NaN shows as "–".

    Floats get ``digits`` decimals, or ``row_digits[row]`` for the rows named there, or the
    format spec ``col_formats[column]`` (e.g. ``".1f"``, ``"g"``) for the columns named there.
    """

    def cell(v: Any, spec: str) -> str:
        if v is None or v is pd.NA:
            return "–"
        if isinstance(v, (float, np.floating)):
            if not np.isfinite(v):
                return "–"
            text = format(v, spec)
            return text.lstrip("-") if float(text) == 0 else text  # no "-0.000"
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in table.columns]
    head = [str(table.index.name or ""), *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in table.iterrows():
        default = f".{(row_digits or {}).get(idx, digits)}f"
        specs = [(col_formats or {}).get(c, default) for c in cols]
        cells = (cell(v, spec) for v, spec in zip(row.tolist(), specs, strict=True))
        lines.append("| " + " | ".join([str(idx), *cells]) + " |")
    return "\n".join(lines)


# (metric, variant, column, format) of the README's per-seed table; "FT lr" follows "FT %"
PER_SEED_COLUMNS = [
    ("accuracy", "zs", "ZS %", ".1f"),
    ("accuracy", "icl", "ICL %", ".1f"),
    ("accuracy", "ft", "FT %", ".1f"),
    ("simaou", "ft", "SimAOU", ".3f"),
    ("simaou_null", "ft", "null", ".3f"),
    ("simaou", "untrained", "untrained", ".3f"),
    ("rec2ftp", "ft", "Rec2FTP %", ".1f"),
    ("rec2ftp", "chance", "chance %", ".1f"),
    ("kendall_token", "ft", "Kendall", ".3f"),
]
PER_SEED_FORMATS = {column: spec for *_, column, spec in PER_SEED_COLUMNS} | {"FT lr": "g"}


def per_seed_table(results: Results) -> pd.DataFrame:
    """One row per (task, seed): accuracies, the chosen FT learning rate and the headline
    similarities beside their nearest baselines, so no single seed is cherry-picked.

    Values are numbers (accuracies in percent, NaN where a metric was not run); format them
    with ``to_markdown(table, col_formats=PER_SEED_FORMATS)``.
    """
    frame = results.to_frame()
    frame = frame[frame.layer.astype(str) == "mean"]
    wide = frame.pivot_table(index=["task", "seed"], columns=["metric", "variant"],
                             values="value", aggfunc="first")  # fmt: skip
    table = pd.DataFrame(index=wide.index)
    for metric, variant, column, _ in PER_SEED_COLUMNS:
        col = wide.get((metric, variant), pd.Series(np.nan, index=wide.index))
        table[column] = col.astype(float) * (100.0 if metric in PERCENT else 1.0)
    lrs = {(r.task, r.seed): r.provenance.get("lr") for r in results.runs}
    lr = [lrs.get(key) for key in table.index]
    table.insert(
        table.columns.get_loc("FT %") + 1, "FT lr", [np.nan if x is None else x for x in lr]
    )
    table.index = [f"{t} seed {k}" for t, k in table.index]
    table.index.name = "task, seed"
    return table


def readme_tables(results: Results) -> str:
    """The README's reference tables: the summary (metrics × tasks, mean over seeds) and one
    row per seed (``per_seed_table``)."""
    frame = results.to_frame()
    summary = summary_table(frame).T
    seeds = summary.loc["seeds"].astype(int).tolist()
    summary = summary.drop(index="seeds")
    summary.columns = [f"{t} ({n} seeds)" for t, n in zip(summary.columns, seeds, strict=True)]
    summary.index.name = "mean over seeds"
    percent = {c: 1 for m, _, c in SUMMARY_COLUMNS if m in PERCENT or m == "rec2ftp"}
    return (
        to_markdown(summary, 3, percent)
        + "\n\n"
        + to_markdown(per_seed_table(results), col_formats=PER_SEED_FORMATS)
    )
