"""Evaluation sets and demonstration pools from three sources, with provenance.

- ``"hf"``: the official Hugging Face datasets (needs internet, or pass ``dataset=``).
- ``"staicc"``: the offline copies shipped in the StaICC package (train splits only, so
  disjoint eval and demo pools are carved deterministically), read with a pickle loader
  that refuses anything but plain containers and scalars.
- ``"file"``: a user's CSV / TSV / JSONL file (see :func:`load_file`).

Reference settings: the eval split is shuffled with seed 1 and capped at 2000; demos are the
first k of the pool shuffled with the run's seed (:func:`sample_demos`). Texts are stripped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from icl_lens.tasks import Example, TaskSpec, get_task, template_fields

EVAL_SEED = 1
EVAL_CAP = 2000
OFFLINE_HINT = "the offline data needs the 'offline' extra: pip install 'icl-lens[offline]'"
_EVAL_SPLITS = {"eval", "test", "validation", "valid", "dev"}
_DEMO_SPLITS = {"train", "demo"}


class UnsafePickleError(ValueError):
    """A pickle asked for a global (class, function): loading it could run code."""


@dataclass
class TaskData:
    """A task's evaluation examples and demonstration pool, disjoint, with their provenance."""

    task: TaskSpec
    eval: list[Example] = field(repr=False)
    demo_pool: list[Example] = field(repr=False)
    source: str
    provenance: dict[str, Any]


# --------------------------------------------------------------------------- safe pickles


class _PlainUnpickler(pickle.Unpickler):
    """Builds only lists, tuples, dicts, strings and numbers: every global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name}: only plain lists, tuples, strings and "
            "numbers are allowed (the file may run code; do not load it with pickle)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids: only plain data allowed")


def safe_unpickle(data: bytes, what: str = "pickle") -> Any:
    """Unpickle plain data only; raises :class:`UnsafePickleError` on any global or reduce."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{what}: {err}") from None
    except Exception as err:  # truncated / corrupt files
        raise ValueError(f"{what}: not a readable pickle ({type(err).__name__}: {err})") from err


def read_staicc_file(path: str | Path) -> list[tuple[list[str], int]]:
    """A StaICC ``*.dataset`` file as a validated list of ``([text, ...], label)``."""
    records = safe_unpickle(Path(path).read_bytes(), str(path))
    if not isinstance(records, list):
        raise ValueError(
            f"{path}: expected a list of ([text], label), got {type(records).__name__}"
        )
    for i, rec in enumerate(records):
        ok = (
            isinstance(rec, (tuple, list))
            and len(rec) == 2
            and isinstance(rec[0], list)
            and len(rec[0]) > 0
            and all(isinstance(t, str) for t in rec[0])
            and isinstance(rec[1], int)
            and not isinstance(rec[1], bool)
        )
        if not ok:
            raise ValueError(
                f"{path}: record {i} is {rec!r:.80}, expected ([text, ...], int label)"
            )
    return records


