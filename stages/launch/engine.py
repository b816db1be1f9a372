"""The generation engine: continuous batching over a static KV cache, sampling on device.

    Engine(model, tokenizer, eos_ids, device, dtype, max_model_len, max_num_seqs, kv_cache_tokens)
    engine.generate(prompts_token_ids, SamplingParams(...)) -> [{text, token_ids, finish_reason}]

Each running sequence owns one cache slot; the running sequences always hold slots [0, n) (when one
finishes, the last one's cache row moves into its slot), so a decode step reads the cache rows as one
contiguous view. Policy (as nano-vllm's): when a slot is free and a prompt waits, prefill a batch of waiting
prompts (right-padded, within a token budget); otherwise decode one token for every running sequence. On
CUDA each decode batch size bucket is captured once in a CUDA graph and replayed; on CPU the same eager code
runs. The model provides the engine interface described in stages/launch/models/decoder.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from prestage.stages.errors import ResourceError, UsageError
from prestage.stages.launch.detokenizer import IncrementalDetokenizer
from prestage.stages.launch.sampling import SamplingParams, penalize, sample

_GIB = 1024**3


@dataclass
class Sequence:
    index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    detok: IncrementalDetokenizer
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    slot: int = -1
    seen: torch.Tensor | None = None  # [V] bool: ids in the prompt or output, kept only for a repetition penalty

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


def plan_kv_cache(
    model,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    max_num_seqs: int,
    gpu_memory_utilization: float = 0.9,
    cpu_kv_cache_space_gib: float = 4.0,
    prefill_tokens: int = 8192,
) -> int:
    """How many KV-cache tokens fit; ResourceError when not even one sequence of max_model_len does.

    CUDA (after the weights are loaded): total x utilization, less what is in use now, less a reserve for
    prefill activations. CPU: a fixed budget (`cpu_kv_cache_space_gib`, as vLLM's VLLM_CPU_KVCACHE_SPACE)."""
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


class DecodeGraphs:
    """CUDA graphs of the decode step, one per batch-size bucket, sharing one memory pool."""

    def __init__(self, model, num_slots: int, max_model_len: int, device: torch.device):
        self.model, self.attend_len = model, max_model_len
        self.buckets = sorted({b for b in [1, 2, 4, 8, *range(16, num_slots + 1, 16), num_slots] if b <= num_slots})
        self.ids = torch.zeros(num_slots, dtype=torch.long, device=device)  # [slots]
        self.pos = torch.zeros(num_slots, dtype=torch.long, device=device)  # [slots]
        self.graphs: dict[int, tuple] = {}
        pool = None
        for bs in reversed(self.buckets):
            model.decode(self.ids[:bs], self.pos[:bs], attend_len=max_model_len)  # warm-up outside capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = model.decode(self.ids[:bs], self.pos[:bs], attend_len=max_model_len)  # [bs, V]
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize(device)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        bs = next(b for b in self.buckets if b >= n)
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(positions)
        self.ids[n:bs].zero_()
        self.pos[n:bs].zero_()  # padding rows write position 0 of free slots: never read
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        eos_ids,
        device,
        dtype: torch.dtype,
        max_model_len: int,
        max_num_seqs: int,
        kv_cache_tokens: int,
        seed: int = 0,
        cuda_graphs: bool = True,
        max_prefill_tokens: int = 8192,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = set(int(i) for i in (eos_ids or []))
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.num_slots = min(max_num_seqs, kv_cache_tokens // max_model_len)
        if self.num_slots < 1:
            raise ResourceError(
                f"KV cache of {kv_cache_tokens} tokens cannot hold one sequence of --max-model-len "
                f"{max_model_len}; lower --max-model-len"
            )
        self.kv_cache_tokens = self.num_slots * max_model_len
        self.max_prefill_tokens = max(max_prefill_tokens, max_model_len)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        model.allocate_kv_cache(self.num_slots, max_model_len, self.device, dtype)
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and getattr(model, "supports_cuda_graph", False):
            with torch.no_grad():
                self.graphs = DecodeGraphs(model, self.num_slots, max_model_len, self.device)
        self.stats: dict = {}

    # ---- public --------------------------------------------------------------------------------------------
    def generate(
        self, prompts_token_ids: list[list[int]], params: SamplingParams | list[SamplingParams], on_step=None
    ) -> list[dict]:
        """Run every prompt to completion; `on_step(index, text, finish_reason)`, when given, is called for each
        sequence a step advanced, with its whole text so far (the server streams the deltas)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts_token_ids)
        pairs = enumerate(zip(prompts_token_ids, params, strict=True))
        seqs = [self._new_sequence(i, list(p), sp) for i, (p, sp) in pairs]
        waiting, running = deque(seqs), []
        start, first_token_s = time.perf_counter(), None
        with torch.inference_mode():
            while waiting or running:
                if waiting and len(running) < self.num_slots:
                    batch = self._take_prefill_batch(waiting, self.num_slots - len(running))
                    for j, seq in enumerate(batch):
                        seq.slot = len(running) + j
                    stepped = batch
                    self._append(batch, self._prefill(batch, slot0=len(running)))
                    running.extend(batch)
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - start
                else:
                    stepped = list(running)
                    self._append(running, self._decode(running))
                if on_step is not None:
                    for seq in stepped:
                        on_step(seq.index, seq.text, seq.finish_reason)
                running = self._compact(running)
        self.stats = {
            "first_token_s": first_token_s,
            "generate_s": time.perf_counter() - start,
            "generated_tokens": sum(len(s.output) for s in seqs),
        }
        return [{"text": s.text, "token_ids": list(s.output), "finish_reason": s.finish_reason} for s in seqs]

    # ---- steps ---------------------------------------------------------------------------------------------
    def _new_sequence(self, index: int, prompt: list[int], params: SamplingParams) -> Sequence:
        if not prompt:
            raise UsageError(f"prompt {index} is empty: give at least one token")
        if len(prompt) >= self.max_model_len:
            raise UsageError(
                f"prompt {index} has {len(prompt)} tokens, more than --max-model-len "
                f"{self.max_model_len} allows (prompt + 1 generated); shorten it or raise --max-model-len"
            )
        vocab = getattr(self.model, "vocab_size", None)
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise UsageError(
                f"prompt {index} has token id {bad[0]}, outside the model's vocabulary of {vocab}; "
                "the tokenizer does not match the model"
            )
        gen = self.generator
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens)
        return Sequence(index, prompt, params, gen, detok)

    def _take_prefill_batch(self, waiting: deque, free_slots: int) -> list[Sequence]:
        batch = [waiting.popleft()]
        longest = len(batch[0].prompt)
        while waiting and len(batch) < free_slots:
            longest_next = max(longest, len(waiting[0].prompt))
            if longest_next * (len(batch) + 1) > self.max_prefill_tokens:
                break
            longest = longest_next
            batch.append(waiting.popleft())
        return batch

    def _prefill(self, batch: list[Sequence], slot0: int) -> torch.Tensor:
        T = max(len(s.prompt) for s in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)  # [B, T], right-padded with 0
        for i, s in enumerate(batch):
            ids[i, : len(s.prompt)] = torch.tensor(s.prompt)
        lengths = torch.tensor([len(s.prompt) for s in batch])  # [B]
        return self.model.prefill(ids.to(self.device), lengths.to(self.device), slot0)  # [B, V]

    def _decode(self, running: list[Sequence]) -> torch.Tensor:
        ids = torch.tensor([s.output[-1] for s in running]).to(self.device)  # [B]
        positions = torch.tensor([s.length - 1 for s in running]).to(self.device)  # [B]
        if self.graphs is not None:
            return self.graphs(ids, positions)  # [B, V]
        return self.model.decode(ids, positions)  # [B, V]

    def _append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        params = [s.params for s in seqs]
        for seq in seqs:
            if seq.params.repetition_penalty != 1.0 and seq.seen is None:  # first token: mark the prompt's ids
                seq.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # [V]
                seq.seen[torch.tensor(seq.prompt, device=logits.device)] = True
        logits = penalize(logits.float(), params, [s.seen for s in seqs])  # [B, V]
        tokens = sample(logits, params, [s.generator for s in seqs]).tolist()
        for seq, token in zip(seqs, tokens, strict=True):
            seq.output.append(token)
            if seq.seen is not None:
                seq.seen[token] = True
            if token in self.eos_ids and not seq.params.ignore_eos:
                seq.finish_reason = "stop"
            else:
                seq.text += seq.detok.add(token)
                if self._hit_stop_string(seq):
                    seq.finish_reason = "stop"
            if seq.finish_reason is None and (
                len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_model_len
            ):
                seq.finish_reason = "length"
            # At the end, text still held back (it ends in an incomplete UTF-8 character) is dropped, not
            # flushed as U+FFFD: vLLM's incremental detokenizer never emits it (found by tests/vllm/).

    @staticmethod
    def _hit_stop_string(seq: Sequence) -> bool:
        """Cut the text before the first stop string it contains (vLLM leaves the stop string out)."""
        hits = [i for i in (seq.text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            return True
        return False

    def _compact(self, running: list[Sequence]) -> list[Sequence]:
        """Drop finished sequences and move the last ones into the freed slots, so slots stay [0, n)."""
        alive = [s for s in running if s.finish_reason is None]
        if len(alive) == len(running):
            return running
        n = len(alive)
        taken = {s.slot for s in alive if s.slot < n}
        free = iter(sorted(set(range(n)) - taken))
        for seq in alive:
            if seq.slot >= n:
                dst = next(free)
                self.model.move_slot(seq.slot, dst)
                seq.slot = dst
        return sorted(alive, key=lambda s: s.slot)
