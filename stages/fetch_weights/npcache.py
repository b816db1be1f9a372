"""`--load-format npcache`: the `.bin`/`.pt` tensors converted once to one `.npy` file each (docs/vllm-rules.md, §5.6).

vLLM writes `<snapshot>/np/` inside the Hugging Face snapshot, keyed by nothing but the folder and never
invalidated. prestage writes `np/` in the run folder instead (the cache stays exactly what the hub
served, and a run folder owns what it derived), with `np/weight_names.json` recording each tensor's file,
dtype and shape and the sha256 of the source checkpoint files. A later fetch with the same sources reuses
it as it is; different sources rebuild it. A dtype numpy lacks (bfloat16, the float8s: the dtype table in
stages/safetensors.py) is stored as unsigned integers of the same width, with its safetensors dtype name ("BF16")
in weight_names.json, for the loader to view back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prestage.stages import safetensors
from prestage.stages.fetch_weights.verify import hash_files

NP_DIR = "np"
NAMES = "weight_names.json"
_UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}  # bytes per element -> same-width torch dtype


def _safe(name: str) -> str:
    return name.replace("/", "_")


def build(run_dir: Path, sources: list[tuple[str, Path, str]], reporter=None) -> dict:
    """Convert `sources` [(rel, abs path, sha256)] in load order; returns the manifest's `npcache` record."""
    from filelock import FileLock

    run_dir = Path(run_dir)
    np_dir = run_dir / NP_DIR
    want = [{"path": rel, "sha256": sha} for rel, _, sha in sources]
    run_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir / ".np.lock")):
        names_file = np_dir / NAMES
        try:
            doc = json.loads(names_file.read_text())
            if doc.get("sources") != want:
                doc = None
        except (OSError, ValueError):
            doc = None
        if doc is None:
            if reporter is not None:
                reporter.info(f"npcache: converting {len(sources)} checkpoint file(s) to {np_dir}")
            doc = _convert(np_dir, sources, want)
        elif reporter is not None:
            reporter.info(f"npcache: reusing {np_dir}")
    files = [f"{NP_DIR}/{doc['tensors'][n]['file']}" for n in doc["names"]]  # load order
    hashed = hash_files([run_dir / f for f in files])
    return {
        "dir": NP_DIR,
        "names_file": f"{NP_DIR}/{NAMES}",
        "names": doc["names"],
        "files": [{"path": f, "size": hashed[run_dir / f][0], "sha256": hashed[run_dir / f][1]} for f in files],
    }


def _convert(np_dir: Path, sources, want) -> dict:
    import numpy as np
    import torch

    tmp = np_dir.with_name(f".{NP_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names: list[str] = []
    tensors: dict = {}
    for rel, path, _ in sources:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            t = t.detach().contiguous()
            dtype = safetensors.from_torch(t.dtype)
            info = safetensors.DTYPES.get(dtype)
            if info is not None and info.numpy is None and info.itemsize in _UINT:  # stored as its bits
                arr = t.view(getattr(torch, _UINT[info.itemsize])).numpy()  # same shape
            else:
                arr = t.numpy()
            fname = _safe(name) + ".npy"
            np.save(tmp / fname, arr, allow_pickle=False)
            names.append(name)
            tensors[name] = {"file": fname, "dtype": dtype, "shape": list(t.shape), "source": rel}
        del state
    doc = {"names": names, "tensors": tensors, "sources": want}
    (tmp / NAMES).write_text(json.dumps(doc, indent=1, sort_keys=True))
    shutil.rmtree(np_dir, ignore_errors=True)
    os.replace(tmp, np_dir)
    return doc
