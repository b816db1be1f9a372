"""The launch stage through the CLI on tiny local checkpoints: completions that match transformers, the
manifest it writes, and the one-line errors (with their exit codes) for what can go wrong at launch."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from prestage.stages.errors import UnsupportedError


def _hf_greedy(folder, prompt: str, n: int) -> list[int]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok.encode(prompt)
    with torch.no_grad():
        plain_greedy = transformers.GenerationConfig(  # not the checkpoint's sampling defaults
            do_sample=False,
            max_new_tokens=n,
            repetition_penalty=1.0,
            eos_token_id=hf.generation_config.eos_token_id,
            pad_token_id=hf.generation_config.pad_token_id,
        )
        out = hf.generate(
            torch.tensor([ids]),
            generation_config=plain_greedy,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture
def offline_env(monkeypatch):
    import os

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return dict(os.environ)


def test_launch_cli_native_completions_match_transformers(prestage, checkpoint_dirs, artifacts_dir, offline_env):
    folder = checkpoint_dirs["sharded"]
    r = prestage(
        [
            "--artifacts",
            artifacts_dir,
            "--run",
            "r",
            "run",
            folder,
            "--prompt",
            "import os",
            "--prompt",
            "def main(",
            "--max-tokens",
            "10",
            "--verify-hashes",
            "--json",
            "--generation-config",
            "vllm",
        ],
        env=offline_env,
    )  # plain greedy: the file's defaults ignored
    assert r.rc == 0, r
    launch = json.loads(r.stdout)["launch"]
    assert launch["implementation"]["impl"] == "native" and launch["device"] == "cpu"
    assert launch["dtype"] == "float32" and launch["engine"]["cuda_graphs"] is False
    assert launch["kv_cache_tokens"] >= 2 * launch["engine"]["max_model_len"]
    for c in launch["completions"]:
        assert c["token_ids"] == _hf_greedy(folder, c["prompt"], 10)
        assert c["finish_reason"] in ("length", "stop")
    from prestage.stages.manifest import read

    m = read(artifacts_dir / "r" / "launch.msgpack")
    startup = m.volatile["startup"]
    assert {"imports_s", "tokenizer_s", "warmup_s", "first_token_s"} <= set(startup)
    assert startup["weights"]["hashed"] is True and startup["weights"]["bytes"] > 0
    kernels = m.volatile["cpu_kernels"]  # the machine's: on for N of M linears, or off with the reason
    assert kernels.startswith("on for ") or kernels.startswith("off: "), kernels


def test_launch_takes_generation_config_defaults_as_vllm(prestage, checkpoint_dirs, artifacts_dir, offline_env):
    """--generation-config auto (the default): generation_config.json's sampling values fill what the user left
    out. With --temperature 0 the file's repetition_penalty 1.05 still applies, and the tokens equal
    transformers' generate(do_sample=False), which applies the same file."""
    import transformers

    from prestage.stages.manifest import read

    folder = checkpoint_dirs["single"]
    r = prestage(
        [
            "--artifacts",
            artifacts_dir,
            "--run",
            "a",
            "run",
            folder,
            "--prompt",
            "import os",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ],
        env=offline_env,
    )
    assert r.rc == 0, r
    m = read(artifacts_dir / "a" / "launch.msgpack")
    assert m.inputs["generation_config"] == "auto" and m.inputs["temperature"] == 0.0
    assert (m.inputs["top_p"], m.inputs["top_k"], m.inputs["repetition_penalty"]) == (0.8, 20, 1.05)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert hf.generation_config.repetition_penalty == 1.05
    ids = tok.encode("import os")
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=12,
            top_p=None,
            top_k=None,
            temperature=None,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
    assert m.outputs["completions"][0]["token_ids"] == out[0, len(ids) :].tolist()

    r = prestage(
        ["--artifacts", artifacts_dir, "--run", "a", "launch", "a", "--max-tokens", "2", "--generation-config", "vllm"],
        env=offline_env,
    )
    assert r.rc == 0, r
    m = read(artifacts_dir / "a" / "launch.msgpack")
    assert (m.inputs["temperature"], m.inputs["top_p"], m.inputs["repetition_penalty"]) == (0.0, 1.0, 1.0)


