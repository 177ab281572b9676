"""Print the README's reference tables (markdown) from saved results.

    python analyses/make_tables.py results/gemma-3-270m

Uses only the public API (``Results.load``, ``results.readme_tables``). The README's copy is
checked against this output by ``tests/test_results.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_lens.results import Results, readme_tables


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", type=Path, help="directory of <task>/seed<k>.json, or a saved file")
    args = ap.parse_args(argv)
    if not args.results.exists():
        ap.error(f"no results at {args.results}")
    try:
        results = Results.load(args.results)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    print(readme_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
