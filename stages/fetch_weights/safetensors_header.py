"""Reading a safetensors file's header without torch: tensor names, dtypes, shapes, and layout checks.

The format: 8 bytes little-endian u64 N, then N bytes of JSON `{name: {dtype, shape, data_offsets: [b, e]},
"__metadata__": {...}}`, then the data. Offsets are relative to the end of the header. A well-formed file
has every tensor's byte length equal to numel x dtype size, the tensors tiling the data region with no gap
and no overlap, and the data region ending exactly at the end of the file. Any defect is an
InvalidModelError naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from prestage.stages.errors import InvalidModelError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F4": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}


def read_header(path: Path, *, label: str | None = None) -> tuple[dict, dict, int]:
    """Parse and check one file: returns ({name: {dtype, shape, offsets}}, metadata, data_start)."""
    path = Path(path)
    label = label or path.name
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidModelError(f"{label}: {size} bytes is too short for a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InvalidModelError(
                f"{label}: safetensors header length {n} does not fit the {size}-byte file; "
                "the file is truncated or not safetensors"
            )
        raw = fh.read(n)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidModelError(f"{label}: safetensors header is not valid JSON ({e}); re-download it") from None
    if not isinstance(doc, dict):
        raise InvalidModelError(f"{label}: safetensors header is not a JSON object; re-download it")
    meta = doc.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in doc.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            assert all(isinstance(d, int) and d >= 0 for d in shape)
            assert isinstance(begin, int) and isinstance(end, int)
        except Exception:
            raise InvalidModelError(f"{label}: tensor '{name}' has a malformed header entry; re-download it") from None
        if dtype not in DTYPE_BYTES:
            raise InvalidModelError(f"{label}: tensor '{name}' has unknown dtype {dtype!r}")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if dtype == "F4":  # two 4-bit values per byte
            want = (math.prod(shape) + 1) // 2
        if end - begin != want:
            raise InvalidModelError(
                f"{label}: tensor '{name}' {dtype}{shape} needs {want} bytes but its "
                f"data_offsets span {end - begin}; the file is corrupt"
            )
        tensors[name] = {"dtype": dtype, "shape": shape, "offsets": [begin, end]}
    data_start = 8 + n
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1]["offsets"]):
        begin, end = info["offsets"]
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise InvalidModelError(f"{label}: tensor '{name}' at offset {begin} {what}; the file is corrupt")
        pos = end
    if data_start + pos != size:
        raise InvalidModelError(
            f"{label}: tensors end at byte {data_start + pos} but the file has {size} bytes; "
            "the file is truncated or padded: re-download it"
        )
    return tensors, meta, data_start
