"""The one safetensors header parser and the one dtype table, without torch.

The format: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` (space-padded), then
the data region. Offsets are relative to the start of the data region. A well-formed file, as the safetensors
library itself requires, has every tensor's byte length equal to its element count times its dtype's bits / 8
(a whole number of bytes), the tensors tiling the data region with no gap and no overlap, and the data region
ending exactly at the end of the file. prestage also refuses a file with no tensor: a weight file that holds
nothing is a broken export or a failed download.

- `DTYPES`: safetensors dtype name -> `DType` (bits per element, torch dtype name, numpy dtype name).
  `from_torch` maps a torch dtype (or its name) back; `torch_itemsize` gives a torch dtype name's bytes.
- `read_header(path)`: parse and check one file; `header_from_buffer(buf)`: the same over a whole file held
  in memory; `read_header_bytes(path)`: the raw JSON bytes only (for hashing), with the same length checks.
  All return or raise the same way: a `Header(tensors, metadata, data_start)` whose `tensors` is
  `{name: {"dtype", "shape", "offsets": [begin, end]}}` in the header's order, or an InvalidModelError whose
  one-line message names the file, the defect and the fix. Every check is an explicit `if` (none is an
  `assert`, so `python -O` checks the same).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

from prestage.stages.errors import InvalidModelError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# A valid header nests 3 levels (header -> entry -> shape list); anything past this is refused before
# json.loads, so a hostile header cannot exhaust the parser's recursion.
MAX_DEPTH = 16
REDOWNLOAD = "the file is corrupt or not safetensors: re-download or re-export it"


@dataclass(frozen=True)
class DType:
    """One safetensors dtype. `torch` / `numpy` are dtype attribute names, None where that library has no
    dtype with the header's element layout. `checkpoint_float` marks the floating dtypes that count when a
    checkpoint's dtype is read from its headers (vLLM's table: F64, F32, F16, BF16, F8_E4M3, F8_E5M2)."""

    name: str
    bits: int
    torch: str | None
    numpy: str | None
    checkpoint_float: bool = False

    @property
    def itemsize(self) -> int | None:
        """Bytes per element; None for the sub-byte (packed) dtypes."""
        return self.bits // 8 if self.bits % 8 == 0 else None


# Every dtype the safetensors library reads. F4/F6 pack several elements per byte: torch's
# float4_e2m1fn_x2 counts two values as one element, so its shapes differ from the header's.
DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 8, "bool", "bool"),
        DType("F4", 4, None, None),
        DType("F6_E2M3", 6, None, None),
        DType("F6_E3M2", 6, None, None),
        DType("U8", 8, "uint8", "uint8"),
        DType("I8", 8, "int8", "int8"),
        DType("F8_E5M2", 8, "float8_e5m2", None, True),
        DType("F8_E4M3", 8, "float8_e4m3fn", None, True),
        DType("F8_E8M0", 8, "float8_e8m0fnu", None),
        DType("F8_E4M3FNUZ", 8, "float8_e4m3fnuz", None),
        DType("F8_E5M2FNUZ", 8, "float8_e5m2fnuz", None),
        DType("I16", 16, "int16", "int16"),
        DType("U16", 16, "uint16", "uint16"),
        DType("F16", 16, "float16", "float16", True),
        DType("BF16", 16, "bfloat16", None, True),
        DType("I32", 32, "int32", "int32"),
        DType("U32", 32, "uint32", "uint32"),
        DType("F32", 32, "float32", "float32", True),
        DType("C64", 64, "complex64", "complex64"),
        DType("F64", 64, "float64", "float64", True),
        DType("I64", 64, "int64", "int64"),
        DType("U64", 64, "uint64", "uint64"),
    )
}
_BY_TORCH = {d.torch: d for d in DTYPES.values() if d.torch}


def from_torch(torch_dtype) -> str:
    """A torch dtype (or its name, with or without `torch.`) as the safetensors dtype name; a dtype the
    format has no name for comes back upper-cased."""
    name = str(torch_dtype).removeprefix("torch.")
    d = _BY_TORCH.get(name)
    return d.name if d else name.upper()


def torch_itemsize(torch_name: str) -> int:
    """Bytes per element of a torch dtype name (`float16` -> 2); KeyError for a name the table lacks."""
    d = _BY_TORCH[str(torch_name).removeprefix("torch.")]
    return d.bits // 8


def nbytes(dtype: str, shape) -> int | None:
    """Bytes a tensor of `dtype` and `shape` takes; None when its bits are not a whole number of bytes."""
    bits = math.prod(shape) * DTYPES[dtype].bits
    return bits // 8 if bits % 8 == 0 else None


class Header(NamedTuple):
    tensors: dict  # {name: {"dtype": str, "shape": [int], "offsets": [begin, end]}}, header order
    metadata: dict  # {str: str}
    data_start: int  # absolute byte offset of the data region


def _fail(label: str, what: str, fix: str) -> NoReturn:
    raise InvalidModelError(f"{label}: {what}; {fix}")


def header_length(first8: bytes, file_size: int, label: str, fix: str = REDOWNLOAD) -> int:
    """The header length N from the file's first 8 bytes, checked against the limit and the file's size."""
    if len(first8) < 8 or file_size < 8:
        _fail(label, f"{file_size} bytes is too short for a safetensors file (it needs an 8-byte header length)", fix)
    n = int.from_bytes(first8[:8], "little")
    if n > MAX_HEADER_BYTES:
        _fail(label, f"safetensors header length {n} is over the {MAX_HEADER_BYTES}-byte limit", fix)
    if 8 + n > file_size:
        _fail(label, f"safetensors header length {n} does not fit the {file_size}-byte file (truncated?)", fix)
    return n


def _read(path: Path, label: str, fix: str) -> tuple[bytes, int]:
    """(raw header JSON, file size) of the file at `path`, from one open file."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = header_length(fh.read(8), size, label, fix)
            raw = fh.read(n)
    except OSError as e:
        _fail(label, f"cannot read the file ({e.strerror or type(e).__name__})", fix)
    if len(raw) != n:
        _fail(label, f"the file ended inside its {n}-byte header (it changed while being read?)", fix)
    return raw, size


