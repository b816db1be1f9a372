"""The weight loader: reads exactly the files fetch-weights recorded and fills the model's parameters.

    load_checkpoint(model, weights_record, base, run_dir, device, verify_hashes) -> LoadStats

Formats (fetch-weights `format`):
  safetensors / mistral  CPU target: each file is memory-mapped and each tensor copied once from the mapping into
                         its parameter, the mapped pages dropped after the copy (peak memory about the weights).
                         Where each tensor lies is remembered (`LoadStats.mapped`, `MappedTensor`): the decoder
                         maps its LM head again to pre-pack it from there, and a tied embedding's rows are then
                         looked up in that mapping.
                         CUDA target: each shard is read whole by a thread pool (two files ahead) into one
                         pinned buffer, hashed as the bytes stream in when `verify_hashes`; its
                         tensors are views into that buffer (stages/safetensors.py parses and checks the header
                         from it, so the views need no copy), handed to `model.load_weights`, and copied to the
                         device asynchronously while the next shard is being read. `mistral` names are mapped to
                         Hugging Face names.
  pt                     `torch.load(weights_only=True, mmap=True)` per file, in the recorded order.
  npcache                the `.npy` files fetch-weights converted into the run folder.
  dummy                  no file: every floating parameter is filled uniform(-1e-3, 1e-3) with a generator
                         seeded 1234 per tensor (vLLM's rule).
Every file's size is checked before reading (missing: NotFoundError; wrong size or hash: IntegrityError).
Every parameter must be loaded (InvalidModelError listing the missing names); checkpoint tensors that match
no parameter come back as warnings.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prestage.stages import safetensors
from prestage.stages.digest import sha256_hex
from prestage.stages.errors import IntegrityError, InvalidModelError, NotFoundError, UnsupportedError
from prestage.stages.paths import inside
from prestage.stages.records import StoredFile, WeightFile, WeightsRecord

_CHUNK = 16 * 1024 * 1024
_READ_AHEAD = 2
_REFETCH = "re-run `prestage fetch-weights RUN --force`"


@dataclass
class LoadStats:
    format: str
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    hashed: bool = False
    warnings: list = field(default_factory=list)
    mapped: dict = field(default_factory=dict)  # checkpoint name -> MappedTensor (CPU safetensors loads)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "files": self.files,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "gb_per_s": round(self.gbps, 3),
            "hashed": self.hashed,
        }


@dataclass(frozen=True)
class MappedTensor:
    """Where a checkpoint tensor lies in its file, and which file that was (device, inode, size, mtime), so it
    can be mapped again later without a copy: `map()` gives the tensor, or None when the file changed since."""

    path: Path
    offset: int  # bytes from the start of the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    identity: tuple[int, int, int, int]

    @staticmethod
    def identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def map(self) -> MappedView | None:
        """The tensor as a view of a private, read-only mapping of its file (pages are read in only where it is
        used), or None when the file is not the one loaded from or the tensor is not aligned for its dtype."""
        if self.offset % torch.empty((), dtype=self.dtype).element_size():
            return None
        try:
            with open(self.path, "rb") as fh:
                if self.identity_of(os.fstat(fh.fileno())) != self.identity:
                    return None
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private, never written
        except (OSError, ValueError):
            return None
        count = 1
        for n in self.shape:
            count *= n
        tensor = torch.frombuffer(mm, dtype=self.dtype, count=count, offset=self.offset).view(self.shape)
        return MappedView(tensor, mm, self.offset)


@dataclass
class MappedView:
    """A checkpoint tensor mapped from its file (`tensor`, first dimension = rows), and a way to give back the
    pages of some of its rows (they are read in again from the page cache if used later)."""

    tensor: torch.Tensor
    mm: mmap.mmap
    offset: int

    def drop_pages(self, first_row: int, end_row: int) -> None:
        row_bytes = self.tensor[0].numel() * self.tensor.element_size()
        begin, end = self.offset + first_row * row_bytes, self.offset + end_row * row_bytes
        lo = begin - begin % mmap.PAGESIZE
        if end > lo and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)


def load_checkpoint(
    model, fetched: WeightsRecord, base: Path | None, run_dir: Path, device, verify_hashes: bool = False
) -> LoadStats:
    """Fill `model` from what fetch-weights recorded; `base` is the folder its `files` are relative to."""
    fmt = fetched.format
    device = torch.device(device)
    stats = LoadStats(format=fmt, hashed=verify_hashes and fmt != "dummy")
    start = time.perf_counter()
    if fmt == "dummy":
        loaded = fill_dummy(model)
        stats.bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        files = check_files(fetched, base, run_dir)
        if fmt in ("safetensors", "mistral"):
            if device.type == "cpu":
                weights = _mapped_safetensors_weights(files, verify_hashes, stats)
            else:
                weights = _safetensors_weights(files, device, verify_hashes, stats)
            if fmt == "mistral":
                weights = (mistral_to_hf(name, t, model) for name, t in weights)
        elif fmt == "pt":
            weights = _torch_weights(files, verify_hashes, stats)
        elif fmt == "npcache":
            weights = _npcache_weights(fetched, run_dir, verify_hashes, stats)
        else:
            raise UnsupportedError(
                f"load format {fmt!r} recorded by fetch-weights cannot be loaded by launch; "
                "re-run fetch-weights with --load-format auto|safetensors|pt|npcache|dummy"
            )
        loaded = model.load_weights(weights)
        if stats.mapped and isinstance(getattr(model, "mapped", None), dict):
            model.mapped.update(stats.mapped)  # the decoder maps its LM head again to pack it (prepack_for_cpu)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            empty = getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:  # torch keeps freed pinned buffers (each rounded up to a power of two) for reuse
                empty()  # the shards' staging buffers are done with: give that page-locked memory back
    stats.seconds = time.perf_counter() - start
    missing = sorted({n for n, _ in model.named_parameters()} - set(loaded))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InvalidModelError(
            f"{len(missing)} parameter(s) not found in the checkpoint: {shown}; the weights do "
            "not match the architecture in config.json"
        )
    unused = list(getattr(model, "unused_weights", []) or [])
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        stats.warnings.append(f"{len(unused)} checkpoint tensor(s) match no parameter and were ignored: {shown}")
    return stats


def check_files(weights: WeightsRecord, base: Path | None, run_dir: Path) -> list[tuple[Path, WeightFile]]:
    """(absolute path, record) per recorded file, after checking that each exists with its recorded size."""
    out = []
    records = list(weights.files)
    if weights.format == "npcache" and weights.npcache is not None:
        records, base = list(weights.npcache.files), Path(run_dir)
    for rec in records:
        path = inside(Path(base), rec.path, "fetch-weights file")
        if not path.is_file():
            raise NotFoundError(f"weight file {rec.path} recorded by fetch-weights is missing from {base}; {_REFETCH}")
        size = path.stat().st_size
        if size != rec.size:
            raise IntegrityError(
                f"weight file {rec.path} has {size} bytes, fetch-weights recorded {rec.size}; {_REFETCH}"
            )
        out.append((path, rec))
    return out


# ---- safetensors --------------------------------------------------------------------------------------------
def _read_whole(path: Path, rec: dict, pin: bool, verify: bool) -> torch.Tensor:
    """The file's bytes in one uint8 tensor (pinned if asked), sha256-checked while reading if `verify`."""
    size = rec.size
    buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)  # [size]
    view = memoryview(buf.numpy()) if size else memoryview(b"")
    digest = hashlib.sha256() if verify else None
    with open(path, "rb", buffering=0) as fh:
        pos = 0
        while pos < size:
            n = fh.readinto(view[pos : pos + _CHUNK])
            if not n:
                raise IntegrityError(f"weight file {rec.path} ended after {pos} of {size} bytes; {_REFETCH}")
            if digest is not None:
                digest.update(view[pos : pos + n])
            pos += n
    if digest is not None and rec.sha256 and digest.hexdigest() != rec.sha256:
        raise IntegrityError(
            f"weight file {rec.path} has sha256 {digest.hexdigest()[:16]}..., fetch-weights "
            f"recorded {rec.sha256[:16]}...; {_REFETCH}"
        )
    return buf


