"""The OpenAI-compatible server: the same greedy tokens as `prestage launch`, chat through the stored template,
streaming that adds up to the same text, and one-line 4xx errors for what it does not do."""

from __future__ import annotations

import json
import shutil
import time

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
        # a stream still running at SIGTERM ends at once as "abort", then [DONE], and serve exits 0 (it used to
        # run on until uvicorn's 5 s grace period cut it, with a traceback)
        long = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        req = urllib.request.Request(
            f"{base}/v1/completions", data=json.dumps(long).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.readline().startswith(b"data: {")  # the stream is running
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            rest = r.read().decode()
        events = [e for e in rest.strip().split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
        code = proc.wait(timeout=30)
        assert time.monotonic() - stopped < 4.0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert code == 0, err  # a graceful stop: the HTTP thread ends, then the engine loop
    assert "Traceback" not in err, err


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


def test_a_top_k_beyond_the_vocabulary_is_off_and_harms_no_other_request(served):
    """top_k >= 2**63 used to overflow the sampler's tensor, failing the engine step for every running request."""
    client, _ = served
    base = {"prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "seed": 7}
    want = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    for top_k in (2**63, 10**30):
        r = client.post("/v1/completions", json={**base, "top_k": top_k})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want  # top_k over the vocabulary: the same as no top_k


def test_a_deeply_nested_body_is_a_400_not_a_500(served):
    client, _ = served
    for raw in (b"[" * 100_000, b'{"prompt": ' + b"[" * 100_000):
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", ["\ud800", ["ok", "a\udfffb"]])
def test_a_lone_surrogate_in_the_prompt_is_a_400_not_a_500(served, prompt):
    client, _ = served
    body = json.dumps({"prompt": prompt, "max_tokens": 2})  # ASCII, with the surrogate as a \\u escape
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("prompt", "prompt[1]")
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("part", [{"type": "text", "text": 5}, {"type": "text", "text": None}, {"type": "text"}])
def test_a_text_part_without_a_string_is_a_400_not_a_500(served, part):
    client, _ = served
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"


def test_streamed_logprobs_text_offsets_continue_across_chunks(served):
    """text_offset is the token's position in the whole completion, streamed or not (each chunk used to restart
    at 0)."""
    client, _ = served
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    r = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert sum((lp["tokens"] for lp in lps), []) == whole["tokens"]
    assert sum((lp["text_offset"] for lp in lps), []) == whole["text_offset"]


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-300])
def test_a_temperature_below_vllms_epsilon_is_greedy(served, temperature):
    """As vLLM (temperature < 1e-5 is greedy); 1e-40 used to round to 0 in float32 and pick tokens from inf/nan."""
    client, _ = served
    body = {"prompt": PROMPT, "max_tokens": 8}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "temperature": temperature})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy


def test_engine_loop_survives_a_sink_whose_event_loop_closed(served):
    """At shutdown uvicorn closes its event loop while a stream may still run: the engine loop's next delivery
    raised `RuntimeError: Event loop is closed` out of `run_here`, so SIGTERM/SIGINT ended serve with exit 1 and
    "internal error". The request is aborted instead and the loop stops cleanly."""
    import asyncio
    import threading

    from prestage.stages.launch.engine_loop import EngineLoop
    from prestage.stages.launch.sampling import SamplingParams

    engine = served[0].inference.engine
    dead = asyncio.new_event_loop()
    dead.close()
    got = []

    def sink(out):
        got.append(out)
        dead.call_soon_threadsafe(print, out)  # what the server's sink does, on a closed loop

    saved = engine.__dict__.pop("_engine_loop", None)  # the fixture's app has its own loop on this engine
    try:
        loop = EngineLoop.on_this_thread(engine)
        ticket = loop.submit([1, 2, 3], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), sink)
        threading.Timer(2.0, loop.stop).start()
        loop.run_here()  # raised RuntimeError before the fix
        assert [o.finish_reason for o in got] == [None, "abort"]  # the first delivery failed: the request ended
        assert ticket.request_id not in loop._live and engine.slots_in_use == 0
    finally:
        engine._engine_loop = saved


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", ["1", "-0.5", True])
def test_a_penalty_sent_as_a_string_or_bool_is_refused_not_ignored(served, field, value):
    """A non-zero penalty is refused by name; as "1" (which pydantic coerces) it used to pass and be ignored."""
    client, _ = served
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    assert client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, field: "0"}).status_code == 200


