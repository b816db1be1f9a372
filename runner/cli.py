"""The `prestage` command line (click).

    prestage resolve MODEL          prestage configure RUN       prestage tokenize-prep RUN
    prestage fetch-weights RUN      prestage launch RUN          prestage run MODEL [--to/--from/--force]
    prestage inspect FILE|RUN       prestage status RUN          prestage verify RUN
    prestage serve RUN              (the OpenAI API over the launch engine, or `vllm serve` with --engine vllm)
    prestage handoff RUN            (the exact `vllm serve` command and environment for the run)
    prestage bundle RUN -o PATH     prestage unbundle BUNDLE     prestage diff A B
    prestage push RUN|BUNDLE REF    prestage pull REF -o PATH
    (verify also takes a BUNDLE)

Global options (--artifacts, --run, -v, -q) go before or after the subcommand. Every flag of every stage a
command will run is checked before the first stage starts. `launch` and `run --prompt` print the
completions on stdout, one per prompt (`--json`: the whole result, completions under `completions`);
everything else people read goes to stderr.

Stage commands are built from each stage's declared options, lazily: `--help`, `inspect` and `status`
import neither torch nor transformers nor huggingface_hub. Every failure prints one line and exits with the
code of its class (see the table in `prestage --help`); `-v` adds the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import click

from prestage.runner.arguments import check_model, check_run_name
from prestage.stages import ORDER, STAGES, errors, get_stage
from prestage.stages.base import Reporter

_EPILOG = "\b\nExit codes:\n" + errors.exit_code_table()


class _State:
    def __init__(self, artifacts: str, run: str | None, verbose: int, quiet: bool):
        self.artifacts = Path(artifacts)
        self.run = run
        self.verbose = verbose
        self.quiet = quiet

    def merge(self, artifacts: str | None, run: str | None, verbose: int, quiet: bool) -> None:
        """Global options given after the subcommand: they win over the same ones given before it."""
        if artifacts is not None:
            self.artifacts = Path(artifacts)
        if run is not None:
            self.run = run
        self.verbose += verbose or 0
        self.quiet = self.quiet or bool(quiet)

    def reporter(self, json_out: bool = False) -> Reporter:
        return Reporter(verbosity=self.verbose, quiet=self.quiet, json=json_out)

    def run_dir(self, run: str) -> Path:
        """The folder of an existing run: a path (holding a '/' or manifests), else a name under --artifacts."""
        p = Path(run)
        if os.sep in run or (p.is_dir() and any(p.glob("*.msgpack"))):
            return p
        return self.artifacts / check_run_name(run, "RUN")

    def new_run_dir(self, model: str) -> Path:
        """The run folder for MODEL: --run NAME (checked to be one folder name), else a name from the model."""
        if self.run is not None:
            return self.artifacts / check_run_name(self.run)
        return self.artifacts / check_run_name(default_run_name(model), "the run name derived from MODEL")


def _global_options() -> list[click.Option]:
    """The group's options, repeated on every subcommand (default None: 'not given here')."""
    return [
        click.Option(
            ["--artifacts"], default=None, metavar="DIR", help="Folder holding one folder per run [default: artifacts]."
        ),
        click.Option(
            ["--run", "run_name"], default=None, metavar="NAME", help="Run name (default: derived from the model id)."
        ),
        click.Option(["-v", "--verbose"], count=True, help="More detail; tracebacks on errors."),
        click.Option(["-q", "--quiet"], is_flag=True, help="Only errors and warnings on stderr; no progress bars."),
    ]


def _with_globals(cmd: click.Command) -> click.Command:
    """`cmd` accepting the global options after the subcommand too (merged into the group's state)."""
    if getattr(cmd, "_prestage_globals", False):
        return cmd
    inner = cmd.callback

    @functools.wraps(inner)
    def callback(*args, artifacts=None, run_name=None, verbose=0, quiet=False, **kwargs):
        click.get_current_context().find_object(_State).merge(artifacts, run_name, verbose, quiet)
        return inner(*args, **kwargs)

    cmd.params.extend(_global_options())
    cmd.callback = callback
    cmd._prestage_globals = True
    return cmd


def default_run_name(model: str) -> str:
    p = Path(model).expanduser()
    if p.exists():
        return p.resolve().name or "model"
    return model.strip("/").replace("/", "--")


