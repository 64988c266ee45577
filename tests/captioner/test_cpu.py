import platform
import subprocess
import sys

import pytest

# A 64 MB tensor (above glibc's largest mmap threshold) allocated and freed as a training step
# does its logits: how many pages the last of several allocations faults in, with or without
# keep_freed_memory().
SCRIPT = """
import resource, sys, torch
from captioner.runtime.cpu import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(3):
    torch.ones(16_000_000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16_000_000)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.integration  # subprocesses
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_training_reuses_freed_pages_instead_of_faulting_them_in_anew():
    _, fresh = _faults("plain")
    if fresh < 1000:
        pytest.skip(f"this kernel serves large blocks with huge pages: {fresh} faults to save")
    applied, kept = _faults("keep")
    assert applied == "True"
    assert kept < fresh / 10, (kept, fresh)


# Which arenas glibc made once a thread other than the main one has allocated: `malloc_info`
# lists one heap per arena.
ARENAS = """
import ctypes, sys, tempfile, threading, torch
from captioner.runtime.cpu import keep_freed_memory
keep_freed_memory(one_arena=sys.argv[1] == "one_arena")
worker = threading.Thread(target=lambda: torch.ones(100_000))
worker.start()
worker.join()
libc = ctypes.CDLL(None)
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(suffix=".xml") as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(report.name).read().count("<heap nr="))
"""


@pytest.mark.integration  # subprocesses
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory tunes glibc's malloc")
def test_one_arena_puts_other_threads_on_the_main_arena_and_the_default_does_not():
    arenas = {mode: int(subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("one_arena", "default")}
    assert arenas["one_arena"] == 1 and arenas["default"] > 1, arenas
