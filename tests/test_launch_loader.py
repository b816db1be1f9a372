"""The launch weight loader: every format fetch-weights records, the checks, and the one-line errors.

Checkpoints are the tiny Qwen2 ones transformers writes (tests.support.checkpoints); the reference is
transformers' own `from_pretrained` of the same folder. Case labels in test names (W16 is W-16) are defined
in docs/vllm-rules.md.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prestage.stages.errors import IntegrityError, InvalidModelError, NotFoundError, UnsupportedError
from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM
from prestage.stages.launch.weight_loading import fill_dummy, load_checkpoint
from prestage.stages.records import Implementation, ModelSpec
from tests.support.records import weights_record


def record(folder: Path, rel: str, kind: str) -> dict:
    data = (folder / rel).read_bytes()
    return {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "kind": kind}


def safetensors_outputs(folder: Path) -> dict:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    return {"format": "safetensors", "files": [record(folder, f, "safetensors") for f in files]}


def native_for(folder: Path) -> DecoderForCausalLM:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    return DecoderForCausalLM(DecoderArgs.from_hf_config(cfg), dtype=torch.float32)


def last_logits(model, ids: list[int]) -> torch.Tensor:
    model.allocate_kv_cache(1, 64, "cpu", torch.float32)
    with torch.no_grad():
        return model.prefill(torch.tensor([ids]), torch.tensor([len(ids)]), 0)[0]  # [V]


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1]


IDS = [5, 77, 300, 12, 901, 64]


def test_launch_loader_sharded_safetensors_with_hashes(checkpoint_dirs, tmp_path):
    folder = checkpoint_dirs["sharded"]
    outputs = safetensors_outputs(folder)
    assert len(outputs["files"]) > 1
    model = native_for(folder)
    stats = load_checkpoint(model, weights_record(outputs), folder, tmp_path, "cpu", verify_hashes=True)
    assert stats.files == len(outputs["files"]) and stats.hashed
    assert stats.bytes == sum(f["size"] for f in outputs["files"]) and stats.gbps > 0
    assert stats.warnings == []
    diff = (last_logits(model, IDS) - reference_logits(folder, IDS)).abs().max().item()
    assert diff < 1e-5


def test_launch_loader_bin_checkpoint(checkpoint_dirs, tmp_path):
    folder = checkpoint_dirs["bin"]
    outputs = {"format": "pt", "files": [record(folder, "pytorch_model.bin", "bin")]}
    model = native_for(folder)
    stats = load_checkpoint(model, weights_record(outputs), folder, tmp_path, "cpu", verify_hashes=True)
    assert stats.files == 1 and stats.tensors > 0
    diff = (last_logits(model, IDS) - reference_logits(folder, IDS)).abs().max().item()
    assert diff < 1e-5


def test_launch_loader_npcache(checkpoint_dirs, tmp_path):
    from prestage.stages.fetch_weights import npcache

    folder = checkpoint_dirs["bin"]
    rec = record(folder, "pytorch_model.bin", "bin")
    outputs = {
        "format": "npcache",
        "files": [rec],
        "npcache": npcache.build(tmp_path, [(rec["path"], folder / rec["path"], rec["sha256"])]),
    }
    model = native_for(folder)
    load_checkpoint(model, weights_record(outputs), folder, tmp_path, "cpu", verify_hashes=True)
    diff = (last_logits(model, IDS) - reference_logits(folder, IDS)).abs().max().item()
    assert diff < 1e-5


def test_launch_loader_missing_file_is_not_found(checkpoint_dirs, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(checkpoint_dirs["sharded"], folder)
    outputs = safetensors_outputs(folder)
    (folder / outputs["files"][1]["path"]).unlink()
    with pytest.raises(NotFoundError, match=outputs["files"][1]["path"]) as e:
        load_checkpoint(native_for(folder), weights_record(outputs), folder, tmp_path, "cpu")
    assert "\n" not in str(e.value)


def test_launch_loader_wrong_size_and_wrong_hash_are_integrity_errors(checkpoint_dirs, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(checkpoint_dirs["single"], folder)
    outputs = safetensors_outputs(folder)
    path = folder / outputs["files"][0]["path"]
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(IntegrityError, match="bytes, fetch-weights recorded"):
        load_checkpoint(native_for(folder), weights_record(outputs), folder, tmp_path, "cpu")
    data[-1] ^= 0xFF  # same size, one bit pattern changed inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_checkpoint(native_for(folder), weights_record(outputs), folder, tmp_path, "cpu", verify_hashes=True)
    load_checkpoint(
        native_for(folder), weights_record(outputs), folder, tmp_path, "cpu", verify_hashes=False
    )  # sizes only


def test_W15_launch_loader_missing_parameter_and_unused_tensor(checkpoint_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ck"
    shutil.copytree(checkpoint_dirs["single"], folder)
    st = folder / "model.safetensors"
    tensors = load_file(st)
    extra = dict(tensors, **{"model.layers.0.mlp.extra_bias": torch.zeros(3)})
    save_file(extra, st)
    stats = load_checkpoint(native_for(folder), weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")
    assert len(stats.warnings) == 1 and "model.layers.0.mlp.extra_bias" in stats.warnings[0]

    del tensors["model.layers.1.self_attn.k_proj.weight"]  # one shard of the fused qkv_proj
    del tensors["model.norm.weight"]
    save_file(tensors, st)
    with pytest.raises(InvalidModelError) as e:
        load_checkpoint(native_for(folder), weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")
    msg = str(e.value)
    assert "2 parameter(s)" in msg and "model.layers.1.self_attn.qkv_proj.weight" in msg
    assert "model.norm.weight" in msg and "\n" not in msg


def test_launch_loader_checks_headers_with_the_one_parser(checkpoint_dirs, tmp_path):
    """A header defect the size check cannot see (two tensors sharing bytes) is an InvalidModelError naming the
    file and the re-fetch; a dtype torch cannot view (packed F4) is an UnsupportedError."""
    import json

    folder = tmp_path / "ck"
    shutil.copytree(checkpoint_dirs["single"], folder)
    st = folder / "model.safetensors"
    blob = st.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = next(
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if (header[a]["dtype"], header[a]["shape"]) == (header[b]["dtype"], header[b]["shape"])
    )
    header[second]["data_offsets"] = header[first]["data_offsets"]  # same dtype and shape: its size still agrees
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    st.write_bytes(blob[:8] + raw + blob[8 + n :])
    with pytest.raises(
        InvalidModelError, match=rf"model.safetensors: tensor '{second}' .* overlaps .*fetch-weights RUN"
    ):
        load_checkpoint(native_for(folder), weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")

    header = {"q": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}
    raw = json.dumps(header).encode()
    st.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0")
    with pytest.raises(UnsupportedError, match=r"model.safetensors: tensor q has dtype F4, which launch cannot load"):
        load_checkpoint(native_for(folder), weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")


def test_launch_loader_shape_mismatch_is_invalid_model(checkpoint_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ck"
    shutil.copytree(checkpoint_dirs["single"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(InvalidModelError, match=r"model.norm.weight has shape \[65\]"):
        load_checkpoint(native_for(folder), weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")


def test_W13_launch_loader_dummy_follows_vllm_rule(checkpoint_dirs, tmp_path):
    model = native_for(checkpoint_dirs["single"])
    stats = load_checkpoint(model, weights_record({"format": "dummy", "files": []}), None, tmp_path, "cpu")
    assert stats.format == "dummy"
    for name, p in model.named_parameters():
        want = torch.empty(p.shape).uniform_(-1e-3, 1e-3, generator=torch.Generator().manual_seed(1234))
        assert torch.equal(p, want), name
    assert fill_dummy(model) == {n for n, _ in model.named_parameters()}


def test_W04_launch_loader_mistral_format_names(checkpoint_dirs, tmp_path):
    """A consolidated (Mistral-format) checkpoint: Meta names, interleaved q/k rows -> same logits."""
    import transformers
    from safetensors.torch import load_file, save_file

    src = checkpoint_dirs["single"]
    cfg = transformers.AutoConfig.from_pretrained(src)
    hf = load_file(src / "model.safetensors")
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    meta = {}
    for name, t in hf.items():
        if name.endswith("_proj.bias"):
            continue  # Qwen2's q/k/v biases have no Mistral-format name: the test model is bias-free below
        new = {
            "model.embed_tokens.weight": "tok_embeddings.weight",
            "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight",
        }.get(name)
        if new is None:
            new = name.removeprefix("model.")
            for a, b in names.items():
                new = new.replace(a, b)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = H if "q_proj" in name else KV
            rows, cols = t.shape  # half-split -> interleaved rotary layout
            t = t.view(heads, 2, D // 2, cols).transpose(1, 2).reshape(rows, cols)
        meta[new] = t.contiguous()
    folder = tmp_path / "consolidated"
    folder.mkdir()
    save_file(meta, folder / "consolidated.safetensors")
    args = DecoderArgs.from_hf_config(cfg)
    args.qkv_bias = False
    model = DecoderForCausalLM(args, dtype=torch.float32)
    outputs = {"format": "mistral", "files": [record(folder, "consolidated.safetensors", "safetensors")]}
    load_checkpoint(model, weights_record(outputs), folder, tmp_path, "cpu")
    plain = DecoderForCausalLM(args, dtype=torch.float32)
    plain.load_weights((n, t) for n, t in hf.items() if not n.endswith("_proj.bias"))
    assert torch.equal(last_logits(model, IDS), last_logits(plain, IDS))


QWEN2_NATIVE = Implementation(
    architecture="Qwen2ForCausalLM", impl="native", class_ref="prestage.stages.launch.models.decoder:DecoderForCausalLM"
)


def test_W16_launch_untie_when_checkpoint_has_lm_head(checkpoint_dirs, tmp_path):
    """tie_word_embeddings true, but the checkpoint carries its own lm_head.weight: it is loaded untied."""
    import transformers
    from safetensors.torch import load_file

    from prestage.stages.configure.spec import build_spec
    from prestage.stages.launch.inference import build_model, retie_if_identical

    folder = checkpoint_dirs["single"]
    cfg = transformers.AutoConfig.from_pretrained(folder)
    spec = build_spec(cfg, native=True, weight_dtype="float32", sliding_window=None)
    spec["tie_word_embeddings"] = True
    conf = SimpleNamespace(implementation=QWEN2_NATIVE, spec=ModelSpec.from_dict(spec))
    tensors = {name: {} for name in load_file(folder / "model.safetensors")}
    warnings: list = []
    model = build_model(conf, tensors, torch.float32, torch.device("cpu"), None, warnings)
    assert model.args.tie_word_embeddings is False and "untied" in warnings[0]
    load_checkpoint(model, weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")
    diff = (last_logits(model, IDS) - reference_logits(folder, IDS)).abs().max().item()
    assert diff < 1e-5
    tied = build_model(conf, {}, torch.float32, torch.device("cpu"), None, [])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    retie_if_identical(model, warnings)  # the tiny checkpoint's head differs from its embedding: stays untied
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_W16_launch_reties_an_identical_head(checkpoint_dirs, tmp_path):
    """The checkpoint's lm_head.weight equals the embedding: after loading, one shared tensor again."""
    import transformers
    from safetensors.torch import load_file, save_file

    from prestage.stages.configure.spec import build_spec
    from prestage.stages.launch.inference import build_model, retie_if_identical

    state = load_file(checkpoint_dirs["single"] / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    cfg = transformers.AutoConfig.from_pretrained(checkpoint_dirs["single"])
    spec = build_spec(cfg, native=True, weight_dtype="float32", sliding_window=None)
    spec["tie_word_embeddings"] = True
    conf = SimpleNamespace(implementation=QWEN2_NATIVE, spec=ModelSpec.from_dict(spec))
    warnings: list = []
    model = build_model(conf, set(state), torch.float32, torch.device("cpu"), None, warnings)
    load_checkpoint(model, weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")
    before = last_logits(model, IDS)
    retie_if_identical(model, warnings)
    assert model.lm_head.weight is model.model.embed_tokens.weight and "re-tied" in warnings[-1]
    assert torch.equal(last_logits(model, IDS), before)


def test_npcache_round_trips_dtypes_numpy_lacks(tmp_path):
    """bfloat16 and float8 have no numpy dtype: npcache stores their bits, the loader views them back."""
    from prestage.stages.fetch_weights import npcache
    from prestage.stages.launch.weight_loading import LoadStats, _npcache_weights

    gen = torch.Generator().manual_seed(0)
    state = {
        "bf16": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "fp8": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),
        "f32": torch.randn(2, generator=gen),
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    sha = hashlib.sha256((tmp_path / "pytorch_model.bin").read_bytes()).hexdigest()
    record = npcache.build(tmp_path / "run", [("pytorch_model.bin", tmp_path / "pytorch_model.bin", sha)])
    stats = LoadStats(format="npcache")
    got = dict(_npcache_weights(weights_record({"npcache": record}), tmp_path / "run", True, stats))
    assert set(got) == set(state) and stats.tensors == 3
    for name, t in state.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8))


