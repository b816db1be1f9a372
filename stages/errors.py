"""The one errors module: every failure prestage reports, its class, and its exit code.

Each failure class has exactly one exit code. A `PrestageError` carries a one-line message that names the
value at fault and says what to do; the CLI prints it to stderr as `prestage: error: <message>` and exits
with the class's code, never with a traceback (`-v` adds the traceback for a bug report).

This module must stay importable without torch, transformers or huggingface_hub.
"""

from __future__ import annotations

# (code, name, meaning): the table shown in the README and in `prestage --help`.
EXIT_CODES: tuple[tuple[int, str, str], ...] = (
    (0, "ok", "success (a cached stage is a success)"),
    (1, "internal", "a bug in prestage: rerun with -v and report the traceback"),
    (2, "usage", "bad flag, value or argument"),
    (3, "not-found", "model, repo, revision, run or file does not exist"),
    (4, "auth", "gated or private repo: missing or insufficient token"),
    (5, "offline-miss", "offline mode and the files are not in the cache"),
    (6, "network", "hub unreachable after bounded retries"),
    (7, "unsupported", "architecture, model type or load format prestage cannot run"),
    (8, "untrusted-code", "the repo's own code must run: pass --trust-remote-code"),
    (9, "invalid-model", "config, tokenizer or checkpoint files are malformed or inconsistent"),
    (10, "integrity", "bytes differ from the recorded size/sha256, or tokenizer encodings changed"),
    (11, "stale-upstream", "an upstream manifest is missing or out of date: re-run that stage"),
    (12, "bad-manifest", "a manifest file is truncated, foreign or from a newer prestage"),
    (13, "resource", "not enough disk space or memory"),
    (130, "interrupted", "interrupted (Ctrl-C)"),
)

CODE = {name: code for code, name, _ in EXIT_CODES}


class PrestageError(Exception):
    """A failure with a one-line message and the exit code of its class."""

    kind = "internal"

    def __init__(self, message: str):
        # One line, always: a multi-line library message is folded so the CLI prints one line.
        super().__init__(" ".join(str(message).split()))

    @property
    def exit_code(self) -> int:
        return CODE[self.kind]


class UsageError(PrestageError):
    kind = "usage"


class NotFoundError(PrestageError):
    kind = "not-found"


class AuthError(PrestageError):
    kind = "auth"


class OfflineMissError(PrestageError):
    kind = "offline-miss"


class NetworkError(PrestageError):
    kind = "network"


class UnsupportedError(PrestageError):
    kind = "unsupported"


class UntrustedCodeError(PrestageError):
    kind = "untrusted-code"


class InvalidModelError(PrestageError):
    kind = "invalid-model"


class IntegrityError(PrestageError):
    kind = "integrity"


class StaleUpstreamError(PrestageError):
    kind = "stale-upstream"


class BadManifestError(PrestageError):
    kind = "bad-manifest"


class ResourceError(PrestageError):
    kind = "resource"


def exit_code_table() -> str:
    """The exit-code table as aligned text (for `--help` and the README)."""
    return "\n".join(f"{code:>4}  {name:<15} {meaning}" for code, name, meaning in EXIT_CODES)
