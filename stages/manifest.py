"""The manifest format: one msgpack file per stage per run, `artifacts/<run>/<stage>.msgpack`.

Layout (a msgpack map, keys in this order):

    schema          "prestage.manifest"
    schema_version  SCHEMA_VERSION (a reader refuses a newer one)
    stage           the stage name
    stage_version   the stage implementation's version (part of the fingerprint)
    inputs          normalized inputs: plain data, never a secret (a token is only "present"/"absent")
    upstream        {stage: digest} of the upstream manifests this one was built from
    fingerprint     sha256 of (stage, stage_version, inputs, upstream)
    outputs         the stage's results: plain data, paths relative to the run folder or cache root
    warnings        list of one-line strings
    volatile        timestamps, durations, host, library versions: everything allowed to differ

Everything but `volatile` is canonical (sorted map keys, no floats that depend on the clock), so the
same inputs and pins give byte-identical bytes up to the volatile section, on any machine. Writes are
atomic (temp file, fsync, rename). Reads are strict: anything that is not a whole, well-formed manifest
of a schema this code knows is a `BadManifestError` with one line naming the file.

Importable without torch, transformers or huggingface_hub.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from prestage.stages.errors import BadManifestError

SCHEMA = "prestage.manifest"
SCHEMA_VERSION = 1
SUFFIX = ".msgpack"
_KEYS = (
    "schema",
    "schema_version",
    "stage",
    "stage_version",
    "inputs",
    "upstream",
    "fingerprint",
    "outputs",
    "warnings",
    "volatile",
)
_MAX_BYTES = 256 * 1024 * 1024


def plain(value: Any) -> Any:
    """Normalize to msgpack-safe plain data with sorted map keys (tuples → lists, Paths → str)."""
    if isinstance(value, dict):
        return {str(k): plain(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    if isinstance(value, Path):
        return value.as_posix()
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise TypeError(f"manifest values must be plain data, got {type(value).__name__}: {value!r}")


def canonical_bytes(value: Any) -> bytes:
    """The canonical msgpack encoding of plain data (the basis of digests and fingerprints)."""
    return msgpack.packb(plain(value), use_bin_type=True)


def fingerprint(stage: str, stage_version: int, inputs: dict, upstream: dict) -> str:
    blob = canonical_bytes({"stage": stage, "stage_version": stage_version, "inputs": inputs, "upstream": upstream})
    return hashlib.sha256(blob).hexdigest()


@dataclass
class Manifest:
    stage: str
    stage_version: int
    inputs: dict
    upstream: dict
    outputs: dict
    warnings: list = field(default_factory=list)
    volatile: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    fingerprint: str = ""
    record: Any = field(default=None, compare=False, repr=False)  # the typed outputs (stages/records.py), once read

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.stage, self.stage_version, self.inputs, self.upstream)

    def stable(self) -> dict:
        """Everything but the volatile section, in file order."""
        return {
            "schema": SCHEMA,
            "schema_version": self.schema_version,
            "stage": self.stage,
            "stage_version": self.stage_version,
            "inputs": plain(self.inputs),
            "upstream": plain(self.upstream),
            "fingerprint": self.fingerprint,
            "outputs": plain(self.outputs),
            "warnings": plain(list(self.warnings)),
        }

    @property
    def digest(self) -> str:
        """sha256 of the stable part: what downstream manifests record as this one's identity."""
        return hashlib.sha256(canonical_bytes(self.stable())).hexdigest()

    def to_bytes(self) -> bytes:
        # Not canonical_bytes(): the stable keys keep file order, and volatile comes last.
        doc = self.stable()
        doc["volatile"] = plain(self.volatile)
        return msgpack.packb(doc, use_bin_type=True)

    def to_dict(self) -> dict:
        doc = self.stable()
        doc["volatile"] = plain(self.volatile)
        return doc


