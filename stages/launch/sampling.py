"""The on-device sampler (and `SamplingParams`, from the torch-free sampling_params.py).

`SamplingParams` keeps vLLM's names and defaults (temperature 1.0, top_p 1.0, top_k 0 = off, min_p 0,
repetition_penalty 1.0, no seed); the launch stage's own CLI default is greedy (temperature 0.0) unless the
model's generation_config.json says otherwise. `penalize` applies the repetition penalty as vLLM and
transformers do (a logit of a token already in the prompt or the output is divided by the penalty when
positive, multiplied when not). `sample` picks one token per row on the logits' device: argmax where
temperature is below 1e-5 (vLLM's rule: a smaller one would overflow the scaled logits), else temperature, then
top-k (at or over the vocabulary size: off), then top-p, then min-p, then a draw by the exponential race
(argmax of p / E, E ~ Exp(1)), with E drawn from the request's own generator when it has a seed, so a seeded
request gives the same tokens alone or in any batch.
"""

from __future__ import annotations

import torch

from prestage.stages.launch.sampling_params import SamplingParams

__all__ = ["SamplingParams", "logprobs_of", "penalize", "sample"]


def penalize(logits: torch.Tensor, params: list[SamplingParams], seen: list[torch.Tensor | None]) -> torch.Tensor:
    """logits [B, V] float -> the same with each row's repetition penalty applied where `seen[i]` [V] (bool:
    the token is in the prompt or the output so far) is set; rows without a penalty are left as they are."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and seen[i] is not None]
    if not rows:
        return logits
    idx = torch.tensor(rows, device=logits.device)  # [R]
    r = torch.tensor([params[i].repetition_penalty for i in rows], device=logits.device)[:, None]  # [R, 1]
    mask = torch.stack([seen[i] for i in rows])  # [R, V]
    sub = logits[idx]  # [R, V]
    sub = torch.where(mask, torch.where(sub > 0, sub / r, sub * r), sub)  # [R, V]
    out = logits.clone()
    out[idx] = sub
    return out


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, want: list[int | None]) -> list:
    """logits [B, V] (the model's, before any penalty or temperature, as vLLM reports them), tokens [B] ->
    per row None, or (the token's logprob, [(id, logprob) of the `want[i]` most likely tokens])."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()  # [B]
    k = max((w for w in want if w is not None), default=0)
    top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)  # [B, k] each
    out = []
    for i, w in enumerate(want):
        if w is None:
            out.append(None)
            continue
        top = list(zip(top_i[i, :w].tolist(), top_v[i, :w].tolist(), strict=True)) if w else []
        out.append((chosen[i], top))
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (long, same device); `generators[i]` draws row i's randomness."""
    greedy_ids = logits.argmax(dim=-1)  # [B]
    if all(p.greedy for p in params):
        return greedy_ids
    B, V = logits.shape
    device = logits.device
    temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)  # [B]
    # a top_k at or over the vocabulary is off (as vLLM clamps it), so any int a request sends fits the tensor
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=device)  # [B]
    top_p = torch.tensor([p.top_p for p in params], device=device)  # [B]
    scaled = logits.float() / temps[:, None]  # [B, V]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V] each
    ranks = torch.arange(V, device=device)[None, :]  # [1, V]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))  # top-k
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    before = probs.cumsum(dim=-1) - probs  # [B, V]: mass of the better tokens
    probs = probs.masked_fill((before > top_p[:, None]) & (ranks > 0), 0.0)  # top-p (keep the best token)
    min_p = torch.tensor([p.min_p for p in params], device=device)  # [B]
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)  # min-p: relative to the best token
    race = torch.empty_like(probs)  # [B, V]
    for i, gen in enumerate(generators):
        race[i].exponential_(generator=gen)
    picked = (probs / race).argmax(dim=-1)  # [B] index into the sorted order
    sampled_ids = order.gather(1, picked[:, None])[:, 0]  # [B]
    is_greedy = torch.tensor([p.greedy for p in params], device=device)  # [B]
    return torch.where(is_greedy, greedy_ids, sampled_ids)  # [B]
