"""Typed records: what each stage writes under `outputs`, as one frozen dataclass per stage.

    ResolveRecord     resolve: the model's source, the pinned commit, the file listing
    ConfigureRecord   configure: the patched config, max_model_len, dtype, implementation, the model spec
    TokenizerRecord   tokenize-prep: the stored tokenizer, its cached attributes, goldens, sampling defaults
    WeightsRecord     fetch-weights: the selected weight files, their sha256, the tensor index
    LaunchRecord      launch: the engine that ran and the completions

A stage builds its record and the runner writes `record.to_dict()`; a consumer reads
`record_of(manifest)` (the runner attaches it as `manifest.record` to every upstream manifest it loads),
never raw keys. `from_dict` is strict: a missing, unexpected or mistyped field is a one-line
`BadManifestError` naming the file and the field, so a wrong manifest is refused instead of becoming a
wrong value. Every record's shape is pinned to its stage's `version` by tests/test_records.py: changing a
record without bumping the version fails there.

Importable without torch, transformers or huggingface_hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from prestage.stages import names
from prestage.stages.errors import BadManifestError

R = TypeVar("R", bound="Record")
_HINTS: dict[type, dict[str, Any]] = {}


def key(name: str) -> Any:
    """A field stored under another key in the manifest (e.g. `class`, a Python keyword)."""
    return field(metadata={"key": name})


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


class _Mistyped(Exception):
    def __init__(self, path: str, problem: str):
        super().__init__(path, problem)
        self.path, self.problem = path, problem


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errs = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except _Mistyped as e:
                errs.append(e)
        if len(errs) == 1:
            raise errs[0]
        raise _Mistyped(path, f"is {type(value).__name__}, expected {_type_name(tp)}")
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(value, dict):
            raise _Mistyped(path, f"is {type(value).__name__}, expected a map ({tp.__name__})")
        return tp._from(value, path)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _Mistyped(path, f"is {type(value).__name__}, expected a list")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mistyped(path, f"is {type(value).__name__}, expected a map")
        kt, vt = typing.get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            if kt is str and not isinstance(k, str):
                raise _Mistyped(f"{path}.{k!r}", "has a non-string key")
            out[k] = _convert(vt, v, f"{path}.{k}")
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mistyped(path, f"is {type(value).__name__}, expected bool")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Mistyped(path, f"is {type(value).__name__}, expected int")
        return value
    if tp is float:  # an int is a valid float (msgpack keeps 1 and 1.0 apart; both mean the number)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Mistyped(path, f"is {type(value).__name__}, expected a number")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _Mistyped(path, f"is {type(value).__name__}, expected str")
        return value
    raise TypeError(f"records: unsupported field type {tp!r} at {path}")


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Record:
    """Base of every record: strict `from_dict`, plain `to_dict`, and a shape digest for version checks."""

    stage: ClassVar[str] = ""

    @classmethod
    def _from(cls: type[R], data: dict, path: str) -> R:
        hints = _hints(cls)
        fs = dataclasses.fields(cls)
        known = {_key(f) for f in fs}
        extra = sorted(str(k) for k in data if k not in known)
        if extra:
            raise _Mistyped(f"{path}.{extra[0]}" if path else extra[0], "is not a field this prestage knows")
        kwargs = {}
        for f in fs:
            k = _key(f)
            where = f"{path}.{k}" if path else k
            if k not in data:
                raise _Mistyped(where, "is missing")
            kwargs[f.name] = _convert(hints[f.name], data[k], where)
        record = cls(**kwargs)
        wrong = record._wrong_value()
        if wrong is not None:
            raise _Mistyped(f"{path}.{wrong[0]}" if path else wrong[0], wrong[1])
        return record

    def _wrong_value(self) -> tuple[str, str] | None:
        """(field, problem) for a value of the right type that this record cannot hold; checked on reading."""
        return None

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "<manifest>") -> R:
        """The record of a manifest's `outputs`; a BadManifestError naming `where` and the field otherwise."""
        if not isinstance(data, dict):
            raise BadManifestError(f"{where}: outputs is {type(data).__name__}, expected a map; delete it and re-run")
        try:
            return cls._from(data, "")
        except _Mistyped as e:
            stage = f"`prestage {cls.stage}`" if cls.stage else "the stage"
            raise BadManifestError(
                f"{where}: output field '{e.path}' {e.problem}; the file was edited or written by another "
                f"version: delete it and re-run {stage}"
            ) from None

    def to_dict(self) -> dict:
        return {_key(f): _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def shape(cls) -> str:
        """A digest of the field names and types, nested records included (pinned per stage version)."""

        def describe(tp: Any) -> str:
            if isinstance(tp, type) and issubclass(tp, Record):
                inner = ",".join(f"{_key(f)}:{describe(_hints(tp)[f.name])}" for f in dataclasses.fields(tp))
                return f"{tp.__name__}{{{inner}}}"
            args = typing.get_args(tp)
            if args:
                return f"{_type_name(typing.get_origin(tp))}[{','.join(describe(a) for a in args)}]"
            return _type_name(tp)

        return hashlib.sha256(describe(cls).encode()).hexdigest()[:16]


# ---- resolve -----------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RepoFile(Record):
    path: str  # POSIX, relative to the repo (or local folder) root
    size: int | None  # None: not known (offline listing of a file not downloaded)
    sha256: str | None  # the hub's LFS sha256; None for small git files
    lfs: bool
    blob_id: str | None = None  # the hub's git blob id (a non-LFS file's content id); None when not known


@dataclass(frozen=True, kw_only=True)
class ResolveRecord(Record):
    stage: ClassVar[str] = "resolve"
    source: str  # "hub" | "local"
    model: str  # as the user typed it
    repo_id: str | None
    revision: str | None  # the branch, tag or commit asked for
    commit: str | None  # the pinned 40-hex commit (hub)
    local_dir: str | None  # local models: relative to the run folder
    snapshot: str | None  # hub models: the snapshot folder relative to the cache root
    config_format: str  # "hf" | "mistral"
    config_file: str
    config_sha256: str
    listing: str  # "full" (the hub's listing with sizes and sha256), "snapshot" (offline, partial), "local"
    files: list[RepoFile]

    def _wrong_value(self) -> tuple[str, str] | None:
        # later stages pass these to the hub client and into cache paths: an edited manifest must not steer them
        if self.repo_id is not None and not names.is_repo_id(self.repo_id):
            return "repo_id", f"is {self.repo_id!r}, not a Hugging Face repo id"
        if self.commit is not None and not names.GIT_OID_RE.match(self.commit):
            return "commit", f"is {self.commit!r}, not a 40-hex commit"
        return None


# ---- configure ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DtypeDecision(Record):
    config: str  # the checkpoint's dtype
    requested: str  # --dtype
    gpu: str  # what a CUDA sm>=80 GPU runs
    cpu: str  # what the CPU fallback runs
    note: str


@dataclass(frozen=True, kw_only=True)
class Implementation(Record):
    architecture: str | None
    impl: str  # "native" | "transformers" | ...
    class_ref: str = key("class")  # "module:Class" that launch builds


@dataclass(frozen=True, kw_only=True)
class EngineSupport(Record):
    prestage: str  # prestage's engine: "native" | "transformers" | "none"
    vllm: str  # "yes" | "no"
    vllm_how: str  # "vllm:<module.Class>" (vLLM's own class), "transformers" (its backend), or why not


@dataclass(frozen=True, kw_only=True)
class ModelSpec(Record):
    """The shapes and switches the native decoder and the weight checks read instead of config.json."""

    model_type: str | None
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int | None
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    sliding_window: int | None
    layer_types: list[str] | None
    rope: dict | None  # rope_type, rope_theta and the type's parameters (or one such map per layer type)
    rms_norm_eps: float | None
    attention_bias: bool  # q/k/v projections carry a bias
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    hidden_act: str | None
    max_position_embeddings: int | None
    num_experts: int | None
    weight_dtype: str
    param_count: int | None
    weight_bytes: int | None


@dataclass(frozen=True, kw_only=True)
class ConfigureRecord(Record):
    stage: ClassVar[str] = "configure"
    config: dict  # the patched config, as plain data
    config_class: str
    model_type: str | None
    architectures: list[str]
    patches: list[dict]  # {rule, field, before, after, why}
    max_model_len: int
    max_model_len_key: str | None  # the config key it was derived from
    derived_max_model_len: float | None  # the model's own maximum (may be inf when no key is set)
    dtype: DtypeDecision
    implementation: Implementation
    engines: EngineSupport  # which engine can run the model
    spec: ModelSpec
    trust_remote_code: bool
    remote_code: dict | None  # trusted auto_map modules with their sha256


# ---- tokenize-prep -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StoredFile(Record):
    path: str  # relative to the run folder
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class ChatTemplate(Record):
    source: str  # where the template came from (flag, tokenizer, file, ...)
    file: str  # relative to the run folder
    sha256: str


@dataclass(frozen=True, kw_only=True)
class GoldenEncoding(Record):
    name: str
    text: str
    ids: list[int]
    add_special_tokens: bool


@dataclass(frozen=True, kw_only=True)
class GenerationDefaults(Record):
    """The sampling values the model's generation_config.json sets (None: it does not set that one)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None

    def given(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class TokenizerRecord(Record):
    stage: ClassVar[str] = "tokenize-prep"
    tokenizer_dir: str  # the stored tokenizer, relative to the run folder
    source: str  # "model" | "hub" | "local"
    name: str
    repo_id: str | None
    revision: str | None
    commit: str | None
    snapshot: str | None  # relative to the cache root
    local_dir: str | None  # relative to the run folder
    mode: str  # "hf" | "mistral"
    mode_reason: str
    class_name: str = key("class")
    trust_remote_code: bool
    remote_code: dict | None  # trusted auto_map tokenizer code: {auto_map, files: [{path, sha256}]}
    all_special_ids: list[int]
    all_special_tokens: list[str]
    len: int
    is_fast: bool
    max_token_id: int
    max_chars_per_token: int
    vocab_size: int | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    generation_defaults: GenerationDefaults
    pad_token_id: int | None
    added_vocab: dict[str, int]
    chat_template: ChatTemplate | None
    tokenizer_json_sha256: str | None = None
    golden: list[GoldenEncoding]
    model_type: str | None
    model_vocab_size: int | None
    max_valid_id: int
    files: list[StoredFile]


# ---- fetch-weights -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WeightFile(Record):
    path: str  # relative to the weights folder
    size: int
    sha256: str
    kind: str  # "safetensors", "bin", "pt", ...


@dataclass(frozen=True, kw_only=True)
class IndexFile(Record):
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class TensorEntry(Record):
    file: str | None  # None under --load-format dummy
    dtype: str
    shape: list[int]


@dataclass(frozen=True, kw_only=True)
class SkippedFile(Record):
    path: str
    why: str


@dataclass(frozen=True, kw_only=True)
class NpcacheRecord(Record):
    dir: str  # relative to the run folder
    names_file: str
    names: list[str]
    files: list[StoredFile]


@dataclass(frozen=True, kw_only=True)
class WeightsRecord(Record):
    stage: ClassVar[str] = "fetch-weights"
    load_format: str  # as asked
    format: str  # what was selected
    root: str  # "cache" (folder relative to the cache root) | "local" (relative to the run folder)
    folder: str
    index: IndexFile | None
    skipped: list[SkippedFile]
    files: list[WeightFile]
    tensors: dict[str, TensorEntry]
    total_bytes: int
    param_count: int
    npcache: NpcacheRecord | None
    dummy: dict | None  # {shapes_from} under --load-format dummy


# ---- launch ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineInfo(Record):
    kind: str  # "native" | "transformers"
    max_model_len: int
    max_num_seqs: int
    cuda_graphs: bool


@dataclass(frozen=True, kw_only=True)
class Completion(Record):
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass(frozen=True, kw_only=True)
class VllmRun(Record):
    version: str  # vLLM's version
    command: list[str]  # the `vllm serve` command the same decisions make (paths as ${PRESTAGE_RUN}/${HF_HUB_CACHE})
    env: dict[str, str]  # its environment


@dataclass(frozen=True, kw_only=True)
class LaunchRecord(Record):
    stage: ClassVar[str] = "launch"
    implementation: Implementation
    device: str
    dtype: str
    kv_cache_tokens: int
    engine: EngineInfo  # kind: "native" | "transformers" (prestage's engine) | "vllm"
    vllm: VllmRun | None  # when vLLM ran the launch
    completions: list[Completion]


RECORDS: dict[str, type[Record]] = {
    r.stage: r for r in (ResolveRecord, ConfigureRecord, TokenizerRecord, WeightsRecord, LaunchRecord)
}


def record_of(manifest, where: str | None = None) -> Record:
    """The typed record of a manifest's outputs (cached on the manifest); BadManifestError when it does not fit."""
    cached = getattr(manifest, "record", None)
    if cached is not None:
        return cached
    cls = RECORDS.get(manifest.stage)
    if cls is None:
        raise BadManifestError(f"{where or manifest.stage}: unknown stage '{manifest.stage}'")
    rec = cls.from_dict(manifest.outputs, where or f"the {manifest.stage} manifest")
    manifest.record = rec
    return rec
