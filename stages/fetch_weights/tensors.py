"""The tensor index of a checkpoint ({name: {file, dtype, shape}}) and its checks against configure's spec.

- `index_file`: one file's tensors: safetensors from the header (no torch), `.bin`/`.pt` with a lazy
  `torch.load(mmap=True, weights_only=True)` (shapes only, the data stays on disk).
- `check_spec`: transformer layer indices in names (`model.layers.N.`, Mistral's `layers.N.`) must be exactly
  0..num_hidden_layers-1 (plus MTP layers the config declares), the embedding (and an untied lm_head) must
  be [vocab_size, hidden_size]; a mismatch is an InvalidModelError now instead of a crash at launch.
- `dummy_tensors`: the parameters launch will fill for `--load-format dummy`, built on torch's meta device
  from configure's config (nothing allocated), or from the spec's decoder shape when transformers cannot.
dtypes are recorded with safetensors names (BF16, F32, ...) whatever the file format.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from prestage.stages import safetensors
from prestage.stages.errors import InvalidModelError
from prestage.stages.records import ConfigureRecord, ModelSpec

_LAYER_RE = re.compile(r"^(?:model\.|model\.language_model\.|language_model\.model\.)?layers\.(\d+)\.")
_EMBED = (
    "model.embed_tokens.weight",
    "tok_embeddings.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
)
_HEAD = ("lm_head.weight", "output.weight", "language_model.lm_head.weight")


def index_file(path: Path, rel: str, kind: str) -> dict:
    """{name: {file, dtype, shape}} for one weight file."""
    if kind == "safetensors":
        tensors = safetensors.read_header(path, label=rel).tensors
        return {n: {"file": rel, "dtype": t["dtype"], "shape": t["shape"]} for n, t in tensors.items()}
    import torch  # .bin/.pt only: shapes need the pickle

    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        try:  # legacy (non-zip) checkpoints cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise InvalidModelError(
                f"{rel}: not a loadable PyTorch checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); re-download it"
            ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise InvalidModelError(f"{rel}: holds a {type(sd).__name__}, not a state dict of tensors")
    out = {}
    for name, t in sd.items():
        if isinstance(t, torch.Tensor):
            out[str(name)] = {"file": rel, "dtype": safetensors.from_torch(t.dtype), "shape": list(t.shape)}
    del sd
    return out


def merge(indexes) -> dict:
    """One index from per-file indexes in load order; a name in two files is an error."""
    merged: dict = {}
    for idx in indexes:
        for name, info in idx.items():
            if name in merged:
                raise InvalidModelError(
                    f"tensor '{name}' is in both {merged[name]['file']} and {info['file']}; "
                    "the checkpoint mixes two exports: keep one"
                )
            merged[name] = info
    return merged


def param_count(tensors: dict) -> int:
    return sum(math.prod(t["shape"]) for t in tensors.values())


def check_spec(tensors: dict, spec: ModelSpec, config: dict, *, where: str = "checkpoint") -> list[str]:
    """Raise InvalidModelError when the tensors contradict the config; return warnings for softer doubts."""
    warnings: list[str] = []
    n_layers = spec.num_hidden_layers
    found = {int(m.group(1)) for name in tensors if (m := _LAYER_RE.match(name))}
    if found:
        extra_ok = int(config.get("num_nextn_predict_layers") or config.get("mtp_num_hidden_layers") or 0)
        want = set(range(n_layers))
        missing = sorted(want - found)
        extra = sorted(found - want - set(range(n_layers, n_layers + extra_ok)))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"layers {_ranges(missing)} missing")
            if extra:
                parts.append(f"layers {_ranges(extra)} not in the config")
            raise InvalidModelError(
                f"{where}: num_hidden_layers is {n_layers} but the weights have layers "
                f"{_ranges(sorted(found))} ({'; '.join(parts)}); the checkpoint does not match "
                "config.json: fix one of them"
            )
    want_shape = [spec.vocab_size, spec.hidden_size]
    embed = next((n for n in _EMBED if n in tensors), None)
    head = next((n for n in _HEAD if n in tensors), None)
    for name in (embed, head):
        if name and want_shape and _is_float(tensors[name]["dtype"]) and tensors[name]["shape"] != want_shape:
            raise InvalidModelError(
                f"{where}: {name} has shape {tensors[name]['shape']} but the config says "
                f"vocab_size x hidden_size = {want_shape}; the checkpoint does not match "
                "config.json: fix one of them"
            )
    tied = spec.tie_word_embeddings
    if embed and tied and head:
        warnings.append(
            f"tie_word_embeddings is true but the checkpoint has {head}: vLLM unties the embeddings and loads it"
        )
    if embed and not tied and not head:
        warnings.append(
            "tie_word_embeddings is false but the checkpoint has no lm_head.weight: loading will "
            "leave the output projection uninitialized"
        )
    return warnings


def _is_float(dtype: str) -> bool:
    """A float of 16 bits or more: its shape is the logical one whatever the quantization scheme."""
    d = safetensors.DTYPES.get(dtype)
    return d is not None and d.checkpoint_float and d.bits >= 16


def _ranges(nums: list[int]) -> str:
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}..{nums[j]}")
        i = j + 1
    return ",".join(out)


def dummy_tensors(conf: ConfigureRecord) -> tuple[dict, str]:
    """({name: {file: None, dtype, shape}}, how) for the parameters launch fills under `dummy`."""
    dtype = safetensors.from_torch(conf.dtype.config or conf.dtype.requested or "bfloat16")
    try:
        shapes = _meta_model_shapes(conf)
        how = "meta-model"
    except Exception:
        shapes = _decoder_shapes(conf.spec)
        how = "spec"
    return {n: {"file": None, "dtype": dtype, "shape": s} for n, s in shapes.items()}, how


def _meta_model_shapes(conf: ConfigureRecord) -> dict:
    import torch
    import transformers

    cfg = dict(conf.config)
    model_type = conf.model_type or cfg.get("model_type")
    for k in ("model_type", "transformers_version", "architectures_", "_name_or_path"):
        cfg.pop(k, None)
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    arch = (conf.architectures or cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    return {name: list(p.shape) for name, p in model.named_parameters()}  # tied params appear once


def _decoder_shapes(spec: ModelSpec) -> dict:
    """A Llama-style decoder's parameters from the spec (used when transformers cannot build the model)."""
    v, h, i, n = spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers
    nh, nkv, hd = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
    out = {"model.embed_tokens.weight": [v, h]}
    for L in range(n):
        p = f"model.layers.{L}."
        out.update(
            {
                p + "self_attn.q_proj.weight": [nh * hd, h],
                p + "self_attn.k_proj.weight": [nkv * hd, h],
                p + "self_attn.v_proj.weight": [nkv * hd, h],
                p + "self_attn.o_proj.weight": [h, nh * hd],
                p + "mlp.gate_proj.weight": [i, h],
                p + "mlp.up_proj.weight": [i, h],
                p + "mlp.down_proj.weight": [h, i],
                p + "input_layernorm.weight": [h],
                p + "post_attention_layernorm.weight": [h],
            }
        )
    out["model.norm.weight"] = [h]
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = [v, h]
    return out
