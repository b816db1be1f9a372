"""prestage's own config classes, for model types transformers does not know (as vLLM, docs/vllm-rules.md §2.2).

A checkpoint whose `model_type` is listed in `OWN_CONFIGS` never needs --trust-remote-code for its config:
the class is registered with transformers' AutoConfig before loading, as vLLM does. Classes are built inside
functions so that importing this module does not import transformers.

Held here, as vLLM builds them (the same fields and defaults, written for prestage):
- `RWConfig`, Falcon's original "RefinedWeb" config (tiiuae/falcon-7b: `RefinedWebModel`, tiiuae/falcon-40b:
  `RefinedWeb`);
- `ChatGLMConfig` (THUDM/chatglm2-6b, chatglm3-6b, glm-4-9b-chat: `model_type: chatglm`), so those repos need
  no --trust-remote-code for their config, as in vLLM;
- Kimi-K2 (`model_type: kimi_k2`), which vLLM reads with DeepSeek-V3's config class (the same architecture):
  transformers' `DeepseekV3Config` under the model type `kimi_k2`.

`VLLM_OWN_CONFIGS` is vLLM's whole table of model types it builds with its own classes; a type listed there
but not in `OWN_CONFIGS` gets an error that says vLLM can build it and prestage cannot.
"""

from __future__ import annotations

import functools

OWN_CONFIGS = {
    "RefinedWeb": "rw_config_class",
    "RefinedWebModel": "rw_config_class",
    "chatglm": "chatglm_config_class",
    "kimi_k2": "deepseek_v3_config_class",
}


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


@functools.cache
def chatglm_config_class(model_type: str = "chatglm"):
    """ChatGLM2/3 and GLM-4 (the `chatglm` model type): GLM field names, with the standard names as aliases."""
    from transformers import PreTrainedConfig

    class ChatGLMConfig(PreTrainedConfig):
        model_type = "chatglm"
        attribute_map = {"num_hidden_layers": "num_layers", "n_head_kv": "multi_query_group_num"}

        def __init__(
            self,
            num_layers=28,
            padded_vocab_size=65024,
            hidden_size=4096,
            ffn_hidden_size=13696,
            kv_channels=128,
            num_attention_heads=32,
            seq_length=2048,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            layernorm_epsilon=1e-5,
            rmsnorm=True,
            apply_residual_connection_post_layernorm=False,
            post_layer_norm=True,
            add_bias_linear=False,
            add_qkv_bias=False,
            interleaved_qkv=False,
            bias_dropout_fusion=True,
            multi_query_attention=False,
            multi_query_group_num=1,
            apply_query_key_layer_scaling=True,
            attention_softmax_in_fp32=True,
            fp32_residual_connection=False,
            quantization_bit=0,
            pre_seq_len=None,
            prefix_projection=False,
            **kwargs,
        ):
            self.num_layers = num_layers
            self.vocab_size = padded_vocab_size
            self.padded_vocab_size = padded_vocab_size
            self.hidden_size = hidden_size
            self.ffn_hidden_size = ffn_hidden_size
            self.kv_channels = kv_channels
            self.num_attention_heads = num_attention_heads
            self.seq_length = seq_length
            self.max_seq_length = seq_length  # the name some code reads
            self.hidden_dropout = hidden_dropout
            self.attention_dropout = attention_dropout
            self.layernorm_epsilon = layernorm_epsilon
            self.rmsnorm = rmsnorm
            self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
            self.post_layer_norm = post_layer_norm
            self.add_bias_linear = add_bias_linear
            self.add_qkv_bias = add_qkv_bias
            self.interleaved_qkv = interleaved_qkv
            self.bias_dropout_fusion = bias_dropout_fusion
            self.multi_query_attention = multi_query_attention
            self.multi_query_group_num = multi_query_group_num
            self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
            self.attention_softmax_in_fp32 = attention_softmax_in_fp32
            self.fp32_residual_connection = fp32_residual_connection
            self.quantization_bit = quantization_bit
            self.pre_seq_len = pre_seq_len
            self.prefix_projection = prefix_projection
            super().__init__(**kwargs)

    ChatGLMConfig.model_type = model_type
    ChatGLMConfig.__qualname__ = "ChatGLMConfig"
    return ChatGLMConfig


@functools.cache
def deepseek_v3_config_class(model_type: str = "kimi_k2"):
    """transformers' DeepseekV3Config under another model type (vLLM sets the class's model_type instead; a
    subclass leaves transformers' own `deepseek_v3` class untouched)."""
    from transformers import DeepseekV3Config

    return type(
        "DeepseekV3Config",  # vLLM's class name: it reads kimi_k2 with DeepSeek-V3's class
        (DeepseekV3Config,),
        {
            "model_type": model_type,
            "__module__": __name__,
        },
    )


def register(model_type: str):
    """Register prestage's class for `model_type` with AutoConfig; returns the class, or None if not ours."""
    factory = OWN_CONFIGS.get(model_type)
    if factory is None:
        return None
    cls = globals()[factory](model_type)
    from transformers import AutoConfig

    AutoConfig.register(model_type, cls, exist_ok=True)
    return cls
