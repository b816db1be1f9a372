"""The launch stage package: model registry, native model implementations, weight loader, engine, server.

    registry.py          architecture -> implementation (importable without torch; configure uses it)
    models/decoder.py    the native decoder shared by Llama, Mistral, Qwen2 and Qwen3
    models/small_batch.py  decode steps' linears on CPU (1 to 8 rows): builds and loads the kernels small_batch.c
    rope.py              rotary embeddings for every RoPE type
    hf_backend.py        any other causal LM transformers can build
    weight_loading.py    reads the weight files fetch-weights recorded into the model
    engine.py            the step loop: add_request / abort / step, generate() over it
    scheduler.py         sequences, waiting queue and running set; kv_cache.py: KV sizing and the slot table
    model_runner.py      model inputs per step, decode CUDA graphs per batch and context bucket
    sampling.py          the on-device sampler (sampling_params.py: SamplingParams, torch-free);
                         detokenizer.py: incremental text
    inference.py         load_for_inference(): manifests -> ready engine (the stage and the server share it)
    torch_setup.py       import_torch(): the process settings the engine wants before torch's first import
    vllm_table.py        vLLM's architecture and config-class tables, as data (configure reads them)
    vllm_handoff.py      the `vllm serve` command and environment for a run; finding vLLM
    vllm_launch.py       --engine vllm: the completions from vLLM's Python API (vllm_offline.py, in its Python)
    server.py            the OpenAI API over one engine loop (engine_loop.py), request and error bodies in
                         openai_protocol.py; serving.py: the serve command's port, extra check and uvicorn

`LaunchStage` runs the prompts given with --prompt / --prompts-file through the engine and records the
completions. Sampling follows vLLM's `--generation-config auto`: a flag the user gives wins, else the value the
model's generation_config.json sets (tokenize-prep records them), else prestage's default. That default is
greedy (temperature 0), where vLLM's SamplingParams default is 1.0, and the sampler is seeded (--seed 0), so a
launch is reproducible. Its output is a fresh generation each time (always_run).
"""

from __future__ import annotations

from prestage.stages.base import Context, Stage, StageResult, opt
from prestage.stages.errors import UsageError
from prestage.stages.launch.completions import DEFAULT_PROMPT, read_prompts, run_launch
from prestage.stages.launch.sampling_defaults import check_sampling, generation_config_mode, generation_defaults, given
from prestage.stages.manifest import Manifest

OPTIONS = (
    opt(
        "--prompt",
        multiple=True,
        metavar="TEXT",
        help=f"Prompt to complete (repeatable; default: {DEFAULT_PROMPT!r} when no prompt is given).",
    ),
    opt("--prompts-file", default=None, metavar="FILE", help="File with one prompt per line (blank lines skipped)."),
    opt(
        "--max-tokens",
        type=int,
        default=None,
        help="Tokens to generate per prompt [default: generation_config.json's max_new_tokens, else 16].",
    ),
    opt(
        "--temperature",
        type=float,
        default=None,
        help="Sampling temperature, 0 is greedy [default: generation_config.json's, else 0: prestage launches "
        "greedy where vLLM's SamplingParams default is 1.0].",
    ),
    opt(
        "--top-p",
        type=float,
        default=None,
        help="Nucleus sampling: keep the best tokens holding this much probability [default: "
        "generation_config.json's, else 1].",
    ),
    opt(
        "--top-k",
        type=int,
        default=None,
        help="Sample from the k best tokens, 0 or -1 off [default: generation_config.json's, else 0].",
    ),
    opt(
        "--min-p",
        type=float,
        default=None,
        help="Drop tokens less likely than this share of the best one [default: generation_config.json's, else 0].",
    ),
    opt(
        "--repetition-penalty",
        type=float,
        default=None,
        help="Penalize tokens already in the prompt or output, 1 off [default: generation_config.json's, else 1].",
    ),
    opt(
        "--generation-config",
        type=str,
        default="auto",
        show_default=True,
        metavar="auto|vllm",
        help="As vLLM's flag: auto takes the sampling defaults the model's generation_config.json sets; vllm "
        "ignores the file.",
    ),
    opt("--seed", type=int, default=0, show_default=True, help="Random seed of the sampler."),
    opt("--stop", multiple=True, metavar="TEXT", help="Stop string (repeatable); left out of the text, as vLLM does."),
    opt(
        "--device",
        default="auto",
        show_default=True,
        metavar="auto|cuda|cpu",
        help="Where the model runs (auto: CUDA when torch sees a GPU, else CPU).",
    ),
    opt(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        show_default=True,
        help="Share of GPU memory launch may use (weights, activations, KV cache), as vLLM's flag. "
        "On CPU the KV cache gets VLLM_CPU_KVCACHE_SPACE GiB (default 4).",
    ),
    opt(
        "--max-num-seqs",
        type=int,
        default=256,
        show_default=True,
        help="Most sequences decoded at once, as vLLM's flag.",
    ),
    opt(
        "--engine",
        type=str,
        default="prestage",
        show_default=True,
        metavar="prestage|vllm",
        help="prestage's own engine, or vLLM itself (offline through its Python API, with the run's decisions).",
    ),
    opt(
        "--vllm",
        "vllm",
        default=None,
        metavar="PATH",
        help="The vLLM executable, its Python or its virtual environment [default: PRESTAGE_VLLM, else `vllm` "
        "on PATH].",
    ),
    opt(
        "--verify-hashes",
        is_flag=True,
        default=False,
        help="Hash the weight bytes as they load and compare them with fetch-weights' sha256.",
    ),
)