def _tensors_in(buf: torch.Tensor, label: str):
    """Yield (name, tensor view) for each tensor of a safetensors file held in `buf` [size] uint8."""
    header = safetensors.header_from_buffer(buf.numpy(), label=label, fix=_REFETCH)
    data = header.data_start
    for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1]["offsets"]):
        dtype = _torch_dtype(info["dtype"])
        if dtype is None:
            raise UnsupportedError(
                f"{label}: tensor {name} has dtype {info['dtype']}, which launch cannot load (a packed dtype, "
                f"or one torch {torch.__version__} lacks); convert the checkpoint to BF16, F16 or F32"
            )
        begin, end = info["offsets"]
        raw = buf[data + begin : data + end]  # [nbytes] uint8
        if raw.storage_offset() % safetensors.DTYPES[info["dtype"]].itemsize:
            raw = raw.clone()  # unaligned: one copy so the dtype view is legal
        yield name, raw.view(dtype).view(info["shape"])


def _torch_dtype(st_name: str):
    """The torch dtype of a safetensors dtype name, or None (packed dtypes, or one this torch lacks)."""
    d = safetensors.DTYPES.get(st_name)
    return getattr(torch, d.torch, None) if d is not None and d.torch and d.itemsize else None


def _safetensors_weights(files, device: torch.device, verify: bool, stats: LoadStats):
    pin = device.type == "cuda"
    with ThreadPoolExecutor(max_workers=_READ_AHEAD) as pool:
        pending = [pool.submit(_read_whole, p, rec, pin, verify) for p, rec in files[:_READ_AHEAD]]
        for i, (_, rec) in enumerate(files):
            buf = pending[i].result()
            if i + _READ_AHEAD < len(files):
                nxt_path, nxt_rec = files[i + _READ_AHEAD]
                pending.append(pool.submit(_read_whole, nxt_path, nxt_rec, pin, verify))
            for name, tensor in _tensors_in(buf, rec.path):
                stats.tensors += 1
                yield name, tensor
            if pin:
                torch.cuda.current_stream(device).synchronize()  # copies out of `buf` are done: free it
            stats.files += 1
            stats.bytes += rec.size
            pending[i] = None
            del buf


