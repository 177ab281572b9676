"""Print the README's reference tables (markdown) from saved results, or write them in place.

    python analyses/make_tables.py results/reference/gemma-3-270m
    python analyses/make_tables.py results/reference/gemma-3-270m --readme README.md

Uses only the public API (``Results.load``, ``results.readme_tables``). With ``--readme`` the
block between ``<!-- reference-tables:start -->`` and ``<!-- reference-tables:end -->`` is
replaced; ``tests/test_results.py`` checks that the README's copy equals this output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_lens.results import Results, readme_tables

START, END = "<!-- reference-tables:start -->", "<!-- reference-tables:end -->"


def write_into(readme: Path, tables: str) -> None:
    """Replace the marked block of ``readme`` with ``tables`` (the markers must exist)."""
    text = readme.read_text()
    if START not in text or END not in text.split(START, 1)[1]:
        raise ValueError(f"{readme} has no '{START}' ... '{END}' block; add the two markers first")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{tables.strip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", type=Path, help="directory of <task>/seed<k>.json, or a saved file")
    ap.add_argument("--readme", type=Path, help="write the tables into this file's marked block")
    args = ap.parse_args(argv)
    if not args.results.exists():
        ap.error(f"no results at {args.results}")
    try:
        tables = readme_tables(Results.load(args.results))
        if args.readme:
            write_into(args.readme, tables)
            print(f"wrote the reference tables into {args.readme}")
        else:
            print(tables)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
