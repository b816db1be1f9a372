"""One decoder module for the Llama, Mistral, Qwen2 and Qwen3 families.

Pre-norm transformer: RMSNorm, grouped-query attention (optional q/k/v bias for Qwen2, per-head q/k RMSNorm
for Qwen3, per-layer sliding window for Mistral/Qwen2), rotary embeddings (stages/launch/rope.py), SwiGLU MLP,
optionally tied embeddings. q/k/v and gate/up are fused into `qkv_proj` and `gate_up_proj`; `load_weights`
still takes Hugging Face names (`model.layers.N.self_attn.q_proj.weight`, ...) and copies each into its slice
of the fused parameter (`STACKED_PARAMS`).

The KV cache is static, `[num_layers, 2, num_slots, num_kv_heads, max_model_len, head_dim]`: one row (slot)
per running sequence, given by the engine's slot table (rows never move); on CPU it is an anonymous mapping of
zeros, so memory is taken only where sequences write. A forward runs batch row i on
cache slot `slots[i]`, writes its keys/values at its positions, and attends with scaled_dot_product_attention
over the first `attend_len` cache positions only (the longest row in the batch, or the CUDA graph's context
bucket) under a causal (and sliding-window) mask built from positions, so a batch of prompts of different
lengths is right-padded and needs no other bookkeeping: a padded position is written, never read by a real
token, and overwritten when the sequence reaches it. Grouped-query attention folds each KV group's query
heads into the query-length dimension (one SDPA over the KV heads; no repeated keys, no per-head GQA path).

On CPU in bfloat16 or float32 (`prepack_for_cpu`) every projection is pre-packed for oneDNN, and so is the LM
head when its rows can be mapped again from the checkpoint file (the loader records where each tensor lies): the
dense head is dropped first and packed in row chunks from the mapping, and a tied embedding then looks its rows
up in that mapping, so the weights stay one copy in memory. Where oneDNN's packing of a shape would be a plain
copy (float32 on AVX-512 CPUs), the loaded weight is kept as it is (`_pack`).
A decode step's few rows (1 to 8) read those same packed buffers with small_batch.py's kernels where they can run
(AVX-512 with BF16, a C compiler); more rows go to oneDNN.

Engine interface (shared with the transformers backend): `kv_bytes_per_token`, `allocate_kv_cache`,
`prefill`, `decode`, `free_slot`, `load_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prestage.stages.errors import InvalidModelError, UnsupportedError
from prestage.stages.launch.models import small_batch
from prestage.stages.launch.rope import RotaryEmbedding, apply_rotary, rotation_tables
from prestage.stages.records import ModelSpec

# checkpoint name piece -> (fused parameter piece, shard id)
STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", "gate"),
    ".up_proj.": (".gate_up_proj.", "up"),
}
# checkpoint tensors that are derived buffers, not weights
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
HEAD_CHUNK_ROWS = 16384  # the packed LM head is this many vocabulary rows per oneDNN weight


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros in an anonymous mapping: the kernel hands out zero pages, and memory is taken only
    where something is written (a KV cache sized for max_model_len costs what the running sequences fill)."""
    import mmap

    count = 1
    for n in shape:
        count *= n
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=count).view(shape)


