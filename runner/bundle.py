"""`prestage bundle RUN -o PATH`: one self-contained copy of a run for a machine with no network.

A bundle (a folder, or the same tree as one `.tar`) holds:

    bundle.json                  what it is: the run name, the model, the commit, what was included
    run/<stage>.msgpack          the run's manifests, byte for byte (no manifest is rewritten)
    run/<tokenizer dir>/...      the stored tokenizer (and npcache files) the manifests record
    hub/models--org--name/       a valid Hugging Face cache: blobs/<name>, snapshots/<commit>/<path> ->
                                 ../../blobs/<name>, refs/<revision>; the snapshot's non-weight files
                                 (config, generation config, tokenizer files, trusted remote code) and the
                                 weight files fetch-weights selected, nothing else
    hub/.prestage/listings/...   resolve's stored listing of the commit, when the cache has it
    model/...                    a local-folder model's files instead of hub/ (resolve source "local")
    SHA256SUMS                   sha256sum's format, every file above (snapshot links included, with the
                                 sha256 of the blob they point to)
    SHA256SUMS.sig               with `--sign KEY`: SHA256SUMS signed in the OpenSSF model-signing format

The sha256 of each weight file and tokenizer file is the one the manifests recorded: nothing the run
already hashed is hashed again (`prestage verify BUNDLE` re-reads every byte). Blobs keep the names they
have in the source cache. The tar (tarfile's PAX format, each file's bytes copied in the kernel) is written
under a temporary name, fsynced, then renamed to PATH (its folder fsynced too); `--format oci` writes the same
files as an OCI image layout (runner/oci.py); `--link` hard-links weight blobs into a folder or OCI bundle when
both are on one filesystem. The bundle is reproducible: the same run gives the same file list and checksums.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from prestage.runner import checksums, flush
from prestage.stages import ORDER, errors, hub, paths
from prestage.stages.digest import sha256_file
from prestage.stages.manifest import fsync_dir, manifest_path, read
from prestage.stages.records import record_of

FORMAT = "prestage.bundle"
FORMAT_VERSION = 1
FORMATS = ("dir", "tar", "oci")
NEEDED = ("resolve", "configure", "tokenize-prep", "fetch-weights")
SIG = checksums.NAME + ".sig"  # the signature of SHA256SUMS (runner/signing.py), beside it
MTIME_KEY = "PRESTAGE.mtime_ns"  # pax header keeping a file's exact mtime (status compares it on one host)
_COPY_BUF = 8 * 1024 * 1024
_ALIGN, _ALIGN_FROM = 4096, 64 * 1024  # a bundle tar's copied files from 64 KiB start on a 4 KiB boundary


@dataclass
class Entry:
    """One file of a bundle: copied from `src`, written from `data`, or a symlink to `link`."""

    name: str
    sha256: str
    size: int
    src: Path | None = None
    data: bytes | None = None
    link: str | None = None
    mtime_ns: int | None = None
    weight: bool = False

    @property
    def kind(self) -> str:
        return "link" if self.link is not None else "file"


def _weight_patterns() -> tuple[str, ...]:
    from prestage.stages.tokenize_prep.source import WEIGHT_PATTERNS

    return WEIGHT_PATTERNS


def _is_weight_name(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in _weight_patterns())


def _data(name: str, data: bytes) -> Entry:
    import hashlib

    return Entry(name=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data), data=data)


def _check_fresh(run_dir: Path, params: dict) -> dict:
    """The run's manifests ({stage: Manifest}); StaleUpstreamError unless resolve..fetch-weights are fresh."""
    from prestage.runner.chain import stage_status

    rows = {r["stage"]: r for r in stage_status(run_dir, params)}
    for name in NEEDED:
        row = rows[name]
        if row["state"] == "missing":
            raise errors.StaleUpstreamError(
                f"run {run_dir.name} has no {name} manifest; run `prestage run MODEL --run {run_dir.name}` "
                "(up to fetch-weights) before bundling it"
            )
        if row["state"] != "fresh":
            raise errors.StaleUpstreamError(
                f"run {run_dir.name}: {name} is stale ({row['reason']}); re-run `prestage {name} {run_dir.name}` "
                "before bundling it"
            )
    return {n: read(manifest_path(run_dir, n)) for n in ORDER if manifest_path(run_dir, n).exists()}


