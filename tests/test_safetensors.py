"""The one safetensors header parser and dtype table (stages/safetensors.py).

Headers written by the real `safetensors.torch.save_file` parse to the names, dtypes, shapes and offsets the
library wrote (the offsets checked against the tensors' own bytes); every header defect is a one-line
InvalidModelError naming the file and the fix; the checks hold under `python -O`; the dtype table agrees with
torch, numpy and the safetensors library.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from prestage.stages import safetensors as sf
from prestage.stages.errors import CODE, InvalidModelError
from tests.conftest import REPO_ROOT

# torch dtypes save_file writes and this torch has (uint16/32/64 from torch 2.3, float8_e8m0fnu from 2.7)
_TORCH_DTYPES = [
    getattr(torch, d.torch)
    for d in sf.DTYPES.values()
    if d.torch and d.itemsize and getattr(torch, d.torch, None) is not None
]


def _random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    """Random bytes viewed as `dtype` (every bit pattern, NaNs included: the test compares bytes)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape)) if shape else 1
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)  # [numel * itemsize]
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9._]{0,12}", fullmatch=True),
        st.tuples(st.sampled_from(_TORCH_DTYPES), st.lists(st.integers(0, 5), max_size=3)),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**31 - 1),
    metadata=st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3),
)
def test_header_written_by_save_file_parses_back(tmp_path, spec, seed, metadata):
    tensors = {name: _random_tensor(dtype, shape, seed + i) for i, (name, (dtype, shape)) in enumerate(spec.items())}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    blob = path.read_bytes()

    header = sf.read_header(path)
    assert header == sf.header_from_buffer(blob, label="w.safetensors")  # the launch path parses the same
    assert set(header.tensors) == set(tensors)
    assert header.metadata == (metadata or {})
    assert header.data_start == 8 + int.from_bytes(blob[:8], "little")
    for name, t in tensors.items():
        got = header.tensors[name]
        assert got["dtype"] == sf.from_torch(t.dtype)
        assert sf.DTYPES[got["dtype"]].torch == str(t.dtype).removeprefix("torch.")
        assert got["shape"] == list(t.shape)
        begin, end = got["offsets"]
        assert blob[header.data_start + begin : header.data_start + end] == _bytes_of(t)


def test_packed_f4_header_from_save_file(tmp_path):
    """F4 (two values a byte): the header's shape is the unpacked one and its bytes are half the elements."""
    # the torch `make setup` installs (2.13) has the packed dtype; an older one fails here, not silently
    f4 = getattr(torch, "float4_e2m1fn_x2", None)
    assert f4 is not None, (
        f"torch {torch.__version__} has no float4_e2m1fn_x2; use the torch `make setup` installs (2.13.0)"
    )
    path = tmp_path / "f4.safetensors"
    save_file({"q": torch.zeros((3, 2), dtype=torch.uint8).view(f4)}, str(path))
    t = sf.read_header(path).tensors["q"]
    assert (t["dtype"], t["shape"], t["offsets"]) == ("F4", [3, 4], [0, 6])