def _stage_options(names) -> list:
    """The click options of these stages plus the hub flags, de-duplicated by destination."""
    from prestage.stages import hub

    seen, out = set(), []
    for spec in [*hub.OPTIONS, *(o for n in names for o in get_stage(n).options)]:
        if spec.dest not in seen:
            seen.add(spec.dest)
            out.append(spec)
    return out


def _emit(reporter: Reporter, payload) -> None:
    if reporter.json:
        from prestage.runner.show import dumps

        click.echo(dumps(payload))


def _completions(manifest) -> list[dict]:
    """launch's completions as plain maps ({prompt, text, token_ids, finish_reason}), from its record."""
    from prestage.stages.records import record_of

    return [c.to_dict() for c in record_of(manifest).completions]


def _print_completions(completions: list[dict]) -> None:
    """The completions on stdout, plain text, one per prompt, each followed by a newline."""
    for c in completions:
        click.echo(c["text"])


_JSON_HELP = "Print the result as JSON on stdout."
_PLAIN_HTTP = "Talk to the registry over plain HTTP (a local registry without TLS)."
_LAUNCH_JSON_HELP = (
    "Print the result as JSON on stdout; the completions are at its top-level `completions` key "
    "(a list of {prompt, text, token_ids, finish_reason})."
)


def _stage_command(name: str) -> click.Command:
    def callback(run, json_out, force, **params):
        state: _State = click.get_current_context().find_object(_State)
        reporter = state.reporter(json_out)
        from prestage.runner.chain import check_params, run_stage

        if name == "resolve":
            check_model(run)
            params["model"] = run
            run_dir = state.new_run_dir(run)
        else:
            run_dir = state.run_dir(run)
        check_params([name], params)
        params["force"] = force  # resolve: --force asks the hub for a branch's commit, as --refresh does
        outcome = run_stage(name, run_dir, params, reporter, force=force or bool(params.get("refresh")))
        completions = _completions(outcome.manifest) if name == "launch" else None
        if completions is not None and not reporter.json:
            _print_completions(completions)
        head = {"stage": name, "status": outcome.status, "manifest": str(outcome.path)}
        if completions is not None:
            head["completions"] = completions
        _emit(reporter, {**head, **outcome.manifest.to_dict()})

    arg = click.Argument(["run"], metavar="MODEL" if name == "resolve" else "RUN")
    params = [
        arg,
        click.Option(
            ["--json", "json_out"],
            is_flag=True,
            help=_LAUNCH_JSON_HELP if name == "launch" else "Print the manifest as JSON on stdout.",
        ),
        click.Option(
            ["--force"],
            is_flag=True,
            help="Re-run even if the manifest is fresh"
            + (" (and ask the hub for the branch's current commit, as --refresh)." if name == "resolve" else "."),
        ),
    ]
    params += [click.Option(list(o.decls), **o.kwargs) for o in _stage_options([name])]
    summary = _SHORT[name]
    what = "MODEL (a hub id or a local folder)" if name == "resolve" else "the run RUN"
    more = " The completions go to stdout, one per prompt; logs to stderr." if name == "launch" else ""
    return click.Command(
        name,
        callback=callback,
        params=params,
        short_help=summary,
        help=f"{summary}\n\nRuns {name} for {what} and writes {name}.msgpack in the run folder.{more}",
    )


