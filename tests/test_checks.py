"""checks: the warnings name the user's line, however deep inside icl-lens they start."""

from __future__ import annotations

import textwrap
import warnings

import torch

from icl_lens import checks
from icl_lens.checks import FastPathWarning, PrecisionWarning


def _icl_lens_function():
    """A function that runs as icl-lens code (module ``icl_lens._fake``): a torch.no_grad
    decorator and a generator-based context manager between it and its caller, as in
    ``capture`` and ``finetuned``."""
    source = textwrap.dedent(
        """
        import contextlib
        import torch
        from icl_lens.checks import warn, PrecisionWarning

        @torch.no_grad()
        def inner():
            warn("deep inside", PrecisionWarning)

        @contextlib.contextmanager
        def block():
            inner()
            yield
        """
    )
    namespace = {"__name__": "icl_lens._fake"}
    exec(compile(source, "<icl_lens._fake>", "exec"), namespace)
    return namespace["block"]


def test_a_warning_deep_inside_icl_lens_names_the_users_line():
    block = _icl_lens_function()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with block():  # the line the warning must name
            pass
    assert len(seen) == 1 and seen[0].category is PrecisionWarning
    assert seen[0].filename == __file__
    lines = open(__file__).read().splitlines()
    assert "the line the warning must name" in lines[seen[0].lineno - 1]


def test_warn_defaults_to_a_fast_path_warning_at_the_callers_line():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        checks.warn("plain path instead")
    assert seen[0].category is FastPathWarning and seen[0].filename == __file__
    assert torch.is_grad_enabled()
