"""What the engine asks of the process before torch is first imported, and the import itself.

`import_torch()` turns on PyTorch's own `THP_MEM_ALLOC_ENABLE` (unless the environment already sets it) and
imports torch. With it, torch's CPU allocator asks the kernel for transparent huge pages (madvise) for every
allocation of 2 MiB or more, so the pre-packed weights, which a decode step streams from memory once per token,
sit on huge pages: fewer TLB misses and page walks per byte read. Measured with the
Qwen2-0.5B shape on this project's 2-core bench machine, a batch-1 bf16 step took 5-7% less time with the weights
on huge pages when oneDNN ran every linear, and 15% less (batch 8: 8%) with the small-batch kernels
(models/small_batch.py), in one process alternating between two copies of the model, one of them moved onto huge
pages with madvise (so the machine's drift cancels out).

Not for float32 (`huge_pages=False`: launch passes it when the CPU dtype is float32): there, 3 process starts
each way, in turn, gave the same decode speed with and without huge pages (batch 1: 11.8-13.0 against 12.7-13.7
tok/s; batch 8: 72.4-75.6 against 71.9-74.0), while loading the 2 GB of float32 weights took 2.2-4.7 s with them
and 0.55-1.1 s without: with the kernel's THP `defrag` setting `madvise`, a fault in memory marked for huge pages
waits for the kernel to compact memory when no free huge page is at hand. bf16 pays that too, less often
(loading 0.3 s, at times 0.8-2 s), for its 15% faster steps.

PyTorch reads the variable once, at its first allocation (during `import torch`), so it has to be set before
that; when torch is already imported (a library user's process), the setting is left as that process made it.
`THP_MEM_ALLOC_ENABLE=0` turns it off, and `1` on for float32 too. With transparent huge pages disabled in the
kernel ("never"), madvise has no effect and nothing changes.
"""

from __future__ import annotations

import os
import sys

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def import_torch(huge_pages: bool = True):
    """Set the engine's process settings if torch is not imported yet, then import it; returns the module.
    `huge_pages`: ask for huge pages (not for float32 on CPU: see above); the environment's setting wins."""
    if "torch" not in sys.modules and huge_pages:
        os.environ.setdefault(THP_VARIABLE, "1")
    import torch

    return torch
