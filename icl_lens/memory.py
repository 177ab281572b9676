"""Give freed heap memory back to the operating system between the protocol's stages.

PyTorch frees a pass's activations, but glibc keeps much of that memory in its arenas, so the
process's resident size only grows from stage to stage. ``release_memory`` asks glibc to return
what it can (``malloc_trim``); elsewhere (other C libraries, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:  # the C library already loaded into this process (no ldconfig/gcc needed)
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


def release_memory() -> bool:
    """Return freed heap pages to the OS; True if glibc's ``malloc_trim`` ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
