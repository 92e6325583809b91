"""Numeric precision choices that depend on the machine.

bf16 autocast only pays where the CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere
(AVX2-only CPUs) PyTorch emulates it and a training step gets orders of magnitude slower, so
every schedule defaults to fp32 there.
"""

from __future__ import annotations

import functools
from pathlib import Path

_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def native_bf16() -> bool:
    """True when /proc/cpuinfo lists a native bf16 instruction set (Linux; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return any(f in flags for f in _NATIVE_FLAGS)
