"""launch's work: load the staged model into the engine, complete the prompts, record the completions.

The completions are recorded in the manifest; the command line prints their text on stdout."""

from __future__ import annotations

import time
from pathlib import Path

from prestage.stages.base import Context, StageResult
from prestage.stages.errors import NotFoundError, UsageError
from prestage.stages.records import LaunchRecord
from prestage.stages.units import size_text

DEFAULT_PROMPT = "Hello, my name is"


def read_prompts(params: dict) -> list[str]:
    prompts = list(params.get("prompt") or [])
    file = params.get("prompts_file")
    if file:
        path = Path(file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFoundError(f"--prompts-file {file}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts-file {file}: cannot read it as UTF-8 text ({e})") from None
        prompts.extend(line for line in text.splitlines() if line.strip())
    return prompts or [DEFAULT_PROMPT]


def run_launch(ctx: Context, inputs: dict) -> StageResult:
    from prestage.stages.launch.inference import load_for_inference
    from prestage.stages.launch.sampling_params import LAUNCH_FIELDS, SamplingParams

    start = time.perf_counter()
    rep = ctx.reporter
    prompts = inputs["prompts"]
    params = dict(ctx.params, **{k: inputs[k] for k in ("device", "gpu_memory_utilization", "seed", "verify_hashes")})
    inf = load_for_inference(ctx.run_dir, ctx.upstream, params, max_num_seqs=min(inputs["max_num_seqs"], len(prompts)))
    w = inf.timings["weights"]
    rep.info(
        f"launch: {inf.info['implementation'].get('architecture')} ({inf.info['engine']['kind']}) on "
        f"{inf.info['device']} {inf.info['dtype']}: weights {size_text(w['bytes'])} in {w['seconds']:.2f}s "
        f"({w['gb_per_s']:.2f} GB/s), KV cache {inf.info['kv_cache_tokens']} tokens"
    )
    use = getattr(inf.model, "small_batch_use", None)
    kernels = use() if use is not None and inf.info["device"] == "cpu" else None
    if kernels is not None:
        rep.detail(f"launch: small-batch CPU kernels {kernels}")
    sp = SamplingParams(**{k: inputs[k] for k in LAUNCH_FIELDS})
    prompt_ids = [list(inf.tokenizer.encode(p)) for p in prompts]
    results = inf.engine.generate(prompt_ids, sp)
    completions = [
        {"prompt": p, "text": r["text"], "token_ids": r["token_ids"], "finish_reason": r["finish_reason"]}
        for p, r in zip(prompts, results, strict=True)
    ]
    for i, c in enumerate(completions, 1):  # the text itself goes to stdout (the CLI prints it)
        rep.detail(f"launch: completion {i} of {len(completions)}: {len(c['token_ids'])} tokens, {c['finish_reason']}")
    stats = inf.engine.stats
    record = LaunchRecord.from_dict(dict(inf.info, vllm=None, completions=completions), "launch's outputs")
    volatile = {
        "startup": {
            **{k: round(v, 4) for k, v in inf.timings.items() if isinstance(v, float)},
            "weights": inf.timings["weights"],
            "first_token_s": round(stats.get("first_token_s") or 0.0, 4),
        },
        "generate_s": round(stats.get("generate_s", 0.0), 4),
        "generated_tokens": stats.get("generated_tokens", 0),
        "total_s": round(time.perf_counter() - start, 4),
    }
    if kernels is not None:  # machine-dependent, hence volatile
        volatile["cpu_kernels"] = kernels
    return StageResult(outputs=record, warnings=list(inf.warnings), volatile=volatile)