def _run_command() -> click.Command:
    def callback(model, to, from_, force, json_out, **params):
        state: _State = click.get_current_context().find_object(_State)
        reporter = state.reporter(json_out)
        from prestage.runner.chain import check_params, run_stage

        params["model"] = model
        wants_launch = bool(params.get("prompt") or params.get("prompts_file"))
        last = to or ("launch" if wants_launch else "fetch-weights")
        first = from_ or ORDER[0]
        if ORDER.index(first) > ORDER.index(last):
            raise errors.UsageError(
                f"--from {first} comes after --to {last}; pick a range in pipeline order ({' -> '.join(ORDER)})"
            )
        names = ORDER[ORDER.index(first) : ORDER.index(last) + 1]
        if first == ORDER[0]:
            check_model(model)
        run_dir = state.new_run_dir(model)
        check_params(names, params)  # every flag of every stage, before the first one runs
        results = []
        params["force"] = force  # resolve: --force asks the hub for a branch's commit, as --refresh does
        for name in names:
            again = force or (from_ is not None) or (name == "resolve" and bool(params.get("refresh")))
            outcome = run_stage(name, run_dir, params, reporter, force=again)
            results.append({"stage": name, "status": outcome.status, "manifest": str(outcome.path)})
        if last != "launch" and not wants_launch:
            reporter.info(f"run {run_dir.name}: ready; `prestage launch {run_dir.name} --prompt TEXT` generates")
        payload = {"run": run_dir.name, "run_dir": str(run_dir), "stages": results}
        if last == "launch":
            vol = outcome.manifest.volatile
            completions = _completions(outcome.manifest)
            payload["completions"] = completions
            payload["launch"] = {
                **outcome.manifest.outputs,
                "timings": {k: vol.get(k) for k in ("startup", "generate_s", "generated_tokens", "total_s")},
            }
            if not reporter.json:
                _print_completions(completions)
        _emit(reporter, payload)

    choice = click.Choice(ORDER)
    params = [
        click.Argument(["model"], metavar="MODEL"),
        click.Option(
            ["--to"],
            type=choice,
            default=None,
            help="Last stage to run (default: launch when prompts are given, else fetch-weights).",
        ),
        click.Option(
            ["--from", "from_"],
            type=choice,
            default=None,
            help="Re-run from this stage on (earlier manifests must exist).",
        ),
        click.Option(
            ["--force"],
            is_flag=True,
            help="Re-run every stage in the range; resolve asks the hub for the branch's current commit.",
        ),
        click.Option(["--json", "json_out"], is_flag=True, help=_LAUNCH_JSON_HELP),
    ]
    params += [click.Option(list(o.decls), **o.kwargs) for o in _stage_options(ORDER)]
    return click.Command(
        "run",
        callback=callback,
        params=params,
        short_help="Chain the stages for MODEL, skipping the fresh ones.",
        help="Chain resolve -> configure -> tokenize-prep -> fetch-weights -> launch for MODEL. "
        "A stage whose manifest is fresh (same fingerprint, outputs intact) is reported as "
        "cached and left untouched; a changed input re-runs it and everything after it. Every flag is "
        "checked before the first stage runs. With --prompt the completions go to stdout, one per prompt.",
    )


@click.command("inspect")
@click.argument("target")
@click.option("--json", "json_out", is_flag=True, help="Print JSON on stdout.")
@click.option("--full", is_flag=True, help="Show every field (each token id, tensor and file) instead of the summary.")
@click.pass_obj
def inspect_cmd(state: _State, target: str, json_out: bool, full: bool):
    """Show a manifest FILE, or every manifest of a RUN: a summary (decisions and their reasons, file counts
    and bytes, warnings), or everything with --full."""
    from prestage.runner.show import dumps, manifest_summary, manifest_text
    from prestage.stages.manifest import manifest_path, read

    p = Path(target)
    if p.is_file():
        docs = {str(p): read(p).to_dict()}
    else:
        run_dir = state.run_dir(target)
        if not run_dir.is_dir():
            raise errors.NotFoundError(
                f"{target}: no such manifest file or run (looked in {run_dir}); see `ls {state.artifacts}`"
            )
        docs = {
            str(manifest_path(run_dir, n)): read(manifest_path(run_dir, n)).to_dict()
            for n in ORDER
            if manifest_path(run_dir, n).exists()
        }
        if not docs:
            raise errors.NotFoundError(f"{run_dir}: no manifests in this run folder; run a stage first")
    if json_out:
        click.echo(dumps(next(iter(docs.values())) if p.is_file() else {d["stage"]: d for d in docs.values()}))
    else:
        text = [manifest_text(d, path, True) if full else manifest_summary(d, path) for path, d in docs.items()]
        click.echo("\n\n".join(text))


@click.command("status")
@click.argument("run")
@click.option("--json", "json_out", is_flag=True, help="Print JSON on stdout.")
@click.option("--download-dir", default=None, metavar="DIR", help="Hugging Face cache root (default HF_HUB_CACHE).")
@click.pass_obj
def status_cmd(state: _State, run: str, json_out: bool, download_dir):
    """Say fresh, stale (and why) or missing for every stage of RUN."""
    from prestage.runner.chain import stage_status
    from prestage.runner.show import dumps, status_text

    run_dir = state.run_dir(run)
    if not run_dir.is_dir():
        raise errors.NotFoundError(f"{run}: no such run (looked in {run_dir}); start one with `prestage run MODEL`")
    rows = stage_status(run_dir, {"download_dir": download_dir})
    click.echo(dumps({"run": run_dir.name, "stages": rows}) if json_out else status_text(run_dir.name, rows))


