"""The transformers backend: any causal LM transformers can build, run by prestage's engine and weight loader.

`TransformersForCausalLM(config, dtype, device)` builds `AutoModelForCausalLM.from_config(config)` with
empty weights (transformers' `no_init_weights`: memory allocated, no random init), on the target device;
prestage's loader then fills it through `load_weights`, which takes the checkpoint's (Hugging Face) names.
The engine drives it through the same interface as the native decoder; each sequence keeps its own
transformers KV cache (one forward per sequence per step, so no padding or masks are involved): slower
than the native path, but it runs any architecture transformers knows. `model.generate` is never used.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable

import torch

from prestage.stages.errors import InvalidModelError


class TransformersForCausalLM:
    supports_cuda_graph = False

    def __init__(self, config, dtype: torch.dtype | None = None, device=None, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        with torch.device(device or "cpu"), no_init_weights():
            self.hf = AutoModelForCausalLM.from_config(
                config, dtype=dtype or torch.get_default_dtype(), trust_remote_code=trust_remote_code
            )
        self.hf.tie_weights()
        self.hf.eval()
        accepted = inspect.signature(self.hf.forward).parameters
        self._cache_kw = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.x
        self.config = config.get_text_config()
        self.caches: list = []
        self.unused_weights: list[str] = []

    # ---- what the loader reads -----------------------------------------------------------------------------
    def named_parameters(self):
        return self.hf.named_parameters()

    def parameters(self):
        return self.hf.parameters()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors by name (with or without the base-model prefix); returns the parameter
        names loaded. A tied alias (lm_head.weight of a tied model) loads into the one shared tensor."""
        canonical = {id(p): n for n, p in self.hf.named_parameters()}
        params = dict(self.hf.named_parameters(remove_duplicate=False))
        buffers = dict(self.hf.named_buffers())
        prefix = getattr(self.hf, "base_model_prefix", "") or ""
        ignore = [re.compile(p) for p in (getattr(self.hf, "_keys_to_ignore_on_load_unexpected", None) or [])]
        loaded: set[str] = set()
        for name, tensor in weights:
            candidates = [name, f"{prefix}.{name}"]
            if prefix and name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1 :])
            target = next((c for c in candidates if c in params or c in buffers), None)
            if target is None:
                if not any(p.search(name) for p in ignore):
                    self.unused_weights.append(name)
                continue
            dest = params[target].data if target in params else buffers[target]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise InvalidModelError(
                    f"checkpoint tensor {name} has shape {list(tensor.shape)}, the model expects "
                    f"{list(dest.shape)}: the weights do not match config.json"
                )
            dest.copy_(tensor, non_blocking=True)
            if target in params:
                loaded.add(canonical[id(params[target])])
        return loaded

    # ---- engine interface ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_input_embeddings().weight.shape[0]

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        c = self.config
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return c.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def allocate_kv_cache(self, num_slots: int, max_model_len: int, device, dtype: torch.dtype) -> None:
        self.caches = [None] * num_slots  # one transformers cache per running sequence, grown as it goes

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, slots=0) -> torch.Tensor:
        """input_ids [B, T] right-padded, lengths [B], slots (cache slot per row, or the first of B) -> [B, V]."""
        slots = _slot_list(slots, input_ids.shape[0])
        rows = []
        for i, n in enumerate(lengths.tolist()):
            self.caches[slots[i]], logits = self._step(input_ids[i : i + 1, :n], None, None)  # [1, n, V]
            rows.append(logits[0, -1])  # [V]
        return torch.stack(rows)  # [B, V]

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slots=0, attend_len=None) -> torch.Tensor:
        """input_ids, positions [B] for the sequences in cache slots `slots` -> next-token logits [B, V]."""
        slots = _slot_list(slots, input_ids.shape[0])
        rows = []
        for i in range(input_ids.shape[0]):
            self.caches[slots[i]], logits = self._step(
                input_ids[i].view(1, 1), positions[i].view(1, 1), self.caches[slots[i]]
            )  # [1, 1, V]
            rows.append(logits[0, -1])  # [V]
        return torch.stack(rows)  # [B, V]

    def _step(self, ids: torch.Tensor, position_ids, cache):
        """One transformers forward of one sequence: ids [1, T] -> (its grown cache, logits [1, T, V])."""
        kwargs = {"input_ids": ids, "use_cache": True, self._cache_kw: cache}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.hf(**kwargs)
        return out.get("cache", out.get("past_key_values")), out.logits

    def free_slot(self, slot: int) -> None:
        self.caches[slot] = None  # the sequence's transformers cache goes with it


def _slot_list(slots, n: int) -> list[int]:
    if isinstance(slots, int):
        return list(range(slots, slots + n))
    if isinstance(slots, torch.Tensor):
        return slots.tolist()
    return list(getattr(slots, "slots", slots))
