"""The OpenAI-compatible server: the same greedy tokens as `prestage launch`, chat through the stored template,
streaming that adds up to the same text, and one-line 4xx errors for what it does not do."""

from __future__ import annotations

import json
import shutil

import pytest

from prestage.stages.manifest import read

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def served(tmp_path_factory, checkpoint_dirs):
    """A tiny model through every stage on CPU, its launch output, and a TestClient on the server app."""
    from fastapi.testclient import TestClient

    from prestage.runner.chain import load_upstream
    from prestage.stages import get_stage
    from prestage.stages.launch.inference import load_for_inference
    from prestage.stages.launch.server import create_app
    from tests.support.cli import run_cli

    tmp = tmp_path_factory.mktemp("served")
    model = shutil.copytree(checkpoint_dirs["single"], tmp / "tiny")
    arts = tmp / "arts"
    r = run_cli(
        ["--artifacts", arts, "run", model, "--prompt", PROMPT, "--max-tokens", "12", "--device", "cpu"]
        + ["--generation-config", "vllm"]
    )
    assert r.returncode == 0, r.stderr
    run_dir = arts / "tiny"
    launched = read(run_dir / "launch.msgpack").outputs["completions"][0]
    upstream = load_upstream(get_stage("launch"), run_dir)
    inf = load_for_inference(run_dir, upstream, {"device": "cpu", "run_dir": str(run_dir)})
    app = create_app(inf, "tiny", int(upstream["configure"].outputs["max_model_len"]))
    with TestClient(app) as client:
        client.run_dir = run_dir
        client.inference = inf
        yield client, launched


def test_completion_matches_launch(served):
    client, launched = served
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == launched["text"]
    assert body["usage"]["completion_tokens"] == len(launched["token_ids"])
    assert body["object"] == "text_completion" and body["model"] == "tiny"


def test_batch_of_prompts_and_token_ids(served):
    client, launched = served
    r = client.post("/v1/completions", json={"prompt": [PROMPT, "x = 1"], "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts[0] == launched["text"] and len(texts) == 2


def test_models_and_health(served):
    client, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == "tiny" and data[0]["max_model_len"] > 0


def test_chat_uses_the_stored_template(served):
    client, _ = served
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert r.json()["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"prompt": "a", "model": "other"}, 404, "other"),
        ({"prompt": "a", "max_tokens": 10**7}, 400, "max_tokens"),
        ({"prompt": [10**9]}, 400, "out of vocabulary"),
        ({"prompt": "a", "n": 2}, 400, "n=2"),
    ],
)
def test_errors_are_one_line_4xx(served, body, status, needle):
    client, _ = served
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    msg = r.json()["error"]["message"]
    assert needle in msg and "\n" not in msg


def test_prestage_serve_over_http(served):
    """The CLI wiring: `prestage serve RUN` on a loopback port answers the OpenAI API, then stops on SIGTERM."""
    import json
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    from tests.support.cli import popen_cli

    client, launched = served
    run_dir = client.run_dir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = popen_cli(
        ["serve", run_dir, "--port", port, "--device", "cpu", "--served-model-name", "tiny"]
        + ["--generation-config", "vllm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read() if proc.poll() is not None else "timed out"
                    raise AssertionError(f"serve did not come up: {err}") from None
                time.sleep(0.1)
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["text"] == launched["text"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read()  # a graceful stop: the HTTP thread ends, then the engine loop


def test_engine_loop_runs_on_the_thread_that_calls_run_here(served):
    """`serve` runs the engine loop on the thread that loaded the model (one OpenMP team for torch's kernels):
    requests submitted from other threads are stepped and answered on that thread, and stop() ends it."""
    import threading

    from prestage.runner.chain import load_upstream
    from prestage.stages import get_stage
    from prestage.stages.launch.engine_loop import EngineLoop
    from prestage.stages.launch.inference import load_for_inference
    from prestage.stages.launch.sampling import SamplingParams

    client, _ = served
    run_dir = client.run_dir
    inf = load_for_inference(run_dir, load_upstream(get_stage("launch"), run_dir), {"device": "cpu"})
    loop = EngineLoop.on_this_thread(inf.engine)
    with pytest.raises(RuntimeError, match="already has a loop"):
        EngineLoop.on_this_thread(inf.engine)
    here, seen, finals = threading.get_ident(), set(), []

    def sink(out):
        seen.add(threading.get_ident())
        if out.finished:
            finals.append(out)
            if len(finals) == 2:
                loop.stop()

    def submit():
        for _ in range(2):
            loop.submit([5, 17, 300, 9], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), sink)

    threading.Thread(target=submit).start()
    loop.run_here()  # returns once the sink calls stop()
    assert seen == {here} and [len(o.token_ids) for o in finals] == [4, 4]


def test_generation_defaults_fill_what_the_request_leaves_out(served):
    """As vLLM's server: a field the request omits takes generation_config.json's value; a given one wins."""
    from fastapi.testclient import TestClient

    from prestage.stages.launch.server import create_app

    client, _ = served
    defaults = {"temperature": 0.0, "repetition_penalty": 2.0, "max_tokens": 24}
    with TestClient(create_app(client.inference, "tiny", 4096, defaults)) as with_file:
        omitted = with_file.post("/v1/completions", json={"prompt": PROMPT}).json()
    explicit = client.post(
        "/v1/completions", json={"prompt": PROMPT, "temperature": 0, "repetition_penalty": 2.0, "max_tokens": 24}
    ).json()
    plain = client.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, "max_tokens": 24}).json()
    assert omitted["choices"][0]["text"] == explicit["choices"][0]["text"]
    assert omitted["usage"]["completion_tokens"] == 24
    assert explicit["choices"][0]["text"] != plain["choices"][0]["text"]  # the penalty changed the greedy path


def _events(response) -> list:
    lines = [x for x in response.text.split("\n\n") if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
    return [json.loads(x[6:]) for x in lines[:-1]]


def test_streamed_completion_adds_up_to_the_same_text(served):
    client, _ = served
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _events(r)
    assert len(chunks) > 2  # it really streamed
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_streamed_text_never_sends_what_a_stop_string_cuts(served):
    client, _ = served
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and len(cut["text"]) < len(full)
    chunks = _events(client.post("/v1/completions", json={**body, "stop": [stop], "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_chat_starts_with_the_role(served):
    client, _ = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    chunks = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