@click.command("verify")
@click.argument("run", metavar="RUN|BUNDLE")
@click.option("--json", "json_out", is_flag=True, help="Print JSON on stdout.")
@click.option("--download-dir", default=None, metavar="DIR", help="Hugging Face cache root (default HF_HUB_CACHE).")
@click.option(
    "--verify-key", default=None, metavar="PUB", help="BUNDLE: refuse it unless SHA256SUMS is signed by this key."
)
@click.pass_obj
def verify_cmd(state: _State, run: str, json_out: bool, download_dir, verify_key):
    """Re-hash every weight and tokenizer file of RUN and report each one; for a BUNDLE (folder or .tar), every
    file against its SHA256SUMS, and every entry checked to be one a bundle may hold. Offline, in parallel."""
    from prestage.runner.show import dumps, verify_text
    from prestage.runner.verify import is_bundle, verify_bundle, verify_run

    if is_bundle(run):
        ok, report = verify_bundle(run, state.reporter(json_out), verify_key)
        click.echo(dumps({"bundle": run, "ok": ok, "files": report}) if json_out else verify_text(report))
        if not ok:
            bad = [r for r in report if not r.get("ok")]
            raise errors.IntegrityError(
                f"{len(bad)} of {len(report)} entries of bundle {run} fail verification (first: {bad[0]['path']}: "
                f"{str(bad[0]['reason'])[:120]}); copy the bundle again from its source"
            )
        return
    if verify_key:
        raise errors.UsageError(f"--verify-key checks a bundle's signature; {run} is a run, not a bundle")
    run_dir = state.run_dir(run)
    ok, report = verify_run(run_dir, {"download_dir": download_dir}, state.reporter(json_out))
    click.echo(dumps({"run": run_dir.name, "ok": ok, "files": report}) if json_out else verify_text(report))
    if not ok:
        bad = [r for r in report if not r.get("ok")]
        stage = bad[0].get("stage") or "fetch-weights"
        reason = str(bad[0].get("reason"))
        if reason.startswith(("sha256 ", "size ")):  # the listing above has the values
            reason = reason.split(" ", 1)[0] + " differs"
        raise errors.IntegrityError(
            f"{len(bad)} of {len(report)} files of run {run_dir.name} fail verification "
            f"(first: {bad[0].get('path')}: {reason}); re-run "
            f"`prestage {stage} {run_dir.name} --force`"
        )


@click.command("bundle")
@click.argument("run")
@click.option("-o", "--output", "output", required=True, metavar="PATH", help="Bundle to write (must not exist).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["dir", "tar", "oci"]),
    default=None,
    help="dir (a folder), tar (one uncompressed .tar, streamed) or oci (an OCI image layout, ModelPack media types) "
    "[default: tar when PATH ends in .tar, else dir].",
)
@click.option("--link", is_flag=True, help="Hard-link the weight files into a folder or OCI bundle (same filesystem).")
@click.option(
    "--sign",
    "sign_key",
    default=None,
    metavar="KEY",
    help="Sign SHA256SUMS with this PEM elliptic-curve private key (OpenSSF model-signing; offline).",
)
@click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--download-dir", default=None, metavar="DIR", help="Hugging Face cache root (default HF_HUB_CACHE).")
@click.pass_obj
def bundle_cmd(state: _State, run: str, output: str, fmt, link: bool, sign_key, json_out: bool, download_dir):
    """Write RUN (fresh up to fetch-weights) as one self-contained bundle for a machine with no network: its
    manifests, stored tokenizer and model files as a Hugging Face cache under hub/ (a local folder model under
    model/), with a SHA256SUMS list reusing the sha256 the manifests recorded."""
    from prestage.runner.bundle import bundle

    reporter = state.reporter(json_out)
    params = {"download_dir": download_dir}
    summary = bundle(state.run_dir(run), Path(output), fmt, link, params, reporter, sign_key)
    _emit(reporter, summary)


