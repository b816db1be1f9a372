"""The one way prestage writes a byte count for people: decimal SI units (1 MB = 1,000,000 bytes).

`size_text` writes a count as tqdm's bars do (tqdm's `format_sizeof` with unit_divisor=1000: three
significant digits, kB / MB / GB), and fetch-weights' bar uses `BAR_FORMAT` (the "B" kept on the counts),
so a bar and a log line about the same bytes say the same number in the same unit ("40.2MB" and
"40.2 MB"). Importable without the heavy libraries.
"""

from __future__ import annotations

DIVISOR = 1000  # tqdm's unit_divisor
# tqdm's default layout with the "B" kept on the counts ("12.3MB/40.2MB", not "12.3M/40.2M")
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
BAR_FORMAT_NO_TOTAL = "{desc}: {n_fmt}B [{elapsed}, {rate_fmt}{postfix}]"


def size_text(n: int | float) -> str:
    """`n` bytes as "512 B", "824 kB", "8.79 MB", "40.2 MB" or "1.20 GB": the digits a tqdm bar shows."""
    num = float(n)
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(num) < 999.5:
            if abs(num) < 99.95:
                if abs(num) < 9.995:
                    return f"{num:1.2f} {prefix}B" if prefix else f"{int(n)} B"
                return f"{num:2.1f} {prefix}B"
            return f"{num:3.0f} {prefix}B"
        num /= DIVISOR
    return f"{num:3.1f} EB"