_PLAIN_PACKING: dict[tuple, bool] = {}  # (dtype, out, in) -> oneDNN's packing of this shape is a plain copy


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] (bf16 or fp32) -> the weight as oneDNN's linear reads it: re-laid out (an opaque layout),
    or the dense weight itself where oneDNN's layout for that dtype, shape and CPU is plain rows, so packing would
    only copy it (float32 on AVX-512 CPUs): the copy costs start-up time, in fresh memory, and nothing else.
    oneDNN picks its layout per dtype and shape, so the first weight of each shape is packed and compared."""
    dense = weight.detach().contiguous()
    key = (dense.dtype, *dense.shape)
    if _PLAIN_PACKING.get(key):
        return dense
    packed = torch.ops.mkldnn._reorder_linear_weight(dense, 1)
    if key not in _PLAIN_PACKING:
        plain = small_batch.is_plain_copy(packed, dense)
        if plain is None:
            return packed  # this weight cannot tell (a constant block, say): the next one of its shape will
        _PLAIN_PACKING[key] = plain
    return dense if _PLAIN_PACKING[key] else packed


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # [..., in] -> [..., out]


@dataclass
class DecoderArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list | None = None  # per layer "full_attention" | "sliding_attention"; None: all the same
    hidden_act: str = "silu"

    @classmethod
    def from_spec(cls, spec: ModelSpec | dict, architecture: str = "LlamaForCausalLM") -> DecoderArgs:
        """From configure's spec (a ModelSpec, or its plain map) and the architecture name."""
        if isinstance(spec, dict):
            spec = ModelSpec.from_dict(spec, "the model spec")
        for name in ("rms_norm_eps", "max_position_embeddings", "intermediate_size"):
            if getattr(spec, name) is None:
                raise InvalidModelError(
                    f"the config of this {architecture} has no {name}; the native decoder needs it: fix config.json"
                )
        rope = dict(spec.rope or {"rope_type": "default"})
        if not ({"rope_type", "rope_theta"} & set(rope)):  # per-layer-type maps: one RoPE for all
            rope = dict(rope.get("full_attention") or next(v for v in rope.values() if isinstance(v, dict)))
        rope.setdefault("rope_theta", 10000.0)  # transformers' default base when a config names none
        return cls(
            vocab_size=spec.vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            head_dim=spec.head_dim,
            rms_norm_eps=float(spec.rms_norm_eps),
            max_position_embeddings=spec.max_position_embeddings,
            rope=rope,
            tie_word_embeddings=spec.tie_word_embeddings,
            qkv_bias=spec.attention_bias,  # configure resolved both per family: attention_bias = q/k/v bias
            o_bias=spec.o_proj_bias,
            mlp_bias=spec.mlp_bias,
            qk_norm=spec.qk_norm,
            sliding_window=spec.sliding_window or None,
            layer_types=spec.layer_types,
            hidden_act=spec.hidden_act or "silu",
        )

    @classmethod
    def from_hf_config(cls, config) -> DecoderArgs:
        """From a transformers config object (tests; configure records the same facts in `spec`)."""
        arch = (getattr(config, "architectures", None) or [None])[0] or {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }.get(config.model_type, "LlamaForCausalLM")
        from prestage.stages.configure.spec import build_spec  # the same spec configure records

        text = config.get_text_config()
        spec = build_spec(
            text, native=True, weight_dtype="float32", sliding_window=getattr(text, "sliding_window", None)
        )
        return cls.from_spec(spec, arch)


