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

Here: the group, the global options, the stage commands, `run`, `inspect`, `status` and `main`. The shared pieces
are in cli_common.py, serve and handoff in cli_vllm.py, the bundle commands in cli_bundle.py (imported only
when one of their commands is asked for).
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path

import click

from prestage.runner.arguments import check_model
from prestage.runner.cli_common import SHORT_HELP, State, emit, stage_options
from prestage.stages import ORDER, STAGES, errors

_EPILOG = "\b\nExit codes:\n" + errors.exit_code_table()

_LAUNCH_JSON_HELP = (
    "Print the result as JSON on stdout; the completions are at its top-level `completions` key "
    "(a list of {prompt, text, token_ids, finish_reason})."
)


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
        click.get_current_context().find_object(State).merge(artifacts, run_name, verbose, quiet)
        return inner(*args, **kwargs)

    cmd.params.extend(_global_options())
    cmd.callback = callback
    cmd._prestage_globals = True
    return cmd


def _completions(manifest) -> list[dict]:
    """launch's completions as plain maps ({prompt, text, token_ids, finish_reason}), from its record."""
    from prestage.stages.records import record_of

    return [c.to_dict() for c in record_of(manifest).completions]


def _print_completions(completions: list[dict]) -> None:
    """The completions on stdout, plain text, one per prompt, each followed by a newline."""
    for c in completions:
        click.echo(c["text"])


_JSON_HELP = "Print the result as JSON on stdout."


def _stage_command(name: str) -> click.Command:
    def callback(run, json_out, force, **params):
        state: State = click.get_current_context().find_object(State)
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
        emit(reporter, {**head, **outcome.manifest.to_dict()})

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
    params += [click.Option(list(o.decls), **o.kwargs) for o in stage_options([name])]
    summary = SHORT_HELP[name]
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
        state: State = click.get_current_context().find_object(State)
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
        emit(reporter, payload)

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
    params += [click.Option(list(o.decls), **o.kwargs) for o in stage_options(ORDER)]
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
def inspect_cmd(state: State, target: str, json_out: bool, full: bool):
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
def status_cmd(state: State, run: str, json_out: bool, download_dir):
    """Say fresh, stale (and why) or missing for every stage of RUN."""
    from prestage.runner.chain import stage_status
    from prestage.runner.show import dumps, status_text

    run_dir = state.run_dir(run)
    if not run_dir.is_dir():
        raise errors.NotFoundError(f"{run}: no such run (looked in {run_dir}); start one with `prestage run MODEL`")
    rows = stage_status(run_dir, {"download_dir": download_dir})
    click.echo(dumps({"run": run_dir.name, "stages": rows}) if json_out else status_text(run_dir.name, rows))


BUNDLE_COMMANDS = ("verify", "bundle", "unbundle", "diff", "push", "pull")


def _command(module: str, name: str):
    """`name` from runner/`module`.py, imported when the command is asked for."""
    import importlib

    return getattr(importlib.import_module(f"prestage.runner.{module}"), name)


_BUILTIN = {
    "run": _run_command,
    "serve": lambda: _command("cli_vllm", "serve_command")(),
    "handoff": lambda: _command("cli_vllm", "handoff_command")(),
    "inspect": lambda: inspect_cmd,
    "status": lambda: status_cmd,
    **{name: functools.partial(_command, "cli_bundle", f"{name}_cmd") for name in BUNDLE_COMMANDS},
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
        rows = [(n, SHORT_HELP[n]) for n in self.list_commands(ctx)]
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
    ctx.obj = State(artifacts, run_name, verbose, quiet)


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
