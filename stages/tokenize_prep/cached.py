"""The tokenizer attributes vLLM caches (docs/vllm-rules.md, §4.5), and the cached tokenizer launch uses.

transformers recomputes `all_special_ids`, `all_special_tokens`, `len()` and `get_vocab()` on every access;
request validation and detokenization read them per request or per token. `cached_attributes(tok)`
computes them once at tokenize-prep time (plus `max_token_id` = max(max vocab id, vocab_size - 1), which
covers tokenizers whose vocab_size counts ids missing from the vocab (T-06), and `max_chars_per_token`).

`load_stored_tokenizer(run_dir, outputs)` loads `<run>/tokenizer/` offline and returns it as a dynamic
subclass `Cached<Class>` whose members return the values recorded in the manifest: nothing is recomputed
per request. `get_vocab()` is built once, on first use, and the same dict is returned after that.
"""

from __future__ import annotations

import copy
from pathlib import Path

from prestage.stages import errors
from prestage.stages.paths import in_run
from prestage.stages.records import TokenizerRecord

CACHED_KEYS = (
    "all_special_ids",
    "all_special_tokens",
    "len",
    "is_fast",
    "max_token_id",
    "max_chars_per_token",
    "vocab_size",
)


def cached_attributes(tok, vocab: dict[str, int]) -> dict:
    """The attributes vLLM caches (§4.5) of a loaded tokenizer, as plain data."""
    max_token_id = max(vocab.values(), default=-1)
    try:
        vocab_size = int(tok.vocab_size)
        max_token_id = max(max_token_id, vocab_size - 1)
    except NotImplementedError:
        vocab_size = None
    return {
        "all_special_ids": [int(i) for i in tok.all_special_ids],
        "all_special_tokens": [str(t) for t in tok.all_special_tokens],
        "len": int(len(tok)),
        "is_fast": bool(getattr(tok, "is_fast", True)),
        "max_token_id": int(max_token_id),
        "max_chars_per_token": max((len(t) for t in vocab), default=0),
        "vocab_size": vocab_size,
    }


def _cached_class(base: type) -> type:
    """A subclass of `base` whose hot members read `self._prestage_cache` instead of recomputing."""

    def get_vocab(self):
        vocab = self._prestage_vocab
        if vocab is None:
            vocab = self._prestage_vocab = base.get_vocab(self)
        return vocab

    def __reduce__(self):  # pickle the plain tokenizer and re-wrap it on load (the class is dynamic)
        plain = object.__new__(base)
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_prestage_")})
        return cached_tokenizer, (plain, self._prestage_cache)

    members = {
        "all_special_ids": property(lambda self: self._prestage_cache["all_special_ids"]),
        "all_special_tokens": property(lambda self: self._prestage_cache["all_special_tokens"]),
        "is_fast": property(lambda self: self._prestage_cache["is_fast"]),
        "max_token_id": property(lambda self: self._prestage_cache["max_token_id"]),
        "max_chars_per_token": property(lambda self: self._prestage_cache["max_chars_per_token"]),
        "__len__": lambda self: self._prestage_cache["len"],
        "get_vocab": get_vocab,
        "__reduce__": __reduce__,
    }

    def vocab_size(self):
        size = self._prestage_cache["vocab_size"]
        if size is None:  # the original raised NotImplementedError too
            raise NotImplementedError(f"{base.__name__} has no vocab_size")
        return size

    members["vocab_size"] = property(vocab_size)
    return type(f"Cached{base.__name__}", (base,), members)


def cached_tokenizer(tok, cache: dict):
    """A shallow copy of `tok` whose cached members return `cache` (the manifest's recorded values)."""
    missing = [k for k in CACHED_KEYS if k not in cache]
    if missing:
        raise errors.BadManifestError(f"tokenize-prep manifest lacks {', '.join(missing)}; re-run tokenize-prep")
    out = copy.copy(tok)
    out.__class__ = _cached_class(type(tok))
    out._prestage_cache = {k: cache[k] for k in CACHED_KEYS}
    out._prestage_vocab = None
    return out


def load_stored_tokenizer(run_dir: Path, record: TokenizerRecord):
    """The tokenizer tokenize-prep stored in `run_dir`, loaded offline, with the manifest's cached attributes.

    Its `chat_template` is the one tokenize-prep resolved (None when there is none), and its `name_or_path`
    is the tokenizer's hub id (or the path as typed), as vLLM sets it.
    """
    from prestage.stages.tokenize_prep.store import read_template

    folder = in_run(run_dir, record.tokenizer_dir, "stored tokenizer")
    if not folder.is_dir():
        raise errors.StaleUpstreamError(f"{folder}: the stored tokenizer is missing; re-run tokenize-prep")
    try:
        if record.mode == "mistral":
            from mistral_common.protocol.instruct.validator import ValidationMode
            from transformers import MistralCommonBackend

            tok = MistralCommonBackend.from_pretrained(str(folder), mode=ValidationMode.test, local_files_only=True)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(  # left truncation as vLLM; the stored folder keeps the original's
                str(folder),
                local_files_only=True,
                trust_remote_code=record.trust_remote_code,
                truncation_side="left",
            )
    except ImportError as e:
        raise errors.UnsupportedError(
            f"{folder}: loading the stored tokenizer needs a missing package ({e}); "
            "install it (mistral mode: pip install mistral-common)"
        ) from None
    except Exception as e:
        raise errors.IntegrityError(
            f"{folder}: the stored tokenizer does not load ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); re-run tokenize-prep"
        ) from None
    tok.name_or_path = record.name or tok.name_or_path
    template = read_template(Path(run_dir), record)
    if record.mode != "mistral":
        tok.chat_template = template
    return cached_tokenizer(tok, {k: getattr(record, k) for k in CACHED_KEYS})
