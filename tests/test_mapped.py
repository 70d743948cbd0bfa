"""Handing an engine file's mapped pages back to the kernel (adapter.core.mapped)."""

from __future__ import annotations

import mmap
import sys
import time

import numpy as np
import pytest

from adapter.core.mapped import Releaser, mapped_resident_bytes, release_mapped, trim_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def test_release_drops_resident_pages_and_reads_come_back_from_the_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 16 * 2**20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = np.frombuffer(mapped, np.uint8)
        assert int(view.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read
        assert mapped_resident_bytes(path) >= 15 * 2**20
        assert release_mapped(path) == 1
        assert mapped_resident_bytes(path) <= 2**20
        np.testing.assert_array_equal(view, data)  # paged back in from the file, unchanged
        assert mapped_resident_bytes(path) >= 15 * 2**20
        del view


def test_releaser_keeps_pages_handed_back_while_a_loader_reads_the_file(tmp_path):
    """A loader reading a mapped 64 MB file page by page, with the releaser running: the
    resident part of the mapping stays a fraction of the file at every point, and the bytes
    read are the file's. Without it, all of the file is resident by the end."""
    data = np.random.default_rng(1).integers(0, 255, 64 * 2**20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.tobytes())
    chunk = 2**20

    def load(releaser: Releaser | None) -> tuple[int, int]:
        highest, total = 0, 0
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = np.frombuffer(mapped, np.uint8)
            if releaser:
                releaser.start()
            for start in range(0, len(view), chunk):
                total += int(view[start : start + chunk].sum(dtype=np.int64))
                time.sleep(0.002)  # the loader's own work between reads (the GIL is free)
                highest = max(highest, mapped_resident_bytes(path))
            if releaser:
                releaser.stop()
                assert mapped_resident_bytes(path) <= chunk  # stop() releases once more
            del view
        return highest, total

    unreleased, total = load(None)
    assert unreleased >= 60 * 2**20 and total == int(data.sum(dtype=np.int64))
    released, total = load(Releaser(path, interval=0.01))
    assert released <= 24 * 2**20, released
    assert total == int(data.sum(dtype=np.int64))


def test_writable_mappings_and_unmapped_files_are_left_alone(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(bytes(2**20))
    assert release_mapped(path) == 0  # nothing maps it
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as mapped:
        mapped[:4] = b"abcd"
        assert release_mapped(path) == 0  # writable: its pages may hold writes
        assert mapped[:4] == b"abcd"


def _anonymous_resident_mb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssAnon")).split()[1]) // 1024


def test_trim_heap_returns_freed_heap_blocks_to_the_kernel():
    """Blocks under the mmap threshold freed below a live one stay resident in glibc's heap
    (no automatic trim reaches them) until trim_heap hands their pages back."""
    blocks = [bytearray(b"\x01") * 100_000 for _ in range(2000)]  # ~200 MB in 100 kB heap blocks
    keep = blocks[-1]  # a live block above the freed ones: the heap's top cannot shrink
    before = _anonymous_resident_mb()
    del blocks
    freed = _anonymous_resident_mb()
    assert before - freed < 50  # glibc kept the freed blocks resident
    assert trim_heap()
    assert freed - _anonymous_resident_mb() >= 150
    assert keep[0] == 1 and len(keep) == 100_000  # the live block is intact
