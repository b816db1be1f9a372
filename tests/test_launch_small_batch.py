"""The CPU kernels for a decode step's few rows (stages/launch/models/small_batch.py): the same results as oneDNN on
its own packed weights (bf16 and float32, 1 to 8 rows), each row's result independent of the rows beside it, the
layout check, the fallbacks (switched off, no compiler, a compiler that fails), the build cache, and the engine
through them (main thread and the server's loop thread).

The tests that run the kernels need a CPU with AVX-512 BF16 and a C compiler; elsewhere they skip with the reason
`small_batch.status()` gives, and the fallback tests still run (the engine then keeps every linear on oneDNN)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
import torch

from prestage.stages.launch.models import decoder, small_batch
from prestage.stages.launch.models.decoder import DecoderForCausalLM, Linear

needs_kernels = pytest.mark.skipif(small_batch.kernels() is None, reason=f"CPU kernels {small_batch.status()}")


def fp32_packs_plain() -> bool:
    """Does oneDNN pack float32 weights as plain rows on this CPU (what the float32 kernel reads)? It does on the
    AVX-512 CPUs measured; where it does not, float32 stays on oneDNN, and the float32 kernel tests skip."""
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    return small_batch.is_plain_copy(torch.ops.mkldnn._reorder_linear_weight(w, 1), w) is True


needs_plain_fp32 = pytest.mark.skipif(
    not fp32_packs_plain(), reason="oneDNN does not pack float32 as plain rows on this CPU: float32 stays on oneDNN"
)
DTYPES = pytest.mark.parametrize(
    "dtype", [torch.bfloat16, pytest.param(torch.float32, marks=needs_plain_fp32)], ids=["bf16", "fp32"]
)


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """kernels() looked up again under the test's environment, and the session's restored after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    small_batch.kernels.cache_clear()
    small_batch._unavailable.clear()
    yield tmp_path / "cache" / "prestage" / "kernels"
    small_batch.kernels.cache_clear()
    small_batch._unavailable.clear()


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def _onednn(x, packed, bias):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@needs_kernels
@DTYPES
@pytest.mark.parametrize(
    "out_features, in_features", [(1152, 896), (896, 4864), (64, 32), (100, 77), (130, 33), (17, 5)]
)
def test_kernels_match_onednn_on_its_packed_weight(dtype, out_features, in_features):
    """Whole 64-output blocks and ragged ones, inputs a multiple of 32, odd and short, with a bias, 1 to 8 rows:
    the outputs are within rounding of the float64 product, as oneDNN's are, and (bf16) at most one bfloat16 step
    from oneDNN's, rarely."""
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)  # [out, in]
    bias = torch.randn(out_features, generator=g).to(dtype)  # [out]
    packed = _pack(w)
    kernel = small_batch.for_packed(packed, w, bias)
    assert kernel is not None and kernel.dtype == dtype
    for rows in range(1, 9):
        x = torch.randn(rows, in_features, generator=g).to(dtype)  # [rows, in]
        assert kernel.accepts(x)
        ours, onednn = kernel(x).double(), _onednn(x, packed, bias).double()  # [rows, out]
        exact = torch.nn.functional.linear(x.double(), w.double(), bias.double())  # [rows, out]
        size = x.double().abs() @ w.double().abs().T + bias.double().abs()  # [rows, out]: what the sums add up
        if dtype == torch.bfloat16:  # one bf16 step at each output's magnitude, and float32 summation error
            step = exact.abs() * 2**-7 + size * 2**-20
            assert ((ours - exact).abs() <= step).all() and ((onednn - exact).abs() <= step).all()
            assert ((ours - onednn).abs() <= step).all() and (ours != onednn).double().mean() <= 0.01
        else:
            tol = 1e-5 * (size + 1)  # float32 summation error bound, loosely
            assert ((ours - exact).abs() <= tol).all() and ((onednn - exact).abs() <= tol).all()
        alone = torch.cat([kernel(x[i : i + 1]) for i in range(rows)])  # [rows, out]
        assert torch.equal(kernel(x), alone)  # a row's result does not depend on the rows beside it
        strided = torch.randn(rows, 1, 2 * in_features, generator=g).to(dtype)[..., ::2]  # [rows, 1, in], strided
        assert torch.equal(kernel(strided), kernel(strided.contiguous())) and kernel(strided).shape == (
            rows,
            1,
            out_features,
        )
    assert not kernel.accepts(torch.randn(9, in_features).to(dtype))  # more rows: oneDNN's
    assert not kernel.accepts(torch.randn(1, in_features).to(torch.float16))
    assert not kernel.accepts(torch.randn(1, in_features + 1).to(dtype))  # oneDNN names the shape error


