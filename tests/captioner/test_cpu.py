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
