"""What the engine asks of the process before torch is first imported, and the import itself.

`import_torch()` turns on PyTorch's own `THP_MEM_ALLOC_ENABLE` (unless the environment already sets it) and
imports torch. With it, torch's CPU allocator asks the kernel for transparent huge pages (madvise) for every
allocation of 2 MiB or more, so the pre-packed weights, which a decode step streams from memory once per token,
sit on huge pages: fewer TLB misses and page walks per byte read. Measured with the
Qwen2-0.5B shape on this project's 2-core bench machine, a batch-1 bf16 step took 5-7% less time with the weights
on huge pages when oneDNN ran every linear, and 15% less (batch 8: 8%) with the small-batch kernels
(models/small_batch.py), in one process alternating between two copies of the model, one of them moved onto huge
pages with madvise (so the machine's drift cancels out).

PyTorch reads the variable once, at its first allocation (during `import torch`), so it has to be set before
that; when torch is already imported (a library user's process), the setting is left as that process made it.
`THP_MEM_ALLOC_ENABLE=0` turns it off. With transparent huge pages disabled in the kernel ("never"), madvise has
no effect and nothing changes.
"""

from __future__ import annotations

import os
import sys

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def import_torch():
    """Set the engine's process settings if torch is not imported yet, then import it; returns the module."""
    if "torch" not in sys.modules:
        os.environ.setdefault(THP_VARIABLE, "1")
    import torch

    return torch
