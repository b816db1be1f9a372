"""Sequences and the scheduler: which requests run in the next engine step.

    Sequence       one request: prompt, sampling parameters, generator, detokenizer, output so far, slot
    Scheduler      waiting queue + running set over a SlotTable; schedule() -> ("prefill" | "decode", seqs)

Policy (as nano-vllm's): when a slot is free and a prompt waits, prefill a batch of waiting prompts (right-
padded, within a token budget); otherwise decode one token for every running sequence. A sequence that ended
(finished or aborted) leaves the running set, and its slot goes back to the table, at the start of the next
step: `reap()`. New requests join the waiting queue at any time and the running batch at the next prefill.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from prestage.stages.launch.kv_cache import SlotTable


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: object  # SamplingParams
    generator: object  # torch.Generator
    detok: object  # IncrementalDetokenizer
    output: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" once ended
    slot: int = -1
    seen: object = None  # [V] bool tensor: ids in the prompt or output, kept only for a repetition penalty
    logprobs: list = field(default_factory=list)  # per output token: (logprob, [(token id, logprob), ...])
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int):
        self.slots = SlotTable(num_slots)
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # ordered by slot
        self.ended: list[Sequence] = []  # aborted while waiting: reported at the next step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.ended.append(seq)

    def reap(self) -> list[Sequence]:
        """Drop ended sequences from the running set, their slots back to the table; returns them (and the
        requests aborted while waiting)."""
        done = [s for s in self.running if s.finished]
        for seq in done:
            self.slots.free(seq.slot)
        if done:
            self.running = [s for s in self.running if not s.finished]
        done, self.ended = done + self.ended, []
        return done

    def schedule(self) -> tuple[str, list[Sequence]]:
        if self.waiting and self.slots.available:
            batch = self._take_prefill_batch(self.slots.available)
            for seq in batch:
                seq.slot = self.slots.allocate()
            self.running = sorted(self.running + batch, key=lambda s: s.slot)
            return "prefill", batch
        if self.running:
            return "decode", list(self.running)
        return "idle", []

    def _take_prefill_batch(self, free_slots: int) -> list[Sequence]:
        batch = [self.waiting.popleft()]
        longest = len(batch[0].prompt)
        while self.waiting and len(batch) < free_slots:
            longest_next = max(longest, len(self.waiting[0].prompt))
            if longest_next * (len(batch) + 1) > self.max_prefill_tokens:
                break
            longest = longest_next
            batch.append(self.waiting.popleft())
        return batch

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.ended)
