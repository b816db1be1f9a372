"""Running stages: upstream checks, the cache decision, writing the manifest, and freshness (`status`).

A stage is skipped ("cached") when its manifest exists, its fingerprint equals the one the current inputs
and upstream manifests give, and its outputs still check out; the file is then left untouched (same
bytes, same mtime), so make-style chains don't cascade. Anything else runs the stage and rewrites it. One
exception: a weight file whose mtime moved but whose bytes hash as recorded has its new mtime written into
fetch-weights' volatile section (`_remember_mtimes`), so it is hashed once, not at every check.
"""

from __future__ import annotations

import dataclasses
import errno
import platform
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from prestage.stages import ORDER, errors, get_stage, paths
from prestage.stages.base import Context, Reporter
from prestage.stages.manifest import Manifest, fingerprint, manifest_path, read, remove_stale_temps, write
from prestage.stages.records import Record, record_of

_LIBS = ("prestage", "torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "msgpack", "click")


def library_versions() -> dict:
    """Installed versions, from package metadata (no import of the libraries themselves)."""
    out = {}
    for lib in _LIBS:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def load_upstream(stage, run_dir: Path) -> dict[str, Manifest]:
    """The upstream manifests a stage reads, each checked to be present and fresh against its own upstream."""
    found: dict[str, Manifest] = {}
    for name in stage.requires + stage.optional:
        path = manifest_path(run_dir, name)
        if not path.exists():
            if name in stage.requires:
                hint = (
                    f"prestage --run {run_dir.name} resolve MODEL"
                    if name == "resolve"
                    else f"prestage {name} {run_dir.name}"
                )
                raise errors.StaleUpstreamError(
                    f"{stage.name} needs the {name} manifest, and {path} does not "
                    f"exist; run `{hint}` first (or `prestage run`)"
                )
            continue
        found[name] = read(path)
        if found[name].stage == name:
            record_of(found[name], str(path))  # strict: a missing or mistyped output field is bad-manifest here
        if found[name].stage != name:
            raise errors.BadManifestError(
                f"{path}: holds a '{found[name].stage}' manifest, not {name}; delete it and re-run `prestage {name}`"
            )
    for name, m in found.items():
        reason = upstream_drift(run_dir, m)
        if reason:
            raise errors.StaleUpstreamError(
                f"{name} is stale ({reason}); re-run `prestage {name} {run_dir.name}` before {stage.name}"
            )
    return found


def upstream_drift(run_dir: Path, m: Manifest) -> str | None:
    """Why `m` no longer matches the upstream manifests it was built from, or None."""
    for up, digest in sorted(m.upstream.items()):
        path = manifest_path(run_dir, up)
        if not path.exists():
            return f"its upstream {up} manifest is gone"
        try:
            current = read(path)
        except errors.BadManifestError:
            return f"its upstream {up} manifest is unreadable"
        if current.digest != digest:
            return f"{up} changed since it ran"
    return None


def stage_params(params: dict, run_dir: Path, upstream: dict[str, Manifest]) -> dict:
    """The parameters a stage sees: the CLI's, the run folder, and the run's cache root (stages/paths.py).

    `prestage resolve M --download-dir D` then `prestage fetch-weights RUN` finds the model in D without
    repeating the flag, and a run moved with its cache finds it where HF_HUB_CACHE now points."""
    out = {**params, "run_dir": str(run_dir)}
    if "resolve" in upstream:
        out["cache_dir"] = str(paths.cache_root(params, upstream["resolve"]))
    return out


def check_params(names, params: dict) -> None:
    """Every flag of every stage in `names` checked (UsageError) before the first of them runs."""
    for name in names:
        get_stage(name).check_params(params)


_RUN_PLACEHOLDER = re.compile(r"(`prestage [\w-]+ )RUN\b")


def name_the_run(exc: errors.PrestageError, run: str) -> errors.PrestageError:
    """The same error with a hint's `prestage CMD RUN` naming the run (stages deep down do not know it)."""
    msg = str(exc)
    fixed = _RUN_PLACEHOLDER.sub(lambda m: m.group(1) + run, msg)
    if fixed != msg:
        exc.args = (fixed,)
    return exc


@dataclass
class Outcome:
    stage: str
    status: str  # "ran" | "cached"
    manifest: Manifest
    path: Path


def run_stage(name: str, run_dir: Path, params: dict, reporter: Reporter, force: bool = False) -> Outcome:
    stage = get_stage(name)
    run_dir = Path(run_dir)
    upstream = load_upstream(stage, run_dir)
    params = stage_params(params, run_dir, upstream)
    refuse_changed_weights(run_dir, upstream, params)
    inputs = stage.inputs(params, upstream)
    up_digests = {n: m.digest for n, m in upstream.items()}
    try:
        fp = fingerprint(stage.name, stage.version, inputs, up_digests)
    except OverflowError:  # msgpack holds 64-bit integers; a larger flag value cannot be recorded
        big = sorted(k for k, v in inputs.items() if isinstance(v, int) and not -(2**63) <= v < 2**64)
        raise errors.UsageError(
            f"{name}: the value of {', '.join(big) or 'a flag'} is too large; pass a number that fits in 64 bits"
        ) from None
    path = manifest_path(run_dir, name)
    if not force and not stage.always_run and path.exists():
        try:
            old = read(path)
        except errors.BadManifestError as e:
            reporter.warn(f"{e}; re-running {name}")
            old = None
        if old is not None and old.fingerprint == fp:
            try:
                reason = stage.check_outputs(run_dir, old, params)
                if reason is None and name == "fetch-weights":
                    changed = _weights_changed(run_dir, old, params)
                    reason = f"{changed} changed since fetched" if changed else None
            except errors.BadManifestError as e:
                reason = str(e)
            if reason is None:
                reporter.info(f"{name}: cached, inputs unchanged ({path})")
                note = stage.cached_note(run_dir, old, params)
                if note:
                    reporter.info(f"{name}: {note}")
                return Outcome(name, "cached", old, path)
            reporter.info(f"{name}: re-running: {reason}")
        elif old is not None:
            reporter.detail(f"{name}: inputs changed, re-running")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise errors.UsageError(
            f"run folder {run_dir}: cannot create it ({e.strerror}); pass a writable "
            "--artifacts DIR or another --run NAME"
        ) from None
    remove_stale_temps(run_dir, path.name)  # a killed run of this stage left its temporary manifest
    reporter.info(f"{name}: running")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        result = stage.run(Context(run_dir=run_dir, params=params, upstream=upstream, reporter=reporter), inputs)
    except BaseException as e:
        if created:  # a failed first stage leaves no empty run folder behind
            try:
                run_dir.rmdir()
            except OSError:
                pass
        if isinstance(e, errors.PrestageError):
            name_the_run(e, run_dir.name)
        raise
    if not isinstance(result.outputs, Record) or result.outputs.stage != stage.name:
        raise TypeError(f"{name}: run() must return its stage's record, got {type(result.outputs).__name__}")
    volatile = {
        "started_at": started,
        "duration_s": round(time.perf_counter() - t0, 4),
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": library_versions(),
        **result.volatile,
    }
    m = Manifest(
        stage=stage.name,
        stage_version=stage.version,
        inputs=inputs,
        upstream=up_digests,
        outputs=result.outputs.to_dict(),
        warnings=list(result.warnings),
        volatile=volatile,
    )
    try:
        write(path, m)
    except OSError as e:
        cls = errors.ResourceError if e.errno == errno.ENOSPC else errors.UsageError
        raise cls(
            f"{path}: cannot write the manifest ({e.strerror}); free disk space or pass a writable --artifacts DIR"
        ) from None
    for w in m.warnings:  # the one place stage warnings are printed
        reporter.warn(f"{name}: {w}")
    reporter.info(f"{name}: done in {volatile['duration_s']:.2f}s -> {path}")
    m.record = result.outputs
    return Outcome(name, "ran", m, path)


def stage_status(run_dir: Path, params: dict | None = None) -> list[dict]:
    """fresh / stale (with the reason) / missing for every stage, without running anything heavy."""
    params = dict(params or {})
    try:
        resolve = read(manifest_path(run_dir, "resolve"))
        params["cache_dir"] = str(paths.cache_root(params, resolve))
    except errors.BadManifestError:
        pass
    rows: list[dict] = []
    state: dict[str, str] = {}
    for name in ORDER:
        path = manifest_path(run_dir, name)
        row = {"stage": name, "manifest": str(path)}
        if not path.exists():
            row.update(state="missing", reason=None)
        else:
            row.update(_freshness(name, run_dir, path, state, params))
        state[name] = row["state"]
        rows.append(row)
    return rows


def _weights_changed(run_dir: Path, m: Manifest, params: dict) -> str | None:
    from prestage.stages.fetch_weights.file_state import changed_since_fetched

    rec = record_of(m)
    if rec.format == "dummy":
        return None
    rehashed: dict[str, int] = {}
    changed = changed_since_fetched(paths.weights_dir(run_dir, m, params=params), rec, m.volatile, rehashed)
    if changed is None and rehashed:
        _remember_mtimes(run_dir, m, rehashed)
    return changed


def _remember_mtimes(run_dir: Path, m: Manifest, rehashed: dict[str, int]) -> None:
    """These weight files were hashed again and hold the bytes fetch-weights recorded (a run copied with `cp -r`,
    say): record their new mtimes in the manifest's volatile section (outside its digest: nothing downstream
    changes), so the next check does not hash them again. Only over the manifest that was read (one another
    process rewrote is left as it is), and best effort: a read-only run folder hashes again next time."""
    from prestage.stages.fetch_weights.file_state import mtimes_host

    path = manifest_path(run_dir, "fetch-weights")
    here = platform.node()
    known = m.volatile.get("mtime_ns") if mtimes_host(m.volatile) == here else None
    volatile = {**m.volatile, "mtime_ns": {**(known or {}), **rehashed}, "mtime_host": here}
    try:
        if path.read_bytes() == m.to_bytes():
            write(path, dataclasses.replace(m, volatile=volatile))
    except OSError:
        pass


def refuse_changed_weights(run_dir: Path, upstream: dict, params: dict) -> None:
    """As status says: never load a weight file whose bytes changed since fetch-weights hashed it (launch, run,
    serve with either engine). A missing or resized file is left to the loader's own check, which names it."""
    m = upstream.get("fetch-weights")
    if m is None:
        return
    changed = _weights_changed(run_dir, m, params)
    if changed is None:
        return
    rec = record_of(m)
    f = next(f for f in rec.files if f.path == changed)
    try:
        same_size = (paths.weights_dir(run_dir, m, params=params) / f.path).stat().st_size == f.size
    except OSError:
        same_size = False
    if same_size:
        raise errors.IntegrityError(
            f"weight file {changed}: changed since fetched (its sha256 is not the one fetch-weights recorded); "
            f"re-run `prestage fetch-weights {run_dir.name} --force`"
        )


def _freshness(name: str, run_dir: Path, path: Path, state: dict[str, str], params: dict) -> dict:
    try:
        m = read(path)
    except errors.BadManifestError as e:
        return {"state": "stale", "reason": str(e)}
    stage = get_stage(name)
    if m.stage != name:
        return {"state": "stale", "reason": f"the file holds a '{m.stage}' manifest"}
    if m.stage_version != stage.version:
        return {"state": "stale", "reason": f"prestage's {name} changed (v{m.stage_version} -> v{stage.version})"}
    for req in stage.requires:
        if req not in m.upstream:
            return {"state": "stale", "reason": f"built without {req}"}
    for opt_up in stage.optional:
        if opt_up not in m.upstream and manifest_path(run_dir, opt_up).exists():
            return {"state": "stale", "reason": f"{opt_up} ran after it"}
    drift = upstream_drift(run_dir, m)
    if drift:
        return {"state": "stale", "reason": drift}
    for up in m.upstream:
        if state.get(up) == "stale":
            return {"state": "stale", "reason": f"upstream {up} is stale"}
    try:
        record_of(m, str(path))
        reason = stage.check_outputs(run_dir, m, params)
    except errors.BadManifestError as e:
        reason = str(e)
    if reason:
        return {"state": "stale", "reason": reason}
    if name == "fetch-weights":
        changed = _weights_changed(run_dir, m, params)
        if changed:
            return {
                "state": "stale",
                "reason": f"{changed} changed since fetched: run `prestage verify {run_dir.name}`",
            }
    return {"state": "fresh", "reason": None, "fingerprint": m.fingerprint}