def _mapped_safetensors_weights(files, verify: bool, stats: LoadStats):
    """CPU target: each file memory-mapped, each tensor a view copied once into its parameter by the model,
    then that range of the mapping dropped (madvise), so peak memory stays about the weights themselves. Each
    aligned tensor's place in its file goes into `stats.mapped`."""
    for path, rec in files:
        if verify:
            _hash_file(path, rec)
        if rec.size == 0:
            raise IntegrityError(f"weight file {rec.path} is empty; {_REFETCH}")
        with open(path, "rb") as fh:
            identity = MappedTensor.identity_of(os.fstat(fh.fileno()))
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private, never written: no copy made
        try:
            buf = torch.frombuffer(mm, dtype=torch.uint8)  # [size]
            for name, tensor in _tensors_in(buf, rec.path):
                stats.tensors += 1
                begin = tensor.data_ptr() - buf.data_ptr()
                end = begin + tensor.numel() * tensor.element_size()
                in_mapping = 0 <= begin < end <= rec.size  # a view of the mapping, not an unaligned tensor's copy
                if in_mapping:
                    stats.mapped[name] = MappedTensor(path, begin, tensor.dtype, tuple(tensor.shape), identity)
                yield name, tensor
                del tensor  # the model copied it: give the pages back
                lo = begin - begin % mmap.PAGESIZE
                if in_mapping and hasattr(mm, "madvise"):
                    mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
            del buf
            stats.files += 1
            stats.bytes += rec.size
        finally:
            try:
                mm.close()
            except BufferError:  # a view is still held somewhere: the mapping goes with it
                pass


