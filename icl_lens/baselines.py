"""Controls that make the similarity metrics mean something (Deutch et al. 2024).

- ``untrained`` / ``untrained_copy``: the same architecture with attention and MLP weights
  re-initialised, keeping embeddings, norms and unembedding, run through the same protocol
  (in place and restored bit for bit, or as a deep copy).
- ``shuffle_labels``: demonstrations with permuted labels, for FT on shuffled labels.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from icl_lens import backend as B
from icl_lens.tasks import Example

_NORM_MARKERS = ("norm", "ln")


class _Spill:
    """Originals of overwritten tensors, kept in an anonymous temporary file, not in RAM.

    The re-drawn attention/MLP weights are most of a model (400 MB of Gemma-3-270m's 1 GB);
    a second copy in memory would set the protocol's peak RSS. The file is unbuffered and
    every entry has a recorded offset, so a failed (even partial) write is cut off and loses
    no earlier entry. The file is deleted on close.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="icl-lens-untrained-", buffering=0)
        self._saved: list[tuple[nn.Parameter, int, int]] = []  # (tensor, offset, bytes)
        self._end = 0

    def __enter__(self) -> _Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def save(self, p: nn.Parameter) -> None:
        """Append ``p``'s current bytes (before it is overwritten)."""
        data = memoryview(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        start = self._end
        try:
            self._file.seek(start)
            while data:
                data = data[self._file.write(data) :]
        except OSError as e:  # p is not overwritten yet; the caller restores the others
            with suppress(OSError):
                self._file.truncate(start)
            raise OSError(
                f"cannot back up the weights the untrained baseline re-draws ({e}); point "
                "TMPDIR at a disk with room, or leave 'untrained' out of baselines"
            ) from e
        n = p.numel() * p.element_size()
        self._saved.append((p, start, n))
        self._end = start + n

    @torch.no_grad()
    def restore(self) -> None:
        """Write every saved original back, bit for bit (last saved first); every entry is
        tried even if one fails, and the first failure is raised afterwards."""
        failure: BaseException | None = None
        for p, start, n in reversed(self._saved):
            try:
                if n == 0:
                    continue
                self._file.seek(start)
                raw = bytearray(n)
                view, got = memoryview(raw), 0
                while got < n:
                    k = self._file.readinto(view[got:])
                    if not k:
                        raise OSError(f"the untrained baseline's backup file is short ({got}/{n})")
                    got += k
                orig = torch.frombuffer(raw, dtype=torch.uint8).view(p.dtype).view(p.shape)
                p.copy_(orig.to(p.device))
            except (OSError, RuntimeError) as e:
                failure = failure or e
        self._saved.clear()
        if failure is not None:
            raise failure


def _redraw(model: nn.Module, seed: int, saved: _Spill | None = None) -> None:
    """Re-draw attention/MLP weights in place; each original goes to ``saved`` before its
    write, so a failure midway can still be undone.

    Each re-drawn matrix is i.i.d. normal with the original matrix's standard deviation, so
    activation scales stay comparable; attention/MLP biases are zeroed; norm weights inside
    the blocks (e.g. Gemma's q/k norms) are kept.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in B.attention_parameters(model):
            leaf = name.split(".")[-1].lower()
            if any(m in part for part in name.lower().split(".")[2:] for m in _NORM_MARKERS):
                continue
            if saved is not None:
                saved.save(p)
            if p.ndim >= 2 and "b_" not in leaf:
                std = float(p.float().std())
                fresh = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
                p.copy_(fresh.to(p.dtype))
            else:
                p.zero_()


def untrained_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy with attention and MLP matrices re-drawn (see ``untrained``).

    The original model is untouched. Costs a second copy of the whole model (embeddings
    included); ``untrained`` does the same in place for the memory of the re-drawn weights.
    """
    clone = copy.deepcopy(model)
    _redraw(clone, seed)
    return clone


@contextmanager
def untrained(model: nn.Module, seed: int = 0) -> Iterator[nn.Module]:
    """Inside the block ``model`` is untrained (the weights ``untrained_copy`` would draw); on
    exit, also on an exception, every re-drawn tensor is restored bit for bit."""
    with _Spill() as saved:
        try:
            _redraw(model, seed, saved)
            yield model
        finally:
            saved.restore()


def shuffle_labels(demos: Sequence[Example], seed: int) -> list[Example]:
    """The same demonstrations with their labels permuted (a label-free FT control).

    A permutation keeps the label counts; with only one distinct label it is a no-op, so the
    function raises rather than return an uninformative control.
    """
    labels = np.array([d.label for d in demos])
    if len(set(labels.tolist())) < 2:
        raise ValueError("shuffled-label FT needs demonstrations with at least two labels")
    perm = np.random.default_rng(int(seed)).permutation(labels)
    return [replace(d, label=int(lab)) for d, lab in zip(demos, perm, strict=True)]