def manifest_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / f"{stage}{SUFFIX}"


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
_OLD_TMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # written before temporaries carried the pid
_STARTED = time.time()  # this process's start, near enough: older pid-less temporaries are a dead run's


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask sets it as it reads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie or another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the temporary files `write_atomic` left in `folder` when its process was killed.

    A temporary file is `.<name>.<pid>.<random>.tmp`; it is removed only when that pid is no longer alive
    (a live writer keeps its file). One without a pid (`.<name>.<random>.tmp`, older prestage) is removed
    when it is older than this process. With `name`, only the temporaries of that target file. Returns what
    went.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m:
            if int(m.group("pid")) == os.getpid() or pid_alive(int(m.group("pid"))):
                continue
        else:
            m = _OLD_TMP_RE.match(p.name)
            try:
                if not m or p.stat().st_mtime >= _STARTED:
                    continue
            except OSError:
                continue
        if name is not None and m.group("name") != name:
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes so that a crash leaves either the old file or the new one, never half of one.

    The file gets mode 0666 less the umask (0644 under the usual 022), as `open()` would give it; temporary
    files a killed writer left beside it are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)  # make the rename durable too


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a filesystem that cannot is left as it is."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write(path: Path, manifest: Manifest) -> None:
    write_atomic(path, manifest.to_bytes())


def loads(data: bytes, where: str = "<bytes>") -> Manifest:
    """Decode and validate one manifest; any defect is a one-line BadManifestError naming `where`."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except msgpack.ExtraData:
        raise BadManifestError(
            f"{where}: trailing bytes after the manifest (corrupt file); delete it and re-run the stage"
        ) from None
    except Exception as e:  # truncated, garbage: msgpack raises many types
        raise BadManifestError(
            f"{where}: not a readable manifest ({type(e).__name__}: truncated or "
            "corrupt); delete it and re-run the stage"
        ) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise BadManifestError(
            f"{where}: not a prestage manifest (no '{SCHEMA}' schema tag); "
            "point at a <stage>.msgpack file written by prestage"
        )
    version = doc.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadManifestError(f"{where}: schema_version {version!r} is not an integer; delete it and re-run the stage")
    if version > SCHEMA_VERSION:
        raise BadManifestError(
            f"{where}: written by a newer prestage (schema {version}, this one reads "
            f"up to {SCHEMA_VERSION}); upgrade prestage or re-run the stage"
        )
    missing = [k for k in _KEYS if k not in doc]
    if missing:
        raise BadManifestError(f"{where}: manifest lacks {', '.join(missing)}; delete it and re-run the stage")
    types = {
        "stage": str,
        "stage_version": int,
        "inputs": dict,
        "upstream": dict,
        "fingerprint": str,
        "outputs": dict,
        "warnings": list,
        "volatile": dict,
    }
    for key, typ in types.items():
        if not isinstance(doc[key], typ) or isinstance(doc[key], bool):
            raise BadManifestError(
                f"{where}: field '{key}' is {type(doc[key]).__name__}, expected "
                f"{typ.__name__}; delete it and re-run the stage"
            )
    m = Manifest(
        stage=doc["stage"],
        stage_version=doc["stage_version"],
        inputs=doc["inputs"],
        upstream=doc["upstream"],
        outputs=doc["outputs"],
        warnings=doc["warnings"],
        volatile=doc["volatile"],
        schema_version=version,
        fingerprint=doc["fingerprint"],
    )
    expected = fingerprint(m.stage, m.stage_version, m.inputs, m.upstream)
    if expected != m.fingerprint:
        raise BadManifestError(
            f"{where}: fingerprint does not match its inputs (edited or corrupt); delete it and re-run the stage"
        )
    return m


def read(path: Path) -> Manifest:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadManifestError(f"{path}: no such manifest") from None
    except IsADirectoryError:
        raise BadManifestError(f"{path}: is a directory, not a manifest") from None
    except OSError as e:
        raise BadManifestError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > _MAX_BYTES:
        raise BadManifestError(f"{path}: {len(data)} bytes is too large for a manifest")
    return loads(data, str(path))