def test_launch_cli_error_one_liners(prestage, checkpoint_dirs, artifacts_dir, offline_env, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoint_dirs["sharded"], folder)
    base = ["--artifacts", artifacts_dir]
    assert prestage(base + ["--run", "r", "run", folder], env=offline_env).rc == 0

    def launch(env=None):
        r = prestage(base + ["launch", "r", "--prompt", "hi", "--max-tokens", "2"], env=env or offline_env)
        errors = [line for line in r.stderr.splitlines() if line.startswith("prestage: error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r
        return r.rc, errors[0]

    shard = sorted(folder.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.unlink()
    rc, msg = launch()
    assert rc == 3 and shard.name in msg and "missing" in msg
    assert "`prestage fetch-weights r --force`" in msg  # the hint names the run
    shard.write_bytes(data[:-10])
    rc, msg = launch()
    assert rc == 10 and f"{len(data) - 10} bytes" in msg
    shard.write_bytes(data)

    rc, msg = launch(dict(offline_env, VLLM_CPU_KVCACHE_SPACE="0.0001"))
    assert rc == 13 and "--max-model-len" in msg

    tok_json = artifacts_dir / "r" / "tokenizer" / "tokenizer.json"
    tok_json.write_text(tok_json.read_text().replace('"<|im_end|>"', '"<|im_END|>"'))
    rc, msg = launch()
    assert rc == 10 and "tokenizer" in msg


def test_launch_cli_transformers_backend_gpt2(prestage, artifacts_dir, offline_env, tmp_path):
    from tests.support.checkpoints import build_checkpoint

    folder = build_checkpoint(tmp_path / "gpt2", arch="gpt2")
    r = prestage(
        [
            "--artifacts",
            artifacts_dir,
            "--run",
            "g",
            "run",
            folder,
            "--prompt",
            "import os",
            "--max-tokens",
            "8",
            "--json",
            "--generation-config",
            "vllm",
        ],
        env=offline_env,
    )
    assert r.rc == 0, r
    launch = json.loads(r.stdout)["launch"]
    assert launch["implementation"]["impl"] == "transformers"
    assert launch["engine"]["kind"] == "transformers"
    completion = launch["completions"][0]
    assert completion["token_ids"] == _hf_greedy(folder, "import os", 8)


def test_launch_unknown_implementation_is_unsupported():
    from types import SimpleNamespace

    from prestage.stages.launch.inference import build_model
    from prestage.stages.records import Implementation

    conf = SimpleNamespace(
        implementation=Implementation(architecture="FooForCausalLM", impl="native", class_ref="foo:Bar")
    )
    with pytest.raises(UnsupportedError, match="FooForCausalLM.*supported: native: .*Qwen2ForCausalLM"):
        build_model(conf, {}, torch.float32, torch.device("cpu"), None, [])


def test_launch_prompts_file(tmp_path):
    from prestage.stages.errors import NotFoundError
    from prestage.stages.launch import DEFAULT_PROMPT, read_prompts

    f = tmp_path / "prompts.txt"
    f.write_text("first\n\n  \nsecond line\n")
    assert read_prompts({"prompt": ["a"], "prompts_file": str(f)}) == ["a", "first", "second line"]
    assert read_prompts({}) == [DEFAULT_PROMPT]
    with pytest.raises(NotFoundError, match="nope.txt"):
        read_prompts({"prompts_file": str(tmp_path / "nope.txt")})


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("max_tokens", 0, "--max-tokens 0"),
        ("max_tokens", -1, "--max-tokens -1"),
        ("temperature", -1.0, "--temperature"),
        ("top_p", 2.0, "--top-p"),
        ("top_p", 0.0, "--top-p"),
        ("max_num_seqs", 0, "--max-num-seqs 0"),
        ("gpu_memory_utilization", 0.0, "--gpu-memory-utilization"),
        ("gpu_memory_utilization", 2.0, "--gpu-memory-utilization"),
        ("seed", 2**64, "--seed"),
    ],
)
def test_launch_bad_flag_values_are_usage_errors_not_defaults(flag, value, match):
    """A 0 given on the command line is refused, never replaced by the default (it used to be `or 16`)."""
    from prestage.stages.errors import UsageError
    from prestage.stages.launch import LaunchStage

    with pytest.raises(UsageError, match=match):
        LaunchStage().inputs({flag: value, "prompt": ["hi"]}, {})
    with pytest.raises(UsageError, match=match):  # the same check, made before any stage runs
        LaunchStage().check_params({flag: value, "prompt": ["hi"]})
    defaults = LaunchStage().inputs({"prompt": ["hi"]}, {})
    assert (defaults["max_tokens"], defaults["max_num_seqs"], defaults["gpu_memory_utilization"]) == (16, 256, 0.9)


def test_completions_go_to_stdout_logs_to_stderr(checkpoint_dirs, artifacts_dir, offline_env, tmp_path):
    """`prestage launch RUN --prompt X > out.txt` puts the completion in the file, one per prompt with a
    newline; -q keeps them; --json has them at the top-level `completions`; `run --prompt` prints them too."""
    from prestage.stages.manifest import read
    from tests.conftest import REPO_ROOT

    env = dict(offline_env, PYTHONPATH=str(REPO_ROOT))
    prestage = f"{shlex.quote(sys.executable)} -m prestage --artifacts {shlex.quote(str(artifacts_dir))}"

    def shell(args: str) -> tuple[str, str]:
        out, err = tmp_path / "out.txt", tmp_path / "err.txt"
        cmd = f"{prestage} {args} > {shlex.quote(str(out))} 2> {shlex.quote(str(err))}"
        rc = subprocess.run(["sh", "-c", cmd], env=env, timeout=300).returncode
        assert rc == 0, err.read_text()
        return out.read_text(), err.read_text()

    model = shlex.quote(str(checkpoint_dirs["single"]))
    out, err = shell(f"--run r run {model} --prompt 'import os' --max-tokens 4 --temperature 0")
    texts = [c["text"] for c in read(artifacts_dir / "r" / "launch.msgpack").outputs["completions"]]
    assert out == texts[0] + "\n" and "launch: done" in err and repr(texts[0]) not in err

    out, err = shell("launch r --prompt 'import os' --prompt 'def main(' --max-tokens 4 --temperature 0")
    texts = [c["text"] for c in read(artifacts_dir / "r" / "launch.msgpack").outputs["completions"]]
    assert len(texts) == 2 and out == "".join(t + "\n" for t in texts) and "launch: done" in err
    assert repr(texts[1]) not in err

    out, err = shell("launch r --prompt 'import os' --max-tokens 4 --temperature 0 -q")
    assert out == texts[0] + "\n" and err == ""

    out, _ = shell("launch r --prompt 'import os' --max-tokens 4 --temperature 0 --json")
    doc = json.loads(out)
    assert [c["text"] for c in doc["completions"]] == texts[:1] and doc["completions"][0]["prompt"] == "import os"
    assert os.path.basename(doc["manifest"]) == "launch.msgpack"


def test_launch_flag_checks_and_sampling_params_import_no_torch():
    """Checking launch's flags and building its SamplingParams happen before the engine starts: no torch yet."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from prestage.stages.launch.stage import LaunchStage\n"
        "from prestage.stages.launch.sampling_params import SamplingParams\n"
        "LaunchStage().check_params({'temperature': 0.5, 'max_tokens': 3})\n"
        "SamplingParams(max_tokens=3, temperature=0.5)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
