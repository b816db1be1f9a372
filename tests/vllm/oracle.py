"""vLLM's own decisions as JSON, run with the vLLM Python (.venv-vllm/bin/python), never imported by prestage.

    python oracle.py registry                 vLLM's architecture tables (names, runner, module) and version
    python oracle.py config FOLDER [JSON]     ModelConfig on a model folder: config class, patched rope,
                                              max_model_len, dtype, architecture resolution, runner
    python oracle.py tokenizer FOLDER         vLLM's get_tokenizer: class, encodings, special ids, template
    python oracle.py generate FOLDER JSON     greedy tokens from vLLM's LLM (float32) for the prompts in JSON
    python oracle.py batch SPEC.json          [{"what": "config"|"tokenizer"|"weights", "folder": ..., "opts": {}}]
                                              in one process (vLLM's import paid once): a JSON list

Each prints one JSON object on stdout (logs go to stderr). JSON options: {"trust_remote_code": bool,
"dtype": str, "max_model_len": int|null, "hf_overrides": {...}, "tokenizer": path, "prompts": [...],
"max_tokens": int}. Runs offline (HF_HUB_OFFLINE=1 is set before vLLM is imported).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def _plain(v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    s = str(v)
    return s[len("torch.") :] if s.startswith("torch.") else s


def registry() -> dict:
    import vllm
    from vllm.model_executor.models import registry as r

    pooling_tables = {
        **r._EMBEDDING_MODELS,
        **r._LATE_INTERACTION_MODELS,
        **r._REWARD_MODELS,
        **r._TOKEN_CLASSIFICATION_MODELS,
        **r._SEQUENCE_CLASSIFICATION_MODELS,
    }
    generative = {**r._TEXT_GENERATION_MODELS, **r._MULTIMODAL_MODELS}
    # vLLM's runner for a registered name follows its class: a class some generation entry names generates
    # (LlamaModel -> llama.LlamaForCausalLM), any other registered class pools
    classes = {(m, c) for m, c in generative.values()}
    every = {**pooling_tables, **generative}
    generate = {a: f"{m}.{c}" for a, (m, c) in sorted(every.items()) if (m, c) in classes}
    pooling = {a: f"{m}.{c}" for a, (m, c) in sorted(every.items()) if (m, c) not in classes}
    return {
        "version": vllm.__version__,
        "generate": generate,
        "pooling": pooling,
        "draft": {a: f"{m}.{c}" for a, (m, c) in sorted(r._SPECULATIVE_DECODING_MODELS.items())},
        "transformers_supported": sorted(r._TRANSFORMERS_SUPPORTED_MODELS),
        "transformers_backend": sorted(r._TRANSFORMERS_BACKEND_MODELS),
        "previously_supported": dict(sorted(r._PREVIOUSLY_SUPPORTED_MODELS.items())),
        "out_of_tree": dict(sorted(r._OOT_SUPPORTED_MODELS.items())),
        "config_registry": sorted(_config_registry()),
    }


def _config_registry() -> dict:
    from vllm.transformers_utils import config as c

    return {k: str(dict.__getitem__(c._CONFIG_REGISTRY, k)) for k in dict.keys(c._CONFIG_REGISTRY)}


def config(folder: str, opts: dict) -> dict:
    from vllm.config import ModelConfig

    try:
        mc = ModelConfig(
            model=folder,
            tokenizer=opts.get("tokenizer") or folder,
            trust_remote_code=bool(opts.get("trust_remote_code")),
            dtype=opts.get("dtype", "auto"),
            max_model_len=opts.get("max_model_len"),
            hf_overrides=opts.get("hf_overrides") or {},
            disable_sliding_window=bool(opts.get("disable_sliding_window")),
            model_impl=opts.get("model_impl", "auto"),
            skip_tokenizer_init=True,
        )
    except Exception as e:
        return {"error": type(e).__name__, "message": " ".join(str(e).split())[:400]}
    hf = mc.hf_config
    text = mc.hf_text_config
    cls = type(hf)
    arch, arch_error = None, None
    try:
        _, arch = mc.registry.inspect_model_cls(mc.architectures, mc)
    except Exception as e:
        arch_error = " ".join(str(e).split())[:300]
    return {
        "config_class": f"{cls.__module__}.{cls.__qualname__}",
        "model_type": hf.model_type,
        "architectures": list(mc.architectures),
        "architecture": arch,
        "architecture_error": arch_error,
        "runner": mc.runner_type,
        "convert": mc.convert_type,
        "max_model_len": mc.max_model_len,
        "dtype": _plain(mc.dtype),
        "rope_parameters": _plain(getattr(text, "rope_parameters", None)),
        "sliding_window": _plain(getattr(text, "sliding_window", None)),
        "head_dim": mc.get_head_size(),
        "num_kv_heads": mc.get_total_num_kv_heads(),
        "num_layers": mc.get_num_layers_by_block_type(None, "attention") if False else text.num_hidden_layers,
        "vocab_size": mc.get_vocab_size(),
        "hidden_size": mc.get_hidden_size(),
    }


def tokenizer(folder: str, opts: dict) -> dict:
    from vllm.tokenizers import get_tokenizer

    try:
        tok = get_tokenizer(folder, trust_remote_code=bool(opts.get("trust_remote_code")))
    except Exception as e:
        return {"error": type(e).__name__, "message": " ".join(str(e).split())[:400]}
    texts = opts.get("texts") or []
    return {
        "class": type(tok).__name__,
        "encodings": [list(tok.encode(t)) for t in texts],
        "all_special_ids": sorted(tok.all_special_ids),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "len": len(tok),
        "chat_template": getattr(tok, "chat_template", None),
    }


def weights(folder: str, opts: dict) -> dict:
    """The weight files vLLM's default loader picks in a local folder for opts["load_format"]."""
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    try:
        loader = DefaultModelLoader(LoadConfig(load_format=opts.get("load_format", "auto")))
        got = loader._prepare_weights(folder, None, None, True, None)
    except Exception as e:
        return {"error": type(e).__name__, "message": " ".join(str(e).split())[:300]}
    hf_folder, files = got[0], got[1]
    return {"files": sorted(os.path.relpath(f, hf_folder) for f in files), "safetensors": bool(got[2])}


def generate(folder: str, opts: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=folder,
        tokenizer=opts.get("tokenizer") or folder,
        dtype=opts.get("dtype", "float32"),
        max_model_len=opts.get("max_model_len") or 256,
        enforce_eager=True,
        seed=0,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=int(opts.get("max_tokens", 16)), ignore_eos=True)
    outs = llm.generate(list(opts["prompts"]), sp)
    return {"token_ids": [list(o.outputs[0].token_ids) for o in outs], "text": [o.outputs[0].text for o in outs]}


def main(argv: list[str]) -> int:
    what = argv[0]
    if what == "registry":
        out = registry()
    elif what == "batch":
        cases = json.loads(open(argv[1], encoding="utf-8").read())
        out = [
            {"config": config, "tokenizer": tokenizer, "weights": weights}[c["what"]](c["folder"], c.get("opts") or {})
            for c in cases
        ]
    else:
        folder = argv[1]
        opts = json.loads(argv[2]) if len(argv) > 2 else {}
        out = {"config": config, "tokenizer": tokenizer, "generate": generate}[what](folder, opts)
    sys.stdout.write(json.dumps(out, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
