"""The CLI frame: fast commands stay light, the cache leaves files untouched, errors are one line + code."""

from __future__ import annotations

import json
import os
import re
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
    assert result["completions"] == result["launch"]["completions"]  # the documented top-level place
    assert result["launch"]["timings"]["startup"]["weights"]["bytes"] > 0
    st = json.loads(cli("--artifacts", arts, "status", "tiny", "--json").stdout)
    assert [x["state"] for x in st["stages"]] == ["fresh"] * 5
    commands = [["--artifacts", arts, "status", "tiny"], ["--artifacts", arts, "inspect", "tiny"]]
    for args, heavy in zip(commands, _imports_of(commands, tmp_path), strict=True):
        assert heavy == set(), args

    # inspect: a summary by default (decisions with their reasons, file counts and bytes), --full for everything
    summary = cli("--artifacts", arts, "inspect", "tiny").stdout
    full = cli("--artifacts", arts, "inspect", "tiny", "--full").stdout
    assert "model.layers.0.mlp.down_proj.weight" in full and "model.layers.0.mlp.down_proj.weight" not in summary
    assert "tensors: 27 entries" in summary and re.search(r"files: 1 files, 8\d\d kB", summary)
    assert "note: checkpoint dtype float32" in summary and "warnings: none" in summary
    assert len(summary.splitlines()) < 150 < len(full.splitlines())

    # status sees a weight file replaced by another of the same size; verify lists each file with its result
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    st = cli("--artifacts", arts, "status", "tiny")
    assert "model.safetensors changed since fetched: run `prestage verify tiny`" in st.stdout, st.stdout
    r = cli("--artifacts", arts, "verify", "tiny")
    assert r.returncode == CODE["integrity"]
    lines = r.stdout.splitlines()
    assert any(x.startswith("FAIL") and "model.safetensors" in x and "sha256" in x for x in lines), r.stdout
    assert any(x.startswith("ok") and "tokenizer/tokenizer.json" in x for x in lines), r.stdout
    assert "`prestage fetch-weights tiny --force`" in r.stderr


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
    assert r.returncode == CODE["not-found"] and "no such model folder" in r.stderr
    assert not (tmp_path / "a" / "empty-model").exists()  # the failed first stage left no run folder


# ---- the command line a vLLM / hf user expects -------------------------------------------------------------


def _main(args, capsys) -> tuple[int, str, str]:
    """`prestage ARGS` in this process: (exit code, stdout, stderr)."""
    from prestage.runner.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_global_options_before_or_after_the_subcommand(tmp_path, local_model, capsys):
    arts = tmp_path / "arts"
    code, out, err = _main(["resolve", local_model, "--artifacts", arts, "--run", "x", "-q"], capsys)
    assert code == 0 and (arts / "x" / "resolve.msgpack").is_file() and err == ""
    code, _, err = _main(["--artifacts", arts, "run", local_model, "--run", "y", "--to", "resolve"], capsys)
    assert code == 0 and (arts / "y" / "resolve.msgpack").is_file(), err
    code, _, err = _main(["--run", "before", "resolve", local_model, "--run", "after", "--artifacts", arts], capsys)
    assert code == 0 and (arts / "after").is_dir() and not (arts / "before").exists()  # after the subcommand wins
    code, out, _ = _main(["status", "x", "--artifacts", arts, "--json"], capsys)
    assert code == 0 and json.loads(out)["stages"][0]["state"] == "fresh"
    for args in (["--help"], ["run", "--help"], ["status", "--help"]):
        code, out, _ = _main(args, capsys)
        assert code == 0 and all(flag in out for flag in ("--artifacts", "--run", "--verbose", "--quiet")), args


@pytest.mark.parametrize("name", ["../../x", "/abs/run", "", "a/b", "..", "."])
def test_run_names_are_one_folder_name(tmp_path, local_model, capsys, name):
    arts = tmp_path / "deep" / "arts"
    code, _, err = _main(["--artifacts", arts, "--run", name, "resolve", local_model], capsys)
    assert code == CODE["usage"] and "a run name is one folder name" in err and repr(name) in err
    assert not (tmp_path / "x").exists() and not arts.exists()


def test_missing_model_folder_is_not_found_before_resolve(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    arts = tmp_path / "arts"
    for model in ("models/nonexistent", "./nope", "~/prestage-no-such-folder", "/no/such/model", "bad--id"):
        code, _, err = _main(["--artifacts", arts, "resolve", model], capsys)
        assert code == CODE["not-found"], (model, err)
        assert f"no such model folder: {model}" in err and "unreachable" not in err
    assert not arts.exists()  # refused before any stage ran


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--load-format", "safetensor"], ["--load-format", "safetensor", "safetensors"]),
        (["--dtype", "fp16"], ["--dtype", "fp16", "bfloat16"]),
        (["--max-model-len", "100x"], ["--max-model-len", "100x", "4k"]),
        (["--model-impl", "vllm2"], ["--model-impl", "vllm2", "native"]),
        (["--tokenizer-mode", "slow"], ["--tokenizer-mode", "slow", "mistral"]),
        (["--prompt", "hi", "--device", "tpu"], ["--device", "tpu", "cuda"]),
        (["--prompt", "hi", "--temperature", "-1"], ["--temperature", "-1", ">= 0"]),
        (["--prompt", "hi", "--generation-config", "file"], ["--generation-config", "file", "vllm"]),
    ],
)
def test_every_flag_is_checked_before_the_first_stage(tmp_path, local_model, capsys, flags, named):
    arts = tmp_path / "arts"
    code, _, err = _main(["--artifacts", arts, "run", local_model, *flags], capsys)
    assert code == CODE["usage"], err
    assert all(word in err for word in named), err
    assert "running" not in err and not arts.exists()  # no stage ran, no run folder


