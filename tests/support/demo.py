"""`make demo`: every stage of prestage on a tiny real model, offline.

Builds a tiny Qwen2-shaped model with a real trained BPE tokenizer, serves it from a local hub on
127.0.0.1 (the protocol huggingface_hub speaks), and runs `prestage run` on it through all five stages;
then shows `status`, runs the chain again (all cached), moves the hub's main (a plain run keeps the
cached commit and says so; `--refresh` follows the branch), and runs once more with the hub stopped and
HF_HUB_OFFLINE=1, as an air-gapped machine would. Nothing leaves this machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.checkpoints import build_checkpoint
from tests.support.hub_server import LocalHub

REPO = "prestage-demo/tiny-qwen2"
ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".demo"
PROMPT = "def fibonacci(n):"


def _prestage(args: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", "prestage", "--artifacts", str(WORK / "artifacts"), *args]
    print(f"\n$ prestage {shlex.join(args)}", flush=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"demo: `prestage {' '.join(args)}` failed with exit code {r.returncode}")


def _check_against_transformers(model_dir: Path, launch_manifest: Path) -> None:
    """The oracle: transformers' own greedy generate() on the same files must give the same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prestage.stages.manifest import read

    done = read(launch_manifest).outputs["completions"][0]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        # greedy, with the model's generation_config.json otherwise as it is (its repetition_penalty 1.05
        # applies), which is what prestage launch does under --generation-config auto with --temperature 0
        out = model.generate(ids, max_new_tokens=24, do_sample=False, temperature=None, top_p=None, top_k=None)
    ref = out[0, ids.shape[1] :].tolist()
    same = ref == done["token_ids"]
    print(
        f"\ndemo: transformers generate() on the same files gives {'the same' if same else 'DIFFERENT'} "
        f"{len(ref)} token ids as prestage launch, both greedy under the model's generation_config.json (the "
        "weights are random: the text is noise, the tokens are the check)",
        flush=True,
    )
    if not same:
        sys.exit(f"demo: prestage {done['token_ids']} != transformers {ref}")


def main() -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    print("demo: building a tiny Qwen2-shaped model and a real BPE tokenizer...", flush=True)
    model_dir = build_checkpoint(WORK / "model", layout="single", arch="qwen2", seed=0)
    hub = LocalHub(WORK / "hub").start()
    try:
        hub.commit(REPO, model_dir)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_ENDPOINT": hub.url,
            "HF_HUB_CACHE": str(WORK / "hf-cache"),
            "HF_HOME": str(WORK / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "DISABLE_SAFETENSORS_CONVERSION": "1",
        }
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(var, None)
        print(f"demo: local hub at {hub.url} serving {REPO}", flush=True)
        run = ["run", REPO, "--prompt", PROMPT, "--max-tokens", "24", "--temperature", "0", "--device", "cpu"]
        _prestage(run, env)
        _check_against_transformers(model_dir, WORK / "artifacts" / REPO.replace("/", "--") / "launch.msgpack")
        _prestage(["status", REPO.replace("/", "--")], env)
        _prestage(run, env)  # every stage but launch is cached now
        hub.commit(REPO, {"README.md": "# tiny-qwen2\n\nA tiny model for the demo.\n"}, message="add a model card")
        print(
            "\ndemo: the hub's main moved; a plain run keeps the commit in the cache and says so, "
            "--refresh asks the hub and the later stages follow:",
            flush=True,
        )
        _prestage(["run", REPO], env)
        _prestage(["run", REPO, "--refresh"], env)
    finally:
        hub.stop()
    print("\ndemo: hub stopped; the same run offline, as on an air-gapped machine:", flush=True)
    _prestage(run, {**env, "HF_HUB_OFFLINE": "1"})
    _prestage(["inspect", str(WORK / "artifacts" / REPO.replace("/", "--") / "launch.msgpack")], env)
    print(f"\ndemo: done; manifests are in {WORK / 'artifacts' / REPO.replace('/', '--')}", flush=True)


if __name__ == "__main__":
    main()