def test_launch_loader_cpu_copies_once(tmp_path):
    """On CPU the loader maps the file and copies each tensor once into its parameter: the process's peak RSS
    grows by about the weights (128 MiB here), not twice that."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.full((4096, 2048), float(i)) for i in range(4)}, path)  # 4 x 32 MiB float32
    script = f"""
import torch
from types import SimpleNamespace
from pathlib import Path
from prestage.stages.launch.weight_loading import LoadStats, _mapped_safetensors_weights
path = Path({str(path)!r})
params = {{f"w{{i}}": torch.zeros(4096, 2048) for i in range(4)}}
for p in params.values():
    p.fill_(-1.0)  # touch every page: the parameters are resident before loading
def hwm():  # peak RSS of this process since exec (ru_maxrss would start from the parent's at fork)
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
base = hwm()
rec = SimpleNamespace(path="big.safetensors", size=path.stat().st_size, sha256=None)
for name, t in _mapped_safetensors_weights([(path, rec)], False, LoadStats("safetensors")):
    params[name].copy_(t)
peak = hwm()
assert all(float(params[f"w{{i}}"][7, 7]) == i for i in range(4))
print((peak - base) * 1024)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.split()[-1])
    assert grew < 0.5 * 128 * 1024**2, f"peak RSS grew by {grew / 1024**2:.0f} MiB while loading 128 MiB"


