"""A content-addressed store of configure results, so a new run of an already-configured model skips transformers.

Building a config costs ~3 s on a small machine, almost all of it `import transformers` (which imports torch);
the work itself takes milliseconds. The result depends only on what is hashed into the key:

    the config file's bytes (and config.json's beside a params.json), the safetensors headers and file sizes in
    the model folder (they decide the dtype when the config has none), the normalized inputs, the stage version,
    the source of the configure package, the registry and the safetensors parser, and the installed transformers
    version.

Entries live in `<HF cache>/.prestage/configure/<key>.msgpack` beside resolve's listings. Trusted remote code is
never memoized (its classes must be imported anyway). Any unreadable entry is a miss; a failed write is ignored.
`--force` on configure still uses the store: it re-derives the manifest from the same content (set
PRESTAGE_NO_CONFIG_MEMO=1 to bypass it).
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import msgpack

from prestage.stages import safetensors
from prestage.stages.errors import BadManifestError, PrestageError
from prestage.stages.hub import env_true
from prestage.stages.manifest import canonical_bytes, write_atomic
from prestage.stages.records import ConfigureRecord

_SOURCES = Path(__file__).resolve().parent
_REGISTRY = _SOURCES.parent / "launch" / "registry.py"
_VLLM_TABLE = _SOURCES.parent / "launch" / "vllm_table.py"
_PARSER = _SOURCES.parent / "safetensors.py"  # configure reads checkpoint dtypes through it


def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_SOURCES.glob("*.py")) + [_REGISTRY, _VLLM_TABLE, _PARSER]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _headers_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        h.update(path.name.encode())
        try:
            h.update(str(path.stat().st_size).encode() + b"\0" + safetensors.read_header_bytes(path))
        except (OSError, PrestageError):  # configure itself reports the file; here it only has to change the key
            h.update(b"unreadable")
    return h.hexdigest()


def key(folder: Path, config_file: str, inputs: dict, stage_version: int, capability) -> str | None:
    """The entry's key, or None when this configure must not be memoized."""
    if inputs.get("trust_remote_code") or env_true("PRESTAGE_NO_CONFIG_MEMO"):
        return None
    folder = Path(folder)
    try:
        files = {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in sorted({config_file, "config.json"})
            if (folder / name).is_file()
        }
        transformers_version = metadata.version("transformers")
    except (OSError, metadata.PackageNotFoundError):
        return None
    blob = canonical_bytes(
        {
            "files": files,
            "headers": _headers_digest(folder),
            "inputs": inputs,
            "stage_version": stage_version,
            "source": _source_digest(),
            "transformers": transformers_version,
            "capability": list(capability),
        }
    )
    return hashlib.sha256(blob).hexdigest()


def _path(cache_dir: Path, k: str) -> Path:
    return Path(cache_dir) / ".prestage" / "configure" / f"{k}.msgpack"


def load(cache_dir: Path, k: str) -> tuple[ConfigureRecord, list] | None:
    """The stored (record, warnings) for key `k`, or None (absent, unreadable, or of another record shape)."""
    try:
        doc = msgpack.unpackb(_path(cache_dir, k).read_bytes(), raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.UnpackException, TypeError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != k or not isinstance(doc.get("outputs"), dict):
        return None
    warnings = doc.get("warnings")
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        return None
    try:
        return ConfigureRecord.from_dict(doc["outputs"], "configure store entry"), warnings
    except BadManifestError:
        return None


def save(cache_dir: Path, k: str, record: ConfigureRecord, warnings: list) -> None:
    try:
        doc = {"key": k, "outputs": record.to_dict(), "warnings": warnings}
        write_atomic(_path(cache_dir, k), canonical_bytes(doc))
    except (OSError, TypeError):
        pass
