"""The ``--data`` file: read and checked before the model loads, then checked against the
tokenizer once it has."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from icl_lens.cli.checks import _check_template, _parse_label_words
from icl_lens.cli.errors import UsageError
from icl_lens.tasks import TASKS

SPLIT_COLUMN = "split"  # a --data column of this name says which rows are demos, which eval


def _user_data(args: argparse.Namespace) -> Any:
    """The ``--data`` file as TaskData, every problem a UsageError naming the fix. A column
    named ``split`` (train / test, validation, dev, eval) decides the demonstration pool and the
    evaluation rows; without one, a seeded half of the rows is evaluated on."""
    from icl_lens.data import FILE_SUFFIXES, load_file, read_table

    path = Path(args.data).expanduser()
    flag = f"--data {args.data}"
    if not path.exists():
        raise UsageError(f"{flag}: no such file")
    if path.is_dir():
        raise UsageError(f"{flag} is a directory; pass a .csv, .tsv or .jsonl file")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise UsageError(f"{flag}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    if path.stem in TASKS:
        raise UsageError(
            f"{flag}: its task would be named {path.stem!r} (the file's stem), a built-in task's "
            "name, and its results would mix with that task's under --out; rename the file"
        )
    template = _check_template(args.template)
    words = _parse_label_words(args.label_words)
    text_column, label_column = args.text_column or "text", args.label_column or "label"
    try:
        frame = read_table(path, [text_column])
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    for option, column in (("--text-column", text_column), ("--label-column", label_column)):
        if column not in frame.columns:
            raise UsageError(
                f"{path}: no column {column!r} ({option}); its columns are {list(frame.columns)}"
            )
    if len(frame) == 0:
        raise UsageError(f"{path}: no rows; add one example per row under the header")
    present = {str(v) for v in frame[label_column] if isinstance(v, str) and v.strip()}
    present |= {str(v) for v in frame[label_column] if not isinstance(v, str) and v == v}
    missing = sorted(present - set(words))
    if missing:
        shown = " ".join(f'{v}=" ..."' for v in missing[:3])
        one = len(missing) == 1
        what = f"value {missing[0]!r}" if one else f"values {missing[:5]}"
        raise UsageError(
            f"{path}: the label {what} of column {label_column!r} {'has' if one else 'have'} no "
            f"label word; add {'it' if one else 'them'} to --label-words ({shown}); given: "
            f"{', '.join(words)}"
        )
    split = (
        SPLIT_COLUMN if SPLIT_COLUMN in set(frame.columns) - {text_column, label_column} else None
    )
    try:
        return load_file(path, text_column, label_column, template, tuple(words.values()),
                         labels=list(words), split_column=split, name=path.stem)  # fmt: skip
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None


def _check_data_for_model(data: Any, model: Any, n_eval: int) -> None:
    """``--data`` checks that need the tokenizer: single-token label words, rows that fit."""
    from icl_lens import backend as B
    from icl_lens.tasks import LabelWordError, build_prompt, label_token_ids

    tok = getattr(model, "tokenizer", None)
    if tok is None:  # run_experiment names this
        return
    spec = data.task
    try:
        label_token_ids(spec, tok)
    except LabelWordError as e:
        if e.multi_token:
            shown = "; ".join(f"{w!r} is {len(ids)} tokens" for w, ids in e.multi_token.items())
            raise UsageError(
                f"--label-words: {shown} for this model's tokenizer; each label word must be one "
                "token: choose another word (with or without its leading space)"
            ) from None
        raise UsageError(
            f"--label-words: {list(spec.label_words)} share a token for this model's tokenizer; "
            "choose words that are different tokens"
        ) from None
    n_ctx = B.dims(model).n_ctx
    where = data.provenance.get("file", spec.name)
    for ex in [*data.eval[:n_eval], *data.demo_pool]:
        try:
            n = len(build_prompt(spec, tok, ex))
        except ValueError as e:
            raise UsageError(f"{where}: row {ex.id}: {e}") from None
        if n > n_ctx:
            raise UsageError(
                f"{where}: row {ex.id} is {n} tokens in the template (with BOS and the label "
                f"word), more than the model's context of {n_ctx}; shorten or drop that row"
            )
