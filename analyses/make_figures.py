"""Regenerate every figure from saved results (a run directory or one saved JSON file).

    python analyses/make_figures.py RESULTS [-o OUT_DIR] [--formats png pdf]

Uses only the public API: ``Results.load`` and ``plots.make_all``. OUT_DIR defaults to
``figures/`` beside the results. Figures whose metrics were not run are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from icl_lens import plots
from icl_lens.results import Results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", type=Path, help="directory of <task>/seed<k>.json, or a saved file")
    ap.add_argument("-o", "--out", type=Path, default=None, help="output directory")
    ap.add_argument("--formats", nargs="+", default=["png", "pdf"], help="file formats")
    ap.add_argument("--dpi", type=int, default=150)
    args = ap.parse_args(argv)
    if not args.results.exists():
        ap.error(f"no results at {args.results}")
    results = Results.load(args.results)
    out = args.out or (args.results if args.results.is_dir() else args.results.parent) / "figures"
    paths = plots.make_all(results, out, formats=args.formats, dpi=args.dpi)
    for p in paths:
        print(p)
    skipped = sorted(set(plots.FIGURES) - {p.stem for p in paths})
    if skipped:
        print(f"skipped (metrics not in the results): {', '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
