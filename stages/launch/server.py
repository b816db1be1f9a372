"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over a loaded `Inference`.

    GET  /health                 200 when the model is loaded
    GET  /v1/models              the one served model, with its max_model_len
    POST /v1/completions         prompt: str | [str] | [int] | [[int]]; max_tokens, temperature, top_p, top_k,
                                 seed, stop, n (1 only), echo (false only)
    POST /v1/chat/completions    messages through the chat template tokenize-prep stored

A sampling field the request leaves out takes, as in vLLM's server, the value the model's generation_config.json
sets (`generation_defaults`, recorded by tokenize-prep; `--generation-config vllm` ignores them), else the OpenAI
API's default (max_tokens 16 for completions, temperature 1.0, top_p 1.0). `top_k`, `min_p` and
`repetition_penalty` are accepted as vLLM's extra parameters. The engine runs one request at a time (a lock);
several prompts in one request are batched together. `stream: true` answers with server-sent events
(`data: {chunk}` lines, then `data: [DONE]`) as OpenAI's API does; while a sequence runs, the last
(longest stop string - 1) characters are held back, so text that a stop string later cuts is never sent.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid

from pydantic import BaseModel, Field


class _Sampling(BaseModel):
    """The request fields both endpoints share, with the OpenAI API's defaults."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _text_of(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(parts) != len(content):
        raise ApiError(400, "only text content parts are supported by this model", "messages")
    return "".join(parts)


_OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def create_app(inference, served_model_name: str, max_model_len: int, generation_defaults: dict | None = None):
    """A FastAPI app serving `inference` (from prestage.stages.launch.inference.load_for_inference); a field a request
    leaves out takes `generation_defaults` (the model's generation_config.json), else the OpenAI default."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from prestage.stages.launch.sampling import SamplingParams

    app = FastAPI(title="prestage", version="1")
    lock = threading.Lock()
    tokenizer = inference.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(
            status_code=e.status,
            content={"error": {"message": e.message, "type": "invalid_request_error", "param": e.param, "code": None}},
        )

    def check_common(model: str | None, n: int) -> None:
        if model not in (None, served_model_name):
            raise ApiError(404, f"model '{model}' does not exist; this server serves '{served_model_name}'", "model")
        if n != 1:
            raise ApiError(400, f"n={n} is not supported; send n=1 (one completion per prompt)", "n")

    defaults = {**_OPENAI_DEFAULTS, **{k: v for k, v in (generation_defaults or {}).items() if k != "max_tokens"}}
    default_max_tokens = (generation_defaults or {}).get("max_tokens")

    def sampling(req, max_tokens: int | None, prompt_len: int, fallback_max_tokens: int | None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        budget = max_model_len - prompt_len
        if budget <= 0:
            raise ApiError(
                400, f"the prompt has {prompt_len} tokens and this model's context is {max_model_len}", "prompt"
            )
        if max_tokens is None:
            max_tokens = default_max_tokens or fallback_max_tokens
        tokens = budget if max_tokens is None else max_tokens
        if tokens < 1 or tokens > budget:
            raise ApiError(
                400,
                f"max_tokens={tokens}: must be between 1 and {budget} (context {max_model_len} "
                f"minus {prompt_len} prompt tokens)",
                "max_tokens",
            )
        values = {k: defaults[k] if getattr(req, k) is None else getattr(req, k) for k in _OPENAI_DEFAULTS}
        try:
            return SamplingParams(max_tokens=tokens, seed=req.seed, stop=stop, **values)
        except Exception as e:  # the engine's own validation of the values, one line
            raise ApiError(400, " ".join(str(e).split())) from None

    def run(prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
        with lock:
            return inference.engine.generate(prompts, params)

    def stream(prompts: list[list[int]], params: list[SamplingParams], chunk):
        """Server-sent events: generation runs in a thread; each step's new text goes out as `chunk(index, delta,
        finish_reason)`, holding back what a stop string could still cut."""
        from fastapi.responses import StreamingResponse

        events: queue.Queue = queue.Queue()
        hold = [max((len(x) for x in p.stop), default=1) - 1 for p in params]

        def work():
            try:
                with lock:
                    inference.engine.generate(prompts, params, on_step=lambda i, t, f: events.put((i, t, f)))
                events.put(None)
            except Exception as e:  # reported in the stream: the 200 header is already sent
                events.put(e)

        def body():
            threading.Thread(target=work, daemon=True).start()
            sent = [0] * len(prompts)
            while (event := events.get()) is not None:
                if isinstance(event, Exception):
                    error = {"message": " ".join(str(event).split()), "type": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                i, text, finish = event
                upto = len(text) if finish else max(sent[i], len(text) - hold[i])
                if upto > sent[i] or finish:
                    yield f"data: {json.dumps(chunk(i, text[sent[i] : upto], finish))}\n\n"
                    sent[i] = upto
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    def usage(prompts, outs) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(len(o["token_ids"]) for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def validate_ids(ids: list[int]) -> list[int]:
        bound = len(tokenizer) - 1
        for i in ids:
            if not 0 <= i <= bound:
                raise ApiError(400, f"token id {i} is out of vocabulary (0..{bound})", "prompt")
        return ids

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "prestage",
                    "max_model_len": max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        check_common(req.model, req.n)
        if req.echo:
            raise ApiError(400, "echo=true is not supported; send echo=false", "echo")
        raw = req.prompt
        if isinstance(raw, str):
            prompts = [tokenizer.encode(raw)]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [validate_ids(list(raw))]
        elif raw and all(isinstance(x, list) for x in raw):
            prompts = [validate_ids(list(x)) for x in raw]
        elif raw and all(isinstance(x, str) for x in raw):
            prompts = [tokenizer.encode(x) for x in raw]
        else:
            raise ApiError(400, "prompt must be a non-empty string, list of strings, or token ids", "prompt")
        params = [sampling(req, req.max_tokens, len(p), 16) for p in prompts]  # OpenAI's completions default
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return stream(
                prompts,
                params,
                lambda i, delta, finish: {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": served_model_name,
                    "choices": [{"index": i, "text": delta, "logprobs": None, "finish_reason": finish}],
                },
            )
        outs = run(prompts, params)
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": served_model_name,
            "choices": [
                {"index": i, "text": o["text"], "logprobs": None, "finish_reason": o["finish_reason"]}
                for i, o in enumerate(outs)
            ],
            "usage": usage(prompts, outs),
        }

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        check_common(req.model, req.n)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(
                400,
                "this model has no chat template (tokenize-prep recorded none); use "
                "/v1/completions or re-run tokenize-prep with --chat-template",
                "messages",
            )
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
            raise ApiError(
                400, f"the chat template rejected the messages: {' '.join(str(e).split())}", "messages"
            ) from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        params = sampling(req, req.max_completion_tokens or req.max_tokens, len(ids), None)  # None: the context
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            first = [True]

            def chunk(_, delta, finish):
                # the first chunk carries the role, as OpenAI's stream does
                body = {"role": "assistant", "content": delta} if first[0] else {"content": delta}
                first[0] = False
                return {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": served_model_name,
                    "choices": [{"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}],
                }

            return stream([ids], [params], chunk)
        out = run([ids], [params])[0]
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": served_model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["text"]},
                    "logprobs": None,
                    "finish_reason": out["finish_reason"],
                }
            ],
            "usage": usage([ids], [out]),
        }

    return app