def read_header_bytes(path: Path, *, label: str | None = None, fix: str = REDOWNLOAD) -> bytes:
    """The raw header JSON of the file at `path` (length checked, not parsed)."""
    return _read(Path(path), label or Path(path).name, fix)[0]


def read_header(path: Path, *, label: str | None = None, fix: str = REDOWNLOAD) -> Header:
    """Parse and check the safetensors file at `path` (`label` names it in errors; default its name)."""
    label = label or Path(path).name
    raw, size = _read(Path(path), label, fix)
    return parse_header(raw, size, label, fix)


def header_from_buffer(buf, *, label: str, fix: str = REDOWNLOAD) -> Header:
    """Parse and check a whole safetensors file held in `buf` (bytes, memoryview, or a uint8 numpy array)."""
    view = memoryview(buf).cast("B")
    n = header_length(bytes(view[:8]), len(view), label, fix)
    return parse_header(bytes(view[8 : 8 + n]), len(view), label, fix)


# A JSON string (escapes included), or an unterminated one running to the end: possessive so the scan is linear.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\Z)', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")


def _too_deep(raw: bytes) -> bool:
    """True when the JSON text nests arrays/objects more than MAX_DEPTH deep, found without recursion.

    Outside strings, only the brackets matter. Each pass deletes every innermost pair; a pair deleted within
    MAX_DEPTH passes is at most that high, and deleting balanced pairs leaves every other bracket's depth as it
    was. Staying within depth 0..MAX_DEPTH in what is left would need a pair of height <= MAX_DEPTH, all
    deleted: so the walk below leaves that range within MAX_DEPTH + 1 brackets. Above it: too deep. Below 0: a
    stray closer, where json.loads stops with an error after nesting at most 2 x MAX_DEPTH deep."""
    brackets = _STRING.sub(b"", raw).translate(_AS_SQUARE, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    depth = 0
    for c in brackets:
        depth += 1 if c == ord("[") else -1
        if depth < 0:
            return False
        if depth > MAX_DEPTH:
            return True
    return False


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_header(raw: bytes, file_size: int, label: str, fix: str = REDOWNLOAD) -> Header:
    """Check the header JSON `raw` of a `file_size`-byte file and return its Header."""
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    if _too_deep(raw):
        _fail(label, f"safetensors header nests deeper than {MAX_DEPTH} levels (a valid one nests 3)", fix)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        _fail(label, "safetensors header is not UTF-8 text", fix)
    except _DuplicateKey as e:
        _fail(label, f"safetensors header names {str(e.args[0])[:100]!r} twice", fix)
    except (ValueError, RecursionError) as e:
        _fail(label, f"safetensors header is not valid JSON ({str(e)[:120]})", fix)
    if not isinstance(doc, dict):
        _fail(label, f"safetensors header is a JSON {type(doc).__name__}, not an object", fix)
    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        _fail(label, f"__metadata__ is a JSON {type(meta).__name__}, not an object of strings", fix)
    for k, v in meta.items():
        if not isinstance(v, str):
            _fail(label, f"__metadata__ key {k[:100]!r} holds {v!r:.60}, not a string", fix)
    if not doc:
        _fail(label, "holds no tensors (a weight file must hold at least one)", fix)
    tensors = {}
    for name, info in doc.items():
        tensors[name] = _entry(name, info, data_len, label, fix)
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1]["offsets"]):
        begin, end = t["offsets"]
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            _fail(label, f"tensor {name[:100]!r} at data offset {begin} {what}", fix)
        pos = end
    if pos != data_len:
        _fail(label, f"the file has {data_len - pos} bytes after its last tensor (tensors end at {pos})", fix)
    return Header(tensors, meta, data_start)


def _entry(name: str, info, data_len: int, label: str, fix: str) -> dict:
    """One tensor's entry, checked: known dtype, non-negative int shape, offsets in the file matching the size."""
    what = f"tensor {name[:100]!r}"
    if not isinstance(info, dict):
        _fail(label, f"{what} has a malformed header entry (a JSON {type(info).__name__}, not an object)", fix)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            _fail(label, f"{what} has a malformed header entry (no {key})", fix)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        _fail(label, f"{what} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", fix)
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        _fail(label, f"{what} has a malformed header entry (shape {shape!r} is not a list of integers >= 0)", fix)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        _fail(label, f"{what} has a malformed header entry (data_offsets {offsets!r} is not two integers >= 0)", fix)
    begin, end = offsets
    if begin > end:
        _fail(label, f"{what} has data_offsets [{begin}, {end}] that end before they begin", fix)
    if end > data_len:
        _fail(label, f"{what} data_offsets [{begin}, {end}] run past the {data_len}-byte data region (truncated)", fix)
    want = nbytes(dtype, shape)
    if want is None:
        _fail(label, f"{what} {dtype}{shape} does not fill a whole number of bytes", fix)
    if end - begin != want:
        _fail(label, f"{what} {dtype}{shape} needs {want} bytes but its data_offsets span {end - begin}", fix)
    return {"dtype": dtype, "shape": list(shape), "offsets": [begin, end]}
