"""Run every benchmark in turn (`make bench`); each prints its table and writes bench/out/<name>.json."""

from __future__ import annotations

import importlib
import sys

BENCHES = (
    "bench.bench_cli",
    "bench.bench_configure",
    "bench.bench_tokenizer",
    "bench.bench_fetch",
    "bench.bench_bundle",
    "bench.bench_decode",
)


def main() -> None:
    failed = []
    for name in BENCHES:
        print(f"\n=== {name}", flush=True)
        try:
            importlib.import_module(name).main()
        except SystemExit as e:
            failed.append(f"{name}: {e}")
    if failed:
        sys.exit("bench: failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