def _empty(*shape, factory):
    return nn.Parameter(torch.empty(*shape, **factory), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b); `shards` names the row ranges of a fused weight: {shard id: (offset, size)}."""

    def __init__(self, in_features: int, out_features: int, bias: bool, factory: dict, shards: dict | None = None):
        super().__init__()
        self.weight = _empty(out_features, in_features, factory=factory)  # [out, in]
        self.bias = _empty(out_features, factory=factory) if bias else None  # [out]
        self.shards = shards or {}
        self.packed: torch.Tensor | None = None  # the weight as oneDNN reads it (CPU): packed, or kept (see _pack)
        self.small_batch: small_batch.SmallBatchLinear | None = None  # few-row kernel on `packed`, if usable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small_batch is not None and self.small_batch.accepts(x):
            return self.small_batch(x)  # 1 to 8 rows (a decode step): [..., out]
        if self.packed is not None:
            return _packed_linear(x, self.packed, self.bias)  # [..., out]
        return F.linear(x, self.weight, self.bias)  # [..., in] -> [..., out]

    def prepack(self) -> None:
        """Re-lay the weight out for oneDNN once (what vLLM's CPU path does): torch's default bf16 matmul reads
        weights at about half the memory bandwidth, and its float32 one (MKL) took 1.3 to 2.2 times oneDNN's time
        at 8 to 128 rows here. The dense weight is dropped (or kept as the one copy: see `_pack`; then `packed`
        shares the old parameter's memory, so a caller still holding that parameter must not change it): the
        module is inference-only. A few rows (a decode step) then read the same buffer with small_batch's kernels
        where usable."""
        self.packed = _pack(self.weight)  # oneDNN's layout
        self.small_batch = small_batch.for_packed(self.packed, self.weight, self.bias)
        self.weight = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, factory: dict):
        super().__init__()
        self.weight = _empty(dim, factory=factory)  # [dim]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # [..., dim] in float32, as transformers does
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., dim]
        return self.weight * x.to(dtype)  # [..., dim]


class Attention(nn.Module):
    def __init__(self, args: DecoderArgs, layer: int, factory: dict):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            args.hidden_size, q + 2 * kv, args.qkv_bias, factory, shards={"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        )
        self.o_proj = Linear(q, args.hidden_size, args.o_bias, factory)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, factory)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, factory)
        else:
            self.q_norm = self.k_norm = None
        kind = args.layer_types[layer] if args.layer_types else "sliding_attention"
        self.sliding = bool(args.sliding_window) and kind == "sliding_attention"

    def forward(self, x, cos, sin, kv_cache, rows, mask, write, S):
        # x [B, T, hidden]; cos/sin [B, 1, T, rot] from rotation_tables; kv_cache [2, slots, Hkv, S_max, D] (this
        # layer, every slot); rows: Rows (the batch's cache slots); mask [B, 1, T, S] additive in x's dtype, or
        # None when nothing is masked; write: CacheWrites (where each new key and value goes); S = attend_len
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D)  # [B, T, H + 2*Hkv, D]
        if self.q_norm is not None:
            q = apply_rotary(self.q_norm(qkv[:, :, :H]).transpose(1, 2), cos, sin)  # [B, H, T, D]
            k = apply_rotary(self.k_norm(qkv[:, :, H : H + Hkv]).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
        else:  # one rotation for the query and key heads together
            qk = apply_rotary(qkv[:, :, : H + Hkv].transpose(1, 2), cos, sin)  # [B, H + Hkv, T, D]
            q, k = qk[:, :H], qk[:, H:]  # [B, H, T, D], [B, Hkv, T, D]
        v = qkv[:, :, H + Hkv :]  # [B, T, Hkv, D]
        write(kv_cache, k, v)
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [slots, Hkv, S_max, D] each
        q_size = H * D
        keys, values = rows.read(k_cache, S), rows.read(v_cache, S)  # [B, Hkv, S, D] each: only what is filled
        rep = self.num_heads // self.num_kv_heads
        if rep > 1 and T > 1 and x.is_cuda:
            # prefill on GPU: repeat the KV heads so SDPA can take its memory-efficient masked kernel instead of
            # materializing [B, H, T, S] scores
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)  # [B, H, S, D]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, H, T, D]
        elif rep > 1:
            # grouped-query attention with each KV group's query heads folded into the query-length dimension
            # (one SDPA call over Hkv heads, no repeated KV and no per-head GQA path)
            qf = q.reshape(B, self.num_kv_heads, rep * T, self.head_dim)  # [B, Hkv, rep*T, D]
            mf = mask if T == 1 or mask is None else mask[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
            out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mf)  # [B, Hkv, rep*T, D]
            out = out.view(B, self.num_heads, T, self.head_dim)  # [B, H, T, D]
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, q_size))  # [B, T, hidden]


class CacheWrites:
    """Where a step's new keys and values go in a layer's cache [2, slots, Hkv, S_max, D], as row numbers of its
    flat view [2 * slots * Hkv * S_max, D], computed once per step: then a layer writes its keys and its values
    with one index_copy_ each (a plain row copy, where indexing the 4-d cache by [slot, :, position] costs about
    2.5 times as much per call on CPU)."""

    def __init__(self, index: torch.Tensor, positions: torch.Tensor, cache_shape: tuple[int, ...]):
        # index [B] the batch's cache slots; positions [B, T]; cache_shape [L, 2, slots, Hkv, S_max, D]
        _, _, slots, Hkv, S_max, _ = cache_shape
        head = torch.arange(Hkv, device=index.device)  # [Hkv]
        start = (index[:, None] * Hkv + head[None, :]) * S_max  # [B, Hkv]: row of each (slot, head) at position 0
        self.keys = (start[:, :, None] + positions[:, None, :]).reshape(-1)  # [B*Hkv*T], k's (b, h, t) order
        self.values = (start[:, None, :] + positions[:, :, None]).reshape(-1) + slots * Hkv * S_max  # [B*T*Hkv]

    def __call__(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """kv_cache [2, slots, Hkv, S_max, D] (one layer); k [B, Hkv, T, D]; v [B, T, Hkv, D]."""
        flat = kv_cache.view(-1, kv_cache.shape[-1])  # [2 * slots * Hkv * S_max, D]
        flat.index_copy_(0, self.keys, k.reshape(-1, k.shape[-1]).to(flat.dtype))  # [B*Hkv*T, D]
        flat.index_copy_(0, self.values, v.reshape(-1, v.shape[-1]).to(flat.dtype))  # [B*T*Hkv, D]


class Rows:
    """The cache slots of a batch's rows: `index` [B] long (on the device), and `start` when they are the
    contiguous range [start, start + B) (then reads are views, no gather)."""

    def __init__(self, index: torch.Tensor, start: int | None = None):
        self.index, self.start = index, start

    @classmethod
    def of(cls, slots, device) -> Rows:
        if isinstance(slots, Rows):
            return slots
        if isinstance(slots, torch.Tensor):
            return cls(slots.to(device))
        slots = list(range(slots, slots + 1)) if isinstance(slots, int) else list(slots)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(torch.tensor(slots, dtype=torch.long, device=device), slots[0] if contiguous else None)

    def read(self, cache: torch.Tensor, length: int) -> torch.Tensor:
        """cache [slots, Hkv, S_max, D] -> these rows' first `length` positions [B, Hkv, length, D]."""
        if self.start is not None:
            return cache[self.start : self.start + self.index.shape[0], :, :length]  # a view
        return cache[:, :, :length].index_select(0, self.index)


class MLP(nn.Module):
    def __init__(self, args: DecoderArgs, factory: dict):
        super().__init__()
        inter = args.intermediate_size
        if args.hidden_act not in ("silu", "swish"):
            raise UnsupportedError(
                f"hidden_act {args.hidden_act!r} is not supported by the native decoder "
                "(silu only); run with the transformers backend"
            )
        self.gate_up_proj = Linear(
            args.hidden_size, 2 * inter, args.mlp_bias, factory, shards={"gate": (0, inter), "up": (inter, inter)}
        )
        self.down_proj = Linear(inter, args.hidden_size, args.mlp_bias, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, T, I] each
        return self.down_proj(F.silu(gate) * up)  # [B, T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, args: DecoderArgs, layer: int, factory: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, factory)
        self.self_attn = Attention(args, layer, factory)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, factory)
        self.mlp = MLP(args, factory)

    def forward(self, x, cos, sin, kv_cache, rows, mask, write, S):
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, rows, mask, write, S)
        x = x + h  # [B, T, hidden]
        return x + self.mlp(self.post_attention_layernorm(x))  # [B, T, hidden]