_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LaunchStage(Stage):
    """Generate completions for the prompts with the staged model, tokenizer and weights."""

    name = "launch"
    version = 3  # 2: typed record; 3: engine (prestage | vllm) and the vLLM command
    requires = ("resolve", "configure", "tokenize-prep", "fetch-weights")
    options = OPTIONS
    always_run = True

    def check_params(self, params: dict) -> None:
        generation_config_mode(params)
        check_sampling(**{k: params.get(k) for k in _SAMPLING}, stop=params.get("stop"))
        self._engine_params(params)
        engine_choice(params)
        read_prompts(params)

    @staticmethod
    def _engine_params(params: dict) -> tuple[str, int, float, int]:
        """(device, max_num_seqs, gpu_memory_utilization, seed), each checked."""
        device = str(params.get("device") or "auto").lower()
        if device not in ("auto", "cuda", "cpu"):
            raise UsageError(f"--device {params.get('device')!r}: use one of auto, cuda, cpu")
        max_num_seqs = int(given(params, "max_num_seqs", 256))
        if max_num_seqs < 1:
            raise UsageError(f"--max-num-seqs {max_num_seqs}: must be at least 1")
        util = float(given(params, "gpu_memory_utilization", 0.9))
        if not 0 < util <= 1:
            raise UsageError(f"--gpu-memory-utilization {util}: must be in (0, 1]")
        seed = int(given(params, "seed", 0))
        if not -(2**63) <= seed < 2**64:
            raise UsageError(f"--seed {seed}: must fit in 64 bits")
        return device, max_num_seqs, util, seed

    def inputs(self, params: dict, upstream: dict[str, Manifest]) -> dict:
        from prestage.stages.launch.sampling_params import LAUNCH_FIELDS, SamplingParams

        mode = generation_config_mode(params)
        file_defaults = generation_defaults(mode, upstream)

        def pick(key, fallback):  # the flag, else generation_config.json's value, else prestage's default
            return given(params, key, file_defaults.get(key, fallback))

        sp = SamplingParams(
            max_tokens=int(pick("max_tokens", 16)),
            temperature=float(pick("temperature", 0.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            min_p=float(pick("min_p", 0.0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            stop=list(params.get("stop") or []),
        )
        device, max_num_seqs, util, seed = self._engine_params(params)
        return {
            "prompts": read_prompts(params),
            **{k: getattr(sp, k) for k in LAUNCH_FIELDS},
            "generation_config": mode,
            "seed": seed,
            "device": device,
            "gpu_memory_utilization": util,
            "max_num_seqs": max_num_seqs,
            "verify_hashes": bool(params.get("verify_hashes")),
            "engine": engine_choice(params),
        }

    def run(self, ctx: Context, inputs: dict) -> StageResult:
        if inputs["engine"] == "vllm":
            from prestage.stages.launch.vllm_launch import run_vllm_launch

            return run_vllm_launch(ctx, inputs)
        return run_launch(ctx, inputs)


ENGINES = ("prestage", "vllm")


def engine_choice(params: dict) -> str:
    value = str(params.get("engine") or "prestage").strip().lower()
    if value not in ENGINES:
        raise UsageError(f"--engine {params.get('engine')!r}: use one of {', '.join(ENGINES)}")
    return value