def _greedy(model, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """(the prompt's last logits [V] in float32, `steps` greedy tokens) from the model's own prefill/decode."""
    model.allocate_kv_cache(1, 64, "cpu", model.dtype)
    with torch.inference_mode():
        logits = model.prefill(torch.tensor([ids]), torch.tensor([len(ids)]), 0)  # [1, V]
        first, tokens = logits[0].float(), []
        for pos in range(len(ids), len(ids) + steps):
            tokens.append(int(logits[0].argmax()))
            logits = model.decode(torch.tensor([tokens[-1]]), torch.tensor([pos]), 0)  # [1, V]
    return first, tokens


@pytest.mark.parametrize(
    "dtype, file_dtype",
    [(torch.bfloat16, "bfloat16"), (torch.float32, "bfloat16"), (torch.float32, "float32")],
    ids=["bf16", "fp32-from-bf16", "fp32"],
)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_launch_packs_the_head_from_the_mapped_checkpoint(tmp_path, monkeypatch, tied, dtype, file_dtype):
    """bf16 or fp32 on CPU after a mapped safetensors load: prepack_for_cpu packs the LM head too, in row chunks,
    from the checkpoint's mapping; the dense head is dropped (a tied embedding then reads its rows from the
    mapping), and logits and greedy tokens stay those of the dense model (through the small-batch kernels, where
    they run). The head's pieces are memory of their own, even where packing keeps a float32 weight as it is:
    overwriting an untied head in the file changes nothing. A file changed since loading keeps the head dense."""
    import os

    import transformers

    from prestage.stages.launch.models import decoder, small_batch
    from tests.support.checkpoints import build_checkpoint

    folder = build_checkpoint(
        tmp_path / "m", config_overrides={"tie_word_embeddings": tied}, dtype=file_dtype, with_tokenizer=False
    )
    args = DecoderArgs.from_hf_config(transformers.AutoConfig.from_pretrained(folder))
    assert args.tie_word_embeddings is tied

    def loaded() -> DecoderForCausalLM:
        model = DecoderForCausalLM(args, dtype=dtype)
        load_checkpoint(model, weights_record(safetensors_outputs(folder)), folder, tmp_path, "cpu")
        return model

    dense, packed = loaded(), loaded()
    monkeypatch.setattr(decoder, "HEAD_CHUNK_ROWS", 100)  # several chunks, the last one short
    assert packed.prepack_for_cpu()
    assert packed.lm_head.weight is None and len(packed.head_packed) == -(-args.vocab_size // 100)
    # one-row logits (the prefill's last token, each decode step) come from the small-batch kernels where they run
    from tests.test_launch_small_batch import fp32_packs_plain

    runs = small_batch.kernels() is not None and (dtype == torch.bfloat16 or fp32_packs_plain())
    assert (packed.head_small_batch is not None) == runs, small_batch.status()
    if tied:
        assert packed.model.embed_tokens.weight is None and packed.embed_rows.shape == (args.vocab_size, 64)
    else:
        assert packed.embed_rows is None and packed.model.embed_tokens.weight is not None
    (a, dense_tokens), (b, packed_tokens) = _greedy(dense, IDS, 8), _greedy(packed, IDS, 8)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    assert packed_tokens == dense_tokens
    if not tied:  # the head is read from the pieces, not from the file: zeros written over it change nothing
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as f:
            head_bytes = f.get_tensor("lm_head.weight").numel() * (2 if file_dtype == "bfloat16" else 4)
        source = packed.mapped["lm_head.weight"]
        with open(folder / "model.safetensors", "r+b") as fh:
            fh.seek(source.offset)
            fh.write(bytes(head_bytes))
        again, again_tokens = _greedy(packed, IDS, 8)
        assert torch.equal(again, b) and again_tokens == packed_tokens

    stale = loaded()
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert stale.prepack_for_cpu() and stale.head_packed is None and stale.lm_head.weight is not None
