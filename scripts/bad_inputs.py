"""Run every bad-input case of issue 14 through the real CLI and print a Markdown table
(command, the one line it printed last on stderr, exit code, seconds).

Usage: python scripts/bad_inputs.py [--fast]   (--fast skips the cases that load the model)
Needs the offline extra (Gemma-3-270m bundle, StaICC); nothing touches the network: the hub
is made unreachable with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 for the offline cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-c", "import sys; from icl_lens.cli import main; sys.exit(main())"]
FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def _cases(tmp: Path, fast: bool) -> list[tuple[str, list[str], dict[str, str]]]:
    a_file = tmp / "a_file"
    a_file.write_text("x")
    empty = tmp / "empty.csv"
    empty.write_text("")
    (tmp / "list_run" / "sst2").mkdir(parents=True)
    (tmp / "list_run" / "sst2" / "seed0.json").write_text("[]")
    (tmp / "null_run" / "sst2").mkdir(parents=True)
    (tmp / "null_run" / "sst2" / "seed0.json").write_text("null")
    nolabel = tmp / "nolabel.csv"
    nolabel.write_text("review,sentiment\ngood film,positive\nbad film,neutral\n")
    long_text = tmp / "long.jsonl"
    rows = [{"review": "word " * 40000 if i == 0 else f"fine film {i}", "sentiment": "positive"
             if i % 2 else "negative"} for i in range(40)]  # fmt: skip
    long_text.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = ["--out", str(tmp / "out")]
    user = ["--text-column", "review", "--label-column", "sentiment", "--template",
            "Review: {text} Sentiment:", "--label-words", "negative= Negative",
            "positive= Positive"]  # fmt: skip
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cases = [
        ("unknown task", ["reproduce", "--tasks", "sst3", *out], {}),
        ("a good and an unknown task", ["reproduce", "--tasks", "sst2", "sst3", *out], {}),
        ("task that needs --source hf", ["reproduce", "--tasks", "cb", *out], {}),
        ("unknown baseline", ["reproduce", "--baselines", "foo", *out], {}),
        ("unknown model", ["reproduce", "--model", "no-such-model", *out], {}),
        ("model name case typo", ["reproduce", "--model", "gemma-3-270M", *out], {}),
        ("TL model offline", ["reproduce", "--model", "gpt2", *out], offline),
        ("--source hf offline", ["reproduce", "--source", "hf", *out], offline),
        ("--n-demos 0", ["reproduce", "--n-demos", "0", *out], {}),
        ("--n-eval 0", ["reproduce", "--n-eval", "0", *out], {}),
        ("--n-eval -1", ["reproduce", "--n-eval", "-1", *out], {}),
        ("--lr inf", ["reproduce", "--lr", "inf", *out], {}),
        ("--lr nan", ["reproduce", "--lr", "nan", *out], {}),
        (
            "unwritable --out (read-only file system)",
            ["reproduce", "--out", "/proc/icl-lens-results"],
            {},
        ),  # fmt: skip
        ("--out is a file", ["reproduce", "--out", str(a_file)], {}),
        ("results file holding []", ["compare", str(tmp / "list_run")], {}),
        ("results file holding null", ["compare", str(tmp / "null_run")], {}),
        ("empty CSV", ["reproduce", "--data", str(empty), *user, *out], {}),
        (
            "missing --text-column",
            ["reproduce", "--data", str(FIX / "reviews.csv"), *user[2:], *out],
            {},
        ),  # fmt: skip
        (
            "column not in the file",
            [
                "reproduce",
                "--data",
                str(FIX / "reviews.csv"),
                "--text-column",
                "body",
                *user[2:],
                *out,
            ],
            {},
        ),  # fmt: skip
        ("label value without a word", ["reproduce", "--data", str(nolabel), *user, *out], {}),
        (
            "template without {text}",
            [
                "reproduce",
                "--data",
                str(FIX / "reviews.csv"),
                *user[:5],
                "Review:",
                *user[6:],
                *out,
            ],
            {},
        ),  # fmt: skip
    ]
    if not fast:  # these load the model (the checks need its tokenizer and context)
        cases += [
            (
                "multi-token label word",
                [
                    "reproduce",
                    "--data",
                    str(FIX / "reviews.csv"),
                    *user[:7],
                    "negative= Unfavourably",
                    "positive= Positive",
                    "--n-demos",
                    "4",
                    *out,
                ],
                {},
            ),  # fmt: skip
            (
                "text longer than the context",
                ["reproduce", "--data", str(long_text), *user, "--n-demos", "4", *out],
                {},
            ),  # fmt: skip
            (
                "FT diverges at a fixed --lr",
                [
                    "reproduce",
                    "--tasks",
                    "sst2",
                    "--seeds",
                    "0",
                    "--n-eval",
                    "8",
                    "--n-demos",
                    "32",
                    "--lr",
                    "1e9",
                    "--baselines",
                    "--no-figures",
                    *out,
                ],
                {},
            ),  # fmt: skip
        ]
    return cases


def main() -> None:
    fast = "--fast" in sys.argv
    print("| case | command | last line on stderr | exit | s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        try:
            for name, args, env in _cases(tmp, fast):
                start = time.perf_counter()
                p = subprocess.run([*CLI, *args], capture_output=True, text=True,
                                   env={**os.environ, **env}, timeout=900)  # fmt: skip
                secs = time.perf_counter() - start
                lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
                last = lines[-1] if lines else "(nothing)"
                shown = " ".join(args).replace(str(tmp), "$TMP").replace(str(FIX), "tests/fixtures")
                last = last.replace(str(tmp), "$TMP").replace(str(FIX), "tests/fixtures")
                print(f"| {name} | `icl-lens {shown}` | {last.replace('|', '/')} | "
                      f"{p.returncode} | {secs:.1f} |", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(tmp / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
