"""`prestage serve` (the OpenAI API over the launch engine, or `vllm serve` with --engine vllm) and
`prestage handoff` (the exact `vllm serve` command and environment for a run), with vLLM's scale-out flags."""

from __future__ import annotations

import os
import sys

import click

from prestage.runner.cli_common import SHORT_HELP, State, stage_options
from prestage.stages import errors, get_stage


def serve_command() -> click.Command:
    request_level = {
        "prompt",
        "prompts_file",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "stop",
    }

    def callback(run, host, port, served_model_name, api_key, extra, **params):
        state: State = click.get_current_context().find_object(State)
        reporter = state.reporter()
        from prestage.runner.chain import load_upstream, name_the_run, refuse_changed_weights, stage_params
        from prestage.stages.launch import generation_config_mode, generation_defaults
        from prestage.stages.launch.serving import bind, check_serve_extra, check_serve_params, serve
        from prestage.stages.launch.stage import engine_choice

        mode = generation_config_mode(params)  # checked before the model loads
        engine = engine_choice(params)
        run_dir = state.run_dir(run)
        upstream = load_upstream(get_stage("launch"), run_dir)
        staged = stage_params(params, run_dir, upstream)
        refuse_changed_weights(run_dir, upstream, staged)
        if engine == "vllm":
            for flag, value in (("--api-key", api_key), ("--max-model-len", params.get("max_model_len"))):
                if value is not None:
                    extra = (*extra, flag, str(value))  # vLLM's own flags of the same name
            if str(params.get("dtype") or "auto") != "auto":
                raise errors.UsageError("--dtype with --engine vllm: vLLM runs configure's dtype; re-run configure")
            _exec_vllm_serve(run_dir, upstream, staged, host, port, served_model_name, extra, reporter)
            return
        if extra or any(params.get(k) not in (None, False) for k in _SCALE_OUT_DESTS):
            raise errors.UsageError("scale-out flags and arguments after -- are for --engine vllm")
        check_serve_extra()
        check_serve_params(params)
        sock = bind(host, port)  # a port in use fails here, before anything is printed
        from prestage.stages.launch.inference import load_for_inference

        try:
            inference = load_for_inference(run_dir, upstream, staged)
        except errors.PrestageError as e:
            name_the_run(e, run_dir.name)  # a hint's `prestage CMD RUN` names this run
            raise
        for w in inference.warnings:
            reporter.warn(w)
        from prestage.stages.launch.engine_loop import EngineLoop
        from prestage.stages.launch.server import create_app

        name = served_model_name or upstream["resolve"].record.model
        max_model_len = inference.info["engine"]["max_model_len"]
        loop = EngineLoop.on_this_thread(inference.engine)  # run below, on the thread that loaded the model
        app = create_app(inference, name, max_model_len, generation_defaults(mode, upstream), api_key=api_key)
        real_port = sock.getsockname()[1]
        reporter.info(
            f"serve: {name} on http://{host}:{real_port}/v1 ({inference.info['device']}, {inference.info['dtype']})"
        )
        serve(app, sock, state.quiet, loop)

    params = [
        click.Argument(["run"], metavar="RUN"),
        click.Option(["--host"], default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.Option(
            ["--port"], type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on."
        ),
        click.Option(
            ["--served-model-name"],
            default=None,
            help="Model name in the API (default: the model id given to resolve).",
        ),
        click.Option(["--api-key"], default=None, help="Require 'Authorization: Bearer KEY' on /v1 requests."),
        click.Option(
            ["--max-model-len"], type=int, default=None, help="Context length, at most configure's [default: it]."
        ),
        click.Option(
            ["--dtype"],
            default="auto",
            show_default=True,
            metavar="auto|bfloat16|float16|float32",
            help="Weight and activation dtype (auto: configure's choice for the device).",
        ),
    ]
    params += [
        click.Option(list(o.decls), **o.kwargs) for o in stage_options(["launch"]) if o.dest not in request_level
    ]
    params += _scale_out_options()
    params.append(click.Argument(["extra"], nargs=-1, type=click.UNPROCESSED))
    return click.Command(
        "serve",
        callback=callback,
        params=params,
        short_help=SHORT_HELP["serve"],
        help="Load the model of RUN once and serve the OpenAI API (/v1/completions, "
        "/v1/chat/completions, /v1/models; stream=true as server-sent events) with FastAPI "
        "+ uvicorn, with /metrics for Prometheus. Requests join one running batch (continuous batching). "
        "Sampling fields a request leaves out take the model's generation_config.json "
        "values (--generation-config auto), as vLLM's server does. With --engine vllm it runs `vllm serve` "
        "with the run's decisions instead (the command `prestage handoff RUN` prints), scale-out flags and "
        "anything after -- passed to vLLM.",
    )


_SCALE_OUT_DESTS = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
    "nnodes",
    "node_rank",
    "master_addr",
    "distributed_executor_backend",
    "headless",
)


