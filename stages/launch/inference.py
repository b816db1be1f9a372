"""Everything between the upstream manifests and a ready engine, shared by the launch stage and the server.

    load_for_inference(run_dir, upstream, params) -> Inference(engine, tokenizer, model, info, timings, warnings)

Steps, each timed: check the stored tokenizer (sizes and sha256) and its golden encodings, load it; build
the model configure chose (native decoder from `spec`, or the transformers backend from `config`) on the
device in the dtype configure picked for it (empty weights); load the weights fetch-weights recorded; size
the KV cache; build the engine (on CUDA this captures the decode CUDA graphs); warm up with one short
generation. Memory errors become ResourceError one-liners.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prestage.stages import paths
from prestage.stages.errors import ResourceError, UnsupportedError, UsageError
from prestage.stages.launch import given, registry
from prestage.stages.records import ConfigureRecord

DEVICES = ("auto", "cuda", "cpu")


@dataclass
class Inference:
    engine: object
    tokenizer: object
    model: object
    info: dict  # implementation, device, dtype, kv_cache_tokens, engine facts: plain data
    timings: dict = field(default_factory=dict)  # seconds per startup step, load stats: plain data
    warnings: list = field(default_factory=list)


def pick_device(requested: str | None):
    import torch

    requested = (requested or "auto").lower()
    if requested not in DEVICES:
        raise UsageError(f"--device {requested!r}: use one of {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def pick_dtype(conf: ConfigureRecord, device, warnings: list, requested: str | None = None):
    """configure's dtype for the device, or `requested` (serve's --dtype) when it is not auto."""
    import torch

    name = conf.dtype.gpu if device.type == "cuda" else conf.dtype.cpu
    if requested and str(requested).lower() != "auto":
        name = str(requested).lower()
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UnsupportedError(f"dtype {name!r} chosen by configure is not a torch dtype launch can run")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        warnings.append("this GPU has no bfloat16 support; running float16 instead (as vLLM does on sm<80)")
        dtype = torch.float16
    return dtype


def requested_dtype(params: dict) -> str:
    """serve's or run's --dtype, read as configure reads it ("float" is float32, "half" float16; "auto" unset)."""
    from prestage.stages.configure.dtype import normalize_requested

    return normalize_requested(params.get("dtype"))


def cpu_dtype_name(conf: ConfigureRecord, requested: str) -> str:
    """The dtype pick_dtype chooses on CPU for `requested` (requested_dtype's), known before torch is imported (the
    device is not: on a GPU the choice only sets import_torch's huge pages for host memory)."""
    return requested if requested != "auto" else str(conf.dtype.cpu).lower()


def hf_config(conf: ConfigureRecord, model_dir: Path | None):
    """The transformers config configure recorded (patched), rebuilt as a config object."""
    from transformers import AutoConfig

    raw = dict(conf.config)
    model_type = raw.pop("model_type", None) or conf.model_type
    trust = conf.trust_remote_code
    try:
        return AutoConfig.for_model(model_type, **raw)
    except ValueError:
        if not (trust and model_dir is not None):
            raise UnsupportedError(
                f"model type {model_type!r} is unknown to the installed transformers; upgrade "
                "transformers, or pass --trust-remote-code for a model with its own code"
            ) from None
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True, local_files_only=True)
    for key, value in raw.items():
        setattr(config, key, value)
    return config


def build_model(conf: ConfigureRecord, checkpoint_tensors, dtype, device, model_dir: Path | None, warnings: list):
    """The implementation configure chose, with empty weights on `device` (`checkpoint_tensors`: the names
    fetch-weights indexed)."""
    cls_ref, arch = conf.implementation.class_ref, conf.implementation.architecture
    if cls_ref == registry.DECODER:
        from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM

        args = DecoderArgs.from_spec(conf.spec, arch)
        if args.tie_word_embeddings and "lm_head.weight" in checkpoint_tensors:
            args.tie_word_embeddings = False  # vLLM's maybe_untie_word_embeddings: the checkpoint has its own head
            warnings.append("tie_word_embeddings is true but the checkpoint has lm_head.weight: loading it untied")
        model = DecoderForCausalLM(args, dtype=dtype, device=device)
        model.untied_by_checkpoint = conf.spec.tie_word_embeddings and not args.tie_word_embeddings
        return model
    if cls_ref == registry.TRANSFORMERS_BACKEND:
        from prestage.stages.launch.hf_backend import TransformersForCausalLM

        return TransformersForCausalLM(
            hf_config(conf, model_dir),
            dtype=dtype,
            device=device,
            trust_remote_code=conf.trust_remote_code,
        )
    raise UnsupportedError(
        f"architecture {arch} maps to implementation {cls_ref!r}, which launch cannot build; "
        f"supported: {registry.supported_summary()}"
    )


def retie_if_identical(model, warnings: list) -> None:
    """vLLM's maybe_retie_word_embeddings: a model untied only because the checkpoint carried lm_head.weight
    shares one tensor again when that head equals the embedding (half the memory, the same logits)."""
    import torch

    if not getattr(model, "untied_by_checkpoint", False):
        return
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight  # [V, hidden] each
    if head.shape == embed.shape and torch.equal(head, embed):
        model.lm_head.weight = embed
        model.args.tie_word_embeddings = True
        warnings.append("the checkpoint's lm_head.weight equals the embedding: re-tied them")