@click.command("unbundle")
@click.argument("path", metavar="BUNDLE|REF")
@click.option(
    "--hub-cache",
    default=None,
    metavar="DIR",
    help="Hugging Face cache to place the model files in [default: HF_HUB_CACHE, else HF_HOME/hub].",
)
@click.option(
    "--model-dir",
    default=None,
    metavar="DIR",
    help="Local-folder models: confirm where the model folder goes (the place the run records).",
)
@click.option(
    "--verify-key", default=None, metavar="PUB", help="Refuse the bundle unless SHA256SUMS is signed by this key."
)
@click.option("--plain-http", is_flag=True, help="REF: " + _PLAIN_HTTP)
@click.option("--json", "json_out", is_flag=True, help="Print what was placed as JSON on stdout.")
@click.pass_obj
def unbundle_cmd(state: _State, path: str, hub_cache, model_dir, verify_key, plain_http: bool, json_out: bool):
    """Check every file of BUNDLE (a folder, a .tar, an OCI layout, or REGISTRY/NAME:TAG: pulled first) against
    its SHA256SUMS, then place the run under --artifacts (name: the bundle's run, or --run NAME) and the model
    files in the cache. Nothing is placed unless everything checks."""
    import shutil
    import tempfile

    from prestage.runner.unbundle import unbundle
    from prestage.stages import hub

    reporter = state.reporter(json_out)
    cache = Path(hub_cache).expanduser() if hub_cache else hub.default_cache_dir()
    pulled = None
    if not Path(path).exists() and ":" in path and "/" in path:  # a registry reference, not a local bundle
        from prestage.runner import oci

        state.artifacts.mkdir(parents=True, exist_ok=True)
        pulled = Path(tempfile.mkdtemp(prefix=".prestage-pull-", dir=state.artifacts))
        try:
            oci.pull(path, pulled / "layout", plain_http, reporter)
        except BaseException:
            shutil.rmtree(pulled, ignore_errors=True)
            raise
    try:
        source = pulled / "layout" if pulled else path
        report = unbundle(source, state.artifacts, cache, state.run, model_dir, reporter, verify_key)
    finally:
        if pulled is not None:
            shutil.rmtree(pulled, ignore_errors=True)
    _emit(reporter, report)


@click.command("push")
@click.argument("source", metavar="RUN|BUNDLE")
@click.argument("ref", metavar="REGISTRY/NAME:TAG")
@click.option("--plain-http", is_flag=True, help=_PLAIN_HTTP)
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--download-dir", default=None, metavar="DIR", help="Hugging Face cache root (default HF_HUB_CACHE).")
@click.pass_obj
def push_cmd(state: _State, source: str, ref: str, plain_http: bool, json_out: bool, download_dir):
    """Push RUN (bundled on the way as an OCI layout, weights hard-linked where possible) or an OCI BUNDLE to an
    OCI registry with the oras SDK; blobs the registry holds are not sent again."""
    import shutil
    import tempfile

    from prestage.runner import oci
    from prestage.runner.verify import is_bundle

    reporter = state.reporter(json_out)
    if oci.is_layout(source):
        result = oci.push(Path(source), ref, plain_http, reporter)
    elif is_bundle(source):
        raise errors.UsageError(
            f"{source}: a folder or tar bundle; push takes a run or an OCI bundle (`prestage bundle RUN --format oci`)"
        )
    else:
        from prestage.runner.bundle import bundle

        run_dir = state.run_dir(source)
        tmp = Path(tempfile.mkdtemp(prefix=".prestage-push-", dir=run_dir.parent if run_dir.parent.is_dir() else None))
        try:
            layout = tmp / "layout"
            bundle(run_dir, layout, "oci", True, {"download_dir": download_dir}, reporter)
            result = oci.push(layout, ref, plain_http, reporter)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _emit(reporter, result)