@needs_kernels
@DTYPES
def test_kernels_write_into_a_slice_of_columns(dtype):
    """The LM head's pieces write their columns of one [rows, V] tensor: nothing outside them is touched."""
    w = torch.randn(100, 48).to(dtype)
    kernel = small_batch.for_packed(_pack(w), w)
    x = torch.randn(3, 48).to(dtype)
    out = torch.full((3, 130), 7.0, dtype=dtype)
    kernel(x, out=out[:, 20:120])
    assert torch.equal(out[:, 20:120], kernel(x))
    assert (out[:, :20] == 7).all() and (out[:, 120:] == 7).all()
    wide = torch.zeros(3, 200, dtype=dtype)
    for wrong in (out[:, 20:119], out[:2, 20:120], wide[:, ::2], out[:, 20:120].to(torch.float16)):
        with pytest.raises(ValueError, match="out must be"):  # too narrow, too few rows, strided, another dtype
            kernel(x, out=wrong)


@needs_kernels
@DTYPES
def test_layout_check_compares_first_middle_and_last_blocks(dtype):
    """layout_matches reads the packed buffer as the kernel will; a weight that differs from what was packed in
    the first, a middle or the (ragged) last block of 64 outputs is refused, and so is another shape."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64 * 5 + 7, 96, generator=g).to(dtype)  # 6 blocks, the last one ragged
    packed = _pack(w)
    assert small_batch.layout_matches(packed, w)
    for row in (0, 64 * 3 + 1, 64 * 5 + 6):  # blocks 0, 6 // 2 and 5
        other = w.clone()
        other[row, 7] += 1
        assert not small_batch.layout_matches(packed, other), row
    assert not small_batch.layout_matches(packed, w[:, :64])  # another shape: another buffer size
    for same in (torch.ones_like(w), w[:1].expand_as(w).contiguous(), w[:, :1].expand_as(w).contiguous()):
        assert not small_batch.layout_matches(_pack(same), same)  # constant, repeated rows, repeated columns
    assert small_batch.for_packed(packed, w.double()) is not None  # compared in the packed dtype
    if dtype == torch.bfloat16:
        assert small_batch.for_packed(w, w) is None  # a dense weight, not oneDNN's packing
    else:  # plain rows: what the float32 kernel reads (see the test below)
        x = torch.randn(3, 96)
        assert torch.equal(small_batch.for_packed(w, w)(x), small_batch.for_packed(packed, w)(x))
        assert small_batch.for_packed(torch.randn(96, 64 * 5 + 7).T, w) is None  # not contiguous


@needs_kernels
@needs_plain_fp32
def test_float32_weights_that_onednn_would_only_copy_are_used_as_they_are(monkeypatch):
    """oneDNN's float32 packing is plain rows on this CPU (the kernels read it so): the loaded weight is then what
    oneDNN's linear and the kernels read. The first weight of a shape is packed and compared; the next ones are not
    copied at all; every result is the packed copy's, bit for bit. A weight that cannot tell (a constant one) is
    packed and decides nothing; bf16 is always re-laid out."""
    monkeypatch.setattr(decoder, "_PLAIN_PACKING", {})
    g = torch.Generator().manual_seed(5)
    first, second, bias = (torch.randn(*shape, generator=g) for shape in ((200, 96), (200, 96), (200,)))
    onednn = torch.ops.mkldnn._reorder_linear_weight(second, 1)
    assert small_batch.is_plain_copy(_pack(first), first) is True
    assert small_batch.is_plain_copy(onednn, first) is False  # another weight's packing
    assert small_batch.is_plain_copy(_pack(first.bfloat16()), first.bfloat16()) is False
    constant = torch.ones(200, 96)
    assert small_batch.is_plain_copy(_pack(constant), constant) is None
    assert decoder._pack(constant).is_mkldnn and decoder._PLAIN_PACKING == {}  # it decided nothing
    assert decoder._pack(first).data_ptr() == first.data_ptr()
    assert decoder._PLAIN_PACKING == {(torch.float32, 200, 96): True}
    kept = decoder._pack(second)  # not packed: the decision is the shape's
    assert not kept.is_mkldnn and kept.data_ptr() == second.data_ptr()
    for rows in (1, 9, 33):
        x = torch.randn(2, rows, 96, generator=g)  # [2, rows, in]
        assert torch.equal(decoder._packed_linear(x, kept, bias), decoder._packed_linear(x, onednn, bias))
    assert decoder._pack(second.bfloat16()).is_mkldnn
    assert decoder._PLAIN_PACKING[(torch.bfloat16, 200, 96)] is False


@needs_kernels
def test_kernels_share_torch_openmp_runtime():
    """The library is linked against the OpenMP runtime torch loaded: one thread pool in the process."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith(("libgomp", "libiomp5"))}
    assert runtimes == {str(small_batch.openmp_runtime())}, runtimes


