"""CPU training keeps freed memory for reuse: allocating again what was freed costs no page faults."""

import subprocess
import sys

import pytest

# Allocates and frees a 64 MiB tensor five times after four others (malloc settles on reusing a
# pair of blocks), and prints the page faults those five took. With "cpu", configure_backend
# first sets up CPU training, as the trainer does.
COUNT_FAULTS = """
import resource, sys, torch
from gptlab.device import configure_backend
if sys.argv[1] == "cpu":
    configure_backend(torch.device("cpu"))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(16 * 2**20)
before = faults()
for _ in range(5):
    torch.ones(16 * 2**20)
print(faults() - before)
"""


def faults_of_reallocation(setup: str) -> int:
    done = subprocess.run([sys.executable, "-c", COUNT_FAULTS, setup], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_cpu_training_reuses_freed_memory_without_page_faults():
    kept = faults_of_reallocation("cpu")
    default = faults_of_reallocation("none")
    # By default each 64 MiB block goes back to the kernel and faults in again (16,384 pages of
    # 4 KiB each time, or 32 huge pages where the kernel gives them).
    assert default > 10 * max(kept, 1)
    assert kept < 100


def test_keep_freed_memory_says_whether_it_applied():
    from gptlab.host_memory import _glibc, keep_freed_memory

    assert keep_freed_memory() == (_glibc() is not None)