def test_stage_command_checks_its_flags_before_reading_upstream(tmp_path, capsys):
    (tmp_path / "arts" / "empty").mkdir(parents=True)  # no resolve manifest: the flag is refused first
    code, _, err = _main(["--artifacts", tmp_path / "arts", "fetch-weights", "empty", "--load-format", "x"], capsys)
    assert code == CODE["usage"] and "--load-format 'x'" in err


def test_max_model_len_above_the_model_is_a_usage_error(tmp_path, local_model, capsys):
    code, _, err = _main(["--artifacts", tmp_path / "arts", "run", local_model, "--max-model-len", "100k"], capsys)
    assert code == CODE["usage"] and "--max-model-len 100000" in err


def test_stale_manifest_temporary_is_removed_on_the_next_run(tmp_path, local_model, capsys):
    arts = tmp_path / "arts"
    assert _main(["--artifacts", arts, "resolve", local_model], capsys)[0] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = arts / "tiny-llama"
    stale = run / f".resolve.msgpack.{dead.pid}.k3j2h1g0.tmp"
    live = run / f".resolve.msgpack.{os.getppid()}.a1b2c3d4.tmp"  # the pytest runner's parent: alive
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    assert _main(["--artifacts", arts, "resolve", local_model, "--force"], capsys)[0] == 0
    assert not stale.exists() and live.exists()
    assert (run / "resolve.msgpack").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- the in-process CLI helper the tests use (tests/support/cli.py) ---------------------------------


def test_in_process_cli_applies_the_given_env_and_restores_os_environ(hub, hf_env, tmp_path):
    before = dict(os.environ)
    offline = {**hf_env, "HF_HUB_OFFLINE": "1"}
    r = run_cli(["--artifacts", tmp_path, "resolve", "test-org/tiny-single"], env=offline)
    assert r.rc == CODE["offline-miss"], r  # the env reached the CLI: offline, and the repo is not cached
    assert dict(os.environ) == before  # including what the CLI itself set for huggingface_hub
    assert run_cli(["--artifacts", tmp_path, "resolve", "test-org/tiny-single"]).rc == 0  # online again


def test_in_process_cli_past_its_timeout_fails_the_test(hub, hf_env, tmp_path):
    hub.stall("answer")  # the hub never answers: resolve would wait for its read timeout
    with pytest.raises(pytest.fail.Exception, match="still running after 1 s"):
        run_cli(["--artifacts", tmp_path, "resolve", "test-org/tiny-single"], timeout=1)


def test_launch_refuses_weights_changed_since_fetched_and_a_touched_file_stays_fresh(tmp_path, checkpoint_dirs):
    """status, run and launch agree on the weights: a file whose bytes changed since fetch-weights is stale for
    launch too (it used to generate from it, exit 0), and one whose mtime alone changed (a `cp -r` copy) is fresh."""
    import os
    import shutil

    model = shutil.copytree(checkpoint_dirs["single"], tmp_path / "tiny")
    arts = str(tmp_path / "arts")
    assert cli("--artifacts", arts, "run", str(model), "--to", "fetch-weights").returncode == 0
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    rows = json.loads(cli("--artifacts", arts, "status", "tiny", "--json").stdout)["stages"]
    assert [x["state"] for x in rows][:4] == ["fresh"] * 4, rows
    # the bytes were hashed and found unchanged: the new mtime is recorded, so the next check hashes nothing
    from prestage.stages.manifest import read

    fetched = read(Path(arts) / "tiny" / "fetch-weights.msgpack")
    assert fetched.volatile["mtime_ns"]["model.safetensors"] == weights.stat().st_mtime_ns
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    r = cli("--artifacts", arts, "launch", "tiny", "--prompt", "hi", "--max-tokens", "1", "--device", "cpu")
    assert r.returncode == CODE["integrity"], r.stderr
    assert "model.safetensors: changed since fetched" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("--artifacts", arts, "serve", "tiny", "--port", "0", "--device", "cpu")  # serve refuses it too
    assert r.returncode == CODE["integrity"] and "changed since fetched" in r.stderr, r.stderr


def test_weights_on_another_host_are_hashed_once_then_trusted_by_mtime(tmp_path, checkpoint_dirs):
    """A run copied or unbundled onto another machine: the recorded mtimes are another host's, so each weight
    file is hashed (a changed byte, its mtime kept, is caught), and once found unchanged its mtime is recorded
    with this host."""
    import dataclasses
    import os
    import platform
    import shutil

    from prestage.stages.manifest import read, write

    model = shutil.copytree(checkpoint_dirs["single"], tmp_path / "tiny")
    arts = str(tmp_path / "arts")
    assert cli("--artifacts", arts, "run", str(model), "--to", "fetch-weights").returncode == 0
    path = Path(arts) / "tiny" / "fetch-weights.msgpack"
    fetched = read(path)
    write(path, dataclasses.replace(fetched, volatile={**fetched.volatile, "host": "elsewhere"}))
    weights = model / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the size and the mtime as recorded
    rows = json.loads(cli("--artifacts", arts, "status", "tiny", "--json").stdout)["stages"]
    assert rows[3]["state"] == "stale" and "model.safetensors" in rows[3]["reason"], rows
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    rows = json.loads(cli("--artifacts", arts, "status", "tiny", "--json").stdout)["stages"]
    assert [x["state"] for x in rows][:4] == ["fresh"] * 4, rows
    again = read(path).volatile
    assert again["mtime_host"] == platform.node() and again["host"] == "elsewhere"
    assert again["mtime_ns"] == {"model.safetensors": st.st_mtime_ns}
