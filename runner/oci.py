"""A bundle as an OCI image layout (`bundle --format oci`) and through an OCI registry (`push`, `pull`).

The layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`) holds one image manifest with the CNCF ModelPack
types: artifactType `application/vnd.cncf.model.manifest.v1+json`, a `application/vnd.cncf.model.config.v1+json`
config, and one layer per bundle file, its digest the file's sha256 from SHA256SUMS (nothing hashed again):

    weight files                      application/vnd.cncf.model.weight.v1.raw
    trusted remote code (*.py)        application/vnd.cncf.model.code.v1.raw
    config, tokenizer, other files    application/vnd.cncf.model.weight.config.v1.raw
    manifests, SHA256SUMS(.sig),      application/vnd.cncf.model.doc.v1.raw
    bundle.json, refs, listings

Each layer carries its bundle path in `org.cncf.model.filepath` and `org.opencontainers.image.title`; the
snapshot links, which are not files, are the manifest annotation `dev.prestage.bundle.links` ({path: target}).
`OciBundle` reads a layout as a bundle (each layer a member, its blob hashed when placed, its digest checked
against SHA256SUMS), so `unbundle`, `verify` and `diff` take one like a folder. `push`/`pull` move a layout
through a registry with the `oras` Python SDK (the `bundle` extra), blob by blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from prestage.runner import checksums
from prestage.runner.bundle_read import Member
from prestage.stages import errors

ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_CONFIG = "application/vnd.cncf.model.weight.config.v1.raw"
CODE = "application/vnd.cncf.model.code.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
FILEPATH = "org.cncf.model.filepath"
TITLE = "org.opencontainers.image.title"
LINKS = "dev.prestage.bundle.links"
SIG = checksums.NAME + ".sig"
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_EXTRA = "install the `bundle` extra: pip install 'prestage[bundle]' (oras)"


def is_layout(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "oci-layout").is_file() and (p / "index.json").is_file()


def _media_type(name: str, weight: bool) -> str:
    if weight:
        return WEIGHT
    if name.endswith(".py"):
        return CODE
    if name in (checksums.NAME, SIG, checksums.META) or name.startswith("run/") and name.endswith(".msgpack"):
        return DOC
    if "/refs/" in name or name.startswith("hub/.prestage/"):
        return DOC
    return WEIGHT_CONFIG


def _layer(name: str, sha: str, size: int, weight: bool) -> dict:
    return {
        "mediaType": _media_type(name, weight),
        "digest": f"sha256:{sha}",
        "size": size,
        "annotations": {FILEPATH: name, TITLE: name},
    }


def _put_blob(blobs: Path, sha: str, src: Path | None, data: bytes | None, link: bool) -> bool:
    """Store one blob (copy, hard link, or bytes) under blobs/sha256/; True when it was hard-linked."""
    dst = blobs / sha
    if dst.exists():
        return False
    if data is not None:
        dst.write_bytes(data)
        return False
    from prestage.runner.bundle import _copy

    return _copy(src, dst, None, link)


def write_layout(entries, meta: dict, out: Path, link: bool, sig: bytes | None) -> int:
    """The bundle as an OCI image layout at `out` (built under a temporary name, then renamed); files linked."""
    from prestage.runner.bundle import _check_size, _partial

    tmp = _partial(out)
    linked = 0
    sums = checksums.render({e.name: e.sha256 for e in entries})
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layers, links = [], {}
        extra = [(checksums.NAME, sums)] + ([(SIG, sig)] if sig is not None else [])
        for name, data in extra:
            sha = hashlib.sha256(data).hexdigest()
            _put_blob(blobs, sha, None, data, False)
            layers.append(_layer(name, sha, len(data), False))
        for e in entries:
            if e.link is not None:
                links[e.name] = e.link
                continue
            if e.data is None:
                _check_size(e)
            linked += _put_blob(blobs, e.sha256, e.src, e.data, link and e.weight)
            layers.append(_layer(e.name, e.sha256, e.size, e.weight))
        config = {
            "descriptor": {"name": meta["model"], "version": meta.get("commit") or "local", "vendor": "prestage"},
            "config": {"format": "safetensors" if any(lay["mediaType"] == WEIGHT for lay in layers) else ""},
            "modelfs": {"type": "layers", "diffIds": [lay["digest"] for lay in layers]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": ARTIFACT,
            "config": _store_json(blobs, config, CONFIG),
            "layers": layers,
            "annotations": {LINKS: json.dumps(links, sort_keys=True), "dev.prestage.bundle.run": meta["run"]},
        }
        _finish_layout(tmp, blobs, manifest, "latest", out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return linked


def _finish_layout(tmp: Path, blobs: Path, manifest: dict, tag: str, out: Path) -> None:
    """Store the image manifest, write oci-layout and index.json (one manifest, named `tag`) into the staging
    folder `tmp`, then rename it to `out`."""
    desc = _store_json(blobs, manifest, MANIFEST)
    desc["artifactType"] = ARTIFACT
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (tmp / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (tmp / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [desc]}))
    os.rename(tmp, out)


def _store_json(blobs: Path, doc: dict, media_type: str) -> dict:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    sha = hashlib.sha256(data).hexdigest()
    (blobs / sha).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{sha}", "size": len(data)}


# ---- reading a layout ----------------------------------------------------------------------------------------


def _json_blob(root: Path, digest: str, where: str, what: str) -> dict:
    m = _DIGEST.match(str(digest))
    if not m:
        raise errors.IntegrityError(f"{where}: {what} digest {digest!r} is not sha256:<hex>; the layout is damaged")
    p = root / "blobs" / "sha256" / m.group(1)
    try:
        data = p.read_bytes()
    except OSError:
        raise errors.IntegrityError(f"{where}: {what} blob {digest} is missing; copy the whole layout again") from None
    if hashlib.sha256(data).hexdigest() != m.group(1):
        raise errors.IntegrityError(f"{where}: {what} blob {digest} does not match its digest; the layout is damaged")
    try:
        return json.loads(data)
    except ValueError:
        raise errors.IntegrityError(f"{where}: {what} blob {digest} is not JSON; the layout is damaged") from None


def read_manifest(root: Path) -> dict:
    """The layout's one image manifest, its bytes checked against the digest index.json gives."""
    where = str(root)
    try:
        index = json.loads((root / "index.json").read_text())
        desc = index["manifests"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise errors.IntegrityError(f"{where}: index.json names no manifest; the OCI layout is damaged") from None
    manifest = _json_blob(root, desc.get("digest"), where, "manifest")
    if manifest.get("artifactType") != ARTIFACT or not isinstance(manifest.get("layers"), list):
        raise errors.IntegrityError(f"{where}: the manifest is not a {ARTIFACT} with layers; not a prestage bundle")
    return manifest


class OciBundle:
    """An OCI image layout read as a bundle: each layer a member named by its file path annotation."""

    kind = "dir"  # members are plain files on disk: hashed in parallel like a folder's

    def __init__(self, root: Path):
        self.root, self.where = Path(root), str(root)
        manifest = read_manifest(self.root)
        self.members_: list[Member] = []
        by_name: dict[str, tuple[str, Path, int]] = {}
        for lay in manifest["layers"]:
            ann = lay.get("annotations") or {}
            name, m = ann.get(FILEPATH) or ann.get(TITLE), _DIGEST.match(str(lay.get("digest")))
            if not isinstance(name, str) or not m or not isinstance(lay.get("size"), int):
                raise errors.IntegrityError(f"{self.where}: a layer without a file path or sha256 digest; damaged")
            if name in by_name:
                raise errors.IntegrityError(f"{self.where}: two layers for {name!r}; the layout is damaged")
            by_name[name] = (m.group(1), self.root / "blobs" / "sha256" / m.group(1), lay["size"])
        if checksums.NAME not in by_name:
            raise errors.IntegrityError(f"{self.where}: no {checksums.NAME} layer; not a complete prestage bundle")
        sha, path, _ = by_name.pop(checksums.NAME)
        self.sums = self._blob(path, sha, checksums.NAME)
        self.listing = checksums.parse(self.sums, self.where)
        self.signature = None
        if SIG in by_name:
            sha, path, _ = by_name.pop(SIG)
            self.signature = self._blob(path, sha, SIG)
        for name, (sha, path, size) in sorted(by_name.items()):
            if name in self.listing and self.listing[name] != sha:
                raise errors.IntegrityError(
                    f"{self.where}: layer {name}: digest sha256:{sha[:16]}... is not the sha256 {checksums.NAME} "
                    "lists; the layout was altered: nothing was placed"
                )
            if path.is_symlink() or not path.is_file():
                self.members_.append(Member(name, "missing"))
                continue
            self.members_.append(Member(name, "file", size=size, path=path))  # the layer's size: a cut blob differs
        try:
            links = json.loads((manifest.get("annotations") or {}).get(LINKS, "{}"))
        except ValueError:
            links = None
        if not isinstance(links, dict):
            raise errors.IntegrityError(f"{self.where}: the manifest's {LINKS} annotation is not a map; damaged")
        for name, target in sorted(links.items()):
            self.members_.append(Member(str(name), "link", link=str(target)))

    def _blob(self, path: Path, sha: str, name: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError:
            raise errors.IntegrityError(f"{self.where}: the {name} blob is missing; copy the whole layout") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise errors.IntegrityError(
                f"{self.where}: the {name} blob does not match its digest; the layout is damaged"
            )
        return data

    def members(self):
        return [m for m in self.members_ if m.kind != "missing"]

    def open(self, m: Member):
        return open(m.path, "rb", buffering=0)

    def copy_to(self, m: Member, dst: Path) -> None:
        shutil.copyfile(m.path, dst, follow_symlinks=False)

    def read(self, name: str) -> bytes:
        for m in self.members_:
            if m.name == name and m.kind == "file":
                return m.path.read_bytes()
        raise errors.IntegrityError(f"{self.where}: {name} is missing; the bundle is incomplete")

    def close(self) -> None:
        pass


# ---- registries --------------------------------------------------------------------------------------------


def _oras():
    try:
        import oras.provider
    except ImportError as e:
        raise errors.UsageError(f"push and pull need the oras library ({e.name} is missing); {_EXTRA}") from None
    return oras.provider


def _ref(ref: str):
    """(registry host, container reference) of REGISTRY/NAME:TAG; UsageError for anything else."""
    m = re.fullmatch(
        r"(?P<host>[A-Za-z0-9.\-]+(?::\d+)?)/(?P<name>[a-z0-9]+(?:[._\-/][a-z0-9]+)*)(?::(?P<tag>[\w.\-]{1,128}))?", ref
    )
    if not m:
        raise errors.UsageError(f"{ref!r} is not REGISTRY/NAME[:TAG] (e.g. 127.0.0.1:5000/models/tiny:v1)")
    return m.group("host"), ref if m.group("tag") else ref + ":latest"


def _client(host: str, insecure: bool, ref: str):
    """An oras Registry for `host`, its console logging off (errors come back as one line from here), checked
    to answer /v2/ within 10 s: the SDK retries a refused connection for minutes, so an unreachable registry
    fails here at once."""
    provider = _oras()
    import oras.logger

    oras.logger.logger.log_handler = []  # the SDK prints its errors on stdout; they are reported here instead
    client = provider.Registry(hostname=host, insecure=insecure, auth_backend="basic")
    url = f"{client.prefix}://{host}/v2/"
    try:
        r = client.session.get(url, timeout=10, verify=client._tls_verify)
    except Exception as e:
        hint = "; pass --plain-http for a registry without TLS" if not insecure else ""
        raise errors.NetworkError(f"{ref}: registry {url} cannot be reached ({type(e).__name__}){hint}") from None
    if r.status_code not in (200, 401):
        raise errors.NetworkError(f"{ref}: {url} answered {r.status_code}; is {host} an OCI registry?")
    return client


def _registry_error(e: Exception, ref: str) -> errors.PrestageError:
    msg = " ".join(str(e).split())[:200]
    if "Not Found" in msg or "404" in msg:
        return errors.NotFoundError(f"{ref}: the registry has no such repository or tag; check REGISTRY/NAME:TAG")
    if "Unauthorized" in msg or "Forbidden" in msg or "401" in msg or "403" in msg:
        return errors.AuthError(f"{ref}: the registry refused access ({msg[:80]}); log in with `oras login`")
    return errors.NetworkError(f"{ref}: the registry refused or could not be reached ({type(e).__name__}: {msg})")


def push(layout: Path, ref: str, insecure: bool, reporter) -> dict:
    """Upload a layout's blobs (each skipped when the registry has it) and its manifest to REGISTRY/NAME:TAG."""
    host, target = _ref(ref)
    manifest = read_manifest(layout)
    client = _client(host, insecure, ref)
    blobs = layout / "blobs" / "sha256"
    sent = 0
    try:
        container = client.get_container(target)
        for desc in [manifest["config"], *manifest["layers"]]:
            path = blobs / desc["digest"].split(":", 1)[1]
            big = desc["size"] > 64 * 1024 * 1024
            r = client.upload_blob(str(path), container, desc, do_chunked=big)
            if r.status_code not in (200, 201, 202):
                raise errors.NetworkError(f"{ref}: uploading {desc['digest'][:19]}... answered {r.status_code}")
            sent += desc["size"]
        r = client.upload_manifest(manifest, container)
        if r.status_code not in (200, 201, 202):
            raise errors.NetworkError(f"{ref}: the registry refused the manifest ({r.status_code}: {r.text[:160]})")
    except errors.PrestageError:
        raise
    except Exception as e:
        raise _registry_error(e, ref) from None
    reporter.info(f"push: {len(manifest['layers'])} layer(s), {sent / 1e6:.1f} MB -> {target}")
    return {"ref": target, "layers": len(manifest["layers"]), "bytes": sent}


def pull(ref: str, out: Path, insecure: bool, reporter) -> dict:
    """Download REGISTRY/NAME:TAG into a new OCI layout at `out` (every blob's sha256 checked on arrival)."""
    host, target = _ref(ref)
    if out.exists():
        raise errors.UsageError(f"-o {out}: already exists; pick a new path for the pulled layout")
    client = _client(host, insecure, ref)
    from prestage.runner.bundle import _partial
    from prestage.runner.bundle_read import hash_stream

    tmp = _partial(out)
    got = 0
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        try:
            container = client.get_container(target)
            manifest = client.get_manifest(container)
        except Exception as e:
            raise _registry_error(e, ref) from None
        if manifest.get("artifactType") != ARTIFACT:
            raise errors.NotFoundError(f"{ref}: not a {ARTIFACT} (artifactType {manifest.get('artifactType')!r})")
        for desc in [manifest["config"], *manifest["layers"]]:
            m = _DIGEST.match(str(desc.get("digest")))
            if not m:
                raise errors.IntegrityError(f"{ref}: a layer digest {desc.get('digest')!r} is not sha256:<hex>")
            dst = blobs / m.group(1)
            if dst.exists():
                continue
            try:
                with client.get_blob(container, desc["digest"], stream=True) as r:
                    r.raise_for_status()
                    r.raw.decode_content = True
                    with open(dst, "wb") as fh:  # never more than the descriptor says: a lying registry
                        size, sha = hash_stream(r.raw, fh, limit=int(desc.get("size") or 0))
            except errors.PrestageError:
                raise
            except Exception as e:
                raise _registry_error(e, ref) from None
            if sha != m.group(1) or size != desc.get("size"):
                raise errors.IntegrityError(
                    f"{ref}: blob {desc['digest'][:19]}... arrived with other bytes; pull again"
                )
            got += size
        _finish_layout(tmp, blobs, manifest, target.rsplit(":", 1)[1], out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    reporter.info(f"pull: {target} -> {out} ({got / 1e6:.1f} MB); `prestage unbundle {out}` places it")
    return {"ref": target, "layout": str(out), "bytes": got}
