"""What this CPU computes natively: /proc/cpuinfo (Linux; elsewhere nothing is claimed) and the
vector instruction set PyTorch dispatches to (`torch.backends.cpu.get_cpu_capability()`).

bf16 only pays where the CPU has bf16 dot products (AVX-512 BF16 or AMX-BF16): elsewhere PyTorch
emulates bf16 and runs slower than fp32. int8 products run natively with VNNI (AVX-512 VNNI,
AVX-VNNI) or AMX-INT8; without them int8 kernels multiply in 16 bits and can saturate.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo, read once ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    return _cpuinfo().get("model name", "unknown CPU")


def native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX-512 BF16 or AMX-BF16)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def native_int8() -> bool:
    """True when the CPU has int8 dot products (AVX-512 VNNI, AVX-VNNI or AMX-INT8)."""
    return any(flag in cpu_flags() for flag in INT8_FLAGS)


def capabilities() -> dict[str, Any]:
    """The facts `auto` precision decides on, as `captioner info` and /v1/model report them."""
    import torch

    flags = cpu_flags()
    return {
        "name": cpu_name(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [flag for flag in REPORTED_FLAGS if flag in flags],
        "native_bf16": native_bf16(),
        "native_int8": native_int8(),
        "amx": any(flag.startswith("amx") for flag in flags),
    }


def keep_freed_memory(one_arena: bool = False) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    PyTorch's CPU allocator has no cache of its own, and glibc serves every block above its mmap
    threshold (32 MB at most) with fresh pages that it unmaps on free: a training step that
    allocates its (tokens, vocabulary) logits and their gradient, 48 MB each, page-faults them
    in anew every step, and the encoder its 25 MB activations every batch. On 2 AVX2 cores
    `torch.exp` of such a tensor takes 92 ms into fresh pages and 28 ms into reused ones, and the
    encoder at batch 16 30 to 35 ms per photo against 19 to 20. After this call the main arena
    serves blocks of every size and is never trimmed, so the process keeps its peak memory (as a
    GPU caching allocator does).

    The arenas glibc gives other threads hand large freed blocks back (a thread's 24 MB tensor
    faulted in anew each time). With `one_arena`, threads that first allocate after this call
    share the main arena, which usually avoids that: for processes that compute in a thread other
    than their main one (the service's batching thread where the encoder runs in PyTorch: on fp32,
    11-25% more requests/s one photo at a time; Ray's caption actors on every path, since on
    int8 arenas per thread gave them no more images/s) and for training (2-3% faster). Without
    it each thread has its own arena, so the OpenMP workers that compute a small product with the
    calling thread (fbgemm allocates per call) do not wait on its malloc lock: with one arena an
    int8 decoder step of 3 rows took 2x as long (AMX Xeon) and the service served 6-11% fewer
    requests on int8 with ONNX Runtime's encoder. The settings are
    process-wide and `one_arena` cannot be undone: call this at the start of a process that
    computes, and with `one_arena` before the threads it concerns first allocate. Returns whether
    it applied (glibc only)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process already runs on
    if mallopt is None:  # not glibc (macOS): nothing to set
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    return (bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
            and (not one_arena or bool(mallopt(m_arena_max, 1))))
