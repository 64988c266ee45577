"""What this CPU computes natively, read from /proc/cpuinfo (Linux; elsewhere nothing is claimed).

bf16 autocast only pays where the CPU has bf16 dot products (AVX-512 BF16 or AMX): elsewhere
PyTorch emulates bf16 and runs slower than fp32.
"""

from __future__ import annotations

import functools
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX-512 BF16 or AMX-BF16)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)