class DecoderModel(nn.Module):
    def __init__(self, args: DecoderArgs, factory: dict):
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _empty(args.vocab_size, args.hidden_size, factory=factory)  # [V, hidden]
        self.layers = nn.ModuleList(DecoderLayer(args, i, factory) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, factory)


class DecoderForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 causal LM with a static KV cache (see the module docstring)."""

    supports_cuda_graph = True

    def __init__(self, args: DecoderArgs, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        factory = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.args = args
        self.model = DecoderModel(args, factory)
        if args.tie_word_embeddings:
            self.lm_head = nn.Module()
            self.lm_head.weight = self.model.embed_tokens.weight  # one Parameter, listed once
        else:
            self.lm_head = nn.Module()
            self.lm_head.weight = _empty(args.vocab_size, args.hidden_size, factory=factory)  # [V, hidden]
        with torch.device(device or "cpu"):
            self.rotary = RotaryEmbedding(args.rope, args.head_dim, args.max_position_embeddings)
        self.window = args.sliding_window
        self.dtype = factory["dtype"]
        self.kv_cache: torch.Tensor | None = None
        self.unused_weights: list[str] = []
        self.mapped: dict = {}  # checkpoint name -> weight_loading.MappedTensor, filled by the CPU loader
        self.head_packed: list[torch.Tensor] | None = None  # the LM head in HEAD_CHUNK_ROWS-row pieces, as `_pack`
        self.head_small_batch: list | None = None  # [(first row, small_batch kernel)] per piece, if all usable
        self.embed_rows: torch.Tensor | None = None  # [V, hidden] mapped from the checkpoint once the head is packed

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        slots=0,
        attend_len: int | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [B, T]; seq_lens [B] (each row's length after this step) -> hidden [B, T, hidden].

        Row i uses cache slot `slots[i]` (`slots`: a Rows, a list or [B] tensor of slot numbers, or the first
        of B contiguous slots); attention reads the first `attend_len` cache positions (default:
        max(positions) + 1, which syncs; CUDA graphs pass their context bucket)."""
        assert self.kv_cache is not None, "allocate_kv_cache() first"
        B, T = input_ids.shape
        if isinstance(slots, int):
            slots = range(slots, slots + B)
        rows = Rows.of(slots, input_ids.device)
        if attend_len is None:
            attend_len = int(positions.max()) + 1
        key_pos = torch.arange(attend_len, device=input_ids.device)  # [S]
        dist = positions[:, :, None] - key_pos[None, None, :]  # [B, T, S]: query pos - key pos
        causal = dist >= 0  # [B, T, S]
        windowed = (causal & (dist < self.window)) if self.window else causal  # [B, T, S]
        # built once per step, not per layer: the masks as SDPA's additive form, the rotation tables in the
        # activations' dtype (as transformers casts them), where the new keys and values go in the cache
        x = self.embed(input_ids)  # [B, T, hidden]
        masks = {
            False: self._additive(causal, x.dtype),
            True: self._additive(windowed, x.dtype) if self.window else None,
        }
        cos, sin = rotation_tables(*self.rotary(positions, seq_lens), x.dtype)  # [B, 1, T, rot] each
        write = CacheWrites(rows.index, positions, tuple(self.kv_cache.shape))
        self.last_attend_len = attend_len
        for i, layer in enumerate(self.model.layers):
            mask = masks[True] if layer.self_attn.sliding and self.window else masks[False]
            x = layer(x, cos, sin, self.kv_cache[i], rows, mask, write, attend_len)  # [B, T, hidden]
        return self.model.norm(x)  # [B, T, hidden]

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """allowed [B, T, S] bool -> [B, 1, T, S] additive mask (0 or -inf) in the activations' dtype, which is
        what SDPA turns a bool mask into on every call; None on CPU when every position is allowed (a batch-1
        decode step), where SDPA then skips the mask. CUDA keeps the mask: checking it would sync."""
        if not allowed.is_cuda and bool(allowed.all()):
            return None
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return zero.masked_fill(~allowed, float("-inf"))[:, None]  # [B, 1, T, S]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> [B, T, hidden]: from the dense embedding, or from the checkpoint's mapped rows (in
        its own dtype, cast here exactly as loading would have) once a tied head is packed."""
        if self.embed_rows is not None:
            return F.embedding(input_ids, self.embed_rows).to(self.dtype)  # [B, T, hidden]
        return F.embedding(input_ids, self.model.embed_tokens.weight)  # [B, T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_small_batch is not None and self.head_small_batch[0][1].accepts(hidden):
            logits = torch.empty(*hidden.shape[:-1], self.args.vocab_size, dtype=hidden.dtype)  # [..., V]
            rows = logits.view(-1, self.args.vocab_size)  # [rows, V]
            for lo, kernel in self.head_small_batch:
                kernel(hidden, out=rows[:, lo : lo + kernel.out_features])  # one piece's columns, in place
            return logits
        if self.head_packed is not None:
            return torch.cat([_packed_linear(hidden, w, None) for w in self.head_packed], dim=-1)  # [..., V]
        return F.linear(hidden, self.lm_head.weight)  # [..., hidden] -> [..., V]

    # ---- engine interface ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        a = self.args
        itemsize = torch.empty((), dtype=dtype).element_size()
        return a.num_hidden_layers * 2 * a.num_key_value_heads * a.head_dim * itemsize

    def allocate_kv_cache(self, num_slots: int, max_model_len: int, device, dtype: torch.dtype) -> None:
        a = self.args
        shape = (a.num_hidden_layers, 2, num_slots, a.num_key_value_heads, max_model_len, a.head_dim)
        if torch.device(device).type == "cpu":
            self.kv_cache = zeros_on_demand(shape, dtype)  # [L, 2, slots, Hkv, S_max, D]
        else:
            self.kv_cache = torch.zeros(shape, device=device, dtype=dtype)  # [L, 2, slots, Hkv, S_max, D]

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor, slots=0) -> torch.Tensor:
        """input_ids [B, T] right-padded prompts, lengths [B], slots (see forward) -> last-token logits [B, V]."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)[None, :].expand(B, T)  # [B, T]
        hidden = self.forward(input_ids, positions, lengths, slots, attend_len=T)  # [B, T, hidden]
        last = hidden[torch.arange(B, device=hidden.device), lengths - 1]  # [B, hidden]
        return self.compute_logits(last)  # [B, V]

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slots=0, attend_len=None) -> torch.Tensor:
        """input_ids, positions [B] for the sequences in cache slots `slots` -> next-token logits [B, V].

        Attention reads `attend_len` positions (default: the longest running sequence's length)."""
        hidden = self.forward(input_ids[:, None], positions[:, None], positions + 1, slots, attend_len)  # [B, 1, h]
        return self.compute_logits(hidden[:, 0])  # [B, V]

    def small_batch_use(self) -> str:
        """Which linears the small-batch CPU kernels run (or why none do), for the launch manifest."""
        linears = [m.small_batch for m in self.modules() if isinstance(m, Linear)]
        return small_batch.usage(linears, self.head_small_batch is not None)

    def prepack_for_cpu(self) -> bool:
        """On CPU in bfloat16 or float32 with oneDNN: pre-pack every projection's weight, and the LM head when the
        loader recorded where it lies in the checkpoint (see `_pack_head`). Call after the weights are loaded; True
        when it packed."""
        w = self.model.layers[0].mlp.down_proj.weight if len(self.model.layers) else None
        packable = (torch.bfloat16, torch.float32)  # float16 has no fast oneDNN path on most CPUs
        if w is None or w.device.type != "cpu" or w.dtype not in packable or not torch.backends.mkldnn.is_available():
            return False
        for module in self.modules():
            if isinstance(module, Linear) and module.packed is None:
                module.prepack()
        self._pack_head()
        return True

    def _pack_head(self) -> None:
        """The head is a quarter of a small model's bytes, read every step: pack it too, from the checkpoint's
        mapping after the dense copy is dropped (so memory never holds both), one chunk of rows at a time, giving
        each chunk's mapped pages back once packed. A tied embedding then reads its rows from that mapping. With
        no mapping (other formats, a changed file, a renamed tensor) the head stays dense."""
        if self.head_packed is not None:
            return
        tied = self.args.tie_word_embeddings and self.lm_head.weight is self.model.embed_tokens.weight
        source = self.mapped.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        view = source.map() if source is not None else None
        if view is None or tuple(view.tensor.shape) != tuple(self.lm_head.weight.shape):
            return
        self.lm_head.weight = None
        if tied:
            self.model.embed_tokens.weight = None
            self.embed_rows = view.tensor  # [V, hidden], in the checkpoint's dtype
        rows = view.tensor.shape[0]
        chunks, kernels = [], []
        for lo in range(0, rows, HEAD_CHUNK_ROWS):
            hi = min(lo + HEAD_CHUNK_ROWS, rows)
            mapped = view.tensor[lo:hi]  # [hi - lo, hidden], in the checkpoint's file
            piece = _pack(mapped.to(self.dtype))  # packed (or kept as is: float32)
            if not piece.is_mkldnn and piece.data_ptr() == mapped.data_ptr():  # fp32 from an fp32 file: its pages
                piece = piece.clone()  # the head is memory of its own, as the packed pieces are
            chunks.append(piece)
            kernels.append((lo, small_batch.for_packed(piece, mapped)))
            view.drop_pages(lo, hi)
        self.head_packed = chunks
        if all(kernel is not None for _, kernel in kernels):
            self.head_small_batch = kernels

    def free_slot(self, slot: int) -> None:
        """Nothing to do: a slot's stale keys are never read (attention masks by position) and get overwritten."""

    # ---- weights -------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named tensors into the parameters; returns the names of the parameters fully loaded.

        Names that match no parameter are collected in `self.unused_weights` (the loader warns about them)."""
        params = dict(self.named_parameters())
        shards_seen: dict[str, set] = {}
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # tied: the embedding is the head (vLLM skips it too)
            target, shard = name, None
            for piece, (fused, shard_id) in STACKED_PARAMS.items():
                if piece in name:
                    target, shard = name.replace(piece, fused), shard_id
                    break
            param = params.get(target)
            if param is None:
                self.unused_weights.append(name)
                continue
            dest = param.data
            if shard is not None:
                module = self.get_submodule(target.rsplit(".", 1)[0])
                offset, size = module.shards[shard]
                dest = dest.narrow(0, offset, size)  # rows of this shard
            if tuple(dest.shape) != tuple(tensor.shape):
                raise InvalidModelError(
                    f"checkpoint tensor {name} has shape {list(tensor.shape)}, the model expects "
                    f"{list(dest.shape)}: the weights do not match config.json"
                )
            dest.copy_(tensor, non_blocking=True)
            if shard is None:
                loaded.add(target)
            else:
                shards_seen.setdefault(target, set()).add(shard)
                module = self.get_submodule(target.rsplit(".", 1)[0])
                if shards_seen[target] == set(module.shards):
                    loaded.add(target)
        return loaded