def _run_files(run_dir: Path, manifests: dict) -> list[Entry]:
    """The manifests and the files they record inside the run folder (stored tokenizer, npcache)."""
    out = []
    for name in manifests:
        out.append(_data(f"run/{name}.msgpack", manifest_path(run_dir, name).read_bytes()))
    recorded = {}
    tok = record_of(manifests["tokenize-prep"])
    for f in tok.files:
        recorded[f.path] = (f.sha256, f.size)
    if tok.chat_template is not None and tok.chat_template.file not in recorded:
        p = paths.in_run(run_dir, tok.chat_template.file, "stored chat template")
        recorded[tok.chat_template.file] = (tok.chat_template.sha256, p.stat().st_size)
    weights = record_of(manifests["fetch-weights"])
    for f in weights.npcache.files if weights.npcache else []:
        recorded[f.path] = (f.sha256, f.size)
    for rel, (sha, size) in sorted(recorded.items()):
        src = paths.in_run(run_dir, rel, "recorded run file")
        out.append(Entry(name=f"run/{rel}", sha256=sha, size=size, src=src, mtime_ns=src.stat().st_mtime_ns))
    return out


def _known_sha(manifests: dict) -> dict[str, str]:
    """{repo path: sha256} of every model file a manifest recorded the sha256 of (nothing to hash again)."""
    resolve = record_of(manifests["resolve"])
    known = {f.path: f.sha256 for f in resolve.files if checksums.is_sha256(f.sha256)}
    known[resolve.config_file] = resolve.config_sha256
    weights = record_of(manifests["fetch-weights"])
    if weights.format != "dummy":
        for f in list(weights.files) + ([weights.index] if weights.index else []):
            known[f.path] = f.sha256
    return known


def _selected(folder: Path, manifests: dict) -> list[tuple[str, Path]]:
    """(repo path, file) of the model folder's files the later stages use: every non-weight file, and the weight
    files fetch-weights selected (a weight file it did not select stays out)."""
    weights = record_of(manifests["fetch-weights"])
    chosen = set()
    if weights.format != "dummy":
        chosen = {f.path for f in weights.files} | ({weights.index.path} if weights.index else set())
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not p.is_file():
            continue
        if rel in chosen or not _is_weight_name(rel):
            out.append((rel, p))
    missing = sorted(chosen - {rel for rel, _ in out})
    if missing:
        raise errors.StaleUpstreamError(
            f"{missing[0]} recorded by fetch-weights is not in {folder}; re-run `prestage fetch-weights RUN`"
        )
    return out


def _hub_files(cache: Path, manifests: dict) -> list[Entry]:
    resolve = record_of(manifests["resolve"])
    weights = record_of(manifests["fetch-weights"])
    chosen = {f.path for f in weights.files} if weights.format != "dummy" else set()
    snap = paths.inside(cache, resolve.snapshot, "resolve snapshot")
    repo_dir = hub.repo_folder(cache, resolve.repo_id)
    repo_name = repo_dir.name
    known = _known_sha(manifests)
    out: list[Entry] = []
    blobs: dict[str, Entry] = {}
    for rel, p in _selected(snap, manifests):
        src = p.resolve()
        st = src.stat()
        sha = known.get(rel) or sha256_file(src)[1]
        blob = src.name if (p.is_symlink() and src.parent == (repo_dir / "blobs").resolve()) else sha
        if checksums.unsafe_reason(f"hub/{repo_name}/blobs/{blob}") or "/" in blob:
            blob = sha
        if blob not in blobs:
            blobs[blob] = Entry(
                name=f"hub/{repo_name}/blobs/{blob}",
                sha256=sha,
                size=st.st_size,
                src=src,
                mtime_ns=st.st_mtime_ns,
                weight=rel in chosen,
            )
        elif blobs[blob].sha256 != sha:
            raise errors.IntegrityError(
                f"{snap}: two files point to blob {blob} with different recorded sha256; run `prestage verify RUN`"
            )
        name = f"hub/{repo_name}/snapshots/{resolve.commit}/{rel}"
        depth = rel.count("/") + 2  # up from the file's folder to the repo folder
        out.append(Entry(name=name, sha256=sha, size=st.st_size, link="../" * depth + f"blobs/{blob}"))
    out.extend(blobs.values())
    if resolve.revision and resolve.revision != resolve.commit and not hub.SHA_RE.match(resolve.revision):
        out.append(_data(f"hub/{repo_name}/refs/{resolve.revision}", resolve.commit.encode()))
    listing = cache / ".prestage" / "listings" / repo_name / f"{resolve.commit}.json"
    if listing.is_file():
        out.append(_data(f"hub/.prestage/listings/{repo_name}/{resolve.commit}.json", listing.read_bytes()))
    return out


def _local_files(run_dir: Path, manifests: dict) -> list[Entry]:
    folder = paths.model_dir(run_dir, manifests["resolve"])
    known = _known_sha(manifests)
    weights = record_of(manifests["fetch-weights"])
    chosen = {f.path for f in weights.files} if weights.format != "dummy" else set()
    out = []
    for rel, p in _selected(folder, manifests):
        st = p.stat()
        sha = known.get(rel) or sha256_file(p)[1]
        out.append(
            Entry(
                name=f"model/{rel}",
                sha256=sha,
                size=st.st_size,
                src=p.resolve(),
                mtime_ns=st.st_mtime_ns,
                weight=rel in chosen,
            )
        )
    return out