def _scale_out_options() -> list[click.Option]:
    """vLLM's scale-out flags, passed to `vllm serve` unchanged."""
    pos = click.IntRange(min=1)
    return [
        click.Option(["--tensor-parallel-size", "-tp"], type=pos, default=None, help="vLLM: GPUs per model replica."),
        click.Option(["--pipeline-parallel-size", "-pp"], type=pos, default=None, help="vLLM: pipeline stages."),
        click.Option(["--data-parallel-size", "-dp"], type=pos, default=None, help="vLLM: model replicas."),
        click.Option(["--nnodes"], type=pos, default=None, help="vLLM: number of nodes."),
        click.Option(["--node-rank"], type=click.IntRange(min=0), default=None, help="vLLM: this node's rank."),
        click.Option(["--master-addr"], default=None, metavar="HOST", help="vLLM: address of node 0."),
        click.Option(
            ["--distributed-executor-backend"], default=None, metavar="mp|ray", help="vLLM: mp or ray workers."
        ),
        click.Option(["--headless"], is_flag=True, default=False, help="vLLM: a worker node without the API server."),
    ]


def _vllm_command(run_dir, upstream, params, host=None, port=None, served=None, extra=(), exe="vllm"):
    """(argv, env, symbolic args) of `vllm serve` for the run."""
    from prestage.stages.launch import vllm_handoff as handoff

    device = str(params.get("device") or "cuda").lower()
    args = handoff.engine_args(run_dir, upstream, params, device="cpu" if device == "cpu" else "cuda")
    values = args.real()
    if served:
        values["served_model_name"] = served
    scale = {k: params.get(k) for k in _SCALE_OUT_DESTS}
    tail = list(extra)
    if host is not None:
        tail = ["--host", str(host), "--port", str(port), *tail]
    argv = [exe, *handoff.serve_argv(values, scale, tail)]
    return argv, handoff.real_env(args), args


def _exec_vllm_serve(run_dir, upstream, params, host, port, served, extra, reporter) -> None:
    from prestage.stages.launch import vllm_handoff as handoff

    install = handoff.require_vllm(params)
    _version, _cuda, dist = handoff.probe(install, with_dist=True)
    argv, env, _ = _vllm_command(run_dir, upstream, params, host, port, served, extra)
    argv = handoff.runnable_serve_argv(argv, install, dist)
    reporter.info("serve: " + handoff.shell_text(argv, env))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, {**os.environ, **env})


def handoff_command() -> click.Command:
    def callback(run, engine, fmt, vllm, device, generation_config, extra, **scale):
        state: State = click.get_current_context().find_object(State)
        from prestage.runner.chain import load_upstream, stage_params
        from prestage.runner.show import dumps
        from prestage.stages.launch import vllm_handoff as handoff

        if engine != "vllm":
            raise errors.UsageError(f"--engine {engine!r}: handoff prints the command of vllm only; use --engine vllm")
        run_dir = state.run_dir(run)
        upstream = load_upstream(get_stage("launch"), run_dir)
        params = stage_params(
            {"vllm": vllm, "device": device, "generation_config": generation_config, **scale}, run_dir, upstream
        )
        found = handoff.find_vllm(params)
        exe = (found.executable if found else None) or "vllm"
        argv, env, args = _vllm_command(run_dir, upstream, params, extra=extra, exe=exe)
        if fmt == "json":
            click.echo(
                dumps(
                    {
                        "engine": "vllm",
                        "argv": argv,
                        "env": env,
                        "shell": handoff.shell_text(argv, env),
                        "symbolic": {"args": args.values, "env": args.env},
                    }
                )
            )
        else:
            click.echo(handoff.shell_text(argv, env))

    params = [
        click.Argument(["run"], metavar="RUN"),
        click.Option(["--engine"], type=click.Choice(["vllm"]), default="vllm", show_default=True, help="The engine."),
        click.Option(
            ["--format", "fmt"],
            type=click.Choice(["shell", "json"]),
            default="shell",
            show_default=True,
            help="One shell-quoted line, or JSON (argv, env) for a Kubernetes or Slurm template.",
        ),
        click.Option(["--vllm"], default=None, metavar="PATH", help="The vLLM executable (default: `vllm`)."),
        click.Option(
            ["--device"],
            type=click.Choice(["cuda", "cpu"]),
            default="cuda",
            show_default=True,
            help="Whose dtype decision to use: the GPU's or the CPU fallback's.",
        ),
        click.Option(
            ["--generation-config"],
            type=click.Choice(["auto", "vllm"]),
            default="auto",
            show_default=True,
            help="vLLM's --generation-config: auto reads the model's generation_config.json.",
        ),
        *_scale_out_options(),
        click.Argument(["extra"], nargs=-1, type=click.UNPROCESSED),
    ]
    return click.Command(
        "handoff",
        callback=callback,
        params=params,
        short_help=SHORT_HELP["handoff"],
        help="Print the exact `vllm serve` command and environment that start vLLM on RUN with its decisions "
        "(pinned snapshot, stored tokenizer, dtype, max_model_len, load format, ...), offline, without running "
        "it. Scale-out flags and anything after -- are passed through.",
    )
