"""Differential tests: prestage's manifests field by field against vLLM's own functions on the same folders.

vLLM runs once for the whole module (tests/vllm/oracle.py `batch`): `ModelConfig` on every config case (the
test bed's model cards plus config.json variants built here: every RoPE type, sliding windows, dtype
variants, legacy keys), `get_tokenizer` on the tiny model's stored tokenizer, and the default loader's weight
file selection for each load format on folders of placeholder files. prestage's configure, tokenize-prep and
fetch-weights selection run in-process on the same inputs.

Every field that differs must be listed in KNOWN (case, field) with its reason, and the same reasons are in
docs/vllm-deviations.md; an unlisted difference fails, and so does a listed one that no longer differs. The
tally (fields compared, agreements, deviations) is written to bench/out/vllm-differential.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.vllm.conftest import REPO, oracle

CARDS = REPO / "tests" / "data" / "configs"
TALLY = REPO / "bench" / "out" / "vllm-differential.json"

BASE = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
LLAMA = dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama")
HALF = 32  # head_dim / 2: the length of longrope factor lists


def _variants() -> dict[str, dict]:
    v = {
        "base": BASE,
        "rope-default-explicit": dict(BASE, rope_scaling={"rope_type": "default"}),
        "rope-linear": dict(BASE, rope_scaling={"type": "linear", "factor": 2.0}),
        "rope-dynamic": dict(BASE, rope_scaling={"type": "dynamic", "factor": 2.0}),
        "rope-yarn": dict(BASE, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}),
        "rope-llama3": dict(
            LLAMA,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        ),
        "rope-longrope": dict(
            LLAMA,
            max_position_embeddings=8192,
            original_max_position_embeddings=1024,
            rope_scaling={"type": "longrope", "short_factor": [1.0] * HALF, "long_factor": [2.0] * HALF},
        ),
        "rope-su-legacy": dict(
            LLAMA,
            max_position_embeddings=8192,
            original_max_position_embeddings=1024,
            rope_scaling={"type": "su", "short_factor": [1.0] * HALF, "long_factor": [2.0] * HALF},
        ),
        "rope-parameters-v5": dict(BASE, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}),
        "mistral-sliding": dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64),
        "qwen2-sliding-on": dict(BASE, use_sliding_window=True, sliding_window=64, max_window_layers=1),
        "qwen2-sliding-off": dict(BASE, use_sliding_window=False, sliding_window=64),
        "dtype-float16": dict(BASE, torch_dtype="float16"),
        "dtype-bfloat16": dict(BASE, torch_dtype="bfloat16"),
        "dtype-key-v5": {k: v for k, v in dict(BASE, dtype="bfloat16").items() if k != "torch_dtype"},
        "dtype-absent": {k: v for k, v in BASE.items() if k != "torch_dtype"},
        "legacy-no-architectures": {k: v for k, v in LLAMA.items() if k != "architectures"},
        "legacy-seq-length": dict({k: v for k, v in BASE.items() if k != "max_position_embeddings"}, seq_length=2048),
        "legacy-model-max-length": dict(BASE, model_max_length=1024),
    }
    for card in sorted(CARDS.glob("*.json")):
        v[f"card-{card.stem}"] = json.loads(card.read_text())
    return v


# (case, field) -> why prestage differs from vLLM on purpose (also in docs/vllm-deviations.md)
KNOWN: dict[tuple[str, str], str] = {
    ("config:card-kimi-k2-instruct", "head_dim"): "MLA: vLLM's head size is the latent KV entry (kv_lora_rank + "
    "qk_rope_head_dim = 576) of its MLA attention; prestage's spec keeps the config's head_dim (64), the size "
    "its Transformers backend caches per head",
    ("config:card-phi-3-mini-128k-su", "outcome"): "vLLM 0.32's environment has transformers 5.19, whose longrope "
    "validation wants original_max_position_embeddings inside rope_scaling and rejects the legacy 'su' card "
    "(KeyError); prestage (transformers 5.24) renames su to longrope before building, as vLLM's legacy rule "
    "means to, and accepts it",
}


def _prestage_config(folder: Path) -> dict:
    from prestage.stages.configure import ConfigureStage, configure

    try:
        rec, _ = configure(folder, "config.json", ConfigureStage().inputs({}, {}))
    except Exception as e:  # a PrestageError: the outcome compared is "error"
        return {"error": type(e).__name__, "message": str(e)}
    out = rec.to_dict()
    cfg = out["config"]
    spec = out["spec"]
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    return {
        "config_class": out["config_class"].rsplit(".", 1)[-1],
        "model_type": out["model_type"],
        "architectures": out["architectures"],
        "vllm_how": out["engines"]["vllm_how"],
        "max_model_len": out["max_model_len"],
        "dtype": out["dtype"]["gpu"],  # vLLM's CPU build decides as on a bfloat16-capable GPU
        "rope_parameters": text.get("rope_parameters"),
        "sliding_window": spec["sliding_window"],
        "head_dim": spec["head_dim"],
        "num_kv_heads": spec["num_key_value_heads"],
        "vocab_size": spec["vocab_size"],
        "hidden_size": spec["hidden_size"],
        "num_layers": spec["num_hidden_layers"],
    }


def _vllm_view(v: dict) -> dict:
    if "error" in v:
        return v
    arch = v["architecture"]
    if arch is None:
        how = None
    elif arch.startswith("Transformers"):
        how = "transformers"
    else:
        from prestage.stages.launch import vllm_table

        how = f"vllm:{vllm_table.GENERATE.get(arch, arch)}"
    return {
        "config_class": v["config_class"].rsplit(".", 1)[-1],
        "model_type": v["model_type"],
        "architectures": v["architectures"],
        "vllm_how": how,
        "max_model_len": v["max_model_len"],
        "dtype": v["dtype"],
        "rope_parameters": v["rope_parameters"],
        "sliding_window": v["sliding_window"],
        "head_dim": v["head_dim"],
        "num_kv_heads": v["num_kv_heads"],
        "vocab_size": v["vocab_size"],
        "hidden_size": v["hidden_size"],
        "num_layers": v["num_layers"],
    }


def _norm(x):
    """Floats compared as floats, tuples as lists (JSON from vLLM, plain data from prestage)."""
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_norm(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, (int, float)):
        return float(x)
    return x


WEIGHT_LAYOUTS = {
    "single": ["model.safetensors"],
    "sharded": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
    "bin-only": ["pytorch_model.bin"],
    "both": ["model.safetensors", "pytorch_model.bin"],
    "extra-consolidated": ["model.safetensors", "consolidated.safetensors"],
    "original-folder": ["model.safetensors", "original/consolidated.00.pth"],
}
FORMATS = ("auto", "safetensors", "pt")


def _weights_folder(root: Path, name: str, files: list[str]) -> Path:
    d = root / f"w-{name}"
    for f in files:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_bytes(b"")
    if name == "sharded":
        index = {"metadata": {}, "weight_map": {"a": files[0], "b": files[1]}}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "config.json").write_text(json.dumps(BASE))
    return d


def _prestage_weights(folder: Path, fmt: str) -> dict:
    from prestage.stages.fetch_weights import selection

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    index = None
    name = selection.index_needed(fmt, paths)
    if name and (folder / name).is_file():
        index = json.loads((folder / name).read_text())
    try:
        sel = selection.select(fmt, paths, index=index)
    except Exception as e:
        return {"error": type(e).__name__}
    return {"files": sorted(sel.files), "safetensors": sel.format in ("safetensors", "mistral")}


@pytest.fixture(scope="module")
def answers(tmp_path_factory, wide_model):
    """Every case built, prestage's answers computed, and vLLM's from one oracle process."""
    root = tmp_path_factory.mktemp("diff")
    cases, ours = [], {}
    for name, cfg in _variants().items():
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        cases.append({"what": "config", "folder": str(d), "key": f"config:{name}"})
        ours[f"config:{name}"] = _prestage_config(d)
    for name, files in WEIGHT_LAYOUTS.items():
        d = _weights_folder(root, name, files)
        for fmt in FORMATS:
            key = f"weights:{name}:{fmt}"
            cases.append({"what": "weights", "folder": str(d), "opts": {"load_format": fmt}, "key": key})
            ours[key] = _prestage_weights(d, fmt)
    tok = _stage_tokenizer(root, wide_model)
    cases.append({"what": "tokenizer", "folder": str(tok["folder"]), "opts": {"texts": tok["texts"]}, "key": "tok"})
    ours["tok"] = tok["ours"]
    spec = root / "cases.json"
    spec.write_text(json.dumps([{k: c[k] for k in ("what", "folder", "opts") if k in c} for c in cases]))
    theirs = oracle("batch", str(spec), timeout=900)
    return {c["key"]: (ours[c["key"]], t) for c, t in zip(cases, theirs, strict=True)}


def _stage_tokenizer(root: Path, model: Path) -> dict:
    """tokenize-prep on the wide tiny model (CLI), its stored tokenizer folder and its record's facts."""
    import subprocess
    import sys

    arts = root / "arts"
    cmd = [sys.executable, "-m", "prestage", "--artifacts", str(arts), "--run", "t", "run", str(model)]
    done = subprocess.run([*cmd, "--to", "tokenize-prep"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    from prestage.stages.manifest import manifest_path, read

    rec = read(manifest_path(arts / "t", "tokenize-prep")).outputs
    template = (arts / "t" / rec["chat_template"]["file"]).read_text() if rec["chat_template"] else None
    texts = [g["text"] for g in rec["golden"]]
    ours = {
        "encodings": [g["ids"] for g in rec["golden"]],
        "all_special_ids": sorted(rec["all_special_ids"]),
        "bos_token_id": rec["bos_token_id"],
        "len": rec["len"],
        "chat_template": template,
        "class": rec["class"],
    }
    # golden encodings with add_special_tokens=False are not what vLLM's encode() gives: compare like with like
    keep = [i for i, g in enumerate(rec["golden"]) if g["add_special_tokens"]]
    ours["encodings"] = [ours["encodings"][i] for i in keep]
    return {"folder": arts / "t" / rec["tokenizer_dir"], "texts": [texts[i] for i in keep], "ours": ours}


def _compare(answers) -> tuple[list, list, int]:
    agree, differ = [], []
    for key, (ours, theirs) in sorted(answers.items()):
        if key.startswith("config:"):
            theirs = _vllm_view(theirs)
        if key == "tok":
            theirs = dict(theirs)
            theirs.pop("eos_token_id", None)  # prestage records eos ids (with generation_config's), compared in tests
            theirs["class"] = str(theirs.get("class", "")).removeprefix("Cached")  # vLLM's caching wrapper
            ours = copy.deepcopy(ours)
        if "error" in ours or "error" in theirs:
            fields = {"outcome": ("error" if "error" in ours else "ok", "error" if "error" in theirs else "ok")}
        else:
            fields = {f: (ours.get(f), theirs.get(f)) for f in sorted(set(ours) | set(theirs))}
        for f, (a, b) in fields.items():
            (agree if _norm(a) == _norm(b) else differ).append((key, f, a, b))
    return agree, differ, len(agree) + len(differ)


def test_prestage_decides_as_vllm(answers):
    agree, differ, total = _compare(answers)
    unexplained = [d for d in differ if (d[0], d[1]) not in KNOWN]
    TALLY.parent.mkdir(parents=True, exist_ok=True)
    TALLY.write_text(
        json.dumps(
            {
                "fields_compared": total,
                "agreements": len(agree),
                "deviations": [
                    {"case": k, "field": f, "prestage": a, "vllm": b, "why": KNOWN.get((k, f))} for k, f, a, b in differ
                ],
            },
            indent=1,
            default=str,
        )
    )
    print(f"\nvLLM differential: {total} fields compared, {len(agree)} agree, {len(differ)} listed deviations")
    assert not unexplained, "\n".join(f"{k} {f}: prestage {a!r} vs vLLM {b!r}" for k, f, a, b in unexplained)
    stale = sorted(set(KNOWN) - {(d[0], d[1]) for d in differ})
    assert not stale, f"listed deviations that no longer differ (remove them here and in the docs): {stale}"


def test_every_case_ran(answers):
    assert len([k for k in answers if k.startswith("config:")]) >= len(_variants())
    assert any(k.startswith("weights:") for k in answers) and "tok" in answers