def test_metadata_value_full_of_brackets_is_not_nesting(tmp_path):
    """Brackets inside JSON strings (a metadata value holding JSON, escaped quotes) do not count as depth."""
    deep = '["\\"' + "[" * 5000 + "]" * 4999
    path = tmp_path / "m.safetensors"
    path.write_bytes(
        _raw({"__metadata__": {"config": deep}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    )
    assert sf.read_header(path).metadata == {"config": deep}


# ---- defects --------------------------------------------------------------------------------------------


def _raw(header, data: bytes = b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def _one(dtype="F32", shape=(2,), offsets=(0, 8), **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


DEEP = b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
DEFECTS = [
    # (case, file bytes, message fragment)
    ("empty file", b"", "0 bytes is too short"),
    ("truncated length", b"\x01\x02\x03", "3 bytes is too short"),
    ("huge length", (1 << 40).to_bytes(8, "little") + b"{}", "over the 100000000-byte limit"),
    ("length past the end", (100).to_bytes(8, "little") + b"{}", "does not fit the 10-byte file"),
    ("not JSON", _raw(b"{{{"), "not valid JSON"),
    ("not UTF-8", _raw(b'{"\xff": 1}'), "not UTF-8"),
    ("an array", _raw(b"[]"), "a JSON list, not an object"),
    ("deep nesting", _raw(DEEP), "nests deeper than 16 levels"),
    ("unterminated deep", _raw(b'{"a": "' + b"[" * 10_000), "not valid JSON"),
    ("duplicate name", _raw(b'{"a": 1, "a": 2}'), "names 'a' twice"),
    ("zero tensors", _raw({}), "holds no tensors"),
    ("only metadata", _raw({"__metadata__": {"format": "pt"}}), "holds no tensors"),
    ("metadata not a map", _raw({"__metadata__": ["pt"], "a": _one()}, b"\0" * 8), "__metadata__ is a JSON list"),
    (
        "metadata value not str",
        _raw({"__metadata__": {"n": 1}, "a": _one()}, b"\0" * 8),
        "key 'n' holds 1, not a string",
    ),
    ("entry not an object", _raw({"a": [1]}, b""), "malformed header entry (a JSON list"),
    ("no data_offsets", _raw({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "malformed header entry (no data_"),
    ("unknown dtype", _raw({"a": _one("Q9", (1,), (0, 1))}, b"\0"), "unknown dtype 'Q9'"),
    ("dtype not a string", _raw({"a": _one(7, (1,), (0, 1))}, b"\0"), "unknown dtype 7"),
    ("negative dim", _raw({"a": _one(shape=(-1,))}, b"\0" * 8), "shape [-1] is not a list of integers >= 0"),
    ("float dim", _raw({"a": _one(shape=(2.0,))}, b"\0" * 8), "shape [2.0] is not a list"),
    ("bool dim", _raw({"a": _one(shape=(True,), offsets=(0, 4))}, b"\0" * 4), "shape [True] is not a list"),
    ("shape not a list", _raw({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8), "shape 2 is"),
    ("one offset", _raw({"a": _one(offsets=(0,))}, b"\0" * 8), "data_offsets [0] is not two integers"),
    ("negative offset", _raw({"a": _one(offsets=(-8, 0))}, b"\0" * 8), "data_offsets [-8, 0] is not two integers"),
    ("offsets reversed", _raw({"a": _one(offsets=(8, 0))}, b"\0" * 8), "end before they begin"),
    ("offsets outside the file", _raw({"a": _one()}, b"\0" * 4), "run past the 4-byte data region (truncated)"),
    (
        "size inconsistent",
        _raw({"a": _one(offsets=(0, 4))}, b"\0" * 4),
        "F32[2] needs 8 bytes but its data_offsets span 4",
    ),
    ("sub-byte not whole", _raw({"a": _one("F4", (3,), (0, 2))}, b"\0\0"), "does not fill a whole number of bytes"),
    ("gap", _raw({"a": _one(shape=(1,), offsets=(4, 8))}, b"\0" * 8), "leaves a gap of 4 bytes"),
    (
        "overlap",
        _raw({"a": _one(), "b": _one(shape=(1,), offsets=(4, 8))}, b"\0" * 8),
        "tensor 'b' at data offset 4 overlaps the previous tensor",
    ),
    ("trailing bytes", _raw({"a": _one()}, b"\0" * 12), "has 4 bytes after its last tensor"),
]


@pytest.mark.parametrize("case,blob,msg", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_header_defect_is_one_line_invalid_model_error(tmp_path, case, blob, msg):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(InvalidModelError) as e:
        sf.read_header(path)
    text = str(e.value)
    assert msg in text
    assert text.startswith("bad.safetensors: ") and text.endswith(sf.REDOWNLOAD) and "\n" not in text
    assert type(e.value) is InvalidModelError and e.value.exit_code == CODE["invalid-model"] == 9
    with pytest.raises(InvalidModelError) as e2:  # the in-memory path (launch) refuses it the same way
        sf.header_from_buffer(blob, label="bad.safetensors", fix="re-fetch")
    assert msg in str(e2.value) and str(e2.value).endswith("; re-fetch")


def test_read_header_bytes_bounds_the_length(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_raw({"a": _one()}, b"\0" * 8))
    assert json.loads(sf.read_header_bytes(path)) == {"a": _one()}
    path.write_bytes((sf.MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(InvalidModelError, match="over the 100000000-byte limit"):
        sf.read_header_bytes(path)
    with pytest.raises(InvalidModelError, match="nope.safetensors: cannot read the file"):
        sf.read_header_bytes(tmp_path / "nope.safetensors")


def test_checks_hold_under_python_O(tmp_path):
    """Every check is an explicit `if`: `python -O` (asserts stripped) refuses the same headers."""
    cases = {"neg.safetensors": _raw({"a": _one(shape=(-1,))}, b"\0" * 8), "deep.safetensors": _raw(DEEP)}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from prestage.stages import safetensors
        from prestage.stages.errors import InvalidModelError
        assert False, "asserts must be stripped"  # under -O this line does nothing
        print("optimize", sys.flags.optimize)
        for name in {sorted(cases)!r}:
            try:
                safetensors.read_header(Path({str(tmp_path)!r}) / name)
                print("ACCEPTED", name)
            except InvalidModelError as e:
                print("refused", e.exit_code, e)
        """
    )
    r = subprocess.run([sys.executable, "-O", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "optimize 1" and "ACCEPTED" not in r.stdout
    assert lines[1].startswith("refused 9 deep.safetensors: safetensors header nests deeper")
    assert lines[2].startswith("refused 9 neg.safetensors: tensor 'a' has a malformed header entry (shape [-1]")


# ---- the dtype table -------------------------------------------------------------------------------------


def test_dtype_table_agrees_with_torch_numpy_and_the_library(tmp_path):
    for d in sf.DTYPES.values():
        if d.numpy:
            assert np.dtype(d.numpy).itemsize * 8 == d.bits, d
        t = getattr(torch, d.torch, None) if d.torch else None
        if t is None:
            continue
        assert torch.empty((), dtype=t).element_size() * 8 == d.bits, d
        assert sf.from_torch(t) == sf.from_torch(d.torch) == d.name
        assert sf.torch_itemsize(d.torch) == d.itemsize
        path = tmp_path / f"{d.name}.safetensors"
        save_file({"x": torch.zeros(2, dtype=t)}, str(path))  # the library names the dtype as the table does
        assert sf.read_header(path).tensors["x"]["dtype"] == d.name
    assert sf.nbytes("F4", [3, 4]) == 6 and sf.nbytes("F4", [3]) is None and sf.nbytes("F6_E2M3", [4]) == 3
    assert {d.name for d in sf.DTYPES.values() if d.checkpoint_float} == {
        "F16",
        "BF16",
        "F32",
        "F64",
        "F8_E4M3",
        "F8_E5M2",
    }


def test_module_imports_without_torch():
    code = "import sys, prestage.stages.safetensors; print('torch' in sys.modules, 'numpy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stderr


def test_fetch_index_refuses_a_zero_tensor_file(tmp_path):
    """A safetensors file with no tensors no longer passes fetch-weights' index."""
    from prestage.stages.fetch_weights.tensors import index_file

    path = tmp_path / "empty.safetensors"
    save_file({}, str(path), metadata={"format": "pt"})
    with pytest.raises(InvalidModelError, match="shards/empty.safetensors: holds no tensors"):
        index_file(path, "shards/empty.safetensors", "safetensors")
