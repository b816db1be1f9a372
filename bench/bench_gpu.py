"""GPU figures: prestage's CUDA path beside transformers on random checkpoints of the real Qwen2 shapes.

    make bench-gpu                                   # or: python -m bench.bench_gpu
    python -m bench.bench_gpu --smoke                # the same harness on CPU, a tiny shape (checks the plumbing)

For Qwen2-0.5B and Qwen2-7B (their config.json values, random bf16 weights written here as sharded safetensors,
as the hub serves them), each engine in its own process:
- loading, GB/s of checkpoint bytes: cold (the files' pages dropped from the page cache first, with
  posix_fadvise) and warm (a second process, the files cached): prestage's loader (`load_checkpoint`, the launch
  path: shards read by a thread pool into pinned memory, copied to the GPU while the next one is read) beside
  transformers' `from_pretrained(device_map=...)` (without the accelerate package: loaded on the CPU, then moved);
- decode tok/s at batch 1 / 16 / 64 (the decode steps only, the prefill excluded; the best of a few runs): the
  engine with its CUDA graphs beside transformers' `generate`;
- process start to first token (the cold process: import, load, engine with its CUDA graphs, one token).
Targets printed beside them: 7B batch 1 at least 150 tok/s, warm loading at least 15 GB/s, start to first token
at most 10 s. Without CUDA it prints why and writes that reason to bench/out/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bench_decode
from bench.common import OUT, ROOT
from bench.decode_worker import MARK, _decode_rate, _prompts, generate_seconds, transformers_decode_rate

QWEN2_05B = {**bench_decode.QWEN2_05B, "max_position_embeddings": 131072}  # as Qwen/Qwen2-0.5B's config.json
QWEN2_7B = {
    **QWEN2_05B,
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
TINY = {  # --smoke: the harness on CPU in seconds
    **QWEN2_05B,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SHARD_BYTES = 4 * 1024**3  # the hub's Qwen2 checkpoints come in shards of about 4 GB
MAX_MODEL_LEN = 1024
WORKER_TIMEOUT_S = 1200
TARGETS = {"decode_tok_s_b1_7b": 150.0, "warm_load_gb_s": 15.0, "start_to_first_token_s": 10.0}


# ---- the checkpoint -----------------------------------------------------------------------------------------
def hf_names(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, as transformers saves a Qwen2 model of this config."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    return shapes


def build_checkpoint(out: Path, config: dict, device: str) -> int:
    """Random bf16 weights (normal, std 0.02; norms 1) of `config`'s shape in shards of SHARD_BYTES with their
    index, generated on `device`; returns the checkpoint's bytes. The files are flushed to disk, so dropping their
    pages from the page cache afterwards leaves them cold."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    shapes = hf_names(config)
    plan: list[list[str]] = [[]]  # the names in each shard, in order, before any tensor is made
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        if size and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(plan):  # one shard in memory at a time
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02  # [rows, cols]
                tensors[name] = t.bfloat16().cpu()
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file(tensors, out / fname, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
        total += (out / fname).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in out.glob("*.safetensors"):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    return total


def drop_cached(folder: Path) -> None:
    """Give the weight files' pages back to the kernel (clean pages of files this process may read: no root
    needed), so the next read comes from the disk."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the workers (each in its own process) ------------------------------------------------------------------
def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def run_prestage(folder: Path, device: str, spawned: float, batches: list[int]) -> dict:
    from types import SimpleNamespace

    from prestage.stages.launch.torch_setup import import_torch

    torch = import_torch()
    from bench.decode_worker import _IdTokenizer
    from prestage.stages.configure.spec import build_spec
    from prestage.stages.launch.engine import Engine
    from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM
    from prestage.stages.launch.sampling import SamplingParams
    from prestage.stages.launch.weight_loading import load_checkpoint
    from prestage.stages.records import WeightsRecord

    config = json.loads((folder / "config.json").read_text())
    spec = build_spec(SimpleNamespace(**config), native=True, weight_dtype="bfloat16", sliding_window=None)
    model = DecoderForCausalLM(DecoderArgs.from_spec(spec, config["architectures"][0]), torch.bfloat16, device)
    files = [{"path": f.name, "size": f.stat().st_size, "sha256": "", "kind": "safetensors"} for f in _files(folder)]
    record = WeightsRecord.from_dict(
        {
            **dict.fromkeys(("index", "npcache", "dummy")),
            "load_format": "safetensors",
            "format": "safetensors",
            "root": "local",
            "folder": ".",
            "skipped": [],
            "files": files,
            "tensors": {},
            "total_bytes": sum(f["size"] for f in files),
            "param_count": 0,
        },
        "bench record",
    )
    stats = load_checkpoint(model, record, folder, folder, device)
    slots = max(batches, default=1)
    engine = Engine(model, _IdTokenizer(), [], device, torch.bfloat16, MAX_MODEL_LEN, slots, slots * MAX_MODEL_LEN)
    engine.generate([_prompts(1)[0]], SamplingParams(max_tokens=1, temperature=0.0))
    out = {
        "start_to_first_token_s": round(time.time() - spawned, 3),
        "load_gb_s": round(stats.gbps, 3),
        "load_s": round(stats.seconds, 3),
        "cuda_graphs": engine.graphs is not None,
    }
    for b in batches:
        out[f"decode_tok_s_b{b}"] = round(_decode_rate(engine, b), 2)  # as bench_decode measures it on CPU
    return out


def run_transformers(folder: Path, device: str, spawned: float, batches: list[int]) -> dict:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    # device_map loads straight onto the device, and needs accelerate; without it, the CPU load and a copy
    how = "device_map" if importlib.util.find_spec("accelerate") else "from_pretrained, then .to(device)"
    t0 = time.perf_counter()
    if how == "device_map":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in _files(folder))

    generate_seconds(model, torch.tensor(_prompts(1), device=device), 1)
    out = {
        "start_to_first_token_s": round(time.time() - spawned, 3),
        "load_gb_s": round(size / load_s / 1e9, 3),
        "load_s": round(load_s, 3),
        "loaded_with": how,
    }
    for b in batches:
        out[f"decode_tok_s_b{b}"] = round(transformers_decode_rate(model, torch.tensor(_prompts(b), device=device)), 2)
    return out


def worker(kind: str, folder: Path, device: str, batches: list[int]) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_gpu", "--worker", kind, str(folder), device, repr(time.time())]
    try:
        r = subprocess.run(
            [*cmd, ",".join(map(str, batches))], cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench-gpu: {kind} on {folder.name} ran over {WORKER_TIMEOUT_S} s") from None
    lines = [x for x in r.stdout.splitlines() if x.startswith(MARK)]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"bench-gpu: {kind} on {folder.name} failed: {(r.stdout + r.stderr).strip()[-800:]}")
    return json.loads(lines[-1][len(MARK) :])


# ---- the driver -----------------------------------------------------------------------------------------------
def measure(name: str, config: dict, device: str, batches: list[int], scratch: Path) -> dict:
    folder = scratch / name
    t0 = time.perf_counter()
    size = build_checkpoint(folder, config, device)
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the generator's blocks: the workers get the whole GPU
    print(f"  {name}: random checkpoint, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s", flush=True)
    row: dict = {"checkpoint_bytes": size}
    for engine in ("prestage", "transformers"):
        drop_cached(folder)
        cold = worker(engine, folder, device, batches)
        warm = worker(engine, folder, device, [])
        row[engine] = {**cold, "load_gb_s_cold": cold["load_gb_s"], "load_gb_s_warm": warm["load_gb_s"]}
        row[engine].pop("load_gb_s")
        print(f"    {engine}: {json.dumps(row[engine])}", flush=True)
    return row


def report(rows: dict, batches: list[int]) -> None:
    print(f"\n{'':<26}{'prestage':>12}{'transformers':>14}   target")
    for name, row in rows.items():
        ours, base = row["prestage"], row["transformers"]
        lines = [
            ("load GB/s, cold", "load_gb_s_cold", ""),
            ("load GB/s, warm", "load_gb_s_warm", f">= {TARGETS['warm_load_gb_s']:g}"),
            ("start to first token, s", "start_to_first_token_s", f"<= {TARGETS['start_to_first_token_s']:g}"),
        ] + [(f"decode tok/s, batch {b}", f"decode_tok_s_b{b}", "") for b in batches]
        print(f"  {name}")
        for label, key, target in lines:
            if name.endswith("7b") and key == "decode_tok_s_b1":
                target = f">= {TARGETS['decode_tok_s_b1_7b']:g}"
            print(f"    {label:<22}{ours.get(key, '-'):>12}{base.get(key, '-'):>14}   {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on CPU: checks the harness, no figures")
    parser.add_argument("--out", type=Path, default=OUT / "gpu.json")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=OUT / "gpu-scratch",
        help="where the random checkpoints are written (about 17 GB; on a disk, not tmpfs, or cold loads are warm)",
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, folder, device, spawned, batches = args.worker
        fn = run_prestage if kind == "prestage" else run_transformers
        picked = [int(b) for b in batches.split(",") if b]
        print(MARK + json.dumps(fn(Path(folder), device, float(spawned), picked)), flush=True)
        return
    import torch

    if args.smoke:
        device, shapes, batches = "cpu", {"tiny": TINY}, [1, 2]
    elif not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
        print(f"bench-gpu: skipped: {reason}")
        _write(args.out, {"skipped": reason})
        return
    else:
        device, shapes, batches = "cuda", {"qwen2-0.5b": QWEN2_05B, "qwen2-7b": QWEN2_7B}, [1, 16, 64]
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke run: not figures)"
    print(f"bench-gpu: {card}, torch {torch.__version__}", flush=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prestage-bench-gpu-", dir=args.scratch) as tmp:
        fs = _filesystem(Path(tmp))
        print(f"bench-gpu: checkpoints in {tmp} ({fs})", flush=True)
        if fs in ("tmpfs", "ramfs"):
            print("bench-gpu: that is memory, not a disk: the cold loads will be warm (use --scratch DIR)")
        rows = {name: measure(name, config, device, batches, Path(tmp)) for name, config in shapes.items()}
    report(rows, batches)
    _write(args.out, {"device": card, "torch": torch.__version__, "scratch_fs": fs, "targets": TARGETS, "models": rows})


def _filesystem(path: Path) -> str:
    """The type of the file system `path` is on (from /proc/mounts): on tmpfs the page cache cannot be dropped."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"bench-gpu: wrote {path}")


if __name__ == "__main__":
    main()
