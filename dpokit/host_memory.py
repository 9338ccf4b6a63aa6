"""How a dpokit process asks for host (CPU) memory: two allocator settings made once, at the start of the
`dpokit` command, before torch is imported.

- **Transparent huge pages for large CPU tensors.** With ``THP_MEM_ALLOC_ENABLE=1`` set before torch is
  imported, torch's CPU allocator (c10's ``alloc_cpu``) asks the kernel for huge pages
  (``madvise(MADV_HUGEPAGE)``) for every allocation of 2 MiB or more. A training step frees its gradients
  and activations and allocates them again, and each fresh 4 KiB page costs a page fault: about 20,000 a
  step on short pairs, a fifth of a full fine-tuning step on CPU; with 2 MiB pages, about 1,000.
- **glibc's heap kept from holding freed tensors.** glibc serves an allocation from its heap (which it
  rarely gives back) when it is below its mmap threshold, and it raises that threshold to the size of
  every mapped block it frees, up to 32 MiB. Freed activations then stay resident. A fixed 4 MiB
  threshold (``M_MMAP_THRESHOLD``) keeps large tensors in their own mappings, returned when freed.

Both change where memory comes from, never a value. A setting the user made in the environment wins.
Measured in bench/train_results.md ("Host memory settings"). Runs started otherwise (``python recipe.py``,
``torchrun``) get them by exporting the same variables: ``THP_MEM_ALLOC_ENABLE=1
MALLOC_MMAP_THRESHOLD_=4194304``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import MutableMapping

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # read by torch's CPU allocator when torch is imported
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"  # read by glibc when a process starts (workers this one launches)
MMAP_THRESHOLD_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def configure_host_memory() -> dict[str, str]:
    """Make both settings for this process and the processes it starts, unless the environment already names
    them. Call before torch is imported (`dpokit.cli.entry` does). Linux only; elsewhere nothing changes.
    Returns the settings in effect."""
    settings = add_host_memory_settings(os.environ)
    threshold = settings.get(MMAP_THRESHOLD, "")
    if threshold.isdigit():  # glibc read the environment when this process started: tell it now
        set_mmap_threshold(int(threshold))
    return settings


def add_host_memory_settings(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Both settings in `environ` (a child process's environment), where it does not name them already."""
    if not sys.platform.startswith("linux"):
        return {}
    environ.setdefault(HUGE_PAGES, "1")
    environ.setdefault(MMAP_THRESHOLD, str(MMAP_THRESHOLD_BYTES))
    return {HUGE_PAGES: environ[HUGE_PAGES], MMAP_THRESHOLD: environ[MMAP_THRESHOLD]}


def set_mmap_threshold(nbytes: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, nbytes)`` in this process; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
