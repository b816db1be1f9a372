"""`prestage serve` as a user's OpenAI client sees it: a real server process on a free loopback port (--port 0,
the announced port), the official `openai` client, every error case with OpenAI's error body and status, the
API key, logprobs, streaming with usage, /metrics; then a bounded load (32 clients x 5 requests, mixed
streaming) where every answer equals the same request alone, cancelled streams free their slots, and the
server's RSS stays flat."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
MAX_MODEL_LEN = 256
SLOTS = 8
REPO = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, lines: list[str]):
        self.proc, self.port, self.lines = proc, port, lines
        self.base = f"http://127.0.0.1:{port}"

    def client(self, key: str = KEY, **kw):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def post(self, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", **(headers or {})}
        req = urllib.request.Request(self.base + path, data=data, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name: str, labels: str = "") -> float:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"") + r" ([0-9.e+-]+)"
        m = re.search(r"^" + pattern + r"$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, checkpoint_dirs) -> Path:
    tmp = tmp_path_factory.mktemp("openai")
    model = shutil.copytree(checkpoint_dirs["single"], tmp / "tiny")
    arts = tmp / "arts"
    r = subprocess.run(
        [sys.executable, "-m", "prestage", "--artifacts", str(arts), "run", str(model), "--max-tokens", "2"]
        + ["--device", "cpu", "--generation-config", "vllm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return arts / "tiny"


def _serve(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prestage", "serve", str(run_dir), "--device", "cpu", *extra],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def server(staged_run):
    proc = _serve(
        staged_run,
        *("--port", "0", "--api-key", KEY, "--served-model-name", "tiny", "--generation-config", "vllm"),
        *("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(SLOTS), "--dtype", "float32"),
    )
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"serve: tiny on http://127\.0\.0\.1:(\d+)/v1", line)
        if m:
            port = int(m.group(1))
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert port, "".join(lines) + (proc.stdout.read() if proc.poll() is not None else "")
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # keep the pipe drained
    srv = Server(proc, port, lines)
    while True:
        try:
            with urllib.request.urlopen(srv.base + "/health", timeout=2):
                break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
    yield srv
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


# ---- the surface ------------------------------------------------------------------------------------------------
def test_serve_port_zero_announces_the_real_port_and_models(server):
    assert server.port != 0
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert abs(models[0].created - time.time()) < 3600


def test_serve_completion_chat_and_usage(server):
    c = server.client()
    r = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=8, temperature=0, best_of=1, user="u1")
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chat = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6


def test_serve_streaming_with_usage_adds_up(server):
    c = server.client()
    whole = c.completions.create(
        model="tiny", prompt="import os", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        c.completions.create(
            model="tiny",
            prompt="import os",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 12 == whole.usage.completion_tokens
    assert "".join(ch.choices[0].text for ch in chunks[:-1]) == whole.choices[0].text
    chat = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].usage.completion_tokens <= 5


def test_serve_logprobs_completions_and_chat(server):
    c = server.client()
    r = c.completions.create(
        model="tiny", prompt="x = 1", max_tokens=5, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and chosen <= 0 and abs(max(top.values()) - chosen) < 1e-4  # greedy: the best one
    chat = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    streamed = list(
        c.completions.create(
            model="tiny",
            prompt="x = 1",
            max_tokens=5,
            temperature=0,
            logprobs=1,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    got = [v for ch in streamed if ch.choices and ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert got == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_serve_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").models.list()
    assert e.value.status_code == 401 and "API key" in e.value.body["message"]
    with urllib.request.urlopen(server.base + "/health", timeout=5) as r:  # health and metrics stay open
        assert r.status == 200


BAD = [
    ({"prompt": "a", "model": "other"}, 404, "model", "other"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature", "temperature"),
    ({"prompt": "a", "temperature": 1e308}, 400, "temperature", "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "top_p"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "a", "max_tokens": 10**7}, 400, "max_tokens", "max_tokens"),
    ({"prompt": "a", "seed": 2**70}, 400, "seed", "seed"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": [""]}, 400, "prompt[0]", "empty"),
    ({"prompt": [[]]}, 400, "prompt[0]", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [10**9]}, 400, "prompt", "out of vocabulary"),
    ({"prompt": "a", "n": 2}, 400, "n", "n=2"),
    ({"prompt": "a", "stop": [""]}, 400, "stop", "stop"),
    ({"prompt": "a", "logprobs": 50}, 400, "logprobs", "logprobs"),
    ({"prompt": "a", "response_format": {"type": "json_object"}}, 400, "response_format", "response_format"),
    ({"prompt": "a", "tools": [{"type": "function"}]}, 400, "tools", "tools"),
    ({"prompt": "a", "logit_bias": {"1": 5}}, 400, "logit_bias", "logit_bias"),
    ({"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty", "frequency_penalty"),
    ({"prompt": "a", "bogus_field": 1}, 400, "bogus_field", "bogus_field"),
    ({"prompt": "a", "best_of": 3}, 400, "best_of", "best_of"),
    ({"prompt": "a b c " * (MAX_MODEL_LEN + 10)}, 400, "prompt", "context"),
    ({"prompt": list(range(1, MAX_MODEL_LEN + 5))}, 400, "prompt", "context"),
]


@pytest.mark.parametrize("body,status,param,needle", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_serve_bad_completion_requests(server, body, status, param, needle):
    code, doc = server.post("/v1/completions", json.dumps(body).encode())
    assert code == status, doc
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert needle in err["message"] and "\n" not in err["message"]
    # the openai client raises the matching error class and shows the message
    cls = openai.NotFoundError if status == 404 else openai.BadRequestError
    known = {"prompt", "temperature", "top_p", "max_tokens", "seed", "n", "stop", "logprobs", "logit_bias", "best_of"}
    known |= {"frequency_penalty", "model"}
    kwargs = {k: v for k, v in body.items() if k in known}
    with pytest.raises(cls) as e:
        server.client().completions.create(
            **{"model": "tiny", **kwargs}, extra_body={k: v for k, v in body.items() if k not in known}
        )
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "raw,needle",
    [
        (b"{not json", "not valid JSON"),
        (b'{"prompt": "a", "temperature": NaN}', "temperature"),
        (b'{"prompt": "a", "temperature": Infinity}', "temperature"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_serve_malformed_bodies(server, raw, needle):
    code, doc = server.post("/v1/completions", raw)
    assert code == 400 and needle in doc["error"]["message"], doc


def test_serve_chat_errors_and_limits(server):
    code, doc = server.post("/v1/chat/completions", json.dumps({"messages": []}).encode())
    assert code == 400 and doc["error"]["param"] == "messages"
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}
    code, doc = server.post("/v1/chat/completions", json.dumps(body).encode())
    assert code == 400 and doc["error"]["param"] == "tools"
    start = time.monotonic()
    code, doc = server.post("/v1/completions", json.dumps({"prompt": "x" * (10 * 1024 * 1024)}).encode())
    assert code == 413 and "limit" in doc["error"]["message"] and time.monotonic() - start < 10
    code, doc = server.post("/v1/nothing", b"{}")
    assert code == 404 and doc["error"]["type"] == "not_found_error"


def test_serve_metrics_and_request_log(server):
    before = server.metric("prestage_requests_total", 'status="length"')
    server.client().completions.create(
        model="tiny", prompt="a", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert server.metric("prestage_requests_total", 'status="length"') == before + 1
    assert server.metric("prestage_generation_tokens_total") >= 3
    assert server.metric("prestage_time_to_first_token_seconds_count") >= 1
    assert server.metric("prestage_kv_cache_slots_total") == SLOTS
    deadline = time.monotonic() + 5
    while not any(
        re.search(r"request \d+ length prompt_tokens=\d+ completion_tokens=3 latency=", x) for x in server.lines
    ):
        assert time.monotonic() < deadline, "".join(server.lines[-20:])
        time.sleep(0.1)


# ---- load, cancellation, memory ---------------------------------------------------------------------------------
TEMPLATES = [
    {"prompt": "def fibonacci(n):", "max_tokens": 24, "temperature": 0},
    {"prompt": "import numpy as np\n", "max_tokens": 16, "temperature": 0},
    {"prompt": "class A:", "max_tokens": 9, "temperature": 0.8, "seed": 11},
    {"prompt": "# a comment", "max_tokens": 30, "temperature": 0},
    {"prompt": "x = [1, 2, 3]", "max_tokens": 5, "temperature": 1.0, "seed": 3},
    {"prompt": "while True:", "max_tokens": 20, "temperature": 0.7, "seed": 99},
    {"prompt": "print('hello')", "max_tokens": 12, "temperature": 0},
    {"prompt": "for i in range(10):", "max_tokens": 18, "temperature": 0},
]


def _ask(client, body: dict, stream: bool) -> str:
    body = {"model": "tiny", "extra_body": {"ignore_eos": True}, **body}
    if not stream:
        return client.completions.create(**body).choices[0].text
    return "".join(ch.choices[0].text for ch in client.completions.create(**body, stream=True) if ch.choices)


def test_serve_load_equals_alone_cancel_frees_and_rss_stays_flat(server):
    client = server.client()
    alone = [_ask(client, t, False) for t in TEMPLATES]  # also the warm-up
    for i in range(SLOTS):  # touch every slot once before measuring
        _ask(client, TEMPLATES[i % len(TEMPLATES)], True)
    warm_rss = server.rss_bytes()

    def one_client(c: int) -> list[tuple[int, str]]:
        own = server.client()
        got = []
        for r in range(5):
            k = (c * 5 + r) % len(TEMPLATES)
            got.append((k, _ask(own, TEMPLATES[k], stream=(c + r) % 2 == 0)))
        return got

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = [x for chunk in pool.map(one_client, range(32)) for x in chunk]
    assert time.monotonic() - start < 60
    assert len(results) == 160
    mismatched = [(k, text) for k, text in results if text != alone[k]]
    assert not mismatched, (
        f"{len(mismatched)} of 160 differ from alone, first: {mismatched[0]} vs {alone[mismatched[0][0]]!r}"
    )

    # cancelled streams: three times as many long streams as slots, dropped at once; the queued ones at least
    # must be aborted (the model is fast enough that the first batch may finish first)
    long_body = {"prompt": "a", "max_tokens": MAX_MODEL_LEN - 8, "temperature": 0}
    t0 = time.monotonic()
    _ask(client, long_body, False)
    full_s = time.monotonic() - t0
    aborts = server.metric("prestage_requests_total", 'status="abort"')
    socks = _send_raw(server, {**long_body, "stream": True, "ignore_eos": True}, 3 * SLOTS)
    time.sleep(0.05)
    for sock in socks:
        sock.close()
    t0 = time.monotonic()
    first = next(iter(client.completions.create(model="tiny", prompt="b", max_tokens=4, temperature=0, stream=True)))
    ttft = time.monotonic() - t0
    assert first.choices[0].text is not None
    assert ttft < max(full_s / 2, 0.5), (ttft, full_s)
    deadline = time.monotonic() + 10
    while server.metric("prestage_requests_total", 'status="abort"') < aborts + 2 * SLOTS:
        assert time.monotonic() < deadline, "the cancelled streams were not aborted"
        time.sleep(0.1)
    while server.metric("prestage_kv_cache_slots_in_use") != 0:
        assert time.monotonic() < deadline, "slots stay in use after the streams were cancelled"
        time.sleep(0.1)

    after_rss = server.rss_bytes()
    assert after_rss <= warm_rss * 1.10, (warm_rss, after_rss)


def test_serve_dropped_non_streaming_requests_are_aborted(server):
    """Clients that send a long non-streaming request and hang up: the server notices, aborts them (those still
    queued behind the first full batch at least), and their slots come back; before, each ran to its end."""

    aborts = server.metric("prestage_requests_total", 'status="abort"')
    body = {"prompt": "a", "max_tokens": MAX_MODEL_LEN - 8, "temperature": 0, "ignore_eos": True}
    socks = _send_raw(server, body, 3 * SLOTS)
    time.sleep(0.05)
    for s in socks:
        s.close()
    deadline = time.monotonic() + 15
    while server.metric("prestage_requests_total", 'status="abort"') < aborts + 2 * SLOTS:
        assert time.monotonic() < deadline, "".join(server.lines[-12:])
        time.sleep(0.1)
    while server.metric("prestage_kv_cache_slots_in_use") != 0:
        assert time.monotonic() < deadline, "slots stay in use after the clients left"
        time.sleep(0.1)


def _send_raw(server, body: dict, count: int) -> list:
    """`count` connections, each with one POST /v1/completions sent and nothing read (to be dropped)."""
    import socket

    data = json.dumps(body)
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n{data}"
    ).encode()
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(count)]
    for s in socks:
        s.sendall(request)
    return socks


# ---- the command line -------------------------------------------------------------------------------------------
def test_serve_port_in_use_is_one_resource_line(staged_run):
    import socket

    from prestage.stages.errors import CODE

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _serve(staged_run, "--port", str(port))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == CODE["resource"], err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port} is already in use" in lines[0] and "serve:" not in err


def test_serve_without_the_serve_extra_says_what_to_install(staged_run):
    from prestage.stages.errors import CODE

    code = (
        "import sys; sys.modules['uvicorn'] = None; sys.argv = ['prestage', 'serve', sys.argv[1]];"
        "from prestage.runner.cli import main; main()"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(staged_run)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == CODE["unsupported"], r.stderr
    assert "pip install 'prestage[serve]'" in r.stderr and "uvicorn" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "flags,needle", [(["--dtype", "int3"], "--dtype 'int3'"), (["--max-model-len", "99999"], "--max-model-len 99999")]
)
def test_serve_flag_errors(staged_run, flags, needle):
    from prestage.stages.errors import CODE

    proc = _serve(staged_run, "--port", "0", *flags)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == CODE["usage"] and needle in err, err
