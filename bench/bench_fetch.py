"""Weight fetch and hashing: prestage fetch-weights beside huggingface_hub and sha256sum, same run, same files.

A multi-shard bf16 checkpoint of `--size` bytes (default 2 GB; `--size 200MB` for a quick run) is built
here, committed to a LocalHub served from this process on 127.0.0.1, and fetched into fresh caches by:

    prestage fetch-weights RUN          download (thread pool) + sha256 + safetensors header check of every shard
    snapshot_download(allow_patterns)   huggingface_hub's own parallel download of the same files, no hashing
    snapshot_download + sha256sum       the same, then hashing the files the plain way

Then sha256 throughput on the downloaded shards (page cache warm): prestage's hasher with 1 and N threads
beside `sha256sum` with 1 process and N processes (xargs -P). Prints a table, writes bench/out/fetch.json.

    python -m bench.bench_fetch [--size 2GB] [--shards 8] [--workers N] [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import hub_env, prestage_cmd, write

REPO = "bench-org/large"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise SystemExit(f"bench: --size {text!r} is not a size like 2GB or 200MB")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)])


def timed(cmd, env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, cmd))[:200]} failed ({r.returncode}): {r.stderr.strip()[-600:]}")
    return dt, r


def rate(nbytes: int, secs: float) -> float:
    return round(nbytes / secs / 1e6, 1) if secs else float("inf")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_fetch", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=os.environ.get("PRESTAGE_BENCH_FETCH_SIZE", "2GB"))
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="threads / processes for hashing")
    ap.add_argument("--work-dir", default=None, help="where to build the checkpoint, hub and caches")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:] if __name__ == "__main__" else [])
    size = parse_size(args.size)

    from prestage.stages.fetch_weights.verify import hash_files
    from tests.support.checkpoints import build_large_checkpoint
    from tests.support.hub_server import LocalHub

    tmp = Path(tempfile.mkdtemp(prefix="prestage-bench-fetch-", dir=args.work_dir))
    try:
        t0 = time.perf_counter()
        model = build_large_checkpoint(tmp / "model", total_bytes=size, num_shards=args.shards)
        shards = sorted(p.name for p in model.glob("*.safetensors"))
        weight_bytes = sum((model / s).stat().st_size for s in shards)
        print(
            f"bench: built {len(shards)} shards, {weight_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        with LocalHub(tmp / "hub") as hub:
            sha = hub.commit(REPO, model)
            shutil.rmtree(model)  # the hub holds its own copy; keep the disk footprint down
            arts, cache_a = tmp / "arts", tmp / "cache-prestage"
            env_a = hub_env(hub.url, cache_a, HF_HUB_DISABLE_PROGRESS_BARS="1")
            run = REPO.replace("/", "--")
            for stage_args in (("resolve", REPO), ("configure", run)):
                timed(prestage_cmd("--artifacts", str(arts), "-q", *stage_args), env_a)
            cache_b = tmp / "cache-hfhub"
            env_b = hub_env(hub.url, cache_b, HF_HUB_DISABLE_PROGRESS_BARS="1")
            patterns = shards + ["model.safetensors.index.json"]
            script = (
                "from huggingface_hub import snapshot_download; "
                f"snapshot_download({REPO!r}, revision={sha!r}, allow_patterns={patterns!r})"
            )
            # Alternate the two, twice, each into a fresh cache, and keep the best of each: neither side gets
            # the warmer page cache or the quieter moment.
            t_pre = t_hf = float("inf")
            for _ in range(2):
                for cache in (cache_a, cache_b):
                    if cache.exists():
                        shutil.rmtree(cache)
                hub.reset_counters()
                t, _ = timed(prestage_cmd("--artifacts", str(arts), "-q", "fetch-weights", run, "--force"), env_a)
                t_pre, served_pre = min(t_pre, t), sum(hub.bytes_served.values())
                hub.reset_counters()
                t, _ = timed([sys.executable, "-c", script], env_b)
                t_hf, served_hf = min(t_hf, t), sum(hub.bytes_served.values())
            from prestage.stages.manifest import manifest_path, read

            vol = read(manifest_path(arts / run, "fetch-weights")).volatile

        snap_b = cache_b / f"models--{REPO.replace('/', '--')}" / "snapshots" / sha
        files = [(snap_b / s).resolve() for s in shards]
        t_sum1, _ = timed(["sha256sum", *map(str, files)])  # also warms the page cache for the rows below
        t_sum1, _ = timed(["sha256sum", *map(str, files)])
        n = max(1, args.workers)
        xargs = ["sh", "-c", f"printf '%s\\n' \"$@\" | xargs -P {n} -n 1 sha256sum", "sh", *map(str, files)]
        t_sumn, _ = timed(xargs)
        t1 = time.perf_counter()
        ours1 = hash_files(files, workers=1)
        t_our1 = time.perf_counter() - t1
        t1 = time.perf_counter()
        oursn = hash_files(files, workers=n)
        t_ourn = time.perf_counter() - t1
        _, out = timed(["sha256sum", str(files[0])])
        assert out.stdout.split()[0] == ours1[files[0]][1] == oursn[files[0]][1], "hashers disagree"

        result = {
            "size_bytes": weight_bytes,
            "shards": len(shards),
            "cpu_count": os.cpu_count(),
            "hash_workers": n,
            "fetch": {
                "prestage_fetch_weights_s": round(t_pre, 3),
                "prestage_download_and_verify_s": vol.get("fetch_seconds"),
                "prestage_MBps": rate(weight_bytes, t_pre),
                "prestage_bytes_served": served_pre,
                "snapshot_download_s": round(t_hf, 3),
                "snapshot_download_MBps": rate(weight_bytes, t_hf),
                "snapshot_download_bytes_served": served_hf,
                "snapshot_download_plus_sha256sum_s": round(t_hf + t_sum1, 3),
            },
            "sha256": {
                "prestage_1_thread_s": round(t_our1, 3),
                "prestage_1_thread_MBps": rate(weight_bytes, t_our1),
                f"prestage_{n}_threads_s": round(t_ourn, 3),
                f"prestage_{n}_threads_MBps": rate(weight_bytes, t_ourn),
                "sha256sum_1_process_s": round(t_sum1, 3),
                "sha256sum_1_process_MBps": rate(weight_bytes, t_sum1),
                f"sha256sum_{n}_processes_s": round(t_sumn, 3),
                f"sha256sum_{n}_processes_MBps": rate(weight_bytes, t_sumn),
            },
            "notes": "prestage timings are the whole `prestage fetch-weights` process (python start, imports, "
            "download, sha256 and header check of every shard); snapshot_download hashes nothing.",
        }
        f, h = result["fetch"], result["sha256"]
        gb = weight_bytes / 1e9
        print(f"\nfetch {gb:.2f} GB in {len(shards)} shards from a LocalHub on 127.0.0.1 ({os.cpu_count()} cores)")
        print(f"  prestage fetch-weights (download + verify)  {t_pre:8.2f}s  {f['prestage_MBps']:8.1f} MB/s")
        print(f"  huggingface_hub snapshot_download          {t_hf:8.2f}s  {f['snapshot_download_MBps']:8.1f} MB/s")
        print(f"  snapshot_download + sha256sum              {t_hf + t_sum1:8.2f}s")
        print(f"sha256 of the same {gb:.2f} GB (page cache warm)")
        print(f"  prestage hasher, 1 thread                  {t_our1:8.2f}s  {h['prestage_1_thread_MBps']:8.1f} MB/s")
        print(f"  prestage hasher, {n} threads                 {t_ourn:8.2f}s  {rate(weight_bytes, t_ourn):8.1f} MB/s")
        print(f"  sha256sum, 1 process                       {t_sum1:8.2f}s  {h['sha256sum_1_process_MBps']:8.1f} MB/s")
        print(f"  sha256sum, {n} processes (xargs -P)          {t_sumn:8.2f}s  {rate(weight_bytes, t_sumn):8.1f} MB/s")
        write("fetch", result)
        return result
    finally:
        if args.keep:
            print(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
