"""Shared benchmark helpers: timing subprocesses, the local hub environment, writing results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"


def hub_env(hub_url: str, cache: Path, **extra: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_ENDPOINT": hub_url,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "DISABLE_SAFETENSORS_CONVERSION": "1",
        **extra,
    }
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        if var not in extra:
            env.pop(var, None)
    return env


def wall(cmd: list[str], env: dict | None = None, repeat: int = 5, cwd: Path | None = None) -> dict:
    """Median and min wall seconds of a command run `repeat` times (each must exit 0)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, cwd=cwd or ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"bench: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "runs": repeat}


def prestage_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prestage", *args]


def row(label: str, ours: dict, base: dict, target: float | None = None) -> str:
    ratio = base["median_s"] / ours["median_s"] if ours["median_s"] else float("inf")
    tgt = f"  target < {target:.2f}s: {'met' if ours['median_s'] < target else 'MISSED'}" if target else ""
    return f"{label:<34} prestage {ours['median_s']:7.3f}s   baseline {base['median_s']:7.3f}s   x{ratio:5.2f}{tgt}"


def write(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    print(f"bench: wrote {path}")
    return path


def report(name: str, title: str, results: dict) -> dict:
    """Print {key: (ours, baseline, target_s)} as a side-by-side table and write it to bench/out/<name>.json."""
    print(f"\n{title}")
    for key, (ours, base, target) in results.items():
        print(row(key, ours, base, target))
    payload = {k: {"prestage": o, "baseline": b, "target_s": t} for k, (o, b, t) in results.items()}
    write(name, payload)
    return payload
