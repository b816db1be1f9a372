"""Batch-1 bfloat16 linears on CPU: a small AVX-512 BF16 kernel (gemv_bf16.c) that reads oneDNN's packed weights.

At one token per step every projection is a matrix-vector product, bound by how fast its weight streams from
memory. oneDNN's kernel for it (brgemm with one row) reads the packed weights at 17-24 GB/s on this project's
2-core bench machine, where a plain `sum` reads 28-35 GB/s; gemv_bf16.c reads the same buffers at 25-33 GB/s
(measured shape by shape for the Qwen2-0.5B projections, one process, both kernels on the same packed weights). It
reads oneDNN's buffer in place, so the weights stay one copy: prefill and batched decode still go through oneDNN.
Its results are oneDNN's but for the order of the float32 additions (about 1 output in 1,000 differs by one
bfloat16 step), the same difference there is between oneDNN and transformers' own matmul.

The kernel is compiled once per machine with the system's C compiler (`$CC`, else gcc) into
`$XDG_CACHE_HOME/prestage/kernels` (default ~/.cache), keyed by a hash of the source and the compiler, in
about half a second. It is linked against the OpenMP runtime torch has loaded, so it shares torch's threads.
It is used only where all of this holds, else every linear stays on oneDNN, with the reason in `status()`:
- Linux on x86-64, and the CPU has AVX512-BF16 (`avx512_bf16` in /proc/cpuinfo);
- `PRESTAGE_CPU_GEMV` is not `0` (set it to compare with oneDNN's kernel);
- a C compiler that builds the file, and an OpenMP runtime mapped into the process by torch;
- oneDNN packed the weight in the layout the kernel reads (64-output blocks of input pairs), checked on each
  weight as it is packed (`layout_matches`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv_bf16.c")
SWITCH = "PRESTAGE_CPU_GEMV"
ABI = 1  # prestage_gemv_abi() of the source this module calls
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-fPIC"]
COMPILE_TIMEOUT_S = 120
BLOCK_OUT, BLOCK_IN = 64, 32  # oneDNN's AB16b64a2b blocks: 64 outputs x 32 inputs (16 pairs)

_unavailable: list[str] = []  # why the kernel is not used (first reason), once looked for


def status() -> str:
    """'on' or 'off: <reason>', for the launch log and the tests."""
    return "on" if kernel() is not None else f"off: {_unavailable[0]}"


@functools.lru_cache(maxsize=1)
def kernel():
    """The loaded kernel (a ctypes function), or None with the reason in status()."""
    try:
        return _load()
    except _Unavailable as e:
        _unavailable.append(str(e))
        return None


class _Unavailable(Exception):
    pass


def _cpu_has_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= set(flags)


def openmp_runtime() -> Path | None:
    """The OpenMP library torch loaded into this process (libgomp, libiomp5 or libomp), from /proc/self/maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode, path
        if len(fields) == 6 and Path(fields[5]).name.startswith(("libgomp", "libiomp5", "libomp")):
            return Path(fields[5])
    return None


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "prestage" / "kernels"


def _compiler() -> str:
    cc = os.environ.get("CC") or "gcc"
    found = shutil.which(cc)
    if found is None:
        raise _Unavailable(f"no C compiler: {cc!r} is not on PATH (install gcc, or set CC)")
    return found