@click.command("pull")
@click.argument("ref", metavar="REGISTRY/NAME:TAG")
@click.option("-o", "--output", "output", required=True, metavar="PATH", help="OCI layout to write (must not exist).")
@click.option("--plain-http", is_flag=True, help=_PLAIN_HTTP)
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_obj
def pull_cmd(state: _State, ref: str, output: str, plain_http: bool, json_out: bool):
    """Pull a bundle pushed with `prestage push` into a new OCI layout at PATH (every blob's sha256 checked);
    then `prestage unbundle PATH` places it."""
    from prestage.runner import oci

    reporter = state.reporter(json_out)
    _emit(reporter, oci.pull(ref, Path(output), plain_http, reporter))


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--volatile", is_flag=True, help="Compare the volatile sections too (times, host, versions).")
@click.option("--json", "json_out", is_flag=True, help="Print the differences as JSON on stdout.")
@click.pass_obj
def diff_cmd(state: _State, a: str, b: str, volatile: bool, json_out: bool):
    """Show field by field what differs between A and B: two runs, bundles or manifest files."""
    from prestage.runner.diff import diff, diff_text, load_side
    from prestage.runner.show import dumps

    kind_a, docs_a = load_side(a, state.run_dir)
    kind_b, docs_b = load_side(b, state.run_dir)
    rows = diff(docs_a, docs_b, volatile)
    if json_out:
        click.echo(dumps({"a": a, "b": b, "kinds": [kind_a, kind_b], "same": not rows, "differences": rows}))
    else:
        click.echo(diff_text(a, b, rows, volatile))


def _serve_command() -> click.Command:
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
        state: _State = click.get_current_context().find_object(_State)
        reporter = state.reporter()
        from prestage.runner.chain import load_upstream, name_the_run, stage_params
        from prestage.stages.launch import generation_config_mode, generation_defaults
        from prestage.stages.launch.serving import bind, check_serve_extra, check_serve_params, serve
        from prestage.stages.launch.stage import engine_choice

        mode = generation_config_mode(params)  # checked before the model loads
        engine = engine_choice(params)
        run_dir = state.run_dir(run)
        upstream = load_upstream(get_stage("launch"), run_dir)
        if engine == "vllm":
            for flag, value in (("--api-key", api_key), ("--max-model-len", params.get("max_model_len"))):
                if value is not None:
                    extra = (*extra, flag, str(value))  # vLLM's own flags of the same name
            if str(params.get("dtype") or "auto") != "auto":
                raise errors.UsageError("--dtype with --engine vllm: vLLM runs configure's dtype; re-run configure")
            params = stage_params(params, run_dir, upstream)
            _exec_vllm_serve(run_dir, upstream, params, host, port, served_model_name, extra, reporter)
            return
        if extra or any(params.get(k) not in (None, False) for k in _SCALE_OUT_DESTS):
            raise errors.UsageError("scale-out flags and arguments after -- are for --engine vllm")
        check_serve_extra()
        check_serve_params(params)
        sock = bind(host, port)  # a port in use fails here, before anything is printed
        from prestage.stages.launch.inference import load_for_inference

        try:
            inference = load_for_inference(run_dir, upstream, stage_params(params, run_dir, upstream))
        except errors.PrestageError as e:
            name_the_run(e, run_dir.name)  # a hint's `prestage CMD RUN` names this run
            raise
        for w in inference.warnings:
            reporter.warn(w)
        from prestage.stages.launch.server import create_app

        name = served_model_name or upstream["resolve"].record.model
        max_model_len = inference.info["engine"]["max_model_len"]
        app = create_app(inference, name, max_model_len, generation_defaults(mode, upstream), api_key=api_key)
        real_port = sock.getsockname()[1]
        reporter.info(
            f"serve: {name} on http://{host}:{real_port}/v1 ({inference.info['device']}, {inference.info['dtype']})"
        )
        serve(app, sock, state.quiet)

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
        click.Option(list(o.decls), **o.kwargs) for o in _stage_options(["launch"]) if o.dest not in request_level
    ]
    params += _scale_out_options()
    params.append(click.Argument(["extra"], nargs=-1, type=click.UNPROCESSED))
    return click.Command(
        "serve",
        callback=callback,
        params=params,
        short_help=_SHORT["serve"],
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


def _handoff_command() -> click.Command:
    def callback(run, engine, fmt, vllm, device, generation_config, extra, **scale):
        state: _State = click.get_current_context().find_object(_State)
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
        short_help=_SHORT["handoff"],
        help="Print the exact `vllm serve` command and environment that start vLLM on RUN with its decisions "
        "(pinned snapshot, stored tokenizer, dtype, max_model_len, load format, ...), offline, without running "
        "it. Scale-out flags and anything after -- are passed through.",
    )


