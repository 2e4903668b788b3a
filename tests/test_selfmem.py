"""The worker's allocator setting: freed large buffers go back to the OS, so peaks do not creep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker import selfmem

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]

# Buffers of a few MiB freed while small long-lived objects are made between them, as a span's
# feature maps are freed while its results are kept: after glibc has seen one large block freed,
# such buffers come from the heap, and the small objects pin its pages.
SCRIPT = r"""
import sys
from worker import selfmem
if sys.argv[1] == "fixed":
    assert selfmem.fix_mmap_threshold()
import numpy as np
big = np.ones(32 * 2**20, dtype=np.uint8); del big   # one large block freed
base = selfmem.rss_mb()
kept = []
for span in range(12):
    bufs = []
    for k in range(8):
        b = np.empty((2 + (span + k) % 3) * 2**20, dtype=np.uint8); b[::4096] = 1
        bufs.append(b)
        kept.append(bytearray(256))
    del bufs
print(round(selfmem.rss_mb() - base, 1))
"""


def _held_after(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_with_a_fixed_mmap_threshold_freed_buffers_leave_the_process():
    fixed, dynamic = _held_after("fixed"), _held_after("dynamic")
    assert fixed < 4.0, fixed  # what is left is the small objects
    assert dynamic > fixed + 8.0, (dynamic, fixed)  # glibc's default keeps the freed buffers


def test_a_threshold_the_user_chose_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert selfmem.fix_mmap_threshold() is False
