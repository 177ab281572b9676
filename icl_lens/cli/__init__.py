"""Command line: ``icl-lens reproduce | figures | compare | bench``.

Every error is one line, ``icl-lens: ...``, and the exit code says whose it is: 2 when the
command as given cannot run (argparse's own errors; icl-lens's checks of the arguments, of
the ``--data`` file, of ``--out``, of the model name and of the network, all made before any
computation; a path that does not exist), 1 when something fails while working.
``ICL_LENS_DEBUG=1`` re-raises instead, with the traceback.

Modules: ``parser`` (argparse), ``checks`` (names, ``--out``, model, network, template, label
words), ``user_data`` (the ``--data`` file, built-in tasks' data), ``plan`` (what
``reproduce`` runs), ``commands`` (the subcommands' bodies), ``errors``, ``defaults``. The
helpers below are re-exported for callers of the old single module; to monkeypatch one, patch
it in the module that defines it.
"""

from __future__ import annotations

import logging
import os

from icl_lens.cli.checks import _check_model as _check_model
from icl_lens.cli.checks import _hf_cache_has_models as _hf_cache_has_models
from icl_lens.cli.checks import _hub_reachable as _hub_reachable
from icl_lens.cli.checks import _tl_checkpoint_cached as _tl_checkpoint_cached
from icl_lens.cli.defaults import BASELINES as BASELINES
from icl_lens.cli.defaults import BUNDLES as BUNDLES
from icl_lens.cli.defaults import DEFAULT_TASKS as DEFAULT_TASKS
from icl_lens.cli.defaults import DEFAULTS as DEFAULTS
from icl_lens.cli.defaults import LR_GRID as LR_GRID
from icl_lens.cli.defaults import QUICK as QUICK
from icl_lens.cli.errors import UsageError, _fail
from icl_lens.cli.parser import build_parser
from icl_lens.cli.plan import _task_data as _task_data

__all__ = ["main", "build_parser", "UsageError"]


def main(argv: list[str] | None = None) -> int:
    """Run a command; errors become one line ``icl-lens: ...`` and exit code 2 (the command as
    given cannot run, or a path it names does not exist) or 1 (a failure while working).
    ``ICL_LENS_DEBUG=1`` re-raises."""
    logging.basicConfig(level=os.environ.get("ICL_LENS_LOG", "WARNING"))
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("ICL_LENS_DEBUG"))
    try:
        return int(args.func(args))
    except (UsageError, FileNotFoundError) as e:
        if debug:
            raise
        return _fail(e, 2)
    except KeyboardInterrupt:
        if debug:
            raise
        return _fail(UsageError("interrupted"), 130)
    except Exception as e:
        if debug:
            raise
        return _fail(e, 1)
