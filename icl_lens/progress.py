"""Progress bars that suit where they are shown.

In a terminal, and in Jupyter with ``ipywidgets`` installed (``pip install 'icl-lens[notebook]'``),
this is ``tqdm.auto``: a text bar, or one widget bar per stage. In Jupyter *without*
``ipywidgets``, text bars would print hundreds of lines into the cell, so bars there stay
silent while they run and each top-level bar (``leave=True``) prints one line when it ends:
``"sst2 seeds: 3/3 in 04:12"``. Inner bars (``leave=False``) print nothing.

``ICL_LENS_PROGRESS=text|widgets|quiet`` overrides the choice.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from tqdm.std import tqdm as _text_tqdm

__all__ = ["tqdm", "style"]


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell), False in a terminal or script."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def _has_widgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def style() -> str:
    """Which bars this process shows: ``"text"``, ``"widgets"`` or ``"quiet"``."""
    forced = os.environ.get("ICL_LENS_PROGRESS", "").strip().lower()
    if forced in ("text", "widgets", "quiet"):
        return forced
    if not _in_notebook():
        return "text"
    return "widgets" if _has_widgets() else "quiet"


class _Sink:
    """Swallows a bar's redraws."""

    def write(self, s: str) -> None:
        pass

    def flush(self) -> None:
        pass


class QuietBar(_text_tqdm):
    """Draws nothing while running; a ``leave=True`` bar prints one summary line at the end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["file"] = _Sink()
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if not self.disable and self.leave:
            total = f"/{self.total}" if self.total is not None else ""
            elapsed = self.format_interval(self.format_dict["elapsed"])
            print(f"{self.desc}: {self.n}{total} in {elapsed}", file=sys.stderr, flush=True)
        super().close()


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """A progress bar in the style :func:`style` picks (the signature is ``tqdm``'s)."""
    chosen = style()
    if chosen == "quiet":
        return QuietBar(*args, **kwargs)
    if chosen == "widgets":
        from tqdm.notebook import tqdm as widget_tqdm

        return widget_tqdm(*args, **kwargs)
    return _text_tqdm(*args, **kwargs)
