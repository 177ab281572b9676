"""Write a small self-made (public-domain) sentiment file, as JSONL and as CSV, for trying
`icl-lens reproduce --data` on your own data:

    python examples/make_reviews.py            # -> examples/reviews.jsonl, examples/reviews.csv

Each review joins an aspect and an opinion ("The soundtrack was a delight."); labels are the
strings "positive"/"negative"; a `split` column puts 48 rows in train (demonstrations) and 48
in test (evaluation). Deterministic: the same files every time.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

ASPECTS = ["The acting", "The plot", "The soundtrack", "The dialogue", "The ending",
           "The camera work", "The pacing", "The lead performance"]  # fmt: skip
GOOD = ["was a delight.", "felt fresh and clever.", "moved me to tears.", "was superb.",
        "kept me gripped throughout.", "was warm and funny."]  # fmt: skip
BAD = ["was a chore.", "felt stale and lazy.", "bored me to tears.", "was dreadful.",
       "dragged on forever.", "was clumsy and flat."]  # fmt: skip


def rows() -> list[dict[str, str]]:
    pairs = (("positive", GOOD), ("negative", BAD))
    out = [
        {"review": f"{a} {o}", "sentiment": lab} for a in ASPECTS for lab, ops in pairs for o in ops
    ]
    random.Random(0).shuffle(out)
    for i, r in enumerate(out):
        r["split"] = "train" if i % 2 == 0 else "test"
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    data = rows()
    with open(here / "reviews.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in data)
    with open(here / "reviews.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "sentiment", "split"])
        w.writeheader()
        w.writerows(data)
    print(f"wrote {len(data)} rows to {here / 'reviews.jsonl'} and {here / 'reviews.csv'}")


if __name__ == "__main__":
    main()
