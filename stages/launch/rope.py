"""Rotary position embeddings: inverse frequencies and attention scaling for each RoPE type, and the module
that turns positions into cos/sin.

RoPE types: default, linear, dynamic (NTK), yarn, llama3, longrope, written from the published formulas
(the parity tests compare them with transformers' `ROPE_INIT_FUNCTIONS`). `rope` is the flat dict that
configure records under `spec.rope` (transformers' standardized `rope_parameters`): `rope_type`,
`rope_theta`, `partial_rotary_factor`, `factor`, `original_max_position_embeddings`, and the type's own keys.

Two types depend on the length of the sequence being run, and both decide it per sequence from `seq_lens`
(the sequence's length after this forward), the way transformers does for a sequence run alone:
  dynamic   up to `max_position_embeddings` the base frequencies; past it, the NTK-scaled base for that length;
  longrope  `short_factor` while the length is within `original_max_position_embeddings`, else `long_factor`.
Keys already in the KV cache keep the rotation they were written with (as in transformers and vLLM).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prestage.stages.errors import UnsupportedError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def _unsupported(kind) -> UnsupportedError:
    return UnsupportedError(
        f"rope_type {kind!r} is not one prestage's engine runs ({', '.join(ROPE_TYPES)}); fix config.json (or "
        "--hf-overrides), or run the model with --engine vllm if vLLM knows it"
    )


def rotary_dim(rope: dict, head_dim: int) -> int:
    return int(head_dim * float(rope.get("partial_rotary_factor") or 1.0))


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim/2]
    return 1.0 / (theta**exponents)  # [dim/2]


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scaling(
    rope: dict, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] float32, attention scaling applied to cos/sin) for one RoPE config.

    `seq_len` matters only for `dynamic` and `longrope` (the length of the sequence being run)."""
    kind = rope.get("rope_type") or rope.get("type") or "default"
    theta = float(rope.get("rope_theta") or 10000.0)
    dim = rotary_dim(rope, head_dim)
    if kind == "default":
        return _base_inv_freq(theta, dim), 1.0
    if kind == "linear":  # positions divided by `factor`
        return _base_inv_freq(theta, dim) / float(rope["factor"]), 1.0
    if kind == "dynamic":  # NTK: raise the base once the sequence outgrows the trained length
        factor = float(rope["factor"])
        length = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(rope, theta, dim), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(rope, theta, dim, max_position_embeddings)
    if kind == "longrope":
        return _longrope_inv_freq(rope, theta, dim, max_position_embeddings, seq_len)
    raise _unsupported(kind)


def _llama3_inv_freq(rope: dict, theta: float, dim: int) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    inv_freq = _base_inv_freq(theta, dim)  # [dim/2]
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq  # [dim/2]
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # [dim/2]
    smooth = (old_len / wavelen - low) / (high - low)  # [dim/2]; 0 at the low edge, 1 at the high edge
    blended = (1 - smooth) * scaled / factor + smooth * scaled  # [dim/2]
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)  # [dim/2] bool
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(rope: dict, theta: float, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp linearly in between."""
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    factor = float(factor) if factor is not None else max_position_embeddings / original
    scaling = rope.get("attention_factor")
    if scaling is None:
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        scaling = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_mscale(factor)
        )
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # [dim/2]
    keep = 1 - ramp  # [dim/2]: 1 = extrapolate (keep the frequency), 0 = interpolate (divide by factor)
    extrapolated = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))  # [dim/2]
    inv_freq = (extrapolated / factor) * (1 - keep) + extrapolated * keep  # [dim/2]
    return inv_freq, float(scaling)


def _longrope_inv_freq(
    rope: dict, theta: float, dim: int, max_position_embeddings: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-frequency rescale factors, short within the original length, long beyond it."""
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    factor = rope.get("factor")
    factor = float(factor) if factor is not None else max_position_embeddings / original
    scaling = rope.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = rope["long_factor"] if seq_len and seq_len > original else rope["short_factor"]
    ext = torch.tensor(ext, dtype=torch.float32)  # [dim/2]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim/2]
    return 1.0 / (ext * theta**exponents), float(scaling)


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rot] float32 -> cos, signed sin [B, 1, T, rot] in the activations' dtype (transformers
    rotates in that dtype), built once per step for every layer. The signed sin has its first half negated:
    rotate_half(x) * sin, with rotate_half(x) = [-x2, x1], is then x.roll(rot / 2) * signed sin, bit for bit
    (negating is exact), one op per call where rotate_half takes four."""
    cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)  # [B, 1, T, rot] each
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # [B, 1, T, rot] each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, signed_sin [B, 1, T, rot] from `rotation_tables`, rot <= D: x * cos + rotate_half(x) *
    sin on the first `rot` dims, the rest passed through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + x.roll(rot // 2, -1) * signed_sin  # [B, H, T, D]
    x_rot, x_pass = x[..., :rot], x[..., rot:]  # [B, H, T, rot], [B, H, T, D-rot]
    return torch.cat((x_rot * cos + x_rot.roll(rot // 2, -1) * signed_sin, x_pass), dim=-1)  # [B, H, T, D]


class RotaryEmbedding(nn.Module):
    """positions [B, T] (+ seq_lens [B]) -> cos, sin [B, T, rotary_dim] float32, attention scaling included."""

    def __init__(self, rope: dict, head_dim: int, max_position_embeddings: int):
        super().__init__()
        self.rope = dict(rope)
        self.kind = rope.get("rope_type") or rope.get("type") or "default"
        if self.kind not in ROPE_TYPES:
            raise _unsupported(self.kind)
        self.dim = rotary_dim(rope, head_dim)
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.scaling = inv_freq_and_scaling(rope, head_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rot/2]
        if self.kind == "longrope":
            self.original = rope.get("original_max_position_embeddings") or max_position_embeddings
            long_freq, _ = inv_freq_and_scaling(rope, head_dim, max_position_embeddings, seq_len=self.original + 1)
            self.register_buffer("inv_freq_long", long_freq, persistent=False)  # [rot/2]
        if self.kind == "dynamic":
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            self.register_buffer("exponents", exponents, persistent=False)  # [rot/2]

    def _per_sequence_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """seq_lens [B] -> inv_freq [B, 1, rot/2] for the length-dependent types."""
        if self.kind == "longrope":
            use_long = (seq_lens > self.original)[:, None]  # [B, 1]
            return torch.where(use_long, self.inv_freq_long, self.inv_freq)[:, None, :]  # [B, 1, rot/2]
        mpe = self.max_position_embeddings
        factor = float(self.rope["factor"])
        theta = float(self.rope.get("rope_theta") or 10000.0)
        length = seq_lens.clamp(min=mpe).double()  # [B]
        base = theta * ((factor * length / mpe) - (factor - 1)) ** (self.dim / (self.dim - 2))  # [B]
        scaled = 1.0 / (base.float()[:, None] ** self.exponents)  # [B, rot/2]
        grown = (seq_lens > mpe)[:, None]  # [B, 1]
        return torch.where(grown, scaled, self.inv_freq)[:, None, :]  # [B, 1, rot/2]

    def forward(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None):
        if self.kind in ("dynamic", "longrope") and seq_lens is not None:
            inv_freq = self._per_sequence_inv_freq(seq_lens)  # [B, 1, rot/2]
        else:
            inv_freq = self.inv_freq[None, None, :]  # [1, 1, rot/2]
        freqs = positions[..., None].float() * inv_freq  # [B, T, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, rot]
        return emb.cos() * self.scaling, emb.sin() * self.scaling  # [B, T, rot] each