def plan(run_dir: Path, params: dict) -> tuple[list[Entry], dict]:
    """Every entry of the bundle of `run_dir` (sorted, SHA256SUMS last) and the bundle.json content."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise errors.NotFoundError(f"{run_dir}: no such run folder; pass a run name under --artifacts or its folder")
    manifests = _check_fresh(run_dir, params)
    resolve = record_of(manifests["resolve"])
    entries = _run_files(run_dir, manifests)
    if resolve.source == "local":
        entries += _local_files(run_dir, manifests)
        cache = None
    else:
        cache = paths.cache_root(params, manifests["resolve"])
        entries += _hub_files(cache, manifests)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run": run_dir.name,
        "source": resolve.source,
        "model": resolve.model,
        "repo_id": resolve.repo_id,
        "revision": resolve.revision,
        "commit": resolve.commit,
        "snapshot": f"hub/{resolve.snapshot}" if resolve.snapshot else None,
        "local_dir": resolve.local_dir,
        "stages": list(manifests),
        "files": len(entries) + 1,
        "bytes": sum(e.size for e in entries if e.kind == "file"),
        "weights": sorted(e.name for e in entries if e.weight),
    }
    entries.append(_data(checksums.META, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()))
    entries.sort(key=lambda e: e.name)
    names = [e.name for e in entries]
    for n in names:
        checksums.check_name(n, str(run_dir))
    return entries, meta


# ---- writing ---------------------------------------------------------------------------------------------


def _partial(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


def _copy(src: Path, dst: Path, mtime_ns: int | None, link: bool) -> bool:
    """Copy (or hard-link) one file; True when it was linked."""
    if link:
        try:
            os.link(src, dst)
            return True
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
    shutil.copyfile(src, dst)
    if mtime_ns is not None:
        os.utime(dst, ns=(mtime_ns, mtime_ns))
    return False


def _check_size(e: Entry) -> None:
    size = e.src.stat().st_size
    if size != e.size:
        raise errors.IntegrityError(
            f"{e.src}: has {size} bytes, the run recorded {e.size}; run `prestage verify RUN` and re-fetch it"
        )


def write_dir(entries: list[Entry], out: Path, link: bool, sig: bytes | None = None) -> int:
    """The bundle as a folder at `out` (built under a temporary name, then renamed); how many files were linked."""
    tmp = _partial(out)
    linked = 0
    try:
        tmp.mkdir(parents=True)
        for e in entries:
            dst = tmp / e.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if e.link is not None:
                os.symlink(e.link, dst)
            elif e.data is not None:
                dst.write_bytes(e.data)
            else:
                _check_size(e)
                linked += _copy(e.src, dst, e.mtime_ns, link and e.weight)
        (tmp / checksums.NAME).write_bytes(checksums.render({e.name: e.sha256 for e in entries}))
        if sig is not None:
            (tmp / SIG).write_bytes(sig)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return linked


def _info(name: str, size: int, mtime_ns: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0o644, 0, 0, "", ""
    info.mtime = (mtime_ns or 0) // 1_000_000_000
    if mtime_ns is not None:
        info.pax_headers = {MTIME_KEY: str(mtime_ns)}
    return info


def write_tar(entries: list[Entry], out: Path, sig: bytes | None = None) -> None:
    """The bundle as one uncompressed tar at `out` (SHA256SUMS and its signature first, so a reader checks them
    before any other byte): a PAX tar, headers from tarfile, each file's bytes copied in the kernel
    (copy_file_range, page-aligned in the tar) with its write-back started at once, one fsync at the end."""
    tmp = _partial(out)
    sums = checksums.render({e.name: e.sha256 for e in entries})
    try:
        with open(tmp, "wb", buffering=0) as fh:
            w = _TarOut(fh)
            w.add(_info(checksums.NAME, len(sums), None), sums)
            if sig is not None:
                w.add(_info(SIG, len(sig), None), sig)
            for e in entries:
                if e.link is not None:
                    info = _info(e.name, 0, None)
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, e.link, 0o777
                    w.add(info, b"")
                elif e.data is not None:
                    w.add(_info(e.name, len(e.data), None), e.data)
                else:
                    _check_size(e)
                    w.add_file(_info(e.name, e.size, e.mtime_ns), e.src)
            w.close()
            os.fsync(fh.fileno())
        os.rename(tmp, out)
        fsync_dir(out.parent)  # the rename is on disk too
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class _TarOut:
    """Writes what tarfile.open(mode="w", format=PAX_FORMAT) writes for the same headers, file bytes copied in
    the kernel; a file of 64 KiB or more gets a pax `comment` record that puts its bytes on a 4 KiB boundary."""

    def __init__(self, fh):
        self.fh, self.fd, self.offset = fh, fh.fileno(), 0

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.fh.write(view) :]
        self.offset += len(data)

    def _pad(self, size: int) -> None:
        if size % tarfile.BLOCKSIZE:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add(self, info: tarfile.TarInfo, data: bytes) -> None:
        self._write(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        self._write(data)
        self._pad(len(data))

    def add_file(self, info: tarfile.TarInfo, src: Path) -> None:
        if info.size >= _ALIGN_FROM:
            self._write(self._aligned(info))
        else:
            self._write(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        with open(src, "rb", buffering=0) as f:
            left = info.size
            while left:
                n = _copy_range(f, self.fd, left)
                if n == 0:
                    raise OSError(errno.EIO, f"{src} got shorter while being bundled", str(src))
                left -= n
        self.offset += info.size
        self._pad(info.size)
        flush.start_writeback(self.fd)  # the disk writes this file while the next one is copied

    def _aligned(self, info: tarfile.TarInfo) -> bytes:
        """The member's headers, with a pax `comment` record sized so that its bytes start on a page boundary
        (copies to and from the tar then move whole pages); unaligned when no size fits (never in practice)."""
        pax = dict(info.pax_headers)
        for pad in range(0, 9 * tarfile.BLOCKSIZE, tarfile.BLOCKSIZE):
            info.pax_headers = {**pax, "comment": "-" * pad}
            buf = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
            if (self.offset + len(buf)) % _ALIGN == 0:
                return buf
        info.pax_headers = pax
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")

    def close(self) -> None:
        self._write(tarfile.NUL * (tarfile.BLOCKSIZE * 2))
        if self.offset % tarfile.RECORDSIZE:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - self.offset % tarfile.RECORDSIZE))


def _copy_range(src, out_fd: int, left: int) -> int:
    """Copy up to `left` bytes from `src`'s position to `out_fd`'s, in the kernel where the OS allows; how many."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src.fileno(), out_fd, min(left, 1 << 30))
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    block = src.read(min(left, _COPY_BUF))
    view = memoryview(block)
    while view:
        view = view[os.write(out_fd, view) :]
    return len(block)


