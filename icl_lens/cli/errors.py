"""How the CLI fails: :class:`UsageError` (exit code 2) and every error as one line."""

from __future__ import annotations

import sys


class UsageError(Exception):
    """The command as given cannot run (exit code 2); the message says what to change."""


def _one_line(e: BaseException) -> str:
    """An exception as one line: its message (lines joined), typed when unexpected."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    expected = (UsageError, ValueError, OSError, ImportError, RuntimeError, ArithmeticError)
    if isinstance(e, expected) and text:
        return text
    return f"{type(e).__name__}: {text} (unexpected; ICL_LENS_DEBUG=1 shows the traceback)"


def _close_progress_bars() -> None:
    """Close the progress bars an error left open (innermost first), so that the error line
    comes last and is not redrawn over."""
    if "tqdm" not in sys.modules:
        return
    try:
        from tqdm import tqdm

        for bar in sorted(list(tqdm._instances), key=lambda b: -abs(getattr(b, "pos", 0))):
            bar.close()
    except Exception:  # a progress bar must never hide the error
        pass


def _fail(e: BaseException, code: int) -> int:
    _close_progress_bars()
    print(f"icl-lens: {_one_line(e)}", file=sys.stderr)
    return code
