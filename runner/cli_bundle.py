"""The bundle commands of `prestage`: verify, bundle, unbundle, push, pull and diff (runner/bundle.py,
unbundle.py, oci.py, verify.py and diff.py do the work; these parse, call and report)."""

from __future__ import annotations

from pathlib import Path

import click

from prestage.runner.cli_common import State, emit
from prestage.stages import errors

PLAIN_HTTP = "Talk to the registry over plain HTTP (a local registry without TLS)."


@click.command("verify")
@click.argument("run", metavar="RUN|BUNDLE")
@click.option("--json", "json_out", is_flag=True, help="Print JSON on stdout.")
@click.option("--download-dir", default=None, metavar="DIR", help="Hugging Face cache root (default HF_HUB_CACHE).")
@click.option(
    "--verify-key", default=None, metavar="PUB", help="BUNDLE: refuse it unless SHA256SUMS is signed by this key."
)
@click.pass_obj
def verify_cmd(state: State, run: str, json_out: bool, download_dir, verify_key):
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
def bundle_cmd(state: State, run: str, output: str, fmt, link: bool, sign_key, json_out: bool, download_dir):
    """Write RUN (fresh up to fetch-weights) as one self-contained bundle for a machine with no network: its
    manifests, stored tokenizer and model files as a Hugging Face cache under hub/ (a local folder model under
    model/), with a SHA256SUMS list reusing the sha256 the manifests recorded."""
    from prestage.runner.bundle import bundle

    reporter = state.reporter(json_out)
    params = {"download_dir": download_dir}
    summary = bundle(state.run_dir(run), Path(output), fmt, link, params, reporter, sign_key)
    emit(reporter, summary)


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
@click.option("--plain-http", is_flag=True, help="REF: " + PLAIN_HTTP)
@click.option("--json", "json_out", is_flag=True, help="Print what was placed as JSON on stdout.")
@click.pass_obj
def unbundle_cmd(state: State, path: str, hub_cache, model_dir, verify_key, plain_http: bool, json_out: bool):
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
    emit(reporter, report)


@click.command("push")
@click.argument("source", metavar="RUN|BUNDLE")
@click.argument("ref", metavar="REGISTRY/NAME:TAG")
@click.option("--plain-http", is_flag=True, help=PLAIN_HTTP)
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--download-dir", default=None, metavar="DIR", help="Hugging Face cache root (default HF_HUB_CACHE).")
@click.pass_obj
def push_cmd(state: State, source: str, ref: str, plain_http: bool, json_out: bool, download_dir):
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
    emit(reporter, result)


@click.command("pull")
@click.argument("ref", metavar="REGISTRY/NAME:TAG")
@click.option("-o", "--output", "output", required=True, metavar="PATH", help="OCI layout to write (must not exist).")
@click.option("--plain-http", is_flag=True, help=PLAIN_HTTP)
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_obj
def pull_cmd(state: State, ref: str, output: str, plain_http: bool, json_out: bool):
    """Pull a bundle pushed with `prestage push` into a new OCI layout at PATH (every blob's sha256 checked);
    then `prestage unbundle PATH` places it."""
    from prestage.runner import oci

    reporter = state.reporter(json_out)
    emit(reporter, oci.pull(ref, Path(output), plain_http, reporter))


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--volatile", is_flag=True, help="Compare the volatile sections too (times, host, versions).")
@click.option("--json", "json_out", is_flag=True, help="Print the differences as JSON on stdout.")
@click.pass_obj
def diff_cmd(state: State, a: str, b: str, volatile: bool, json_out: bool):
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