_BUILTIN = {
    "run": _run_command,
    "serve": _serve_command,
    "handoff": _handoff_command,
    "inspect": lambda: inspect_cmd,
    "status": lambda: status_cmd,
    "verify": lambda: verify_cmd,
    "bundle": lambda: bundle_cmd,
    "unbundle": lambda: unbundle_cmd,
    "diff": lambda: diff_cmd,
    "push": lambda: push_cmd,
    "pull": lambda: pull_cmd,
}
_SHORT = {
    "resolve": "Find MODEL, pin its revision, record its files.",
    "configure": "Build the config as vLLM would: class, patches, max_model_len, dtype, implementation.",
    "tokenize-prep": "Load the tokenizer once, check it, store it with its cached attributes.",
    "fetch-weights": "Select, download and verify the weight files.",
    "launch": "Load the model and generate.",
    "run": "Chain the stages for MODEL, skipping the fresh ones.",
    "serve": "Serve the model of RUN over the OpenAI API (FastAPI + uvicorn, or vLLM with --engine vllm).",
    "handoff": "Print the exact `vllm serve` command and environment for RUN.",
    "inspect": "Show a manifest FILE, or every manifest of a RUN.",
    "status": "Say fresh, stale (and why) or missing for every stage of RUN.",
    "verify": "Re-hash every weight and tokenizer file of RUN, or every file of a BUNDLE, and report each one.",
    "bundle": "Write RUN as one self-contained bundle (folder or .tar) for a machine with no network.",
    "unbundle": "Check a bundle in full, then place its run and model files.",
    "diff": "Show field by field what differs between two runs, bundles or manifests.",
    "push": "Push a run or an OCI bundle to an OCI registry (oras).",
    "pull": "Pull a pushed bundle from an OCI registry into an OCI layout.",
}


class _Group(click.Group):
    """Builds commands on demand, so `--help` and `inspect` don't import every stage."""

    def list_commands(self, ctx):
        return [
            *ORDER,
            "run",
            "serve",
            "handoff",
            "inspect",
            "status",
            "verify",
            "bundle",
            "unbundle",
            "diff",
            "push",
            "pull",
        ]

    def get_command(self, ctx, name):
        if name in STAGES:
            return _with_globals(_stage_command(name))
        if name in _BUILTIN:
            return _with_globals(_BUILTIN[name]())
        return None

    def format_commands(self, ctx, formatter):
        rows = [(n, _SHORT[n]) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=_Group, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.option(
    "--artifacts", default="artifacts", show_default=True, metavar="DIR", help="Folder holding one folder per run."
)
@click.option("--run", "run_name", default=None, metavar="NAME", help="Run name (default: derived from the model id).")
@click.option("-v", "--verbose", count=True, help="More detail; tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and warnings on stderr; no progress bars.")
@click.version_option(package_name="prestage", prog_name="prestage")
@click.pass_context
def cli(ctx, artifacts, run_name, verbose, quiet):
    """prestage: prepare a Hugging Face model for inference as resumable stages, then run it.

    \b
      resolve -> configure -> tokenize-prep -> fetch-weights -> launch
    Each stage reads the manifest its predecessor wrote (artifacts/RUN/STAGE.msgpack) and writes its own.
    The options below may also be given after the subcommand.
    """
    ctx.obj = _State(artifacts, run_name, verbose, quiet)


def main(argv=None) -> None:
    verbose = any(
        a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"})
        for a in (argv if argv is not None else sys.argv[1:])
    )
    try:
        cli.main(args=argv, prog_name="prestage", standalone_mode=False)
    except errors.PrestageError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"prestage: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("prestage: interrupted", err=True)
        sys.exit(errors.CODE["interrupted"])
    except click.ClickException as e:
        e.show()
        sys.exit(errors.CODE["usage"])
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("prestage: interrupted", err=True)
        sys.exit(errors.CODE["interrupted"])
    except BrokenPipeError:
        sys.exit(0)
    except Exception as e:  # a bug: one line, the traceback only with -v
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(e).split())
        click.echo(f"prestage: internal error: {type(e).__name__}: {msg} (rerun with -v and report it)", err=True)
        sys.exit(errors.CODE["internal"])


if __name__ == "__main__":
    main()
