"""The batch-1 bf16 CPU kernel (stages/launch/models/cpu_gemv.py): same results as oneDNN on its packed weights,
the layout check, the fallbacks (switch off, no compiler, a compiler that fails) and the build cache.

The tests that run the kernel need a CPU with AVX512-BF16 and a C compiler; elsewhere they skip with the reason
`cpu_gemv.status()` gives, and the fallback tests still run (the engine then keeps every linear on oneDNN)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prestage.stages.launch.models import cpu_gemv
from prestage.stages.launch.models.decoder import DecoderForCausalLM, Linear

needs_kernel = pytest.mark.skipif(cpu_gemv.kernel() is None, reason=f"CPU kernel {cpu_gemv.status()}")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """kernel() looked up again under the test's environment, and the session's kernel restored after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cpu_gemv.kernel.cache_clear()
    cpu_gemv._unavailable.clear()
    yield tmp_path / "cache" / "prestage" / "kernels"
    cpu_gemv.kernel.cache_clear()
    cpu_gemv._unavailable.clear()


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


@needs_kernel
@pytest.mark.parametrize(
    "out_features, in_features", [(1152, 896), (896, 4864), (64, 32), (100, 77), (130, 33), (17, 5)]
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_gemv_matches_onednn_on_its_packed_weight(out_features, in_features, with_bias):
    """Whole 64-output blocks and ragged ones, inputs a multiple of 32, odd and short: the kernel's bf16 outputs are
    oneDNN's but for float32 summation order (at most one bf16 step apart, and rarely), and both are within bf16
    rounding of the float64 product."""
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    w = torch.randn(out_features, in_features, generator=g).to(torch.bfloat16)  # [out, in]
    bias = torch.randn(out_features, generator=g).to(torch.bfloat16) if with_bias else None  # [out]
    x = torch.randn(1, in_features, generator=g).to(torch.bfloat16)  # [1, in]
    packed = _pack(w)
    kernel = cpu_gemv.for_packed(packed, w, bias)
    assert kernel is not None
    ours = kernel(x).float()  # [1, out]
    onednn = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").float()  # [1, out]
    exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())  # [1, out]
    step = exact.abs().clamp_min(1e-3) * 2**-7  # one bf16 step at each output's magnitude
    assert ((ours - exact).abs() <= step).all() and ((onednn - exact).abs() <= step).all()
    assert ((ours - onednn).abs() <= step).all()
    assert (ours != onednn).float().mean() <= 0.01
    out = torch.full((out_features + 3,), 7.0, dtype=torch.bfloat16)
    kernel(x, out=out[:out_features])  # written in place, nothing past the end
    assert torch.equal(out[:out_features], kernel(x)[0]) and (out[out_features:] == 7).all()


@needs_kernel
def test_layout_check_compares_first_middle_and_last_blocks():
    """layout_matches reads the packed buffer as the kernel will; a weight that differs from what was packed in
    the first, a middle or the (padded) last block of 64 outputs is refused."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64 * 5 + 7, 96, generator=g).to(torch.bfloat16)  # 6 blocks, the last one ragged
    packed = _pack(w)
    assert cpu_gemv.layout_matches(packed, w)
    for row in (0, 64 * 3 + 1, 64 * 5 + 6):  # blocks 0, 6 // 2 and 5
        other = w.clone()
        other[row, 7] += 1
        assert not cpu_gemv.layout_matches(packed, other), row
    assert not cpu_gemv.layout_matches(packed, w[:, :64])  # another shape: another buffer size
    assert cpu_gemv.for_packed(packed, w.float()) is not None  # compared in bf16, as packed
    assert cpu_gemv.for_packed(_pack(w.float()), w.float()) is None  # float32 weights stay on oneDNN


@needs_kernel
def test_kernel_shares_torch_openmp_runtime():
    """The library is linked against the OpenMP runtime torch loaded: one thread pool in the process."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith(("libgomp", "libiomp5"))}
    assert runtimes == {str(cpu_gemv.openmp_runtime())}, runtimes


@needs_kernel
def test_kernel_is_built_once_into_the_cache(fresh_kernel):
    assert cpu_gemv.kernel() is not None and cpu_gemv.status() == "on"
    (built,) = fresh_kernel.glob("gemv_bf16-*.so")
    stamp = built.stat().st_mtime_ns
    cpu_gemv.kernel.cache_clear()
    assert cpu_gemv.kernel() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in fresh_kernel.iterdir()] == [built.name]  # no temporary left behind


@pytest.mark.parametrize(
    "env, reason",
    [
        ({cpu_gemv.SWITCH: "0"}, f"{cpu_gemv.SWITCH}=0"),
        ({"CC": "prestage-no-such-compiler"}, "no C compiler: 'prestage-no-such-compiler' is not on PATH"),
        ({"CC": "false"}, "could not build gemv_bf16.c"),
    ],
    ids=["switched-off", "no-compiler", "build-fails"],
)
def test_without_the_kernel_linears_stay_on_onednn(fresh_kernel, monkeypatch, env, reason):
    """Switched off, no compiler, or a compiler that fails: status says why (one line), nothing is cached, and a
    packed linear still computes its batch-1 rows through oneDNN."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cpu_gemv.kernel() is None
    text = cpu_gemv.status()
    assert text.startswith("off: ") and "\n" not in text
    if cpu_gemv._cpu_has_bf16() or cpu_gemv.SWITCH in env:  # else the CPU is the (first) reason
        assert reason in text, text
    assert not fresh_kernel.exists() or not any(fresh_kernel.iterdir())
    lin = Linear(48, 80, bias=True, factory={"dtype": torch.bfloat16})
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(1, 48).to(torch.bfloat16)
    dense = lin(x)
    lin.prepack()
    assert lin.batch_one is None
    torch.testing.assert_close(lin(x).float(), dense.float(), rtol=0.02, atol=0.05)


@needs_kernel
def test_engine_batch_one_uses_the_kernel_and_matches_onednn():
    """A bf16 model on CPU: after prepacking, every projection has the kernel; a batch-1 decode's logits are
    oneDNN's within bf16 rounding, and greedy decoding gives the same tokens with the kernel as without it."""
    from prestage.stages.launch.engine import Engine
    from prestage.stages.launch.sampling import SamplingParams
    from tests.test_launch_engine import GREEDY, _IdTokenizer, tiny_pair

    _, dense = tiny_pair(7)
    model = DecoderForCausalLM(dense.args, dtype=torch.bfloat16)
    model.load_weights(dense.to(torch.bfloat16).state_dict().items())
    engine = Engine(model, _IdTokenizer(), [], "cpu", torch.bfloat16, 64, 2, 128)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    kernels = [m.batch_one for m in linears]
    assert linears and all(k is not None for k in kernels)

    def run() -> tuple[list[int], torch.Tensor]:
        tokens = engine.generate([[5, 17, 300, 9]], SamplingParams(max_tokens=12, **GREEDY))[0]["token_ids"]
        with torch.inference_mode():
            logits = model.decode(torch.tensor([tokens[-1]]), torch.tensor([15]), 0, attend_len=16)  # [1, V]
        return tokens, logits.float()

    with_kernel = run()
    for m in linears:
        m.batch_one = None
    try:
        without = run()
    finally:
        for m, k in zip(linears, kernels, strict=True):
            m.batch_one = k
    assert with_kernel[0] == without[0]
    torch.testing.assert_close(with_kernel[1], without[1], rtol=0.02, atol=0.02)
