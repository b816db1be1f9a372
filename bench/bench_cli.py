"""The CLI's fast paths beside the plain way, same run, 2-core machine.

    prestage --help                  vs  python -c "import huggingface_hub"  (what a plain script pays to start)
    prestage inspect RUN             vs  a script loading the cached config with transformers.AutoConfig
    prestage resolve (cached, hub    vs  a script: HF_HUB_OFFLINE=1 AutoConfig.from_pretrained(repo) +
      stopped)                           huggingface_hub.try_to_load_from_cache for the listing's files
Targets: --help and inspect under 0.3 s, cached resolve under 0.5 s.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import hub_env, prestage_cmd, report, wall
from tests.support.checkpoints import build_checkpoint
from tests.support.hub_server import LocalHub

REPO = "bench-org/tiny"


def main(repeat: int = 7) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="prestage-bench-cli-"))
    model = build_checkpoint(tmp / "model", layout="single", arch="qwen2")
    cache, arts = tmp / "cache", tmp / "arts"
    with LocalHub(tmp / "hub") as hub:
        hub.commit(REPO, model)
        env = hub_env(hub.url, cache)
        wall(prestage_cmd("--artifacts", str(arts), "resolve", REPO), env, repeat=1)
        dead_env = hub_env("http://127.0.0.1:9", cache)  # the hub is gone: nothing listens there
    plain_cfg = f"from transformers import AutoConfig; AutoConfig.from_pretrained({REPO!r})"
    results = {
        "help": (
            wall(prestage_cmd("--help"), env, repeat),
            wall([sys.executable, "-c", "import huggingface_hub"], env, repeat),
            0.3,
        ),
        "inspect": (
            wall(prestage_cmd("--artifacts", str(arts), "inspect", REPO.replace("/", "--")), env, repeat),
            wall([sys.executable, "-c", plain_cfg], {**dead_env, "HF_HUB_OFFLINE": "1"}, repeat),
            0.3,
        ),
        "resolve_cached_hub_stopped": (
            # --from re-runs resolve each time; it answers from the cache (--force would ask the hub for the branch)
            wall(
                prestage_cmd("--artifacts", str(tmp / "arts2"), "run", REPO, "--from", "resolve", "--to", "resolve"),
                dead_env,
                repeat,
            ),
            wall([sys.executable, "-c", plain_cfg], {**dead_env, "HF_HUB_OFFLINE": "1"}, repeat),
            0.5,
        ),
    }
    return report("cli", "CLI fast paths (median wall time)", results)


if __name__ == "__main__":
    main()
