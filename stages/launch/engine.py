"""The generation engine as a step loop (nano-vllm's shape): requests in, one batched model step at a time.

    engine = Engine(model, tokenizer, eos_ids, device, dtype, max_model_len, max_num_seqs, kv_cache_tokens)
    rid = engine.add_request(prompt_ids, SamplingParams(...))   # joins the running batch at the next step
    engine.abort(rid)                                             # its slot is freed at the next step
    engine.step() -> [RequestOutput]                              # one prefill or decode step
    engine.generate(prompts_token_ids, params) -> [{text, token_ids, finish_reason}]   # a loop over step()

The pieces: `Scheduler` (scheduler.py: waiting queue, running set, slot table from kv_cache.py), `ModelRunner`
(model_runner.py: model inputs, CUDA graphs per batch and context bucket), the sampler (sampling.py) and the
incremental detokenizer (detokenizer.py). The engine is not thread-safe: one thread owns it (the server's
engine loop); others hand it requests through that loop.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from prestage.stages.errors import ResourceError, UsageError
from prestage.stages.launch.detokenizer import IncrementalDetokenizer
from prestage.stages.launch.kv_cache import plan_kv_cache  # noqa: F401  (re-exported: callers size the cache here)
from prestage.stages.launch.model_runner import ModelRunner
from prestage.stages.launch.sampling import SamplingParams, logprobs_of, penalize, sample
from prestage.stages.launch.scheduler import Scheduler, Sequence


@dataclass
class RequestOutput:
    """What one step did for one request: its whole text and tokens so far, and this step's new tokens."""

    request_id: int
    text: str
    token_ids: list[int]
    new_token_ids: list[int]
    new_logprobs: list  # per new token: (logprob, [(token id, logprob), ...]) when the request asked for them
    finish_reason: str | None
    prompt_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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
        prepack: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = {int(i) for i in (eos_ids or [])}
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
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.runner = ModelRunner(model, self.device, self.num_slots, max_model_len, dtype, cuda_graphs, prepack)
        self.graphs = self.runner.graphs
        self.scheduler = Scheduler(self.num_slots, max(max_prefill_tokens, max_model_len))
        self.requests: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.stats: dict = {}

    # ---- requests ------------------------------------------------------------------------------------------
    def check_prompt(self, prompt: list[int], label: str = "prompt") -> None:
        """UsageError for an empty prompt, one too long for max_model_len, or a token id outside the vocabulary."""
        if not prompt:
            raise UsageError(f"{label} is empty: give at least one token")
        if len(prompt) >= self.max_model_len:
            raise UsageError(
                f"{label} has {len(prompt)} tokens, more than --max-model-len "
                f"{self.max_model_len} allows (prompt + 1 generated); shorten it or raise --max-model-len"
            )
        vocab = getattr(self.model, "vocab_size", None)
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise UsageError(
                f"{label} has token id {bad[0]}, outside the model's vocabulary of {vocab}; "
                "the tokenizer does not match the model"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a request; it joins the running batch at the next step. Returns its id."""
        prompt = [int(t) for t in prompt_ids]
        self.check_prompt(prompt)
        rid = next(self._ids)
        gen = self.generator
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens)
        seq = Sequence(rid, prompt, params, gen, detok)
        self.requests[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: int) -> None:
        """End a request (finish_reason "abort"); its slot is freed at the next step. Unknown ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self.scheduler.abort(seq)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.scheduler.running if not s.finished)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def slots_in_use(self) -> int:
        return self.scheduler.slots.in_use

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Free what ended, then run one prefill or decode step; one output per request it advanced (and one
        per request aborted before it ran)."""
        outputs = []
        for seq in self.scheduler.reap():
            if seq.slot >= 0:
                self.runner.free_slot(seq.slot)
            self.requests.pop(seq.id, None)
            if seq.finish_reason == "abort":
                outputs.append(self._output(seq, 0))
        kind, batch = self.scheduler.schedule()
        if kind == "idle":
            return outputs
        with torch.inference_mode():
            logits = self.runner.prefill(batch) if kind == "prefill" else self.runner.decode(batch)  # [B, V]
            self._append(batch, logits)
        return outputs + [self._output(seq, 1) for seq in batch]

    def _output(self, seq: Sequence, new: int) -> RequestOutput:
        return RequestOutput(
            request_id=seq.id,
            text=seq.text,
            token_ids=list(seq.output),
            new_token_ids=seq.output[len(seq.output) - new :] if new else [],
            new_logprobs=seq.logprobs[len(seq.logprobs) - new :] if new and seq.params.logprobs is not None else [],
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt),
        )

    # ---- whole batches -------------------------------------------------------------------------------------
    def generate(
        self, prompts_token_ids: list[list[int]], params: SamplingParams | list[SamplingParams], on_step=None
    ) -> list[dict]:
        """Run every prompt to completion (a loop over step()); `on_step(index, text, finish_reason)`, when given,
        is called for each sequence a step advanced, with its whole text so far."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts_token_ids)
        for i, p in enumerate(prompts_token_ids):
            self.check_prompt(list(p), f"prompt {i}")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts_token_ids, params, strict=True)]
        index = {rid: i for i, rid in enumerate(ids)}
        results: dict[int, RequestOutput] = {}
        start, first_token_s = time.perf_counter(), None
        while len(results) < len(ids):
            for out in self.step():
                if out.request_id not in index:
                    continue
                if first_token_s is None and out.token_ids:
                    first_token_s = time.perf_counter() - start
                if on_step is not None:
                    on_step(index[out.request_id], out.text, out.finish_reason)
                if out.finished:
                    results[out.request_id] = out
        while self.scheduler.running and all(s.finished for s in self.scheduler.running):
            self.step()  # free the slots now, so the cache is empty when generate returns
        outs = [results[rid] for rid in ids]
        self.stats = {
            "first_token_s": first_token_s,
            "generate_s": time.perf_counter() - start,
            "generated_tokens": sum(len(o.token_ids) for o in outs),
        }
        return [{"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason} for o in outs]

    # ---- sampling and stop conditions ----------------------------------------------------------------------
    def _append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        params = [s.params for s in seqs]
        for seq in seqs:
            if seq.params.repetition_penalty != 1.0 and seq.seen is None:  # first token: mark the prompt's ids
                seq.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # [V]
                seq.seen[torch.tensor(seq.prompt, device=logits.device)] = True
        want = [p.logprobs for p in params]
        raw = logits.float()  # [B, V]
        logits = penalize(raw, params, [s.seen for s in seqs])  # [B, V]
        token_tensor = sample(logits, params, [s.generator for s in seqs])  # [B]
        lps = logprobs_of(raw, token_tensor, want) if any(w is not None for w in want) else [None] * len(seqs)
        tokens = token_tensor.tolist()
        now = time.perf_counter()
        for seq, token, lp in zip(seqs, tokens, lps, strict=True):
            seq.output.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            seq.first_token_at = seq.first_token_at or now
            seq.last_token_at = now
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
