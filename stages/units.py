"""The one way prestage writes a byte count for people: decimal SI units (1 MB = 1,000,000 bytes).

tqdm's bars use the same system (unit_scale with unit_divisor=1000, `BAR_FORMAT` below), so a bar and a log
line about the same bytes say the same number and unit. Importable without the heavy libraries.
"""

from __future__ import annotations

DIVISOR = 1000  # tqdm's unit_divisor: kB, MB, GB as a log line writes them
# tqdm's default layout with the "B" kept on the counts ("12.3MB/40.2MB", not "12.3M/40.2M")
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
BAR_FORMAT_NO_TOTAL = "{desc}: {n_fmt}B [{elapsed}, {rate_fmt}{postfix}]"


def size_text(n: int | float) -> str:
    """`n` bytes as "0.8 MB", "40.2 MB" or "12.35 GB" (decimal)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB"
