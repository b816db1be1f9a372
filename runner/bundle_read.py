"""Reading a bundle, folder or tar, without trusting it: its checksum list and its entries, each checked.

`open_bundle(path)` gives a reader with `listing` ({name: sha256} from SHA256SUMS), `sums` (its bytes),
`signature` (SHA256SUMS.sig's bytes, or None) and `members()` (every entry but those two: regular files,
symlinks, folders and anything else, as found); `meta_of(reader)` is bundle.json, checked against its sha256.
`problem(member, listing)` says why an entry may not be placed: an unsafe name (absolute, `..`), a name
SHA256SUMS does not list, a device file, a hard link, a FIFO, or a symlink that is not a snapshot link to a
listed blob of the same repo with the same sha256.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from prestage.runner import checksums
from prestage.stages import errors

MTIME_KEY = "PRESTAGE.mtime_ns"
SIG = checksums.NAME + ".sig"


@dataclass
class Member:
    name: str
    kind: str  # "file" | "link" | "dir" | "other"
    size: int = 0
    link: str | None = None
    mtime_ns: int | None = None
    detail: str = ""  # what an "other" entry is (device, FIFO, hard link)
    path: Path | None = None  # folder bundles: the file itself
    tar_info: tarfile.TarInfo | None = None


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") if name not in ("", "/") else name


def problem(m: Member, listing: dict[str, str]) -> str | None:
    """Why `m` may not be placed (None: it may). Folders only need a safe name."""
    if m.kind == "dir":
        if m.name in ("", ".") or m.name in checksums.TOPS:
            return None
        why = checksums.unsafe_reason(m.name)
        return f"unsafe folder {m.name!r} ({why})" if why else None
    why = checksums.unsafe_reason(m.name)
    if why:
        return f"unsafe entry {m.name!r} ({why})"
    if m.kind == "other":
        return f"{m.name}: {m.detail} (only regular files and snapshot links may be in a bundle)"
    if m.kind == "link":  # a link leading out is named as such, listed or not
        return link_problem(m.name, m.link or "", listing)
    if m.name not in listing:
        return f"{m.name}: not listed in {checksums.NAME}"
    return None


def link_problem(name: str, target: str, listing: dict[str, str]) -> str | None:
    """A link is allowed only as hub/<repo>/snapshots/<commit>/<path> -> a listed hub/<repo>/blobs/<blob>."""
    parts = name.split("/")
    if len(parts) < 5 or parts[0] != "hub" or parts[2] != "snapshots" or target.startswith("/"):
        return f"{name}: symlink to {target!r} escapes the bundle (only snapshot links to blobs are allowed)"
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    if not resolved.startswith(f"hub/{parts[1]}/blobs/") or resolved.count("/") != 3:
        return f"{name}: symlink to {target!r} points outside its repo's blobs/ (escapes the target)"
    if name not in listing:
        return f"{name}: not listed in {checksums.NAME}"
    if resolved not in listing:
        return f"{name}: symlink to {target!r}, a blob {checksums.NAME} does not list"
    if listing[resolved] != listing[name]:
        return f"{name}: symlink to a blob whose listed sha256 differs from the link's"
    return None


class DirBundle:
    """A bundle folder."""

    kind = "dir"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.where = str(root)
        sums = self.root / checksums.NAME
        if sums.is_symlink() or not sums.is_file():
            raise errors.IntegrityError(f"{root}: no {checksums.NAME} file; this is not a complete prestage bundle")
        self.sums = sums.read_bytes()
        self.listing = checksums.parse(self.sums, self.where)
        sig = self.root / SIG
        self.signature = sig.read_bytes() if sig.is_file() and not sig.is_symlink() else None

    def members(self) -> Iterator[Member]:
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for n in sorted(dirnames) + sorted(filenames):
                p = Path(dirpath) / n
                name = n if rel_dir == "." else f"{rel_dir}/{n}"
                st = p.lstat()
                if name == checksums.NAME or (name == SIG and stat.S_ISREG(st.st_mode)):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    yield Member(name, "link", link=os.readlink(p), path=p)
                elif stat.S_ISDIR(st.st_mode):
                    yield Member(name, "dir", path=p)
                elif stat.S_ISREG(st.st_mode):
                    yield Member(name, "file", size=st.st_size, mtime_ns=st.st_mtime_ns, path=p)
                else:
                    what = "device file" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file"
                    yield Member(name, "other", detail=what, path=p)

    def open(self, m: Member) -> BinaryIO:
        return open(m.path, "rb", buffering=0)

    def copy_to(self, m: Member, dst: Path) -> None:
        """Copy a member's bytes to `dst` (in the kernel where the OS allows)."""
        shutil.copyfile(m.path, dst, follow_symlinks=False)

    def read(self, name: str) -> bytes:
        p = self.root / name
        if p.is_symlink() or not p.is_file():
            raise errors.IntegrityError(f"{self.where}: {name} is missing; the bundle is incomplete")
        return p.read_bytes()

    def close(self) -> None:
        pass