def _build(cc: str, omp: Path) -> Path:
    """Compile the source once into the kernel cache (atomically: concurrent launches race harmlessly)."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"the C compiler {cc} does not run: {e}") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, str(omp), " ".join(FLAGS)]).encode()).hexdigest()
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"prestage-kernels-{os.getuid()}"):
        target = folder / f"gemv_bf16-{key[:16]}.so"
        if target.is_file():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                obj, lib = Path(tmp) / "gemv_bf16.o", Path(tmp) / "gemv_bf16.so"
                # compile with OpenMP, then link against torch's own runtime rather than the compiler's
                steps = [
                    [cc, *FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                    [cc, "-shared", str(obj), str(omp), "-o", str(lib)],
                ]
                for step in steps:
                    done = subprocess.run(step, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
                    if done.returncode != 0:
                        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                        raise _Unavailable(f"{Path(cc).name} could not build {SOURCE.name}: {last}")
                os.replace(lib, target)
            return target
        except (OSError, subprocess.TimeoutExpired):
            continue  # an unwritable cache: try the next folder
    raise _Unavailable("no writable folder for the compiled kernel (set XDG_CACHE_HOME)")


def _load():
    if os.environ.get(SWITCH, "1") == "0":
        raise _Unavailable(f"{SWITCH}=0")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise _Unavailable(f"needs Linux on x86-64, not {platform.system()} on {platform.machine()}")
    if not _cpu_has_bf16():
        raise _Unavailable("this CPU has no AVX512-BF16")
    if not torch.backends.mkldnn.is_available():
        raise _Unavailable("this torch has no oneDNN")
    omp = openmp_runtime()
    if omp is None:
        raise _Unavailable("torch loaded no OpenMP runtime")
    lib = ctypes.CDLL(str(_build(_compiler(), omp)))
    if lib.prestage_gemv_abi() != ABI:
        raise _Unavailable(f"the compiled kernel's ABI is {lib.prestage_gemv_abi()}, not {ABI}")
    fn = lib.prestage_gemv_bf16
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = None
    return fn


def _padded(n: int, block: int) -> int:
    return (n + block - 1) // block * block


def layout_matches(packed: torch.Tensor, dense: torch.Tensor) -> bool:
    """Is `packed` (oneDNN's packing of the bf16 weight `dense` [out, in]) laid out as the kernel reads it:
    [out/64, in/32, 16 input pairs, 64 outputs, 2], zero-padded? oneDNN picks a layout per shape and CPU, and a
    layout is one tiling of the whole weight, so the first, a middle and the last block of 64 outputs are
    compared with the dense rows (padding included); that costs three blocks' bytes, not a copy of the weight."""
    out_features, in_features = dense.shape
    n_pad, k_pad = _padded(out_features, BLOCK_OUT), _padded(in_features, BLOCK_IN)
    if torch.ops.mkldnn._nbytes(packed) != n_pad * k_pad * 2:
        return False
    flat = _buffer(packed, n_pad * k_pad)  # [n_pad * k_pad]
    blocks = n_pad // BLOCK_OUT
    for b in sorted({0, blocks // 2, blocks - 1}):
        tile = flat[b * BLOCK_OUT * k_pad : (b + 1) * BLOCK_OUT * k_pad].view(k_pad // 32, 16, 64, 2)
        tile = tile.permute(2, 0, 1, 3).reshape(BLOCK_OUT, k_pad)  # [64 outputs, k_pad]
        rows = dense[b * BLOCK_OUT : (b + 1) * BLOCK_OUT].to(torch.bfloat16)  # [<= 64, in]
        expected = torch.zeros(BLOCK_OUT, k_pad, dtype=torch.bfloat16)
        expected[: rows.shape[0], :in_features] = rows
        if not torch.equal(tile.view(torch.int16), expected.view(torch.int16)):  # bit for bit (NaN included)
            return False
    return True


def _buffer(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The opaque packed tensor's memory as a flat bf16 tensor (a view: it lives as long as `packed`)."""
    address = torch.ops.mkldnn.data_ptr(packed)
    return torch.frombuffer((ctypes.c_uint16 * count).from_address(address), dtype=torch.bfloat16)


class BatchOneLinear:
    """y = x W^T (+ b) for one row x, from a oneDNN-packed bf16 weight; built by `for_packed`."""

    def __init__(self, fn, packed: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None):
        self.fn, self.packed = fn, packed  # holding `packed` keeps its buffer alive
        self.address = torch.ops.mkldnn.data_ptr(packed)
        self.out_features, self.in_features = out_features, in_features
        self.in_padded = _padded(in_features, BLOCK_IN)
        self.bias = bias.detach().float().contiguous() if bias is not None else None  # [out] float32

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] bf16 holding one row -> [..., out] bf16 (or written into `out`, a contiguous bf16 [out])."""
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.bfloat16) if out is None else out
        bias = self.bias.data_ptr() if self.bias is not None else None
        self.fn(
            self.address,
            x.data_ptr(),
            bias,
            y.data_ptr(),
            self.out_features,
            self.in_features,
            self.in_padded,
            torch.get_num_threads(),
        )
        return y


def for_packed(packed: torch.Tensor, dense: torch.Tensor, bias=None) -> BatchOneLinear | None:
    """The batch-1 kernel for `packed`, oneDNN's packing of the weight `dense` [out, in] (still readable: see
    `layout_matches`), or None where oneDNN keeps the weight (see the module docstring)."""
    if packed.dtype != torch.bfloat16 or not packed.is_mkldnn or dense.dim() != 2:
        return None
    fn = kernel()
    if fn is None:
        return None
    try:  # torch's oneDNN ops for a packed tensor's memory (torch.ops.mkldnn.data_ptr and _nbytes)
        if torch.ops.mkldnn.data_ptr(packed) % 64 or not layout_matches(packed, dense):  # 64: aligned loads
            return None
    except (AttributeError, RuntimeError):  # a torch without them
        return None
    out_features, in_features = dense.shape
    return BatchOneLinear(fn, packed, out_features, in_features, bias)
