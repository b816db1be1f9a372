"""The small interface every stage implements, and the option declarations the CLI turns into flags.

A stage is a class with:
    name, version          identity; `version` is bumped when the stage's outputs would change
    requires / optional    upstream stages whose manifests it reads (optional: read when present)
    options                its flags, declared as `Option`s (click kwargs, so stages never import click)
    check_params(params)   refuse a bad flag value (UsageError naming the flag, the value and what is
                           accepted) before any stage of the command runs; upstream manifests are not needed
    inputs(params, up)     the normalized inputs recorded in the manifest: plain data, never a secret
    run(ctx, inputs)       does the work, returns a `StageResult` whose outputs are the stage's typed record
                           (stages/records.py)
    check_outputs(run_dir, m, params)
                           None when what the manifest `m` describes is still there, else the reason
    cached_note(run_dir, m, params)
                           a line said when the manifest `m` is reused as it is (resolve: which commit a
                           branch names, taken from the cache), or None

Stage modules keep torch, transformers and huggingface_hub imports inside functions, so that
`--help`, `inspect` and `status` stay fast.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prestage.stages.manifest import Manifest

if TYPE_CHECKING:  # records are imported by the stages that build them, not by --help
    from prestage.stages.records import Record


@dataclass(frozen=True)
class Option:
    """A flag: `decls` and `kwargs` are handed to click.Option as they are."""

    decls: tuple
    kwargs: dict

    @property
    def dest(self) -> str:
        for d in self.decls:
            if not d.startswith("-"):
                return d
        longest = max((d for d in self.decls if d.startswith("--")), key=len)
        return longest.split("/")[0].lstrip("-").replace("-", "_")


def opt(*decls: str, **kwargs: Any) -> Option:
    return Option(tuple(decls), kwargs)


@dataclass
class Reporter:
    """Human output on stderr; `quiet` silences info, `verbose` adds detail, `json` means stdout is data."""

    verbosity: int = 0
    quiet: bool = False
    json: bool = False

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def detail(self, msg: str) -> None:
        if self.verbosity > 0 and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"prestage: warning: {msg}", file=sys.stderr, flush=True)

    @property
    def progress(self) -> bool:
        """Whether progress bars may be drawn (stderr, not under -q or --json)."""
        return not (self.quiet or self.json)


@dataclass
class Context:
    run_dir: Path
    params: dict  # raw CLI parameters, secrets included: never written anywhere
    upstream: dict  # stage name -> Manifest, each with its typed `.record`
    reporter: Reporter = field(default_factory=Reporter)


@dataclass
class StageResult:
    outputs: Record
    warnings: list = field(default_factory=list)
    volatile: dict = field(default_factory=dict)


class Stage(ABC):
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    requires: ClassVar[tuple] = ()
    optional: ClassVar[tuple] = ()
    options: ClassVar[tuple] = ()
    always_run: ClassVar[bool] = False  # launch: its output is a fresh generation, never cached

    def check_params(self, params: dict) -> None:
        """Raise UsageError for a flag value this stage would refuse; called for every stage a command will run
        before the first one starts, so a misspelt flag value never costs a download. Default: nothing to check."""
        return None

    @abstractmethod
    def inputs(self, params: dict, upstream: dict[str, Manifest]) -> dict:
        """The normalized inputs: everything that decides the outputs, and no secret."""

    @abstractmethod
    def run(self, ctx: Context, inputs: dict) -> StageResult:
        """Do the work; heavy imports live in here."""

    def cached_note(self, run_dir: Path, manifest: Manifest, params: dict | None = None) -> str | None:
        """A line to say when `manifest` is reused without running (None: nothing beyond "cached")."""
        return None

    def check_outputs(self, run_dir: Path, manifest: Manifest, params: dict | None = None) -> str | None:
        """Why the outputs `manifest` records are no longer there (None: still there). `params`: the current
        flags, for where the cache is (stages/paths.py)."""
        return None
