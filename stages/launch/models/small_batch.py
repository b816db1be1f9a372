"""Linears for a few rows on CPU (decode steps of 1 to 8 sequences): small AVX-512 kernels (small_batch.c) that read
oneDNN's packed weights in place.

At a decode step every projection multiplies a few rows by the whole weight, so the step is bound by how fast the
weights stream from memory. oneDNN's kernels for so few rows read them well below the machine's bandwidth: on this
project's 2-core bench machine (one process, the same packed weights, Qwen2-0.5B projections), bfloat16 at
17-25 GB/s for one row and 14-19 GB/s for eight, where a plain `sum` reads 28-35 GB/s; small_batch.c reads them at
29-43 GB/s for one row and 20-25 GB/s for eight, and float32 at 21-32 against 16-25 GB/s for one row (a batch-1
float32 step 5-8% faster) and 17-23 against 14 for eight (a batch-8 float32 step 14% faster than with tiles of 4
rows). The weights stay the one copy oneDNN packed (in float32, where that packing is a plain copy, the loaded
weight itself): prefill and batches of more rows still go through oneDNN. The results are oneDNN's but for the
order of the float32 additions (in bf16 about 1 output in 1,000 is one bfloat16 step apart), the same difference
there is between oneDNN and transformers' own matmul; each row's result does not depend on how many rows run with
it.

The kernels are compiled once per machine with the system's C compiler (`$CC`, else gcc) into
`$XDG_CACHE_HOME/prestage/kernels` (default ~/.cache; a private folder in the system's temp folder if that one
is not writable), keyed by a hash of the source and the compiler, in about half a second; a folder or library
another user could have written is never used. The library is linked against the OpenMP runtime torch has
loaded, so it shares torch's threads. It is used only where all of this holds, else every linear stays on
oneDNN, with the reason in `status()`:
- Linux on x86-64, and the CPU has AVX-512 with BF16 (`avx512_bf16` in /proc/cpuinfo);
- `PRESTAGE_CPU_KERNELS` is not `0` (set it to compare with oneDNN's kernels);
- a C compiler that builds the file, and an OpenMP runtime mapped into the process by torch;
- oneDNN packed the weight in the layout the kernel reads (bf16: 64-output blocks of input pairs; float32: plain
  rows), checked on the first packed weight of each shape (`layout_matches`; oneDNN picks its layout per dtype,
  shape and CPU, so later weights of that shape only have their buffer size checked); or the weight is a float32
  one kept as it was loaded, because oneDNN's packing of its shape was found to be a plain copy on the first
  weight of that shape (`is_plain_copy`, models/decoder.py's `_pack`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("small_batch.c")
SWITCH = "PRESTAGE_CPU_KERNELS"
ABI = 2  # prestage_small_batch_abi() of the source this module calls
MAX_ROWS = 8  # more rows (prefill, bigger batches) go to oneDNN (the kernels were measured up to 8)
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-fPIC"]
COMPILE_TIMEOUT_S = 120
BLOCK_OUT, BLOCK_IN = 64, 32  # oneDNN's bf16 AB16b64a2b blocks: 64 outputs x 32 inputs (16 pairs)

_unavailable: list[str] = []  # why the kernels are not used (first reason), once looked for
_LAYOUT_SEEN: dict[tuple, int] = {}  # (dtype, out, in) -> packed bytes, for shapes `layout_matches` confirmed


def status() -> str:
    """'on' or 'off: <reason>', for the launch log, the bench and the tests."""
    return "on" if kernels() is not None else f"off: {_unavailable[0]}"


def usage(linears: list, head: bool) -> str:
    """Which of a model's linears have a kernel (`linears`: each one's SmallBatchLinear or None; `head`: the LM
    head has them), or why none can: for the launch manifest and the bench."""
    if kernels() is None:
        return status()
    used = sum(k is not None for k in linears)
    return f"on for {used} of {len(linears)} linears" + (" and the LM head" if head else "")


@functools.lru_cache(maxsize=1)
def kernels() -> dict | None:
    """{torch dtype: loaded ctypes function}, or None with the reason in status()."""
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
        target = folder / f"small_batch-{key[:16]}.so"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not (_private(folder) and (not os.path.lexists(target) or _private(target))):
                continue  # a library this process loads must be one only its user can have put there
            if target.is_file():
                return target
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                os.replace(_compile(cc, omp, Path(tmp)), target)
            return target
        except OSError:
            continue  # an unwritable cache: try the next folder
    raise _Unavailable("no private, writable folder for the compiled kernels (set XDG_CACHE_HOME)")


def _compile(cc: str, omp: Path, folder: Path) -> Path:
    """The library, built in `folder`: compiled with OpenMP, then linked against torch's own runtime rather than
    the compiler's (every symbol resolved at link time)."""
    obj, lib = folder / "small_batch.o", folder / "small_batch.so"
    steps = [
        [cc, *FLAGS, "-c", str(SOURCE), "-o", str(obj)],
        [cc, "-shared", "-Wl,--no-undefined", str(obj), str(omp), "-o", str(lib)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise _Unavailable(f"{Path(cc).name} took over {COMPILE_TIMEOUT_S} s to build {SOURCE.name}") from None
        except OSError as e:  # the compiler went away, or cannot run
            raise _Unavailable(f"the C compiler {cc} does not run: {e}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise _Unavailable(f"{Path(cc).name} could not build {SOURCE.name}: {last}")
    os.chmod(lib, 0o755)  # whatever the umask: see _private
    return lib


def _private(path: Path) -> bool:
    """A real folder or file (not a symlink, which another user could point elsewhere later), owned by this user
    and writable by no one else: the system's temp folder is shared (see _build)."""
    st = os.lstat(path)
    kind_ok = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
    return kind_ok and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _load() -> dict:
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
    path = _build(_compiler(), omp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # a noexec mount, say
        raise _Unavailable(f"cannot load the compiled kernels ({path}): {e}") from None
    if lib.prestage_small_batch_abi() != ABI:
        raise _Unavailable(f"the compiled kernels' ABI is {lib.prestage_small_batch_abi()}, not {ABI}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    bf16, f32 = lib.prestage_linear_bf16, lib.prestage_linear_f32
    bf16.argtypes = [ptr] * 4 + [i64] * 5 + [ctypes.c_int]  # w, x, bias, y, rows, ldy, n, k, kpad, threads
    f32.argtypes = [ptr] * 4 + [i64] * 4 + [ctypes.c_int]  # w, x, bias, y, rows, ldy, n, k, threads
    bf16.restype = f32.restype = None
    return {torch.bfloat16: bf16, torch.float32: f32}


def _padded(n: int, block: int) -> int:
    return (n + block - 1) // block * block


def _packed_shape(dtype: torch.dtype, out_features: int, in_features: int) -> tuple[int, int]:
    """(outputs, inputs) of the packed buffer, padding included, in the layout the kernel reads."""
    if dtype == torch.bfloat16:
        return _padded(out_features, BLOCK_OUT), _padded(in_features, BLOCK_IN)
    return out_features, in_features


def layout_matches(packed: torch.Tensor, dense: torch.Tensor) -> bool:
    """Is `packed` (oneDNN's packing of the weight `dense` [out, in]) laid out as the kernel reads it? bf16:
    [out/64, in/32, 16 input pairs, 64 outputs, 2], zero-padded; float32: plain [out, in]. oneDNN picks a layout
    per shape and CPU, and a layout is one tiling of the whole weight, so the first, a middle and the last block of
    64 outputs are compared with the dense rows bit for bit (padding included): three blocks' bytes, not a copy.
    One of them must have distinct rows and distinct columns, or the comparison would prove nothing."""
    dtype = packed.dtype
    out_features, in_features = dense.shape
    n_pad, k_pad = _packed_shape(dtype, out_features, in_features)
    size = dtype.itemsize
    if torch.ops.mkldnn._nbytes(packed) != n_pad * k_pad * size:
        return False
    flat = _buffer(packed, n_pad * k_pad, dtype)  # [n_pad * k_pad]
    bits = torch.int16 if size == 2 else torch.int32  # compared as bits: NaN included
    blocks = -(-n_pad // BLOCK_OUT)
    compared = []
    for b in sorted({0, blocks // 2, blocks - 1}):
        lo, hi = b * BLOCK_OUT, min((b + 1) * BLOCK_OUT, n_pad)
        tile = flat[lo * k_pad : hi * k_pad]
        if dtype == torch.bfloat16:  # [k_pad / 32, 16, 64, 2] -> [64 outputs, k_pad]
            tile = tile.view(k_pad // 32, 16, BLOCK_OUT, 2).permute(2, 0, 1, 3).reshape(BLOCK_OUT, k_pad)
        else:
            tile = tile.view(hi - lo, k_pad)
        rows = dense[lo:hi].to(dtype)  # [<= 64, in]
        expected = torch.zeros(hi - lo, k_pad, dtype=dtype)
        expected[: rows.shape[0], :in_features] = rows
        if not torch.equal(tile.view(bits), expected.view(bits)):
            return False
        compared.append(rows)
    return any(_distinct(rows) for rows in compared)  # else another layout could have looked the same


def is_plain_copy(packed: torch.Tensor, dense: torch.Tensor) -> bool | None:
    """Is oneDNN's packing `packed` of the float32 weight `dense` [out, in] a plain copy of it, byte for byte? On
    CPUs whose float32 kernels read plain rows (AVX-512 ones, this project's bench machine among them) it is, and
    oneDNN's linear then reads the dense weight as it is: the packed copy is not needed. The whole buffer is
    compared. None when this weight cannot tell: a weight without distinct rows and columns in its first block
    (see `_distinct`) would look the same in other layouts."""
    if not packed.is_mkldnn or packed.dtype != torch.float32 or dense.dtype != torch.float32 or dense.dim() != 2:
        return False
    try:
        if torch.ops.mkldnn._nbytes(packed) != dense.numel() * 4:
            return False
        flat = _buffer(packed, dense.numel(), torch.float32)  # [out * in]
    except (AttributeError, RuntimeError):  # a torch without torch.ops.mkldnn.data_ptr and _nbytes
        return False
    if not torch.equal(flat.view(torch.int32), dense.contiguous().view(-1).view(torch.int32)):  # bits: NaN too
        return False
    return True if _distinct(dense[:BLOCK_OUT]) else None


def _distinct(tile: torch.Tensor) -> bool:
    """Are the rows of `tile` [r, c] pairwise different, and its columns? Then a tile that matches shows the layout
    (any weight with real values passes; a constant or repeated block is not evidence, and keeps oneDNN). Compared
    through random projections: equal rows or columns always project equally; different ones almost never do, and
    if they did, the weight would only stay on oneDNN."""
    g = torch.Generator().manual_seed(0)
    t = tile.float()
    by_row = t @ torch.rand(t.shape[1], generator=g)  # [r]
    by_col = torch.rand(t.shape[0], generator=g) @ t  # [c]
    return by_row.unique().numel() == t.shape[0] and by_col.unique().numel() == t.shape[1]


def _buffer(packed: torch.Tensor, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The opaque packed tensor's memory as a flat tensor (a view: it lives as long as `packed`)."""
    address = torch.ops.mkldnn.data_ptr(packed)
    size = dtype.itemsize
    raw = (ctypes.c_uint8 * (count * size)).from_address(address)
    return torch.frombuffer(raw, dtype=dtype)


class SmallBatchLinear:
    """y = x W^T (+ b) for up to MAX_ROWS rows of x, from a oneDNN-packed bf16 or float32 weight, or a kept dense
    float32 one (`for_packed`)."""

    def __init__(self, fn, packed: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None):
        self.fn, self.packed, self.dtype = fn, packed, packed.dtype  # holding `packed` keeps its buffer alive
        self.address = torch.ops.mkldnn.data_ptr(packed) if packed.is_mkldnn else packed.data_ptr()
        self.out_features, self.in_features = out_features, in_features
        self.in_padded = _packed_shape(packed.dtype, out_features, in_features)[1]
        self.bias = bias.detach().float().contiguous() if bias is not None else None  # [out] float32

    def accepts(self, x: torch.Tensor) -> bool:
        """x [..., in] of this weight's dtype with 1 to MAX_ROWS rows."""
        return (
            x.dtype == self.dtype
            and x.shape[-1] == self.in_features  # else oneDNN, which names the shape mismatch
            and 0 < x.numel() <= MAX_ROWS * self.in_features
        )

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] (see `accepts`) -> [..., out]; or written into `out`, [rows, out] with unit column stride
        (a slice of columns of a wider tensor: the LM head's pieces)."""
        x = x.contiguous()
        rows = x.numel() // self.in_features
        if out is None:
            y, stride = torch.empty(*x.shape[:-1], self.out_features, dtype=self.dtype), self.out_features
        elif out.dtype != self.dtype or tuple(out.shape) != (rows, self.out_features) or out.stride(-1) != 1:
            raise ValueError(f"out must be [{rows}, {self.out_features}] {self.dtype} with unit column stride")
        else:
            y, stride = out, out.stride(0)
        bias = self.bias.data_ptr() if self.bias is not None else None
        args = [self.address, x.data_ptr(), bias, y.data_ptr(), rows, stride, self.out_features, self.in_features]
        if self.dtype == torch.bfloat16:
            args.append(self.in_padded)
        self.fn(*args, torch.get_num_threads())
        return y


def for_packed(packed: torch.Tensor, dense: torch.Tensor, bias=None) -> SmallBatchLinear | None:
    """The small-batch kernel for `packed`, oneDNN's packing of the weight `dense` [out, in] (see `fits`), with
    its bias [out] (or None); None where oneDNN keeps the weight (see the module docstring)."""
    if not fits(packed, dense):
        return None
    out_features, in_features = dense.shape
    if bias is not None and bias.numel() != out_features:
        return None
    return SmallBatchLinear(kernels()[packed.dtype], packed, out_features, in_features, bias)


def fits(packed: torch.Tensor, dense: torch.Tensor) -> bool:
    """Can the kernels read `packed`, oneDNN's packing of the weight `dense` [out, in] (still readable: see
    `layout_matches`)? A float32 `packed` may also be the dense weight itself (where oneDNN's packing would be a
    plain copy: see `is_plain_copy`): plain rows are what the float32 kernel reads."""
    found = kernels()
    if found is None or packed.dtype not in found or dense.dim() != 2:
        return False
    if not packed.is_mkldnn:
        plain = packed.dtype == torch.float32 and packed.is_contiguous() and packed.shape == dense.shape
        return plain and packed.data_ptr() % 64 == 0  # 64: aligned loads
    key = (packed.dtype, *dense.shape)
    try:  # torch's oneDNN ops for a packed tensor's memory (torch.ops.mkldnn.data_ptr and _nbytes)
        if torch.ops.mkldnn.data_ptr(packed) % 64:
            return False
        if key in _LAYOUT_SEEN:  # oneDNN picks its layout per dtype and shape: the buffer's size still must agree
            return torch.ops.mkldnn._nbytes(packed) == _LAYOUT_SEEN[key]
        if not layout_matches(packed, dense):
            return False
    except (AttributeError, RuntimeError):  # a torch without them
        return False
    _LAYOUT_SEEN[key] = torch.ops.mkldnn._nbytes(packed)
    return True
