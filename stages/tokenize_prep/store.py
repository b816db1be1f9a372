"""The stored tokenizer folder `<run>/tokenizer/` and the checks on it.

`save(run_dir, tok, source_folder, template)` writes the folder through a temporary sibling and a rename
(a crash leaves the old folder or the new one): `save_pretrained` output, the repo's original
tokenizer.json bytes under `original/` when `save_pretrained` re-serialized them differently, and the
resolved chat template as `chat_template.resolved.jinja` unless `save_pretrained`'s own chat_template.jinja
holds the same text. `tokenizer_config.json` keeps the original's behaviour: the keys the loader passed to
`from_pretrained` (vLLM's left truncation side, the offline flags) that `save_pretrained` writes back are
dropped, or set back to the original's values, so plain transformers loads the folder as it loads the
original. Temporary folders a killed run left (`.tokenizer.tmp-PID`, `.tokenizer.old-PID`) are removed when
their process is gone. `check_outputs` compares sizes (cheap: run on every cache decision); `verify_files`
compares sha256 (launch and verify).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from prestage.stages import errors
from prestage.stages.digest import sha256_hex
from prestage.stages.manifest import pid_alive
from prestage.stages.paths import in_run
from prestage.stages.records import StoredFile, TokenizerRecord

TOKENIZER_DIR = "tokenizer"
RESOLVED_TEMPLATE = "chat_template.resolved.jinja"
# from_pretrained arguments that save_pretrained records in tokenizer_config.json although the original
# did not set them: left there, they would change how plain transformers loads the stored folder.
LOADER_KEYS = ("truncation_side", "local_files_only", "is_local", "trust_remote_code", "cache_dir", "revision")
_TEMP_RE = re.compile(rf"^\.{TOKENIZER_DIR}\.(?:tmp|old)-(\d+)$")


def listing(run_dir: Path) -> list[StoredFile]:
    """[{path, size, sha256}] for every file under tokenizer/, paths relative to the run folder, sorted."""
    root = Path(run_dir) / TOKENIZER_DIR
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out.append(StoredFile(path=p.relative_to(run_dir).as_posix(), size=p.stat().st_size, sha256=sha256_hex(p)))
    return out


def remove_stale_temps(run_dir: Path) -> None:
    """Remove `.tokenizer.tmp-PID` / `.tokenizer.old-PID` folders whose process is gone (a killed run's)."""
    for p in Path(run_dir).glob(f".{TOKENIZER_DIR}.*-*"):
        m = _TEMP_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def restore_config(saved_dir: Path, source_folder: Path) -> None:
    """Give the saved tokenizer_config.json the original's values for LOADER_KEYS (dropped when it had none)."""
    saved_path = Path(saved_dir) / "tokenizer_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    try:
        original = json.loads((Path(source_folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        original = {}
    if not isinstance(original, dict):
        original = {}
    changed = False
    for key in LOADER_KEYS:
        if key in original and saved.get(key) != original[key]:
            saved[key] = original[key]
            changed = True
        elif key not in original and key in saved:
            del saved[key]
            changed = True
    if changed:
        saved_path.write_text(json.dumps(saved, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def save(run_dir: Path, tok, source_folder: Path, template: str | None) -> dict:
    """Write tokenizer/ and return {chat_template_file, tokenizer_json_sha256}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / TOKENIZER_DIR
    tmp = run_dir / f".{TOKENIZER_DIR}.tmp-{os.getpid()}"
    old = run_dir / f".{TOKENIZER_DIR}.old-{os.getpid()}"
    remove_stale_temps(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save_pretrained(str(tmp))
        restore_config(tmp, source_folder)
        original = source_folder / "tokenizer.json"
        tj_sha = None
        if original.is_file():
            data = original.read_bytes()
            tj_sha = hashlib.sha256(data).hexdigest()
            saved = tmp / "tokenizer.json"
            if not saved.is_file() or sha256_hex(saved) != tj_sha:
                (tmp / "original").mkdir(exist_ok=True)
                (tmp / "original" / "tokenizer.json").write_bytes(data)
        template_file = None
        if template is not None:
            own = tmp / "chat_template.jinja"
            if own.is_file() and own.read_text(encoding="utf-8") == template:
                template_file = own.name
            else:
                (tmp / RESOLVED_TEMPLATE).write_text(template, encoding="utf-8")
                template_file = RESOLVED_TEMPLATE
        _install(tmp, final, old)
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise errors.ResourceError(f"{run_dir}: no space left to store the tokenizer; free disk space") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return {
        "chat_template_file": f"{TOKENIZER_DIR}/{template_file}" if template_file else None,
        "tokenizer_json_sha256": tj_sha,
    }


def _install(tmp: Path, final: Path, old: Path, tries: int = 100) -> None:
    """Rename the finished `tmp` folder to `final`, atomically: a folder already there (an earlier save, or
    another process saving the same tokenizer at the same moment) is moved aside to this process's `old`
    first. When two processes race, each retries until its own rename lands; both succeed, and the folder
    left is one whole save."""
    for _ in range(tries):
        try:
            os.replace(tmp, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(final, old)
        except FileNotFoundError:  # another process moved it aside first: try our rename again
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise errors.ResourceError(f"{final}: could not replace the stored tokenizer ({tries} tries); re-run")


def check_outputs(run_dir: Path, record: TokenizerRecord) -> str | None:
    """None when every recorded file is present with its recorded size, else the reason."""
    for f in record.files:
        p = in_run(run_dir, f.path, "stored tokenizer file")
        try:
            size = p.stat().st_size
        except OSError:
            return f"{f.path} is missing"
        if size != f.size:
            return f"{f.path} is {size} bytes, recorded {f.size}"
    return None


def verify_files(run_dir: Path, record: TokenizerRecord) -> None:
    """Raise IntegrityError on the first stored tokenizer file whose bytes differ from the manifest."""
    reason = check_outputs(run_dir, record)
    if reason:
        raise errors.IntegrityError(f"stored tokenizer: {reason}; re-run tokenize-prep")
    for f in record.files:
        if sha256_hex(in_run(run_dir, f.path, "stored tokenizer file")) != f.sha256:
            raise errors.IntegrityError(
                f"stored tokenizer: {f.path} sha256 differs from the manifest (file changed); re-run tokenize-prep"
            )


def read_template(run_dir: Path, record: TokenizerRecord) -> str | None:
    """The resolved chat template text tokenize-prep recorded, or None."""
    ct = record.chat_template
    if ct is None:
        return None
    try:
        return in_run(run_dir, ct.file, "stored chat template").read_text(encoding="utf-8")
    except OSError:
        raise errors.StaleUpstreamError(
            f"{ct.file}: the stored chat template is missing; re-run tokenize-prep"
        ) from None
