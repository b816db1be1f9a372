"""Configure beside the plain way, same run, same local files (a tiny Qwen2 model resolved from a local folder).

    prestage configure RUN --force     vs  python -c "AutoConfig.from_pretrained(<folder>)"
      cold: PRESTAGE_NO_CONFIG_MEMO=1, the config is built with transformers every time
      warm: a model configured before (same content): the result comes from the configure store (memo.py)
    prestage inspect RUN               vs  the same plain AutoConfig script (what reading the config costs
                                           without a manifest)
Targets: configure under 1.5 s, inspect under 0.3 s (2-core machine). Both sides pay Python start-up; a cold
configure and the baseline both import transformers (and with it torch), which dominates their time.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, prestage_cmd, report, wall
from tests.support.checkpoints import build_checkpoint


def main(repeat: int = 5) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="prestage-bench-configure-"))
    model = build_checkpoint(tmp / "model", layout="single", arch="qwen2")
    arts = tmp / "arts"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["HF_HUB_CACHE"] = str(tmp / "hf-cache")  # the configure store starts empty
    wall(prestage_cmd("--artifacts", str(arts), "--run", "b", "resolve", str(model)), env, repeat=1)
    wall(prestage_cmd("--artifacts", str(arts), "configure", "b"), env, repeat=1)  # fills the store
    plain = [sys.executable, "-c", f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(model)!r})"]
    results = {
        "configure_cold": (
            wall(
                prestage_cmd("--artifacts", str(arts), "configure", "b", "--force"),
                {**env, "PRESTAGE_NO_CONFIG_MEMO": "1"},
                repeat,
            ),
            wall(plain, env, repeat),
            1.5,
        ),
        "configure_warm": (
            wall(prestage_cmd("--artifacts", str(arts), "configure", "b", "--force"), env, repeat),
            wall(plain, env, repeat),
            1.5,
        ),
        "inspect_configure": (
            wall(prestage_cmd("--artifacts", str(arts), "inspect", str(arts / "b" / "configure.msgpack")), env, repeat),
            wall(plain, env, repeat),
            0.3,
        ),
    }
    return report(
        "configure", "configure (median wall time; baseline: AutoConfig.from_pretrained on the same folder)", results
    )


if __name__ == "__main__":
    main()
