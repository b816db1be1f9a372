"""Bundle, unbundle and verify throughput beside tar, cp -r and sha256sum of the same files, in the same run.

A multi-shard bf16 checkpoint of `--size` bytes (default 400 MB, random bytes: nothing compresses or stays
sparse) plus a small tokenizer is built here as a local model folder, and `prestage run` takes it to
fetch-weights (no hub: a local model's bundle holds the same bytes under model/ instead of hub/). Then,
each timed as the whole command (process start included), best of `--repeat`:

    bundle --format dir       beside  cp -r MODEL
    bundle --format oci       beside  cp -r MODEL
    bundle --format tar       beside  tar -cf of MODEL, and tar -cf && sync (prestage fsyncs the bundle)
    unbundle of the tar       beside  tar -xf (unbundle hashes every byte against SHA256SUMS on the way)
    unbundle of the folder    beside  cp -r
    verify BUNDLE (folder)    beside  sha256sum of the files (one process) and sha256sum -c SHA256SUMS

GB/s = checkpoint bytes / seconds. The machine is shared with other work: figures taken while it runs are
noisy, and the ratio in the same run is what to read. Writes bench/out/bundle.json.

    python -m bench.bench_bundle [--size 400MB] [--shards 8] [--repeat 2] [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_fetch import parse_size, timed
from bench.common import prestage_cmd, write


def _gbps(nbytes: int, secs: float) -> float:
    return round(nbytes / secs / 1e9, 3) if secs else float("inf")


def _best(repeat: int, prepare, cmd_of, env=None) -> float:
    """The fastest of `repeat` runs of `cmd_of(i)`, each after `prepare(i)` (not timed)."""
    best = float("inf")
    for i in range(repeat):
        prepare(i)
        t, _ = timed(cmd_of(i), env)
        best = min(best, t)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_bundle", description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=os.environ.get("PRESTAGE_BENCH_BUNDLE_SIZE", "400MB"))
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work-dir", default=None, help="where to build the checkpoint and the copies")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv if argv is not None else sys.argv[1:] if __name__ == "__main__" else [])

    from tests.support.checkpoints import TINY_VOCAB, build_large_checkpoint
    from tests.support.tokenizer import train_bpe_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="prestage-bench-bundle-", dir=args.work_dir))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    env["HF_HUB_CACHE"] = str(tmp / "hf-cache")
    try:
        t0 = time.perf_counter()
        model = build_large_checkpoint(
            tmp / "src" / "model", total_bytes=parse_size(args.size), num_shards=args.shards, fill="random"
        )
        train_bpe_tokenizer(TINY_VOCAB).save_pretrained(model)
        nbytes = sum(p.stat().st_size for p in model.iterdir())
        print(
            f"bench: built {args.shards} shards, {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s", flush=True
        )
        arts = tmp / "src" / "arts"
        timed(
            prestage_cmd("--artifacts", str(arts), "--run", "big", "-q", "run", str(model), "--dtype", "bfloat16"), env
        )
        out = tmp / "out"
        out.mkdir()

        def clear(*paths):
            def prepare(i):
                for p in paths:
                    q = Path(str(p).format(i=i))
                    if q.is_dir():
                        shutil.rmtree(q)
                    elif q.exists():
                        q.unlink()

            return prepare

        r = {"startup": _best(args.repeat, lambda i: None, lambda i: prestage_cmd("--version"), env)}
        bundle = prestage_cmd("--artifacts", str(arts), "-q", "bundle", "big")
        r["bundle_dir"] = _best(args.repeat, clear(out / "d"), lambda i: [*bundle, "-o", str(out / "d")], env)
        r["cp_r"] = _best(args.repeat, clear(out / "cp"), lambda i: ["cp", "-r", str(model), str(out / "cp")])
        r["bundle_oci"] = _best(
            args.repeat, clear(out / "o"), lambda i: [*bundle, "-o", str(out / "o"), "--format", "oci"], env
        )
        r["bundle_tar"] = _best(args.repeat, clear(out / "b.tar"), lambda i: [*bundle, "-o", str(out / "b.tar")], env)
        r["tar_c"] = _best(
            args.repeat,
            clear(out / "t.tar"),
            lambda i: ["tar", "-cf", str(out / "t.tar"), "-C", str(model.parent), "model"],
        )
        # prestage fsyncs the bundle before renaming it into place; tar leaves the bytes in the page cache
        r["tar_c_sync"] = _best(
            args.repeat,
            clear(out / "t.tar"),
            lambda i: ["sh", "-c", f"tar -cf '{out / 't.tar'}' -C '{model.parent}' model && sync"],
        )

        def unbundle(src):
            def cmd(i):
                u = out / f"u{i}"
                return prestage_cmd(
                    "--artifacts", str(u / "arts"), "-q", "unbundle", str(src), "--model-dir", str(u / "model")
                )

            return cmd

        r["unbundle_tar"] = _best(args.repeat, clear(out / "u{i}"), unbundle(out / "b.tar"), env)
        r["tar_x"] = _best(
            args.repeat,
            lambda i: (clear(out / "x")(i), (out / "x").mkdir()),
            lambda i: ["tar", "-xf", str(out / "t.tar"), "-C", str(out / "x")],
        )
        r["unbundle_dir"] = _best(args.repeat, clear(out / "u{i}"), unbundle(out / "d"), env)
        r["cp_r_again"] = _best(
            args.repeat, clear(out / "cp2"), lambda i: ["cp", "-r", str(out / "cp"), str(out / "cp2")]
        )
        files = sorted(str(p) for p in model.iterdir())
        r["verify_dir"] = _best(
            args.repeat, lambda i: None, lambda i: prestage_cmd("-q", "verify", str(out / "d")), env
        )
        r["sha256sum"] = _best(args.repeat, lambda i: None, lambda i: ["sha256sum", *files])
        r["sha256sum_c"] = _best(
            args.repeat, lambda i: None, lambda i: ["sh", "-c", f"cd {out / 'd'} && sha256sum -c --quiet SHA256SUMS"]
        )

        rows = [
            ("bundle --format dir", "bundle_dir", "cp -r", "cp_r"),
            ("bundle --format oci", "bundle_oci", "cp -r", "cp_r"),
            ("bundle --format tar", "bundle_tar", "tar -cf", "tar_c"),
            ("bundle --format tar (fsynced)", "bundle_tar", "tar -cf && sync", "tar_c_sync"),
            ("unbundle (tar, checks every sha256)", "unbundle_tar", "tar -xf", "tar_x"),
            ("unbundle (folder, checks every sha256)", "unbundle_dir", "cp -r", "cp_r_again"),
            ("verify BUNDLE (folder)", "verify_dir", "sha256sum FILES", "sha256sum"),
            ("verify BUNDLE (folder)", "verify_dir", "sha256sum -c", "sha256sum_c"),
        ]
        print(f"\nbundle {nbytes / 1e9:.2f} GB in {args.shards} shards ({os.cpu_count()} cores; shared machine: noisy)")
        table = []
        for label, ours, base_label, base in rows:
            ratio = r[base] / r[ours] if r[ours] else float("inf")
            print(
                f"  {label:<40} {r[ours]:7.2f}s {_gbps(nbytes, r[ours]):6.2f} GB/s   "
                f"{base_label:<16} {r[base]:7.2f}s {_gbps(nbytes, r[base]):6.2f} GB/s   x{ratio:4.2f}"
            )
            table.append(
                {
                    "prestage": label,
                    "prestage_s": round(r[ours], 3),
                    "prestage_GBps": _gbps(nbytes, r[ours]),
                    "baseline": base_label,
                    "baseline_s": round(r[base], 3),
                    "baseline_GBps": _gbps(nbytes, r[base]),
                    "speed_ratio": round(ratio, 3),
                }
            )
        print(f"  (prestage's fixed cost, `prestage --version`: {r['startup']:.2f}s of each prestage figure)")
        result = {
            "size_bytes": nbytes,
            "prestage_startup_s": round(r["startup"], 3),
            "shards": args.shards,
            "cpu_count": os.cpu_count(),
            "repeat": args.repeat,
            "rows": table,
            "notes": "each figure is the best of `repeat` runs of the whole command, python start and imports "
            "included for prestage; a local-folder model (model/ in the bundle); the machine is shared with "
            "other work, so figures are noisy: compare the ratios in one run.",
        }
        write("bundle", result)
        return result
    finally:
        if args.keep:
            print(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
