"""The CLI frame: fast commands stay light, the cache leaves files untouched, errors are one line + code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prestage.stages.errors import CODE, EXIT_CODES
from tests.support.cli import child_env, run_cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "huggingface_hub")


def cli(*args, cwd=None, env=None):
    """The CLI in-process; `env` adds to (or overrides) the current environment for the call."""
    return run_cli(list(args), env={**os.environ, **env} if env else None, cwd=cwd)


def _imports_of(commands: list[list[str]], cwd: Path) -> list[set[str]]:
    """The heavy libraries imported so far after each CLI command, all run in one fresh interpreter (a
    subprocess: the test process has them all imported already). The sets only grow, so all empty means
    that no command imported one; the first non-empty set names the command that did."""
    code = (
        "import sys\nfrom prestage.runner.cli import main\n"
        f"for args in {commands!r}:\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        f"    print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=child_env(), timeout=60
    )
    lines = [x for x in out.stderr.splitlines() if x.startswith("HEAVY=")]
    assert len(lines) == len(commands), out.stderr
    return [{m for m in line[6:].split(",") if m} for line in lines]


@pytest.fixture
def local_model(tmp_path):
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 1024,
                "max_position_embeddings": 2048,
            }
        )
    )
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    return d


def test_help_shows_every_exit_code():
    r = cli("--help")
    assert r.returncode == 0
    for code, name, _ in EXIT_CODES:
        assert f"{code:>4}  {name}" in r.stdout


def test_readme_shows_the_exit_code_table():
    readme = (REPO / "README.md").read_text()
    for code, name, _ in EXIT_CODES:
        assert f"| {code} | `{name}` |" in readme, name


def test_help_inspect_status_import_no_heavy_library(tmp_path, local_model):
    arts = str(tmp_path / "arts")
    r = cli("--artifacts", arts, "resolve", str(local_model))
    assert r.returncode == 0, r.stderr
    commands = [
        ["--help"],
        ["resolve", "--help"],
        ["run", "--help"],
        ["--artifacts", arts, "inspect", "tiny-llama"],
        ["--artifacts", arts, "inspect", "tiny-llama", "--json"],
        ["--artifacts", arts, "status", "tiny-llama"],
    ]
    for args, heavy in zip(commands, _imports_of(commands, tmp_path), strict=True):
        assert heavy == set(), args


def test_status_and_inspect_of_a_full_run_import_no_heavy_library(tmp_path, checkpoint_dirs):
    """status checks every stage's outputs and inspect reads every manifest, still without torch & co."""
    import shutil

    model = shutil.copytree(checkpoint_dirs["single"], tmp_path / "tiny")
    arts = str(tmp_path / "arts")
    r = cli("--artifacts", arts, "run", str(model), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # stdout is the one JSON object; the human lines went to stderr
    done = result["launch"]["completions"][0]
    assert done["prompt"] == "hi" and len(done["token_ids"]) <= 2 and "text" in done
    assert result["launch"]["timings"]["startup"]["weights"]["bytes"] > 0
    st = json.loads(cli("--artifacts", arts, "status", "tiny", "--json").stdout)
    assert [x["state"] for x in st["stages"]] == ["fresh"] * 5
    commands = [["--artifacts", arts, "status", "tiny"], ["--artifacts", arts, "inspect", "tiny"]]
    for args, heavy in zip(commands, _imports_of(commands, tmp_path), strict=True):
        assert heavy == set(), args


def test_second_resolve_is_cached_and_untouched(tmp_path, local_model):
    arts = tmp_path / "arts"
    assert cli("--artifacts", str(arts), "resolve", str(local_model)).returncode == 0
    path = arts / "tiny-llama" / "resolve.msgpack"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    r = cli("--artifacts", str(arts), "resolve", str(local_model))
    assert r.returncode == 0 and "cached" in r.stderr
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime


def test_changed_local_config_makes_resolve_stale_then_reruns(tmp_path, local_model):
    arts = tmp_path / "arts"
    assert cli("--artifacts", str(arts), "resolve", str(local_model)).returncode == 0
    st = json.loads(cli("--artifacts", str(arts), "status", "tiny-llama", "--json").stdout)
    assert [r["state"] for r in st["stages"]] == ["fresh", "missing", "missing", "missing", "missing"]
    cfg = json.loads((local_model / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (local_model / "config.json").write_text(json.dumps(cfg))
    st = json.loads(cli("--artifacts", str(arts), "status", "tiny-llama", "--json").stdout)
    assert st["stages"][0]["state"] == "stale" and "config.json changed" in st["stages"][0]["reason"]
    r = cli("--artifacts", str(arts), "resolve", str(local_model))
    assert r.returncode == 0 and "re-running" in r.stderr


def test_inspect_json_and_text(tmp_path, local_model):
    arts = tmp_path / "arts"
    cli("--artifacts", str(arts), "resolve", str(local_model))
    r = cli("--artifacts", str(arts), "inspect", str(arts / "tiny-llama" / "resolve.msgpack"), "--json")
    doc = json.loads(r.stdout)
    assert doc["stage"] == "resolve" and doc["outputs"]["config_format"] == "hf"
    assert doc["outputs"]["local_dir"] == os.path.relpath(local_model, arts / "tiny-llama")
    text = cli("--artifacts", str(arts), "inspect", "tiny-llama").stdout
    assert "stage: resolve" in text and "config_format: hf" in text


def test_bad_manifest_is_one_line_exit_12(tmp_path, local_model):
    arts = tmp_path / "arts"
    cli("--artifacts", str(arts), "resolve", str(local_model))
    path = arts / "tiny-llama" / "resolve.msgpack"
    path.write_bytes(path.read_bytes()[:50])
    r = cli("--artifacts", str(arts), "inspect", str(path))
    assert r.returncode == CODE["bad-manifest"]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and str(path) in r.stderr


def test_upstream_file_holding_another_stage_is_bad_manifest(tmp_path, local_model):
    arts = tmp_path / "arts"
    assert cli("--artifacts", str(arts), "resolve", str(local_model)).returncode == 0
    run = arts / "tiny-llama"
    (run / "configure.msgpack").write_bytes((run / "resolve.msgpack").read_bytes())
    r = cli("--artifacts", str(arts), "tokenize-prep", "tiny-llama")
    assert r.returncode == CODE["bad-manifest"], r.stderr
    assert "holds a 'resolve' manifest, not configure" in r.stderr and "Traceback" not in r.stderr


def test_missing_run_and_missing_upstream(tmp_path):
    arts = str(tmp_path / "arts")
    r = cli("--artifacts", arts, "status", "nope")
    assert r.returncode == CODE["not-found"] and "nope" in r.stderr
    (tmp_path / "arts" / "empty").mkdir(parents=True)
    r = cli("--artifacts", arts, "configure", "empty")
    assert r.returncode == CODE["stale-upstream"], r.stderr
    assert "resolve" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors_exit_2(tmp_path, local_model):
    r = cli("--artifacts", str(tmp_path), "resolve", str(local_model), "--config-format", "yaml")
    assert r.returncode == CODE["usage"] and "yaml" in r.stderr
    r = cli("--artifacts", str(tmp_path), "run", str(local_model), "--from", "launch", "--to", "resolve")
    assert r.returncode == CODE["usage"]
    r = cli("--no-such-flag")
    assert r.returncode == CODE["usage"]
    r = cli("--artifacts", str(tmp_path), "serve", "nope", "--port", "99999")  # refused before any loading
    assert r.returncode == CODE["usage"] and "--port" in r.stderr and "Traceback" not in r.stderr


def test_artifacts_that_is_a_file_is_a_usage_error(tmp_path, local_model):
    (tmp_path / "afile").write_text("")
    r = cli("--artifacts", str(tmp_path / "afile"), "resolve", str(local_model))
    assert r.returncode == CODE["usage"], r.stderr
    assert "cannot create it" in r.stderr and "internal error" not in r.stderr


def test_local_folder_without_config(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    (d / "params.json").write_text("{}")  # params.json alone is not a Mistral model (docs/vllm-rules.md, R-04)
    r = cli("--artifacts", str(tmp_path / "a"), "resolve", str(d))
    assert r.returncode == CODE["not-found"] and "no config.json" in r.stderr
    r = cli("--artifacts", str(tmp_path / "a"), "resolve", str(tmp_path / "does" / "not" / "exist"))
    assert r.returncode == CODE["not-found"] and "not a local folder" in r.stderr
