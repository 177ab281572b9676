"""Command line: ``icl-lens reproduce | figures | bench``."""

from __future__ import annotations

import argparse
import sys

NOT_YET = "icl-lens {cmd}: not yet available in this version of icl-lens ({version})."


def _not_yet(args: argparse.Namespace) -> int:
    from icl_lens import __version__

    print(NOT_YET.format(cmd=args.command, version=__version__), file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icl-lens",
        description="Reproduce Dai et al. 2022 (ICL as implicit gradient descent) with baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("reproduce", "run ZS/ICL/FT analyses on the offline default model and tasks"),
        ("figures", "regenerate the paper's figures from a results directory"),
        ("bench", "run the engine benchmarks"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=_not_yet)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
