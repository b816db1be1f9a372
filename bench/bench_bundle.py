"""Bundle, unbundle and verify throughput beside tar, cp -r and sha256sum of the same files, in the same run.

A multi-shard bf16 checkpoint of `--size` bytes (default 400 MB, random bytes: nothing compresses or stays
sparse) plus a small tokenizer is built here as a local model folder, and `prestage run` takes it to
fetch-weights (no hub: a local model's bundle holds the same bytes under model/ instead of hub/). Then,
each timed as the whole command (process start included), best of `--repeat`:

    bundle --format dir       beside  cp -r MODEL
    bundle --format oci       beside  cp -r MODEL
    bundle --format tar       beside  tar -cf of MODEL, and tar -cf && sync (prestage fsyncs the bundle)
    unbundle of the tar       beside  tar -xf of the same tar, and tar -xf && sync (unbundle hashes every byte
                                      against SHA256SUMS, syncs before its renames and after them)
    unbundle of the folder    beside  cp -r of the same folder, and cp -r && sync
    verify BUNDLE (folder)    beside  sha256sum of the files (one process) and sha256sum -c SHA256SUMS

Each group's commands take turns (ours, its baselines, ours again, ...), so a drift of the machine hits them
alike. Before every run, untimed and the same for ours and the baselines: its previous output is removed, then
`sync`, so no run pays for writing back another's bytes; nothing is dropped from the page cache, so every
source (written by the step before, or read by the previous run) is read from memory by both sides.
GB/s = checkpoint bytes / seconds. The machine is shared with other work (and a VM whose freed memory costs
more to touch again: the kernel time of writing into the page cache varies 1-3x between runs, for tar as for
prestage): figures are noisy, and the ratio in the same run is what to read. Writes bench/out/bundle.json.

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
    return _race(repeat, only=(prepare, cmd_of, env))["only"]


def _race(repeat: int, **specs) -> dict[str, float]:
    """{name: fastest of `repeat` runs} for specs name=(prepare, cmd_of, env), taken in turns (a, b, c, a, b, c,
    ...) so that each sees the same machine; before each run, untimed, `prepare(i)` (which removes the run's
    previous output) and `sync`, so no run writes back another's bytes."""
    best = dict.fromkeys(specs, float("inf"))
    for i in range(repeat):
        for name, (prepare, cmd_of, env) in specs.items():
            prepare(i)
            os.sync()
            t, _ = timed(cmd_of(i), env)
            best[name] = min(best[name], t)
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

        def fresh(folder):  # an empty folder to extract into
            return lambda i: (clear(folder)(i), Path(folder).mkdir())

        r = {"startup": _best(args.repeat, lambda i: None, lambda i: prestage_cmd("--version"), env)}
        bundle = prestage_cmd("--artifacts", str(arts), "-q", "bundle", "big")
        d, o, b_tar, t_tar = out / "d", out / "o", out / "b.tar", out / "t.tar"
        r |= _race(
            args.repeat,
            bundle_dir=(clear(d), lambda i: [*bundle, "-o", str(d)], env),
            bundle_oci=(clear(o), lambda i: [*bundle, "-o", str(o), "--format", "oci"], env),
            cp_r=(clear(out / "cp"), lambda i: ["cp", "-r", str(model), str(out / "cp")], None),
        )
        tar_c = f"tar -cf '{t_tar}' -C '{model.parent}' model"
        r |= _race(
            args.repeat,
            bundle_tar=(clear(b_tar), lambda i: [*bundle, "-o", str(b_tar)], env),
            tar_c=(clear(t_tar), lambda i: ["sh", "-c", tar_c], None),
            # prestage fsyncs the tar before renaming it into place; tar leaves the bytes in the page cache
            tar_c_sync=(clear(t_tar), lambda i: ["sh", "-c", f"{tar_c} && sync"], None),
        )
        clear(out / "cp", o, t_tar)(0)
        u, x = out / "u", out / "x"

        def unbundle(src):
            return lambda i: prestage_cmd(
                "--artifacts", str(u / "arts"), "-q", "unbundle", str(src), "--model-dir", str(u / "model")
            )

        # unbundle syncs before its renames and after them; tar -xf and cp -r leave the bytes in the page cache
        tar_x = f"tar -xf '{b_tar}' -C '{x}'"
        r |= _race(
            args.repeat,
            unbundle_tar=(clear(u), unbundle(b_tar), env),
            tar_x=(fresh(x), lambda i: ["sh", "-c", tar_x], None),
            tar_x_sync=(fresh(x), lambda i: ["sh", "-c", f"{tar_x} && sync"], None),
        )
        clear(x)(0)
        cp_d = f"cp -r '{d}' '{out / 'cp2'}'"
        r |= _race(
            args.repeat,
            unbundle_dir=(clear(u), unbundle(d), env),
            cp_r_again=(clear(out / "cp2"), lambda i: ["sh", "-c", cp_d], None),
            cp_r_sync=(clear(out / "cp2"), lambda i: ["sh", "-c", f"{cp_d} && sync"], None),
        )
        clear(u, out / "cp2")(0)
        files = sorted(str(p) for p in model.iterdir())
        r |= _race(
            args.repeat,
            verify_dir=(lambda i: None, lambda i: prestage_cmd("-q", "verify", str(d)), env),
            sha256sum=(lambda i: None, lambda i: ["sha256sum", *files], None),
            sha256sum_c=(lambda i: None, lambda i: ["sh", "-c", f"cd '{d}' && sha256sum -c --quiet SHA256SUMS"], None),
        )

        rows = [
            ("bundle --format dir", "bundle_dir", "cp -r", "cp_r"),
            ("bundle --format oci", "bundle_oci", "cp -r", "cp_r"),
            ("bundle --format tar", "bundle_tar", "tar -cf", "tar_c"),
            ("bundle --format tar (fsynced)", "bundle_tar", "tar -cf && sync", "tar_c_sync"),
            ("unbundle (tar, checks every sha256)", "unbundle_tar", "tar -xf", "tar_x"),
            ("unbundle (tar, synced)", "unbundle_tar", "tar -xf && sync", "tar_x_sync"),
            ("unbundle (folder, checks every sha256)", "unbundle_dir", "cp -r", "cp_r_again"),
            ("unbundle (folder, synced)", "unbundle_dir", "cp -r && sync", "cp_r_sync"),
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
