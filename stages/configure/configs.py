"""prestage's own config classes, for model types transformers does not know (as vLLM, docs/vllm-rules.md §2.2).

A checkpoint whose `model_type` is listed in `OWN_CONFIGS` never needs --trust-remote-code for its config:
the class is registered with transformers' AutoConfig before loading, as vLLM does. Classes are built inside
functions so that importing this module does not import transformers.

Held here: `RWConfig`, Falcon's original "RefinedWeb" config (tiiuae/falcon-7b: `RefinedWebModel`,
tiiuae/falcon-40b: `RefinedWeb`).
"""

from __future__ import annotations

import functools

OWN_CONFIGS = {"RefinedWeb": "rw_config_class", "RefinedWebModel": "rw_config_class"}


@functools.cache
def rw_config_class(model_type: str = "RefinedWeb"):
    """Falcon RefinedWeb config: old field names (n_layer, n_head) mapped to the standard ones.

    One class per model_type, because AutoConfig.register wants the class's model_type to match the key.
    """
    from transformers import PreTrainedConfig

    class RWConfig(PreTrainedConfig):
        model_type = "RefinedWeb"  # replaced per registration below
        keys_to_ignore_at_inference = ["past_key_values"]
        attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "num_kv_heads": "n_head_kv"}

        def __init__(
            self,
            vocab_size=250880,
            hidden_size=64,
            n_layer=2,
            n_head=8,
            layer_norm_epsilon=1e-5,
            initializer_range=0.02,
            use_cache=True,
            bos_token_id=1,
            eos_token_id=2,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            multi_query=True,
            n_head_kv=None,
            alibi=False,
            bias=False,
            parallel_attn=False,
            new_decoder_architecture=False,
            rope_theta=10000.0,
            max_position_embeddings=2048,
            **kwargs,
        ):
            self.vocab_size = vocab_size
            # Backward compatibility with n_embed kwarg
            n_embed = kwargs.pop("n_embed", None)
            self.hidden_size = hidden_size if n_embed is None else n_embed
            self.n_layer = n_layer
            self.n_head = n_head
            self.layer_norm_epsilon = layer_norm_epsilon
            self.initializer_range = initializer_range
            self.use_cache = use_cache
            self.hidden_dropout = hidden_dropout
            self.attention_dropout = attention_dropout
            self.bos_token_id = bos_token_id
            self.eos_token_id = eos_token_id
            self.multi_query = multi_query
            self.n_head_kv = 1 if n_head_kv is None else n_head_kv
            self.alibi = alibi
            self.bias = bias
            self.parallel_attn = parallel_attn
            self.new_decoder_architecture = new_decoder_architecture
            self.max_position_embeddings = max_position_embeddings
            if not alibi:
                self.rope_theta = rope_theta
            if self.hidden_size == 8192:  # falcon-40b predates the flag but uses the new layout
                self.new_decoder_architecture = True
            super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

        @property
        def head_dim(self):
            return self.hidden_size // self.n_head

        @property
        def rotary(self):
            return not self.alibi

    RWConfig.model_type = model_type
    return RWConfig


def register(model_type: str):
    """Register prestage's class for `model_type` with AutoConfig; returns the class, or None if not ours."""
    factory = OWN_CONFIGS.get(model_type)
    if factory is None:
        return None
    cls = globals()[factory](model_type)
    from transformers import AutoConfig

    AutoConfig.register(model_type, cls, exist_ok=True)
    return cls