@needs_kernels
def test_kernels_are_built_once_into_the_cache(fresh_kernels):
    assert small_batch.kernels() is not None and small_batch.status() == "on"
    (built,) = fresh_kernels.glob("small_batch-*.so")
    stamp = built.stat().st_mtime_ns
    small_batch.kernels.cache_clear()
    assert small_batch.kernels() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in fresh_kernels.iterdir()] == [built.name]  # no temporary left behind


@needs_kernels
def test_kernels_never_come_from_a_folder_others_can_write(fresh_kernels, monkeypatch, tmp_path):
    """A cache folder (or a library in it) that another user could have written is passed over: the kernels are
    built into a private folder in the system's temp folder instead, and loaded from there."""
    fresh_kernels.mkdir(parents=True)
    fresh_kernels.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert small_batch.kernels() is not None
    assert not any(fresh_kernels.iterdir())
    (built,) = (tmp_path / "tmp").glob("prestage-kernels-*/small_batch-*.so")
    assert built.parent.stat().st_mode & 0o777 == 0o700 and built.stat().st_mode & 0o022 == 0
    small_batch.kernels.cache_clear()
    built.chmod(0o777)  # now writable by anyone: not loaded again, and the build has nowhere private to go
    assert small_batch.kernels() is None and "no private, writable folder" in small_batch.status()


@needs_kernels
def test_kernels_never_come_through_a_symlink(fresh_kernels, monkeypatch, tmp_path):
    """A cache folder that is a symlink (another user could repoint it between the check and the load) is passed
    over, even to a private folder of this user."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    fresh_kernels.parent.mkdir(parents=True)
    fresh_kernels.symlink_to(private)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert small_batch.kernels() is not None
    assert not any(private.iterdir()) and list((tmp_path / "tmp").glob("prestage-kernels-*/small_batch-*.so"))


def test_a_library_that_does_not_load_keeps_onednn(fresh_kernels, monkeypatch):
    """Built but not loadable (a noexec mount, an unresolved symbol): a one-line reason, not a failed launch."""

    def refuse(path, *args, **kwargs):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(small_batch.ctypes, "CDLL", refuse)
    assert small_batch.kernels() is None
    if small_batch._cpu_has_bf16():
        assert small_batch.status().startswith("off: cannot load the compiled kernels"), small_batch.status()
    w = torch.randn(80, 48).to(torch.bfloat16)
    assert small_batch.for_packed(_pack(w), w) is None


@pytest.mark.parametrize(
    "env, reason",
    [
        ({small_batch.SWITCH: "0"}, f"{small_batch.SWITCH}=0"),
        ({"CC": "prestage-no-such-compiler"}, "no C compiler: 'prestage-no-such-compiler' is not on PATH"),
        ({"CC": "false"}, "could not build small_batch.c"),
    ],
    ids=["switched-off", "no-compiler", "build-fails"],
)
def test_without_the_kernels_linears_stay_on_onednn(fresh_kernels, monkeypatch, env, reason):
    """Switched off, no compiler, or a compiler that fails: status says why (one line), nothing is cached, and a
    packed linear still computes its rows through oneDNN."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert small_batch.kernels() is None
    text = small_batch.status()
    assert text.startswith("off: ") and "\n" not in text
    if small_batch._cpu_has_bf16() or small_batch.SWITCH in env:  # else the CPU is the (first) reason
        assert reason in text, text
    assert not fresh_kernels.exists() or not any(fresh_kernels.iterdir())
    lin = Linear(48, 80, bias=True, factory={"dtype": torch.bfloat16})
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(1, 48).to(torch.bfloat16)
    dense = lin(x)
    lin.prepack()
    assert lin.small_batch is None
    torch.testing.assert_close(lin(x).float(), dense.float(), rtol=0.02, atol=0.05)


