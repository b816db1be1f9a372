"""The KV cache's size and its slot table.

    plan_kv_cache(model, device, dtype, max_model_len, max_num_seqs, ...) -> tokens that fit
    SlotTable(num_slots): allocate() -> slot, free(slot), in_use

Each running sequence owns one cache slot (a `max_model_len` row of the model's static cache) from admission
until the step after it ends; slots are handed out lowest first, so a batch's slots are usually one contiguous
range (attention then reads them as a view). Nothing is copied when a sequence ends: its slot goes back to the
table, and its stale keys are never read by the next owner (attention masks by position) before being
overwritten.
"""

from __future__ import annotations

import heapq

from prestage.stages.errors import ResourceError

_GIB = 1024**3


def plan_kv_cache(
    model,
    device,
    dtype,
    max_model_len: int,
    max_num_seqs: int,
    gpu_memory_utilization: float = 0.9,
    cpu_kv_cache_space_gib: float = 4.0,
    prefill_tokens: int = 8192,
) -> int:
    """How many KV-cache tokens fit; ResourceError when not even one sequence of max_model_len does.

    CUDA (after the weights are loaded): total x utilization, less what is in use now, less a reserve for
    prefill activations. CPU: a fixed budget (`cpu_kv_cache_space_gib`, as vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    import torch

    per_token = model.kv_bytes_per_token(dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        args = getattr(model, "args", None)
        width = (2 * args.intermediate_size + 6 * args.hidden_size) if args else 0
        reserve = prefill_tokens * width * torch.empty((), dtype=dtype).element_size() + 256 * 1024**2
        budget = total * gpu_memory_utilization - (total - free) - reserve
        where = f"at --gpu-memory-utilization {gpu_memory_utilization} of a {total / _GIB:.1f} GiB GPU"
        fix = "raise --gpu-memory-utilization"
    else:
        budget = cpu_kv_cache_space_gib * _GIB
        where = f"in the CPU KV-cache budget of {cpu_kv_cache_space_gib:g} GiB"
        fix = "raise VLLM_CPU_KVCACHE_SPACE (GiB)"
    need = per_token * max_model_len
    if budget < need:
        raise ResourceError(
            f"--max-model-len {max_model_len} needs {_size(need)} of KV cache for one sequence but "
            f"only {_size(max(budget, 0))} is available {where}; lower --max-model-len or {fix}"
        )
    return int(min(budget // per_token, max_num_seqs * max_model_len))


def _size(n: float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB / 10 else f"{n / 1024**2:.2f} MiB"


class SlotTable:
    """Which cache slots are free; the lowest free slot is handed out first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a heap
        self._used: set[int] = set()

    def allocate(self) -> int:
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not in use")
        self._used.remove(slot)
        heapq.heappush(self._free, slot)

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)
