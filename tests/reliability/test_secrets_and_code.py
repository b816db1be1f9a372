"""What must never leak or run: the hub token, and a repo's own code without --trust-remote-code.

- A token given by flag or by HF_TOKEN appears in no manifest, cache file, run file, stdout/stderr of the
  CLI or `inspect --json`, and is not sent along a redirect to another host.
- An auto_map module (config and tokenizer) that writes a marker file when imported is downloaded and
  checked but never imported without --trust-remote-code: the run stops with `untrusted-code` (8).
"""

from __future__ import annotations

import json
from pathlib import Path

from prestage.stages.errors import CODE
from tests.reliability.conftest import error_lines, files_under

TOKEN = "hf_reliabilitySecretToken0123456789"
REPO = "test-org/tiny-single"


def test_a_token_by_flag_or_env_is_never_written_or_printed(bad_hub, cli, hf_env, tmp_path):
    hub = bad_hub.hub
    artifacts = tmp_path / "artifacts"
    outputs = []
    for how, env, extra in (
        ("flag", hf_env, ["--hf-token", TOKEN]),
        ("env", {**hf_env, "HF_TOKEN": TOKEN}, []),
    ):
        rc, out, err = cli(["--artifacts", artifacts, "--run", how, "run", REPO, "--to", "fetch-weights", *extra], env)
        assert rc == 0, err
        outputs += [out, err]
        rc, out, err = cli(["--artifacts", artifacts, "inspect", how, "--json", "--full"], env)
        assert rc == 0, err
        outputs += [out, err]
    # the hub saw it (it was used) ...
    assert any(auth == f"Bearer {TOKEN}" for _m, _p, auth in hub.authorizations)
    # ... and nothing prestage wrote or printed holds it
    assert not [i for i, text in enumerate(outputs) if TOKEN in text]
    roots = (artifacts, Path(hf_env["HF_HUB_CACHE"]), Path(hf_env["HF_HOME"]))
    leaked = [p for p in files_under(*roots) if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked


def test_the_token_is_not_sent_along_a_redirect_to_another_host(bad_hub, cli, hf_env, tmp_path):
    hub = bad_hub.hub
    sha = hub.resolve(REPO)
    entry = hub.file_entry(REPO, "model.safetensors")
    port = hub.url.rsplit(":", 1)[1]
    # the same server under another host name: a different origin to the client
    query = f"repo={REPO.replace('/', '%2F')}&commit={sha}&path=model.safetensors"
    other = f"http://localhost:{port}/_lfs/{entry.sha256}?{query}"
    bad_hub.hostile_location(other, "tiny-single/model.safetensors")
    rc, _out, err = cli(
        ["-q", "--artifacts", tmp_path / "a", "run", REPO, "--to", "fetch-weights", "--hf-token", TOKEN], hf_env
    )
    assert rc == 0, err
    lfs_gets = [
        auth for method, path, auth in hub.authorizations if method == "GET" and path == f"/_lfs/{entry.sha256}"
    ]
    assert lfs_gets and all(auth is None for auth in lfs_gets), lfs_gets
    assert any(auth == f"Bearer {TOKEN}" for _m, path, auth in hub.authorizations if "/resolve/" in path)


MARKER_CODE = """
from pathlib import Path
Path({marker!r}).write_text("imported")
from transformers import PretrainedConfig, PreTrainedTokenizerFast


class EvilConfig(PretrainedConfig):
    model_type = "evil"


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_a_remote_code_module_is_never_imported_without_trust(bad_hub, cli, hf_env, tmp_path, checkpoint_dirs):
    hub = bad_hub.hub
    marker = tmp_path / "imported.marker"
    base = checkpoint_dirs["single"]
    files = {p.name: p.read_bytes() for p in sorted(base.iterdir()) if p.is_file()}
    cfg = json.loads(files["config.json"])
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil_code.EvilConfig"})
    tok = json.loads(files["tokenizer_config.json"])
    tok["auto_map"] = {"AutoTokenizer": [None, "evil_code.EvilTokenizer"]}
    files.update(
        {
            "config.json": json.dumps(cfg).encode(),
            "tokenizer_config.json": json.dumps(tok).encode(),
            "evil_code.py": MARKER_CODE.format(marker=str(marker)).encode(),
        }
    )
    hub.commit("rel/remote-code", files, replace=True, message="remote code")
    artifacts = tmp_path / "artifacts"
    rc, _out, err = cli(["-q", "--artifacts", artifacts, "run", "rel/remote-code", "--to", "configure"], hf_env)
    assert rc == CODE["untrusted-code"], err
    assert len(error_lines(err)) == 1 and "--trust-remote-code" in err
    # the tokenizer's own code is refused the same way (the config is checked first: take the model's
    # config without auto_map and keep the tokenizer's)
    files["config.json"] = json.dumps({k: v for k, v in cfg.items() if k != "auto_map"} | {"model_type": "qwen2"})
    hub.commit("rel/remote-code", files, replace=True, message="remote tokenizer only")
    rc, _out, err = cli(
        ["-q", "--artifacts", artifacts, "--run", "tok", "run", "rel/remote-code", "--to", "tokenize-prep"], hf_env
    )
    assert rc == CODE["untrusted-code"], err
    assert len(error_lines(err)) == 1 and "--trust-remote-code" in err
    assert not marker.exists(), "a remote-code module was imported without --trust-remote-code"
