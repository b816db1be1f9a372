"""prestage's benchmarks (`make bench`): each prints our figure beside its baseline, measured in the same
run, and writes JSON under bench/out/. Benchmarks are not timed tests."""
