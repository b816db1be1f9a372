"""The body of the tokenize-prep stage: `prepare(ctx, inputs)` -> StageResult (see the package docstring).

Also reads generation_config.json, a model file the tokenizer does not own (its eos_token_id, an int or a
list, is merged into the eos ids, as vLLM stops on both), and takes the model_type (for the chat template
fallback) and the vocab_size (for the embedding bound) from configure's manifest.
"""

from __future__ import annotations

import time
from pathlib import Path

from prestage.stages import errors, hub, paths
from prestage.stages.base import Context, StageResult
from prestage.stages.records import ChatTemplate, GenerationDefaults, GoldenEncoding, TokenizerRecord
from prestage.stages.tokenize_prep import store
from prestage.stages.tokenize_prep.cached import cached_attributes
from prestage.stages.tokenize_prep.chat_template import resolve as resolve_template
from prestage.stages.tokenize_prep.golden import golden
from prestage.stages.tokenize_prep.source import TokenizerSource, locate, pick_mode
from prestage.stages.tokenize_prep.tokenizer_loading import load, preflight, read_json, remote_code, untrusted_warning


def _model_json(ctx: Context, src: TokenizerSource, name: str, warnings: list) -> dict | None:
    """A model-repo JSON file (generation_config.json, config.json), or None when the repo has none."""
    resolve = ctx.upstream["resolve"].record
    if src.kind == "model":  # the tokenizer folder is the model's folder / non-weight snapshot
        return read_json(src.folder / name, resolve.repo_id or resolve.model)
    path = paths.model_dir(ctx.run_dir, ctx.upstream["resolve"], ctx.params) / name
    if resolve.source != "hub":
        return read_json(path, resolve.repo_id or resolve.model)
    entry = next((f.to_dict() for f in resolve.files if f.path == name), None)
    if entry is None:
        return read_json(path, resolve.repo_id) if path.is_file() else None
    s = hub.settings(ctx.params)  # the model's own cache (resolve's), --download-dir included
    cached = hub.verify_cached(s.cache_dir, resolve.repo_id, resolve.commit, name, entry)
    if cached is not None:
        return read_json(cached, resolve.repo_id)
    try:
        if s.offline:
            raise errors.OfflineMissError(f"{resolve.repo_id}: {name} is not in the cache")
        got = hub.HubClient(s, ctx.reporter).download(resolve.repo_id, name, resolve.commit, expect=entry)
    except errors.PrestageError as err:
        # the class only: the full message can hold this machine's cache path, and warnings are not volatile
        warnings.append(f"could not read the model's {name} ({err.kind}); going on without it")
        return None
    return read_json(Path(got), resolve.repo_id)


def _eos_ids(tok, gen: dict | None) -> list[int]:
    ids: list[int] = []
    extra = (gen or {}).get("eos_token_id")
    extra = extra if isinstance(extra, list) else [extra]
    for i in [getattr(tok, "eos_token_id", None), *extra]:
        if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
            ids.append(i)
    return ids


# vLLM's `get_diff_sampling_param`: the sampling fields of generation_config.json that differ from
# transformers' GenerationConfig defaults become the defaults of every request (`--generation-config auto`).
_SAMPLING_FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def generation_defaults(gen: dict | None) -> dict:
    """{temperature, top_p, top_k, min_p, repetition_penalty, max_tokens} that generation_config.json sets."""
    if not gen:
        return {}
    from transformers import GenerationConfig

    try:
        diff = GenerationConfig.from_dict(dict(gen)).to_diff_dict()
    except Exception:  # a generation_config.json transformers refuses: its values are not defaults either
        return {}
    out = {k: diff[k] for k in _SAMPLING_FIELDS if diff.get(k) is not None}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out


def _model_facts(ctx: Context) -> tuple[str | None, int | None]:
    """(model_type, model vocab_size) as configure recorded them."""
    conf = ctx.upstream["configure"].record
    return conf.model_type, conf.spec.vocab_size