class TarBundle:
    """A bundle tar (uncompressed, or compressed by the user: tarfile reads either)."""

    kind = "tar"

    def __init__(self, path: Path):
        self.where = str(path)
        try:
            self.tar = tarfile.open(path, "r:*")
            self.plain = type(self.tar.fileobj).__name__ in ("BufferedReader", "FileIO")  # not decompressed
            self.infos = self.tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise errors.IntegrityError(
                f"{path}: not a readable tar ({e}); the bundle is truncated or corrupt"
            ) from None
        self.by_name = {}
        for info in self.infos:
            self.by_name.setdefault(_norm(info.name), info)
        sums = self.by_name.get(checksums.NAME)
        if sums is None or not sums.isreg():
            raise errors.IntegrityError(
                f"{path}: no {checksums.NAME} in the tar; this is not a prestage bundle, or it is truncated"
            )
        self.sums = self._bytes(sums)
        self.listing = checksums.parse(self.sums, self.where)
        sig = self.by_name.get(SIG)
        self.signature = self._bytes(sig) if sig is not None and sig.isreg() else None

    def _bytes(self, info: tarfile.TarInfo) -> bytes:
        try:
            fh = self.tar.extractfile(info)
            data = fh.read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise errors.IntegrityError(
                f"{self.where}: {info.name}: cannot be read ({e}); the tar is truncated"
            ) from None
        if len(data) != info.size:
            raise errors.IntegrityError(f"{self.where}: {info.name}: cut short; the tar is truncated")
        return data

    def members(self) -> Iterator[Member]:
        seen = set()
        for info in self.infos:
            name = _norm(info.name)
            if name == checksums.NAME or (name == SIG and info.isreg()):
                continue
            if name in seen:
                yield Member(name, "other", detail="a second entry with the same name")
                continue
            seen.add(name)
            if info.issym():
                yield Member(name, "link", link=info.linkname, tar_info=info)
            elif info.isdir():
                yield Member(name, "dir", tar_info=info)
            elif info.isreg():
                ns = info.pax_headers.get(MTIME_KEY)
                mtime = int(ns) if ns and ns.isdigit() else int(info.mtime) * 1_000_000_000
                yield Member(name, "file", size=info.size, mtime_ns=mtime, tar_info=info)
            else:
                what = (
                    "hard link"
                    if info.islnk()
                    else "device file"
                    if info.ischr() or info.isblk()
                    else "FIFO"
                    if info.isfifo()
                    else "special entry"
                )
                yield Member(name, "other", detail=what, tar_info=info)

    def open(self, m: Member) -> BinaryIO:
        return self.tar.extractfile(m.tar_info)

    def hash_member(self, m: Member) -> tuple[int, str]:
        """(size, sha256) of a member's bytes; from an uncompressed tar each call reads its own byte range
        (positioned reads on its own descriptor), so members hash in parallel threads."""
        info = m.tar_info
        if not self.plain:
            with self.open(m) as fh:
                return hash_stream(fh)
        h, size, chunk = hashlib.sha256(), 0, 8 * 1024 * 1024
        fd = os.open(self.where, os.O_RDONLY)
        try:
            offset, left = info.offset_data, info.size
            while left:
                block = os.pread(fd, min(chunk, left), offset)
                if not block:
                    break  # cut short: the size differs from the header's
                h.update(block)
                size, offset, left = size + len(block), offset + len(block), left - len(block)
        finally:
            os.close(fd)
        return size, h.hexdigest()

    def copy_to(self, m: Member, dst: Path) -> None:
        """Copy a regular member's bytes to `dst`: in the kernel (copy_file_range) from an uncompressed tar,
        else through tarfile. A tar cut short is a tarfile.ReadError either way."""
        with open(dst, "wb") as out:
            self._copy(m, out)

    def _copy(self, m: Member, out: BinaryIO) -> None:
        info = m.tar_info
        raw = getattr(self.tar.fileobj, "fileno", None)
        if self.plain and raw is not None and hasattr(os, "copy_file_range"):
            src = self.tar.fileobj.fileno()
            if info.offset_data + info.size > os.fstat(src).st_size:
                raise tarfile.ReadError("unexpected end of data")
            offset, left = info.offset_data, info.size
            try:
                while left:
                    n = os.copy_file_range(src, out.fileno(), min(left, 1 << 30), offset)
                    if n == 0:
                        raise tarfile.ReadError("unexpected end of data")
                    offset, left = offset + n, left - n
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or left != info.size:
                    raise
        with self.open(m) as fh:
            shutil.copyfileobj(fh, out, 8 * 1024 * 1024)

    def read(self, name: str) -> bytes:
        info = self.by_name.get(name)
        if info is None or not info.isreg():
            raise errors.IntegrityError(f"{self.where}: {name} is missing; the bundle is incomplete")
        return self._bytes(info)

    def close(self) -> None:
        self.tar.close()