# ---- torch .bin / .pt ---------------------------------------------------------------------------------------
def _hash_file(path: Path, rec: WeightFile | StoredFile) -> None:
    got = sha256_hex(path)
    if rec.sha256 and got != rec.sha256:
        raise IntegrityError(
            f"weight file {rec.path} has sha256 {got[:16]}..., fetch-weights recorded {rec.sha256[:16]}...; {_REFETCH}"
        )


def _torch_load(path: Path, rec: dict) -> dict:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise InvalidModelError(
            f"weight file {rec.path} cannot be read by torch.load(weights_only=True): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _torch_weights(files, verify: bool, stats: LoadStats):
    for path, rec in files:
        if verify:
            _hash_file(path, rec)
        state = _torch_load(path, rec)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                stats.tensors += 1
                yield name, tensor
        stats.files += 1
        stats.bytes += rec.size
        del state


# ---- npcache ------------------------------------------------------------------------------------------------
def _npcache_weights(weights: WeightsRecord, run_dir: Path, verify: bool, stats: LoadStats):
    import numpy as np

    record = weights.npcache
    by_path = {f.path: f for f in record.files}
    doc = json.loads(inside(Path(run_dir), record.names_file, "npcache names file").read_text())
    for name in doc["names"]:
        info = doc["tensors"][name]
        rel = f"{record.dir}/{info['file']}"
        path = Path(run_dir) / rel
        if verify and rel in by_path:
            _hash_file(path, by_path[rel])
        arr = np.load(path, allow_pickle=False)
        tensor = torch.from_numpy(np.ascontiguousarray(arr))
        st = safetensors.DTYPES.get(info.get("dtype"))
        if st is not None and st.numpy is None and st.torch:  # stored as same-width unsigned ints
            tensor = tensor.view(getattr(torch, st.torch))
        stats.tensors += 1
        stats.bytes += path.stat().st_size
        yield name, tensor
    stats.files = len(by_path)


# ---- mistral-format names -----------------------------------------------------------------------------------
_MISTRAL_PIECES = (
    ("attention.wq.", "self_attn.q_proj."),
    ("attention.wk.", "self_attn.k_proj."),
    ("attention.wv.", "self_attn.v_proj."),
    ("attention.wo.", "self_attn.o_proj."),
    ("feed_forward.w1.", "mlp.gate_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("feed_forward.w3.", "mlp.up_proj."),
    ("attention_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
)


def mistral_to_hf(name: str, tensor: torch.Tensor, model) -> tuple[str, torch.Tensor]:
    """Map a consolidated (Mistral-format) tensor to its Hugging Face name; q/k rows go from the interleaved
    rotary layout to the half-split one transformers uses."""
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight", tensor
    if name == "norm.weight":
        return "model.norm.weight", tensor
    if name == "output.weight":
        return "lm_head.weight", tensor
    if not name.startswith("layers."):
        return name, tensor
    for old, new in _MISTRAL_PIECES:
        if old in name:
            name = name.replace(old, new)
            break
    name = "model." + name
    args = getattr(model, "args", None)
    if args is not None and (".q_proj.weight" in name or ".k_proj.weight" in name):
        heads = args.num_attention_heads if ".q_proj." in name else args.num_key_value_heads
        rows, cols = tensor.shape  # [heads * head_dim, hidden]
        tensor = tensor.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return name, tensor


# ---- dummy --------------------------------------------------------------------------------------------------
def fill_dummy(model, seed: int = 1234, low: float = -1e-3, high: float = 1e-3) -> set[str]:
    """vLLM's dummy weights: each floating parameter uniform(low, high) from a generator seeded `seed`."""
    names = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            names.add(name)
            if not torch.is_floating_point(param):
                continue
            gen = torch.Generator(device=param.device).manual_seed(seed)
            if torch.finfo(param.dtype).bits < 16:  # fp8: uniform_ needs >= 16 bits
                tmp = torch.empty(param.shape, dtype=torch.float16, device=param.device)
                param.data.copy_(tmp.uniform_(low, high, generator=gen))
            else:
                param.data.uniform_(low, high, generator=gen)
    return names
