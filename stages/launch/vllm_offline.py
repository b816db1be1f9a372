"""Offline generation through vLLM's Python API: run by the vLLM Python (`python vllm_offline.py SPEC.json`).

This file imports nothing from prestage (the vLLM environment need not have it): SPEC holds the engine
arguments (`LLM(**engine)`), the sampling parameters and the prompts; it prints one JSON line on stdout:
{"completions": [{prompt, text, token_ids, finish_reason}], "kv_cache_tokens": int, "version": str}.
Logs go to stderr. The main guard matters: vLLM starts worker processes that import this module.
"""

from __future__ import annotations

import json
import sys


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path, encoding="utf-8").read())
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["engine"])
    sp = SamplingParams(**spec["sampling"])
    prompts = spec["prompts"]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    completions = []
    for prompt, out in zip(prompts, outs, strict=True):
        o = out.outputs[0]
        completions.append(
            {
                "prompt": prompt,
                "text": o.text,
                "token_ids": [int(t) for t in o.token_ids],
                "finish_reason": str(o.finish_reason or "length"),
            }
        )
    cache = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    cache = getattr(cache, "cache_config", None)
    blocks = getattr(cache, "num_gpu_blocks", None) or 0
    kv_tokens = int(blocks) * int(getattr(cache, "block_size", 0) or 0)
    line = json.dumps({"completions": completions, "kv_cache_tokens": kv_tokens, "version": vllm.__version__})
    sys.stdout.write("PRESTAGE-VLLM-RESULT " + line + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
