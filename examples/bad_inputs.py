"""Run the CLI on bad input, case by case, and print a Markdown table: command, message, exit code.

Every case should fail in one line (2: the command cannot run as given; 1: a failure while
working), most of them before any model loads. The files they need (an empty CSV, a results
file holding ``[]``, ...) are made in a temporary directory; nothing is written elsewhere.

    python examples/bad_inputs.py            # all cases (the last few load Gemma-3-270m)
    python examples/bad_inputs.py --fast     # only those that fail before any model loads
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REVIEWS = HERE / "reviews.jsonl"
OWN = ["--text-column", "review", "--label-column", "sentiment",
       "--template", "Review: {text} Sentiment:"]  # fmt: skip
WORDS = ["--label-words", "negative= Negative", "positive= Positive"]


def cases(tmp: Path) -> list[tuple[str, list[str], bool]]:
    """(what, argv after ``icl-lens``, loads the tokenizer or model)."""
    (tmp / "empty.csv").write_text("")
    (tmp / "list.json").write_text("[]")
    (tmp / "null.json").write_text("null")
    (tmp / "a_file").write_text("x")
    long = tmp / "long.jsonl"
    long.write_text("".join(json.dumps({"review": f"good {i} " * 20000, "sentiment": s}) + "\n"
                            for i, s in enumerate(("positive", "negative") * 4)))  # fmt: skip
    own = ["reproduce", "--data", str(REVIEWS), *OWN]
    out = ["--out", str(tmp / "out")]
    return [
        ("unknown task", ["reproduce", "--tasks", "sst3", *out], False),
        ("a valid task after a bad one", ["reproduce", "--tasks", "sst2", "sst3", *out], False),
        ("task with no offline data", ["reproduce", "--tasks", "cb", *out], False),
        ("unknown baseline", ["reproduce", "--baselines", "foo", *out], False),
        ("unknown model", ["reproduce", "--model", "no-such-model", *out], False),
        ("model name, case typo", ["reproduce", "--model", "gemma-3-270M", *out], False),
        ("TL model name offline", ["reproduce", "--model", "gpt2", *out], False),
        ("--n-demos 0", ["reproduce", "--n-demos", "0", *out], False),
        ("--n-eval 0", ["reproduce", "--n-eval", "0", *out], False),
        ("--n-eval -1", ["reproduce", "--n-eval", "-1", *out], False),
        ("--seeds repeated", ["reproduce", "--seeds", "0", "0", *out], False),
        ("--lr inf", ["reproduce", "--lr", "inf", *out], False),
        ("--out is a file", ["reproduce", "--out", str(tmp / "a_file")], False),
        ("--out not writable", ["reproduce", "--out", "/proc/icl-lens-out"], False),
        ("--source hf without network", ["reproduce", "--source", "hf", *out], False),
        ("results file holding []", ["figures", str(tmp / "list.json")], False),
        ("results file holding null", ["figures", str(tmp / "null.json")], False),
        ("compare on a missing directory", ["compare", str(tmp / "nothing")], False),
        ("empty CSV", ["reproduce", "--data", str(tmp / "empty.csv"), *OWN, *WORDS, *out], False),
        (
            "missing column",
            ["reproduce", "--data", str(REVIEWS), *OWN[:1], "text", *OWN[2:], *WORDS, *out],
            False,
        ),  # fmt: skip
        (
            "label value without a word",
            [*own, "--label-words", "negative= Negative", "neutral= Neutral", *out],
            False,
        ),
        ("malformed --label-words", [*own, "--label-words", "negative", *out], False),
        (
            "multi-token label word",
            [*own, "--label-words", "negative= Negativeness", "positive= Positive", *out],
            True,
        ),
        (
            "text longer than the context",
            ["reproduce", "--data", str(long), *OWN, *WORDS, "--n-demos", "2", *out],
            True,
        ),  # fmt: skip
        (
            "FT explodes at the --lr given",
            [
                *own,
                *WORDS,
                "--lr",
                "1e9",
                "--n-demos",
                "8",
                "--n-eval",
                "4",
                "--seeds",
                "0",
                "--no-figures",
                *out,
            ],
            True,
        ),  # fmt: skip
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="skip the cases that load the model")
    args = ap.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    env.pop("ICL_LENS_DEBUG", None)
    print("| case | command | message (stderr, last line) | exit | s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for what, cmd, slow in cases(tmp):
            if slow and args.fast:
                continue
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "icl_lens.cli", *cmd], env=env,
                               capture_output=True, text=True)  # fmt: skip
            lines = [x for x in p.stderr.splitlines() if x.strip() and "it/s]" not in x]
            msg = (lines[-1] if lines else "(nothing)").replace(d, "TMP")
            shown = (
                " ".join(shlex.quote(c) for c in cmd)
                .replace(d, "TMP")
                .replace(str(HERE.parent) + "/", "")
            )
            print(f"| {what} | `icl-lens {shown}` | {msg.replace('|', '/')} | {p.returncode} "
                  f"| {time.perf_counter() - t:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