def staicc_file(name: str) -> Path:
    """Path of StaICC's cached ``{name}.dataset`` without importing StaICC."""
    spec = find_spec("StaICC")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(OFFLINE_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / "cached_dataset" / f"{name}.dataset"
    if not path.exists():
        raise FileNotFoundError(f"StaICC has no {path.name}; reinstall it: {OFFLINE_HINT}")
    return path


# --------------------------------------------------------------------------- shared helpers


def _clean(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{where}: text is {text!r}, expected a string; drop or fill empty rows")
    return text.strip()


def _example(id_: str, texts: Sequence[Any], fields: Sequence[str], label: int) -> Example:
    return Example(
        id_, {f: _clean(t, f"example {id_}") for f, t in zip(fields, texts, strict=True)}, label
    )


def _key(ex: Example) -> tuple[str, ...]:
    return tuple(ex.fields[f] for f in sorted(ex.fields))


def _check_labels(task: TaskSpec, examples: Sequence[Example], what: str) -> None:
    bad = sorted({e.label for e in examples if not 0 <= e.label < task.n_labels})
    if bad:
        raise ValueError(
            f"{what}: labels {bad} outside 0..{task.n_labels - 1} of task {task.name!r}; "
            "use a task whose label_words match the data"
        )


def _finish(
    task: TaskSpec,
    eval_pool: list[Example],
    demo_pool: list[Example],
    n_eval: int | None,
    dedup: bool,
    source: str,
    provenance: dict[str, Any],
) -> TaskData:
    """Cut eval to ``n_eval``, drop demo texts that also occur in the eval pool, validate."""
    what = provenance.get("file") or provenance.get("dataset") or task.name
    if n_eval is not None and n_eval <= 0:
        raise ValueError(f"n_eval must be positive, got {n_eval}; pass n_eval=None for all")
    if not eval_pool:
        raise ValueError(
            f"{what}: no evaluation examples; supply more rows (or a larger eval_fraction)"
        )
    n_dup = 0
    if dedup:
        seen = {_key(e) for e in eval_pool}
        kept = [d for d in demo_pool if _key(d) not in seen]
        n_dup, demo_pool = len(demo_pool) - len(kept), kept
    if not demo_pool:
        raise ValueError(f"{what}: the demonstration pool is empty; supply more training rows")
    eval_ = eval_pool if n_eval is None else eval_pool[:n_eval]
    _check_labels(task, eval_, what)
    _check_labels(task, demo_pool, what)
    provenance.update(
        source=source,
        task=task.name,
        n_eval_pool=len(eval_pool),
        n_eval=len(eval_),
        n_demo_pool=len(demo_pool),
        n_demo_dropped_duplicates=n_dup,
        text_normalisation="strip",
    )
    return TaskData(task, eval_, demo_pool, source, provenance)


def _carve(n: int, n_eval_pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Permute ``range(n)`` with ``seed``: first ``n_eval_pool`` -> eval, rest -> demo pool."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_eval_pool], np.sort(perm[n_eval_pool:])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- sources


def _load_staicc(
    task: TaskSpec, n_eval: int | None, path: str | Path | None, seed: int, cap: int, dedup: bool
) -> TaskData:
    if path is None:
        if task.staicc_name is None:
            raise ValueError(
                f"task {task.name!r} is not available offline (StaICC has no copy); "
                "use source='hf' with internet, or source='file' with your own copy"
            )
        path = staicc_file(task.staicc_name)
    path = Path(path)
    records = read_staicc_file(path)
    if not records:
        raise ValueError(f"{path}: no examples; check the file")
    n = len(records)
    eval_idx, demo_idx = _carve(n, min(cap, n // 2), seed)
    if len(task.text_fields) != len(records[0][0]):
        raise ValueError(
            f"{path}: records have {len(records[0][0])} texts but task {task.name!r} needs "
            f"{len(task.text_fields)} ({task.text_fields})"
        )

    def ex(i: int) -> Example:
        texts, label = records[i]
        return _example(str(i), texts, task.text_fields, label)

    try:
        version = importlib.metadata.version("StaICC")
    except importlib.metadata.PackageNotFoundError:
        version = None
    provenance = {
        "dataset": f"StaICC {version} cached_dataset/{path.name}",
        "file": str(path),
        "sha256": _sha256(path),
        "splits": {"eval": "train (carved)", "demo": "train (carved)"},
        "n_total": n,
        "seeds": {"carve": seed},
        "carve": (
            f"numpy default_rng({seed}).permutation(n); first min({cap}, n//2) -> eval pool, "
            "rest -> demo pool (file order), demo texts duplicating an eval-pool text dropped"
        ),
        "ids": "str(index in the file)",
    }
    return _finish(
        task, [ex(i) for i in eval_idx], [ex(i) for i in demo_idx], n_eval, dedup, "staicc",
        provenance,
    )  # fmt: skip


def _hf_load(path: str, name: str | None, split: str) -> Any:
    """``datasets.load_dataset`` (the only network call in icl-lens; tests monkeypatch it)."""
    import datasets

    return datasets.load_dataset(path, name, split=split)


def _hf_rows(task: TaskSpec, ds: Any, what: str) -> tuple[list[list[Any]], list[int], int]:
    """Text columns (row-major) and labels of a Dataset; rows with label < 0 dropped."""
    cols = [*task.hf_text_columns, task.hf_label_column]
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{what}: missing columns {missing}; available: {ds.column_names} "
            "(set hf_text_columns / hf_label_column on the TaskSpec)"
        )
    texts = list(zip(*(list(ds[c]) for c in task.hf_text_columns), strict=True))
    labels = [int(v) for v in ds[task.hf_label_column]]
    return texts, labels, sum(v < 0 for v in labels)


def _load_hf(
    task: TaskSpec, n_eval: int | None, dataset: Any, seed: int, cap: int, dedup: bool
) -> TaskData:
    if task.hf_path is None or task.hf_eval_split is None:
        raise ValueError(f"task {task.name!r} has no HF dataset; set hf_path and hf_eval_split")
    ident = "/".join(p for p in (task.hf_path, task.hf_name) if p)
    carve_single = dataset is not None and not isinstance(dataset, Mapping)
    if carve_single:  # one Dataset: carve disjoint pools like the offline data
        texts, labels, n_neg = _hf_rows(task, dataset, ident)
        keep = [i for i, v in enumerate(labels) if v >= 0]
        e_pos, d_pos = _carve(len(keep), min(cap, len(keep) // 2), seed)
        e_idx = [keep[j] for j in e_pos]
        d_idx = [keep[j] for j in d_pos]
        e_src = d_src = (texts, labels, "given")
        splits = {"eval": "given dataset (carved)", "demo": "given dataset (carved)"}
        carve = f"numpy default_rng({seed}).permutation; first min({cap}, n//2) -> eval pool"
        n_total = len(labels)
    else:
        if dataset is not None:
            lacking = [s for s in (task.hf_eval_split, "train") if s not in dataset]
            if lacking:
                raise ValueError(
                    f"dataset= lacks splits {lacking} (has {list(dataset)}); pass a DatasetDict "
                    f"with {task.hf_eval_split!r} and 'train', or a single Dataset to carve"
                )

        def get(split: str) -> Any:
            if dataset is not None:
                return dataset[split]
            return _hf_load(task.hf_path, task.hf_name, split)

        e_texts, e_labels, n_neg = _hf_rows(task, get(task.hf_eval_split), ident)
        d_texts, d_labels, d_neg = _hf_rows(task, get("train"), ident)
        n_neg += d_neg
        keep = [i for i, v in enumerate(e_labels) if v >= 0]
        perm = np.random.default_rng(seed).permutation(len(keep))[:cap]
        e_idx = [keep[j] for j in perm]
        d_idx = [i for i, v in enumerate(d_labels) if v >= 0]
        e_src = (e_texts, e_labels, task.hf_eval_split)
        d_src = (d_texts, d_labels, "train")
        splits = {"eval": task.hf_eval_split, "demo": "train"}
        carve = f"eval split shuffled with numpy default_rng({seed}).permutation, first {cap}"
        n_total = len(e_labels) + len(d_labels)
    if n_total == 0:
        raise ValueError(f"{ident}: no examples; check the dataset")

    def ex(i: int, src: tuple[list[list[Any]], list[int], str]) -> Example:
        id_ = str(i) if carve_single else f"{src[2]}:{i}"
        return _example(id_, src[0][i], task.text_fields, src[1][i])

    provenance = {
        "dataset": ident,
        "splits": splits,
        "n_total": n_total,
        "n_dropped_unlabelled": n_neg,
        "seeds": {"eval_shuffle": seed},
        "carve": carve,
        "ids": "str(index)" if carve_single else "'{split}:{index in split}'",
        "injected": dataset is not None,
    }
    return _finish(
        task, [ex(i, e_src) for i in e_idx], [ex(i, d_src) for i in d_idx], n_eval, dedup,
        "hf", provenance,
    )  # fmt: skip


FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")


def read_table(path: str | Path, text_columns: Sequence[str] = ()) -> Any:
    """A CSV / TSV / JSONL file as a DataFrame, every cell as written: a text such as ``NA``,
    ``null`` or ``nan`` stays that text (pandas would read it as a missing value); an empty
    CSV cell is ``""`` and a JSON ``null`` is missing. CSV ``text_columns`` are read as strings
    (``007`` stays ``007``). Errors name the file and the fix."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    kind = "JSON lines (one object per line)" if suffix in (".jsonl", ".ndjson") else "a header row"
    if not path.read_bytes().strip():
        raise ValueError(f"{path}: the file is empty; write {kind} and one example per row")
    try:
        if suffix in (".csv", ".tsv"):
            sep = "\t" if suffix == ".tsv" else ","
            text = dict.fromkeys(text_columns, str)
            return pd.read_csv(path, sep=sep, keep_default_na=False, dtype=text)
        return pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    except ValueError as e:  # parser errors, bad JSON, undecodable bytes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not readable as {kind} ({first})") from e


def _labels_of(values: Any, labels: Sequence[Any] | None, what: str) -> list[int]:
    """Label-word indices: the values looked up (as strings) in ``labels`` when it is given,
    else the integers themselves."""
    import pandas as pd

    if labels is None and pd.api.types.is_integer_dtype(values):
        return [int(v) for v in values]
    if labels is None:
        raise ValueError(
            f"{what}: the label column holds {values.iloc[0]!r}-like values, not integers; "
            "pass labels=[...] listing the class names in label-word order"
        )
    index = {str(name): i for i, name in enumerate(labels)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ValueError(f"{what}: labels {unknown[:5]} not in labels={list(labels)}; add them")
    return [index[str(v)] for v in values]


def load_file(
    path: str | Path,
    text_columns: str | Sequence[str],
    label_column: str,
    template: str,
    label_words: Sequence[str],
    *,
    labels: Sequence[Any] | None = None,
    eval_fraction: float = 0.5,
    split_column: str | None = None,
    name: str | None = None,
    n_eval: int | None = EVAL_CAP,
    seed: int = EVAL_SEED,
    cap: int = EVAL_CAP,
    dedup: bool = True,
) -> TaskData:
    """A task and its data from a CSV / TSV / JSONL file.

    Labels are integers (label-word indices), or any values mapped through ``labels`` (the
    values, compared as strings, in label-word order; e.g. ``["negative", "positive"]`` or
    ``[1, 2]``). A text written ``NA`` is the text "NA", not a missing value. Eval rows are
    either the ``split_column`` rows marked eval/test/validation/dev (shuffled with ``seed``,
    capped; the rows marked train/demo are the demo pool; values are matched case-insensitively)
    or the first ``eval_fraction`` of a ``seed`` permutation, the rest forming the demo pool.
    Ids are ``str(row index)``. The provenance records the file's sha256, the columns and the
    label values, which decide (with the template and label words) whether a run is resumed.
    """
    path = Path(path)
    columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    fields = template_fields(template)
    if len(fields) == len(columns) == 1:
        field_of = {columns[0]: fields[0]}
    elif set(fields) == set(columns):
        field_of = {c: c for c in columns}
    else:
        raise ValueError(
            f"template fields {list(fields)} do not match text_columns {columns}; "
            "name the template's placeholders after the columns"
        )
    task = TaskSpec(
        name or path.stem, template, tuple(label_words), text_fields=tuple(field_of.values()),
        hf_text_columns=tuple(columns), hf_label_column=label_column,
    )  # fmt: skip
    df = read_table(path, columns)
    needed = [*columns, label_column] + ([split_column] if split_column else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; available: {list(df.columns)}")
    if len(df) == 0:
        raise ValueError(f"{path}: no rows; add examples to the file")
    for column in needed:
        cells = df[column]
        empty = cells.isna() | cells.map(lambda v: isinstance(v, str) and not v.strip())
        if empty.any():
            rows = [int(i) for i in np.flatnonzero(empty.to_numpy())]
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            raise ValueError(
                f"{path}: {len(rows)} empty {'cell' if len(rows) == 1 else 'cells'} in column "
                f"{column!r} (rows {shown}, counting from 0 after the header); fill or drop "
                f"{'that row' if len(rows) == 1 else 'those rows'}"
            )
    label_ids = _labels_of(df[label_column], labels, str(path))
    rows = df[columns].astype(str).values.tolist()

    def ex(i: int) -> Example:
        return _example(str(i), rows[i], task.text_fields, label_ids[i])

    if split_column:
        split = df[split_column].astype(str).str.strip().str.lower()
        odd = sorted(set(split) - _EVAL_SPLITS - _DEMO_SPLITS)
        accepted = (
            f"use {' or '.join(sorted(_DEMO_SPLITS))} for demonstrations and "
            f"{', '.join(sorted(_EVAL_SPLITS))} for evaluation"
        )
        if odd:
            raise ValueError(
                f"{path}: column {split_column!r} has the values {odd[:5]}, which are not "
                f"splits; {accepted}"
            )
        for what, names in (("an evaluation", _EVAL_SPLITS), ("a demonstration", _DEMO_SPLITS)):
            if not split.isin(names).any():
                raise ValueError(
                    f"{path}: no row of column {split_column!r} is in {what} split; {accepted}"
                )
        e_rows = np.flatnonzero(split.isin(_EVAL_SPLITS).to_numpy())
        e_idx = e_rows[np.random.default_rng(seed).permutation(len(e_rows))][:cap]
        d_idx = np.flatnonzero(split.isin(_DEMO_SPLITS).to_numpy())
        carve = f"split column {split_column!r}; eval rows shuffled with default_rng({seed})"
        present = set(split)
        splits = {
            "column": split_column,
            "eval": ", ".join(sorted(present & _EVAL_SPLITS)),
            "demo": ", ".join(sorted(present & _DEMO_SPLITS)),
        }
    else:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        e_idx, d_idx = _carve(len(df), min(cap, int(len(df) * eval_fraction)), seed)
        carve = (
            f"numpy default_rng({seed}).permutation(n); first min({cap}, "
            f"int(n*{eval_fraction})) -> eval pool, rest -> demo pool"
        )
        splits = {"eval": "carved", "demo": "carved"}
    provenance = {
        "dataset": path.name,
        "file": str(path),
        "sha256": _sha256(path),
        "columns": {"text": columns, "label": label_column, "split": split_column},
        "labels": None if labels is None else [str(v) for v in labels],
        "splits": splits,
        "n_total": len(df),
        "seeds": {"carve": seed},
        "carve": carve,
        "ids": "str(row index in the file)",
    }
    return _finish(
        task, [ex(int(i)) for i in e_idx], [ex(int(i)) for i in d_idx], n_eval, dedup, "file",
        provenance,
    )  # fmt: skip


def load_task_data(
    task: str | TaskSpec,
    source: str = "staicc",
    n_eval: int | None = EVAL_CAP,
    *,
    dataset: Any = None,
    path: str | Path | None = None,
    seed: int = EVAL_SEED,
    cap: int = EVAL_CAP,
    dedup: bool = True,
    **file_kwargs: Any,
) -> TaskData:
    """Evaluation examples and a disjoint demo pool for ``task`` from ``source``.

    ``source="hf"``: official ids; ``dataset=`` injects a local ``DatasetDict`` (needs the eval
    split and ``"train"``) or a single ``Dataset`` (carved like the offline data).
    ``source="staicc"``: the offline copy (``path=`` reads another file of the same format).
    ``source="file"``: ``path=`` to a CSV/JSONL with the task's template; ``file_kwargs`` go to
    :func:`load_file` (``text_columns`` defaults to ``task.hf_text_columns``).
    """
    spec = get_task(task)
    if source == "staicc":
        return _load_staicc(spec, n_eval, path, seed, cap, dedup)
    if source == "hf":
        return _load_hf(spec, n_eval, dataset, seed, cap, dedup)
    if source == "file":
        if path is None:
            raise ValueError("source='file' needs path=... (a .csv, .tsv or .jsonl file)")
        file_kwargs.setdefault("text_columns", spec.hf_text_columns)
        file_kwargs.setdefault("label_column", spec.hf_label_column)
        data = load_file(
            path, template=spec.template, label_words=spec.label_words, name=spec.name,
            n_eval=n_eval, seed=seed, cap=cap, dedup=dedup, **file_kwargs,
        )  # fmt: skip
        if spec.text_fields == data.task.text_fields:
            data.task = spec
        return data
    raise ValueError(f"unknown source {source!r}; use 'staicc' (offline), 'hf' or 'file'")


# --------------------------------------------------------------------------- demonstrations


def sample_demos(
    pool: Sequence[Example], k: int, seed: int, balanced: bool = False
) -> list[Example]:
    """``k`` demonstrations: the first ``k`` of the pool permuted by ``default_rng(seed)``.

    ``balanced=True`` picks round-robin over classes (class order = first appearance in the
    shuffled pool) so class counts differ by at most 1, and keeps the picks in shuffled order.
    """
    if not 0 <= k <= len(pool):
        raise ValueError(f"cannot sample k={k} demonstrations from a pool of {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))
    if not balanced:
        return [pool[i] for i in order[:k]]
    by_class: dict[int, list[int]] = {}
    for rank, i in enumerate(order):
        by_class.setdefault(pool[i].label, []).append(rank)
    base, n_extra = divmod(k, len(by_class))
    extra = [c for c, ranks in by_class.items() if len(ranks) > base][:n_extra]
    if len(extra) < n_extra or any(len(r) < base for r in by_class.values()):
        sizes = {c: len(r) for c, r in by_class.items()}
        raise ValueError(
            f"balanced k={k} needs about {k / len(by_class):.1f} per class but the pool has "
            f"{sizes}; lower k or use balanced=False"
        )
    picked = [r for c, ranks in by_class.items() for r in ranks[: base + (c in extra)]]
    return [pool[order[r]] for r in sorted(picked)]