def bundle(run_dir: Path, out: Path, fmt: str | None, link: bool, params: dict, reporter, sign_key=None) -> dict:
    """Write the bundle of `run_dir` to `out`; a summary {bundle, format, files, bytes, linked, ...}."""
    out = Path(out)
    fmt = fmt or ("tar" if out.suffix == ".tar" else "dir")
    if fmt not in FORMATS:
        raise errors.UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if link and fmt == "tar":
        raise errors.UsageError("--link hard-links files into a folder bundle; drop it or use --format dir or oci")
    if out.exists() or out.is_symlink():
        raise errors.UsageError(f"-o {out}: already exists; remove it or pick another path (a bundle is never merged)")
    if not out.parent.is_dir():
        raise errors.UsageError(f"-o {out}: folder {out.parent} does not exist; create it first")
    entries, meta = plan(run_dir, params)
    sig = None
    if sign_key is not None:
        from prestage.runner import signing

        sig = signing.sign(checksums.render({e.name: e.sha256 for e in entries}), sign_key)
    reporter.info(
        f"bundle: {meta['files']} files, {meta['bytes'] / 1e6:.1f} MB of {meta['source']} model "
        f"{meta['model']} -> {out} ({fmt})"
    )
    linked = 0
    try:
        if fmt == "dir":
            linked = write_dir(entries, out, link, sig)
        elif fmt == "oci":
            from prestage.runner.oci import write_layout

            linked = write_layout(entries, meta, out, link, sig)
        else:
            write_tar(entries, out, sig)
    except OSError as e:
        from prestage.runner.unbundle import write_error

        raise write_error(e, str(out.parent)) from None
    if sig is not None:
        reporter.info(f"bundle: {checksums.NAME} signed with {sign_key} ({SIG}, OpenSSF model-signing format)")
    if meta["source"] == "local":
        reporter.info("bundle: a local-folder model: its files are under model/ (no Hugging Face cache)")
    if link:
        reporter.info(f"bundle: {linked} weight file(s) hard-linked, the rest copied")
    return {
        "bundle": str(out),
        "format": fmt,
        "run": meta["run"],
        "source": meta["source"],
        "files": meta["files"],
        "bytes": meta["bytes"],
        "linked": linked,
        "signed": sig is not None,
    }
