"""The model runner: turns a scheduled batch into model inputs and logits, with CUDA graphs for decode.

    ModelRunner(model, device, num_slots, max_model_len, cuda_graphs)
    runner.prefill(seqs) -> logits [B, V];  runner.decode(seqs) -> logits [B, V]

Attention reads only what is filled: eagerly (CPU, or no graphs) a decode step attends over the longest
running sequence's length; on CUDA each decode graph is captured per batch-size bucket and per context-length
bucket (powers of two from 256 up to max_model_len), and a step replays the smallest graph whose context
bucket holds the longest running sequence, so it reads at most about twice that sequence's KV, never
max_model_len rows. Rows of a graph beyond the real batch write into a scratch slot nobody owns.
"""

from __future__ import annotations

import torch

_MIN_CTX_BUCKET = 256


def batch_buckets(num_slots: int) -> list[int]:
    return sorted({b for b in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, num_slots] if b <= num_slots})


def context_buckets(max_model_len: int) -> list[int]:
    out, b = [], _MIN_CTX_BUCKET
    while b < max_model_len:
        out.append(b)
        b *= 2
    return [*out, max_model_len]


class DecodeGraphs:
    """CUDA graphs of the decode step, one per (batch bucket, context bucket), sharing one memory pool."""

    def __init__(self, model, num_slots: int, max_model_len: int, device: torch.device, scratch_slot: int):
        from prestage.stages.launch.models.decoder import Rows

        self.model = model
        self.buckets = batch_buckets(num_slots)
        self.ctx_buckets = context_buckets(max_model_len)
        self.scratch = scratch_slot
        self.ids = torch.zeros(num_slots, dtype=torch.long, device=device)  # [slots]
        self.pos = torch.zeros(num_slots, dtype=torch.long, device=device)  # [slots]
        self.slots = torch.full((num_slots,), scratch_slot, dtype=torch.long, device=device)  # [slots]
        self.graphs: dict[tuple[int, int], tuple] = {}
        pool = None
        for bs in reversed(self.buckets):
            for ctx in reversed(self.ctx_buckets):
                rows = Rows(self.slots[:bs])
                model.decode(self.ids[:bs], self.pos[:bs], rows, attend_len=ctx)  # warm-up outside capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = model.decode(self.ids[:bs], self.pos[:bs], rows, attend_len=ctx)  # [bs, V]
                pool = graph.pool()
                self.graphs[(bs, ctx)] = (graph, logits)
        torch.cuda.synchronize(device)

    def pick(self, n: int, longest: int) -> tuple[int, int]:
        """(batch bucket, context bucket) for n rows whose longest sequence holds `longest` positions."""
        bs = next(b for b in self.buckets if b >= n)
        ctx = next(c for c in self.ctx_buckets if c >= longest)
        return bs, ctx

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, longest: int):
        n = ids.shape[0]
        bs, ctx = self.pick(n, longest)
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.ids[n:bs].zero_()
        self.pos[n:bs].zero_()
        self.slots[n:bs].fill_(self.scratch)  # padding rows write position 0 of the scratch slot
        graph, logits = self.graphs[(bs, ctx)]
        graph.replay()
        return logits[:n].clone(), ctx  # a copy: another graph's replay may reuse the pool


class ModelRunner:
    def __init__(
        self, model, device, num_slots: int, max_model_len: int, dtype, cuda_graphs: bool = True, prepack: bool = True
    ):
        self.model, self.device = model, torch.device(device)
        pack = getattr(model, "prepack_for_cpu", None) if prepack and self.device.type == "cpu" else None
        self.prepacked = bool(pack()) if pack is not None else False  # weights re-laid out for oneDNN (bf16, fp32)
        use_graphs = cuda_graphs and self.device.type == "cuda" and getattr(model, "supports_cuda_graph", False)
        # with graphs, one more slot than sequences: the padding rows' scratch slot
        model.allocate_kv_cache(num_slots + (1 if use_graphs else 0), max_model_len, self.device, dtype)
        self.graphs = None
        if use_graphs:
            with torch.inference_mode():
                self.graphs = DecodeGraphs(model, num_slots, max_model_len, self.device, scratch_slot=num_slots)
        self.last_attend_len = 0  # positions the last decode step's attention read per row

    def _slots(self, seqs) -> object:
        from prestage.stages.launch.models.decoder import Rows

        slots = [s.slot for s in seqs]
        if hasattr(self.model, "kv_cache"):
            return Rows.of(slots, self.device)
        return slots

    def prefill(self, batch) -> torch.Tensor:
        T = max(len(s.prompt) for s in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)  # [B, T], right-padded with 0
        for i, s in enumerate(batch):
            ids[i, : len(s.prompt)] = torch.tensor(s.prompt)
        lengths = torch.tensor([len(s.prompt) for s in batch])  # [B]
        return self.model.prefill(ids.to(self.device), lengths.to(self.device), self._slots(batch))  # [B, V]

    def decode(self, running) -> torch.Tensor:
        ids = torch.tensor([s.output[-1] for s in running]).to(self.device)  # [B]
        positions = torch.tensor([s.length - 1 for s in running]).to(self.device)  # [B]
        longest = max(s.length for s in running)  # the new token's position + 1, for the longest sequence
        if self.graphs is not None:
            slots = torch.tensor([s.slot for s in running]).to(self.device)  # [B]
            logits, self.last_attend_len = self.graphs(ids, positions, slots, longest)
            return logits  # [B, V]
        self.last_attend_len = longest
        return self.model.decode(ids, positions, self._slots(running), attend_len=longest)  # [B, V]

    def free_slot(self, slot: int) -> None:
        self.model.free_slot(slot)