def _engine_pair(dtype, seed):
    from prestage.stages.launch.engine import Engine
    from tests.test_launch_engine import _IdTokenizer, tiny_pair

    _, dense = tiny_pair(seed)
    model = DecoderForCausalLM(dense.args, dtype=dtype)
    model.load_weights(dense.to(dtype).state_dict().items())
    return model, Engine(model, _IdTokenizer(), [], "cpu", dtype, 64, 4, 256)


@needs_kernels
@DTYPES
def test_engine_decode_uses_the_kernels_and_matches_onednn(dtype):
    """After prepacking, every projection has a kernel; batches of 1 and 3 prompts decode to the same greedy tokens
    with the kernels as with oneDNN alone, and a decode step's logits agree within rounding."""
    from prestage.stages.launch.sampling import SamplingParams
    from tests.test_launch_engine import GREEDY

    model, engine = _engine_pair(dtype, 7)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    kernels = [m.small_batch for m in linears]
    assert linears and all(k is not None for k in kernels)
    if dtype == torch.float32:  # oneDNN's float32 packing is plain rows here: the loaded weights are kept as they are
        assert not any(m.packed.is_mkldnn for m in linears)
    prompts = [[5, 17, 300, 9], [8, 2], [40, 41, 42, 43, 44, 45]]

    def run() -> tuple[list, torch.Tensor]:
        sp = SamplingParams(max_tokens=12, **GREEDY)
        tokens = [engine.generate([p], sp)[0]["token_ids"] for p in prompts[:1]]
        tokens += [o["token_ids"] for o in engine.generate(prompts, sp)]
        with torch.inference_mode():
            logits = model.decode(torch.tensor([tokens[0][-1]]), torch.tensor([15]), 0, attend_len=16)  # [1, V]
        return tokens, logits.float()

    with_kernels = run()
    for m in linears:
        m.small_batch = None
    try:
        without = run()
    finally:
        for m, k in zip(linears, kernels, strict=True):
            m.small_batch = k
    assert with_kernels[0] == without[0]
    tol = 0.02 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(with_kernels[1], without[1], rtol=tol, atol=tol)


@needs_kernels
def test_kernels_run_from_the_server_engine_loop_thread():
    """`prestage serve` steps the engine from a background thread: the kernels' OpenMP team there gives the same
    tokens as on the main thread."""
    from prestage.stages.launch.sampling import SamplingParams
    from tests.test_launch_engine import GREEDY

    model, engine = _engine_pair(torch.bfloat16, 9)
    assert model.model.layers[0].mlp.down_proj.small_batch is not None
    sp = SamplingParams(max_tokens=12, **GREEDY)
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1]]
    main = engine.generate(prompts, sp)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(engine.generate(prompts, sp)))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and [o["token_ids"] for o in got[0]] == [o["token_ids"] for o in main]


@needs_kernels
def test_the_layout_is_checked_on_the_first_weight_of_each_shape(monkeypatch):
    """oneDNN picks its layout per dtype and shape: `fits` compares blocks for the first weight of a shape that
    can tell (a constant one cannot, and decides nothing), then only checks the buffer size of later ones."""
    monkeypatch.setattr(small_batch, "_LAYOUT_SEEN", {})
    g = torch.Generator().manual_seed(5)
    first, later = (torch.randn(64 * 3 + 5, 160, generator=g).bfloat16() for _ in range(2))
    constant = torch.ones_like(first)
    assert not small_batch.fits(_pack(constant), constant) and not small_batch._LAYOUT_SEEN
    assert small_batch.fits(_pack(first), first)
    compared = []
    monkeypatch.setattr(small_batch, "layout_matches", lambda *a: compared.append(a) or True)
    assert small_batch.fits(_pack(later), later) and not compared
    assert not small_batch.fits(_pack(later[:, :96]), first)  # not that shape's buffer: refused, not compared
    assert not compared
