"""`SamplingParams`: one request's sampling values, checked; free of torch, so checking the launch stage's
inputs does not import it (the engine's sampler is in sampling.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prestage.stages.launch.sampling_defaults import check_sampling

SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it is greedy
# The sampling fields launch records in its inputs (the flag, else generation_config.json, else the default).
LAUNCH_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely tokens'

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        check_sampling(
            self.max_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.repetition_penalty,
            self.stop,
        )

    @property
    def greedy(self) -> bool:
        # as vLLM (_SAMPLING_EPS): a temperature this small is greedy; dividing the logits by one that rounds to 0
        # (or under float32's range) would make them inf / nan and pick tokens at random
        return self.temperature < SAMPLING_EPS
