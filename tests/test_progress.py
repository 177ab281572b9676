"""progress: tqdm.auto in terminals and with widgets; quiet one-liners in Jupyter without."""

from __future__ import annotations

import pytest
from tqdm.std import tqdm as text_tqdm

from icl_lens import progress


@pytest.mark.parametrize(
    ("notebook", "widgets", "expected"),
    [
        (False, False, "text"),
        (False, True, "text"),
        (True, True, "widgets"),
        (True, False, "quiet"),
    ],
)
def test_style_follows_the_front_end(monkeypatch, notebook, widgets, expected):
    monkeypatch.delenv("ICL_LENS_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "_in_notebook", lambda: notebook)
    monkeypatch.setattr(progress, "_has_widgets", lambda: widgets)
    assert progress.style() == expected
    monkeypatch.setenv("ICL_LENS_PROGRESS", "quiet")
    assert progress.style() == "quiet"


def test_not_a_notebook_outside_a_kernel():
    assert progress._in_notebook() is False  # pytest runs no ZMQ shell


def test_quiet_bars_print_one_line_for_top_level_bars_only(monkeypatch, capsys):
    monkeypatch.setenv("ICL_LENS_PROGRESS", "quiet")
    outer = progress.tqdm(range(3), desc="sst2 seeds")
    assert isinstance(outer, progress.QuietBar)
    for _ in outer:
        for _ in progress.tqdm(range(50), desc="capture zs", leave=False):
            pass
    err = capsys.readouterr().err
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith("sst2 seeds: 3/3 in ")
    with progress.tqdm(total=2, desc="off", disable=True) as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""


def test_text_bars_in_a_terminal(monkeypatch):
    monkeypatch.setenv("ICL_LENS_PROGRESS", "text")
    bar = progress.tqdm(total=1, disable=True)
    assert type(bar) is text_tqdm
