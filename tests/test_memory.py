"""memory: release_memory runs malloc_trim on glibc and is harmless elsewhere."""

from __future__ import annotations

import platform

from icl_lens.memory import release_memory


def test_release_memory_runs_and_is_idempotent():
    blob = [bytearray(1 << 16) for _ in range(256)]  # 16 MB in 64 KB heap blocks
    del blob
    first, second = release_memory(), release_memory()
    assert first == second
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
