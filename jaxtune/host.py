"""Host memory: keep what an XLA program frees for its next run.

XLA on CPU allocates a program's temporaries with malloc each time it runs: for a training step,
one block of hundreds of MB. glibc serves blocks that large with a fresh `mmap` (always, from the
per-thread arenas that XLA's worker threads use) and unmaps them when they are freed, so every
step faults its temporaries in again, page by page, zeroed by the kernel. On the Llama model of
`benchmarks/train_vs_peers.py` that is 119k page faults (486 MB) and 0.2 s of kernel time in each
1.3 s step, on 2 cores.

`keep_freed_memory` makes glibc serve every thread from the main heap, never by `mmap`, and keep
freed memory instead of returning it to the system: from the second step on, a step reuses the
pages of the one before, with no faults. The process's resident memory then stays at its peak,
which a training process reaches at every step anyway. The `jaxtune` command calls it first
thing; a program of your own can too, before it starts JAX (threads that already have an arena
keep it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only a free top of the heap above 2 GiB.


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory for reuse; False (and nothing done) where the C
  library is not glibc."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    log.debug("not glibc: host memory left to the system allocator's defaults")
    return False
  settings = {_M_ARENA_MAX: 1, _M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _NEVER_TRIM}
  return all(mallopt(param, value) == 1 for param, value in settings.items())
