"""What every `prestage` command module shares: the group's state (global options, run folders), the JSON
emit, the stage options a command takes, and each command's one-line help."""

from __future__ import annotations

import os
from pathlib import Path

import click

from prestage.runner.arguments import check_run_name
from prestage.stages import get_stage
from prestage.stages.base import Reporter


class State:
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


def default_run_name(model: str) -> str:
    p = Path(model).expanduser()
    if p.exists():
        return p.resolve().name or "model"
    return model.strip("/").replace("/", "--")


def stage_options(names) -> list:
    """The click options of these stages plus the hub flags, de-duplicated by destination."""
    from prestage.stages import hub

    seen, out = set(), []
    for spec in [*hub.OPTIONS, *(o for n in names for o in get_stage(n).options)]:
        if spec.dest not in seen:
            seen.add(spec.dest)
            out.append(spec)
    return out


def emit(reporter: Reporter, payload) -> None:
    if reporter.json:
        from prestage.runner.show import dumps

        click.echo(dumps(payload))


SHORT_HELP = {
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
