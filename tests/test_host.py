"""`host.keep_freed_memory`: a large block freed by one thread is reused, not faulted in again.

Each arm runs in a fresh process (mallopt settings are process-wide), with the allocation pattern
of XLA on CPU: a block of hundreds of MB allocated, written and freed by a worker thread, once per
step, each time on a new thread here (the worst case for glibc's per-thread arenas).
"""

import subprocess
import sys

import pytest

_STEPS = """
import ctypes, json, resource, sys, threading
from jaxtune import host
if sys.argv[1] == "keep":
  assert host.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
faults = []

def step():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(3):
  thread = threading.Thread(target=step)
  thread.start()
  thread.join()
print(json.dumps(faults))
"""


def _faults(arm: str) -> list[int]:
  out = subprocess.run(
    [sys.executable, "-c", _STEPS, arm], capture_output=True, text=True, check=True
  ).stdout
  return [int(x) for x in out.strip().strip("[]").split(",")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_without_page_faults():
  pages = (256 << 20) // 4096
  default, kept = _faults("default"), _faults("keep")
  assert all(f >= pages * 0.9 for f in default), default  # Faulted in again at every step.
  assert kept[0] >= pages * 0.9 and all(f < pages * 0.01 for f in kept[1:]), kept