@pytest.mark.parametrize("dtype", ["auto", "half", "float", "float16", "bfloat16", "float32", "torch.float16"])
def test_serve_takes_vllms_dtype_names(dtype):
    """`vllm serve --dtype half` (or float) works, and launch's requested_dtype reads them; serve refused them."""
    from prestage.stages.launch.serving import check_serve_params

    check_serve_params({"dtype": dtype})


def test_serve_refuses_an_unknown_dtype():
    from prestage.stages.errors import UsageError
    from prestage.stages.launch.serving import check_serve_params

    with pytest.raises(UsageError, match="float64"):
        check_serve_params({"dtype": "float64"})


def test_a_batch_stops_tokenizing_at_the_first_prompt_over_the_context(served, monkeypatch):
    """Each prompt of a list is checked as it is tokenized: an 8 MB list of over-long prompts used to be tokenized
    whole (seconds on the event loop, every other request waiting) before the first was refused."""
    client, _ = served
    tok = client.inference.tokenizer
    calls = []
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **k: calls.append(len(text)) or real(text, *a, **k))
    long = "ab " * 6000  # about 6000 tokens: over the tiny model's 4096, under the character bound
    r = client.post("/v1/completions", json={"prompt": [long] * 20, "max_tokens": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt[0]"
    assert len(calls) == 1


def test_a_failed_engine_step_is_a_500_and_a_stream_it_ends_still_gets_done(served, monkeypatch):
    """A step that fails is the server's fault, not the prompt's: a 500 `server_error` for a plain request; a
    stream gets the error as an event, then `[DONE]` (as vLLM ends a failed stream). The next request runs."""
    client, _ = served
    engine = client.inference.engine
    real, failures = engine.step, [1]

    def step():  # fails once this test's request (max_tokens 7) is in the engine, not on an earlier test's abort
        if failures and any(s.params.max_tokens == 7 for s in engine.requests.values()):
            failures.pop()
            raise RuntimeError("injected step failure")
        return real()

    monkeypatch.setattr(engine, "step", step)
    body = {"prompt": PROMPT, "max_tokens": 7}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error" and "injected step failure" in r.json()["error"]["message"]
    failures.append(1)
    events = client.post("/v1/completions", json={**body, "stream": True}).text.strip().split("\n\n")
    assert json.loads(events[-2][6:])["error"]["code"] == 500 and events[-1] == "data: [DONE]"
    assert client.post("/v1/completions", json=body).status_code == 200


def test_seeds_are_int64_and_stream_options_need_a_stream(served):
    """As vLLM: a seed outside int64 is a 400 (2**64 - 1 used to act as -1), and so are stream_options without
    stream: true."""
    client, _ = served
    for seed in (2**63, 2**64 - 1):
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    assert (
        client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "seed": 2**63 - 1}).status_code == 200
    )
    body = {"prompt": PROMPT, "max_tokens": 2, "stream_options": {"include_usage": True}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    assert client.post("/v1/completions", json={**body, "stream": True}).status_code == 200


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_tokenizing_a_prompt_does_not_hold_up_other_requests(served, monkeypatch, route):
    """Tokenizing and chat templates run off the event loop (as vLLM's server does): while one request's slow
    tokenization runs, /health still answers at once (it waited for the whole tokenization before)."""
    import threading

    client, _ = served
    tok = client.inference.tokenizer
    started = threading.Event()
    name = "encode" if route == "completions" else "apply_chat_template"
    real = getattr(tok, name)

    def slow(*args, **kwargs):
        started.set()
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(tok, name, slow)
    if route == "completions":
        path, body = "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}
    else:
        assert getattr(tok, "chat_template", None), "the tiny model's tokenizer carries a chat template"
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    answers = []
    worker = threading.Thread(target=lambda: answers.append(client.post(path, json=body)))
    worker.start()
    assert started.wait(10)
    t0 = time.perf_counter()
    assert client.get("/health").status_code == 200
    waited = time.perf_counter() - t0
    worker.join(30)
    assert answers and answers[0].status_code == 200, answers
    assert waited < 1.0, f"/health waited {waited:.2f}s for another request's tokenization"