def _oom(what: str, device, e: BaseException) -> ResourceError:
    return ResourceError(
        f"out of memory on {device} while {what} ({' '.join(str(e).split())[:120]}); lower "
        "--max-model-len or --max-num-seqs, or use a bigger device"
    )


def check_prestage_can_run(conf: ConfigureRecord) -> None:
    """Refuse, before loading anything, a model configure found only vLLM can run."""
    if conf.engines.prestage == "none":
        arch = conf.implementation.architecture or (conf.architectures or ["this model"])[0]
        raise UnsupportedError(
            f"prestage's engine has no {arch}; use --engine vllm (vLLM runs it: {conf.engines.vllm_how})"
        )


def load_for_inference(run_dir: Path, upstream: dict, params: dict, max_num_seqs: int | None = None) -> Inference:
    """Tokenizer, model, weights and engine from the run's manifests (`upstream`: stage name -> Manifest)."""
    check_prestage_can_run(upstream["configure"].record)
    t = time.perf_counter()
    from prestage.stages.launch.torch_setup import import_torch

    requested = requested_dtype(params)
    torch = import_torch(
        huge_pages=cpu_dtype_name(upstream["configure"].record, requested) != "float32"
    )  # for the weights: before torch's first allocation
    import transformers  # noqa: F401  (timed here, not inside the tokenizer step)

    from prestage.stages.launch.engine import Engine, plan_kv_cache
    from prestage.stages.launch.sampling import SamplingParams
    from prestage.stages.launch.weight_loading import load_checkpoint
    from prestage.stages.tokenize_prep import check_golden, load_stored_tokenizer, verify_files

    timings = {"imports_s": time.perf_counter() - t}
    warnings: list[str] = []
    run_dir = Path(run_dir)
    conf, tok = upstream["configure"].record, upstream["tokenize-prep"].record
    fetch = upstream["fetch-weights"].record

    t = time.perf_counter()
    verify_files(run_dir, tok)
    tokenizer = load_stored_tokenizer(run_dir, tok)
    check_golden(tokenizer, tok)
    timings["tokenizer_s"] = time.perf_counter() - t

    device = pick_device(params.get("device"))
    dtype = pick_dtype(conf, device, warnings, requested)
    model_dir = paths.model_dir(run_dir, upstream["resolve"], params)
    t = time.perf_counter()
    try:
        model = build_model(conf, fetch.tensors, dtype, device, model_dir, warnings)
        timings["build_s"] = time.perf_counter() - t
        base = paths.weights_dir(run_dir, upstream["fetch-weights"], upstream["resolve"], params)
        stats = load_checkpoint(model, fetch, base, run_dir, device, verify_hashes=bool(params.get("verify_hashes")))
    except torch.OutOfMemoryError as e:
        raise _oom("loading the weights", device, e) from None
    warnings.extend(stats.warnings)
    retie_if_identical(model, warnings)
    timings["weights"] = stats.as_dict()

    max_model_len = conf.max_model_len
    if params.get("max_model_len") is not None:  # serve's --max-model-len: at most what configure derived
        asked = int(params["max_model_len"])
        if not 2 <= asked <= conf.max_model_len:
            raise UsageError(
                f"--max-model-len {asked}: must be between 2 and {conf.max_model_len} (configure's, from the "
                "model's config); re-run configure with --max-model-len to change that bound"
            )
        max_model_len = asked
    seqs = int(max_num_seqs if max_num_seqs is not None else given(params, "max_num_seqs", 256))
    if seqs < 1:
        raise UsageError(f"--max-num-seqs {seqs}: must be at least 1")
    util = float(given(params, "gpu_memory_utilization", 0.9))
    if not 0 < util <= 1:
        raise UsageError(f"--gpu-memory-utilization {util}: must be in (0, 1]")
    t = time.perf_counter()
    try:
        kv_tokens = plan_kv_cache(
            model,
            device,
            dtype,
            max_model_len,
            seqs,
            gpu_memory_utilization=util,
            cpu_kv_cache_space_gib=float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 4),
        )
        engine = Engine(
            model,
            tokenizer,
            tok.eos_token_ids,
            device,
            dtype,
            max_model_len,
            seqs,
            kv_tokens,
            seed=int(given(params, "seed", 0)),
        )
        engine.generate([[tok.bos_token_id or 0]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    except torch.OutOfMemoryError as e:
        raise _oom(f"allocating the KV cache for --max-model-len {max_model_len}", device, e) from None
    timings["warmup_s"] = time.perf_counter() - t

    impl = conf.implementation
    info = {
        "implementation": impl.to_dict(),
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_tokens": engine.kv_cache_tokens,
        "engine": {
            "kind": "native" if impl.impl == "native" else "transformers",
            "max_model_len": max_model_len,
            "max_num_seqs": engine.num_slots,
            "cuda_graphs": engine.graphs is not None,
        },
    }
    return Inference(engine, tokenizer, model, info, timings, warnings)
