"""Every bad input, from the command line, a model's files or a hostile hub: its exit code and exactly one
stderr line, and nothing written outside the cache or the run folder.

Each row of CASES builds its input (a model folder, a hub fault, a flag), runs the CLI once with -q in a
subprocess, and checks the class's exit code, that stderr is the one `prestage: error:` line, and the row's
own check (e.g. the file a hostile ETag or revision named does not exist).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from prestage.stages.errors import CODE
from tests.reliability.conftest import error_lines

REPO = "test-org/tiny-single"
SHARDED = "test-org/tiny-sharded"


@dataclass
class Case:
    tmp: Path
    hub: object  # Misbehave
    checkpoints: dict

    def model(self, layout: str = "single", edit=None) -> Path:
        folder = self.tmp / f"model-{layout}"
        if not folder.exists():
            shutil.copytree(self.checkpoints[layout], folder)
        if edit is not None:
            edit(folder)
        return folder


def _config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _deep_config(folder: Path) -> None:
    depth = 10_000
    text = (folder / "config.json").read_text().rstrip()[:-1]
    (folder / "config.json").write_text(text + ', "nested": ' + "[" * depth + "]" * depth + "}")


def _index_shard(name: str):
    def edit(folder: Path) -> None:
        index_path = folder / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = name
        index_path.write_text(json.dumps(index))

    return edit


def _safetensors(header: bytes):
    def edit(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)

    return edit


def _escape_target(c: Case) -> Path:
    return c.tmp / "escaped"


# (id, exit class, build(case) -> argv, check(case) or None)
CASES = [
    # ---- the command line
    ("run-name-10000-chars", "usage", lambda c: ["--run", "r" * 10_000, "resolve", c.model()], None),
    ("run-name-climbs-out", "usage", lambda c: ["--run", "../escape", "resolve", c.model()], None),
    ("run-name-control-char", "usage", lambda c: ["--run", "a\x01b", "resolve", c.model()], None),
    ("model-id-10000-chars", "not-found", lambda c: ["resolve", "a" * 10_000], None),
    ("model-id-org-10000-chars", "not-found", lambda c: ["resolve", "org/" + "b" * 10_000], None),
    (
        "revision-absolute-path",
        "usage",
        lambda c: ["resolve", REPO, "--revision", str(_escape_target(c))],
        lambda c: not _escape_target(c).exists(),
    ),
    ("revision-climbs-out", "usage", lambda c: ["resolve", REPO, "--revision", "../../../escaped"], None),
    ("revision-backslash", "usage", lambda c: ["resolve", REPO, "--revision", "a\\b"], None),
    ("revision-control-char", "usage", lambda c: ["resolve", REPO, "--revision", "ma\x01in"], None),
    ("revision-dot-lock", "usage", lambda c: ["resolve", REPO, "--revision", "main.lock"], None),
    ("revision-does-not-exist", "not-found", lambda c: ["resolve", REPO, "--revision", "no-such-branch"], None),
    ("gated-without-token", "auth", lambda c: ["resolve", "test-org/gated"], None),
    # ---- a model's own files
    (
        "config-int-beyond-64-bits",
        "invalid-model",
        lambda c: ["run", c.model(edit=lambda f: _config(f, hidden_size=10**30)), "--to", "configure"],
        None,
    ),
    (
        "config-nested-10000-deep",
        "invalid-model",
        lambda c: ["run", c.model(edit=_deep_config), "--to", "configure"],
        None,
    ),
    (
        "index-shard-climbs-out",
        "invalid-model",
        lambda c: ["run", c.model("sharded", _index_shard("../../escaped.safetensors")), "--to", "fetch-weights"],
        None,
    ),
    (
        "safetensors-header-nested-10000-deep",
        "invalid-model",
        lambda c: [
            "run",
            c.model(edit=_safetensors(b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")),
            "--to",
            "fetch-weights",
        ],
        None,
    ),
    (
        "safetensors-zero-tensors",
        "invalid-model",
        lambda c: ["run", c.model(edit=_safetensors(b'{"__metadata__": {"format": "pt"}}')), "--to", "fetch-weights"],
        None,
    ),
]


def _hostile(setup, argv, check=None):
    return setup, argv, check


def _etag_escape(c: Case):
    # blobs/ is <tmp>/hf_cache/models--test-org--tiny-single/blobs: three levels up is <tmp>
    c.hub.hostile_etag("../../../escaped", "tiny-single/config.json")


def _names(name: str):
    def setup(c: Case):
        c.hub.hostile_names("rel/hostile-names", c.checkpoints["single"], {name: b"{}"})

    return setup


def _nothing_escaped(c: Case) -> bool:
    return not any(p.exists() for p in (_escape_target(c), c.tmp / "escaped.incomplete", Path("/tmp/escaped")))


HOSTILE = [
    # (id, exit class, setup(case), argv, check(case) or None, fast timeouts)
    ("etag-climbs-out", "integrity", _etag_escape, ["resolve", REPO], _nothing_escaped, False),
    (
        "etag-not-a-digest",
        "integrity",
        lambda c: c.hub.hostile_etag("not-a-digest", "tiny-single/config.json"),
        ["resolve", REPO],
        None,
        False,
    ),
    (
        "lfs-etag-climbs-out",
        "integrity",
        lambda c: c.hub.hostile_etag("../../../escaped", "tiny-single/model.safetensors", lfs=True),
        ["run", REPO, "--to", "fetch-weights"],
        _nothing_escaped,
        False,
    ),
    (
        "location-not-http",
        "integrity",
        lambda c: c.hub.hostile_location("file:///etc/passwd", "tiny-single/model.safetensors"),
        ["run", REPO, "--to", "fetch-weights"],
        None,
        False,
    ),
    ("listing-name-climbs-out", "integrity", _names("../escaped.json"), ["resolve", "rel/hostile-names"], None, False),
    ("listing-name-absolute", "integrity", _names("/escaped.json"), ["resolve", "rel/hostile-names"], None, False),
    ("listing-name-backslash", "integrity", _names("a\\b.json"), ["resolve", "rel/hostile-names"], None, False),
    ("http-500-every-time", "network", lambda c: c.hub.error(500, n=10), ["resolve", REPO], None, False),
    (
        "http-429-retry-after-an-hour",
        "network",
        lambda c: c.hub.throttled(3, retry_after="3600"),
        ["resolve", REPO],
        None,
        False,
    ),
    (
        "reset-every-time",
        "network",
        lambda c: c.hub.reset(n=10, match="config.json"),
        ["resolve", REPO],
        None,
        True,
    ),
    ("stall-listing", "network", lambda c: c.hub.stall("listing", "/api/models/"), ["resolve", REPO], None, True),
    ("stall-head", "network", lambda c: c.hub.stall("head", "/resolve/"), ["resolve", REPO], None, True),
    ("stall-body", "network", lambda c: c.hub.stall("body", "config.json"), ["resolve", REPO], None, True),
]


@pytest.fixture
def case(tmp_path, bad_hub, checkpoint_dirs) -> Case:
    return Case(tmp=tmp_path, hub=bad_hub, checkpoints=checkpoint_dirs)


def _assert_one_line(rc: int, err: str, kind: str) -> None:
    lines = error_lines(err)
    assert rc == CODE[kind], f"exit {rc}, expected {CODE[kind]} ({kind}): {err}"
    assert len(lines) == 1 and lines[0].startswith("prestage: error: "), f"not one error line: {err!r}"
    assert "Traceback" not in err


@pytest.mark.parametrize("cid,kind,build,check", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, cli, hf_env, artifacts_dir, cid, kind, build, check):
    rc, _out, err = cli(["-q", "--artifacts", artifacts_dir, *build(case)], hf_env)
    _assert_one_line(rc, err, kind)
    assert check is None or check(case), cid


@pytest.mark.parametrize("cid,kind,setup,argv,check,fast", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_hub(case, cli, hf_env, artifacts_dir, cid, kind, setup, argv, check, fast):
    setup(case)
    rc, _out, err = cli(["-q", "--artifacts", artifacts_dir, *argv], hf_env, fast=fast)
    _assert_one_line(rc, err, kind)
    assert check is None or check(case), cid
    cache = Path(hf_env["HF_HUB_CACHE"])
    for p in cache.rglob("*"):  # nothing in the cache links or resolves outside it
        assert p.resolve().is_relative_to(cache.resolve()) or not p.exists(), p


def case_count() -> int:
    """Bad inputs tried by this module (the README's Guarantees quote it)."""
    return len(CASES) + len(HOSTILE)