def open_verified(path, verify_key, reporter, command: str):
    """open_bundle(path), its SHA256SUMS signature checked first when `verify_key` is given."""
    b = open_bundle(path)
    if verify_key is not None:
        from prestage.runner import checksums, signing

        try:
            signing.verify(b.sums, b.signature, verify_key, b.where)
        except BaseException:
            b.close()
            raise
        reporter.info(f"{command}: the signature of {checksums.NAME} verifies with {verify_key}")
    return b


def open_bundle(path):
    """A reader for the bundle at `path` (a folder holding SHA256SUMS, an OCI image layout, or a tar file)."""
    p = Path(path)
    from prestage.runner.oci import OciBundle, is_layout

    if is_layout(p):
        return OciBundle(p)
    if p.is_dir():
        return DirBundle(p)
    if not p.exists():
        raise errors.NotFoundError(f"{path}: no such bundle; pass the folder or .tar `prestage bundle` wrote")
    if not p.is_file():
        raise errors.UsageError(f"{path}: not a folder or a file; pass a bundle folder or .tar")
    return TarBundle(p)


def meta_of(b) -> dict:
    """bundle.json, checked against its listed sha256 and for the fields unbundle relies on."""
    data = b.read(checksums.META)
    if hashlib.sha256(data).hexdigest() != b.listing[checksums.META]:
        raise errors.IntegrityError(
            f"{b.where}: {checksums.META} does not match its sha256 in {checksums.NAME}; the bundle was altered"
        )
    try:
        meta = json.loads(data)
    except ValueError:
        raise errors.IntegrityError(f"{b.where}: {checksums.META} is not JSON; the bundle is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != "prestage.bundle":
        raise errors.IntegrityError(f"{b.where}: {checksums.META} is not a prestage bundle description")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > 1:
        raise errors.BadManifestError(
            f"{b.where}: bundle format {meta.get('format_version')!r} is newer than this prestage reads (1); "
            "upgrade prestage"
        )
    return meta


def hash_stream(
    fh: BinaryIO, out: BinaryIO | None = None, chunk: int = 8 * 1024 * 1024, limit: int | None = None
) -> tuple[int, str]:
    """(size, sha256) of what `fh` holds, copying it to `out` on the way when given. With `limit`, at most
    limit + 1 bytes are read (a size above the limit tells the caller the source sent too much)."""
    h = hashlib.sha256()
    size = 0
    while True:
        want = chunk if limit is None else min(chunk, limit + 1 - size)
        block = fh.read(want) if want > 0 else b""
        if not block:
            break
        h.update(block)
        size += len(block)
        if out is not None:
            out.write(block)
    return size, h.hexdigest()