def prepare(ctx: Context, inputs: dict) -> StageResult:
    t0 = time.perf_counter()
    src = locate(ctx.run_dir, ctx.params, inputs, ctx.upstream["resolve"], reporter=ctx.reporter)
    mode, why = pick_mode(inputs["tokenizer_mode"], src.paths)
    where = src.where()
    ctx.reporter.detail(f"tokenize-prep: {where} in mode {mode} ({why})")
    t1 = time.perf_counter()
    config = preflight(src.folder, where, mode)
    tok = load(src.folder, mode, inputs["trust_remote_code"], where, config)
    tok.name_or_path = src.name  # as vLLM: the hub id (or the path as typed), not the snapshot folder
    t2 = time.perf_counter()

    warnings: list[str] = []
    code_warning = untrusted_warning(config, inputs["trust_remote_code"], tok)
    if code_warning:
        warnings.append(code_warning)
    if not getattr(tok, "is_fast", True):
        warnings.append(
            "slow (Python) tokenizer: this might cause a significant slowdown; a repo with "
            "tokenizer.json gives the fast one"
        )
    vocab = tok.get_vocab()
    attrs = cached_attributes(tok, vocab)
    model_type, model_vocab = _model_facts(ctx)
    gen = _model_json(ctx, src, "generation_config.json", warnings)
    eos = _eos_ids(tok, gen)
    if not eos:
        warnings.append(
            "no eos token id in the tokenizer or generation_config.json: generation stops only at max tokens"
        )
    template, template_source, w = resolve_template(
        tok, ctx.params.get("chat_template"), inputs["chat_template"], model_type
    )
    warnings += w
    gold, w = golden(tok, template)
    warnings += w

    max_valid = attrs["max_token_id"]
    if model_vocab is not None:
        max_valid = max(max_valid, model_vocab - 1)  # vLLM's prompt id bound (docs/vllm-rules.md, §4.6)
        if attrs["max_token_id"] >= model_vocab:
            warnings.append(
                f"the tokenizer has ids up to {attrs['max_token_id']} but the model embeds only "
                f"{model_vocab} (vocab_size): prompts with ids >= {model_vocab} cannot be embedded"
            )

    saved = store.save(ctx.run_dir, tok, src.folder, template)
    t3 = time.perf_counter()
    added = tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {}
    record = TokenizerRecord(
        tokenizer_dir=store.TOKENIZER_DIR,
        source=src.kind,
        name=src.name,
        repo_id=src.repo_id,
        revision=src.revision,
        commit=src.commit,
        snapshot=src.snapshot,
        local_dir=src.local_dir,
        mode=mode,
        mode_reason=why,
        class_name=type(tok).__name__,
        trust_remote_code=inputs["trust_remote_code"],
        remote_code=remote_code(src.folder, config, inputs["trust_remote_code"]),
        **attrs,
        bos_token_id=getattr(tok, "bos_token_id", None),
        eos_token_ids=eos,
        generation_defaults=GenerationDefaults(**generation_defaults(gen)),
        pad_token_id=getattr(tok, "pad_token_id", None),
        added_vocab={str(k): int(v) for k, v in added.items()},
        chat_template=None
        if template is None
        else ChatTemplate(
            source=template_source,
            file=saved["chat_template_file"],
            sha256=store.sha256_hex(ctx.run_dir / saved["chat_template_file"]),
        ),
        tokenizer_json_sha256=saved["tokenizer_json_sha256"],
        golden=[GoldenEncoding(**g) for g in gold],
        model_type=model_type,
        model_vocab_size=model_vocab,
        max_valid_id=max_valid,
        files=store.listing(ctx.run_dir),
    )
    volatile = {
        "tokenizer_folder": str(src.folder),
        "locate_s": round(t1 - t0, 4),
        "load_s": round(t2 - t1, 4),
        "record_s": round(t3 - t2, 4),
    }
    return StageResult(outputs=record, warnings=warnings, volatile=volatile)
