"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over a loaded `Inference`, shaped as `vllm serve`.

    GET  /health                 200 when the model is loaded
    GET  /v1/models              the one served model, with its max_model_len and the time it was loaded
    GET  /metrics                Prometheus metrics (engine_loop.py lists them)
    POST /v1/completions         prompt: str | [str] | [int] | [[int]]; logprobs; echo false only
    POST /v1/chat/completions    messages through the chat template tokenize-prep stored; logprobs, top_logprobs

One engine loop (engine_loop.py) owns the engine: every request enters its queue and joins the running batch
at the next step (continuous batching across requests); streaming and non-streaming responses are fed from it,
and a client that disconnects aborts its requests, which frees their slots at the next step. A sampling field
the request leaves out takes, as in vLLM's server, the value the model's generation_config.json sets
(`generation_defaults`; `--generation-config vllm` ignores them), else the OpenAI API's default (max_tokens 16
for completions, the rest of the context for chat). `top_k`, `min_p`, `repetition_penalty`, `ignore_eos` and
`skip_special_tokens` are accepted as vLLM's extra parameters. `stream: true` answers with server-sent events
(`data: {chunk}` lines, then `data: [DONE]`); while a sequence runs, the last (longest stop string - 1)
characters are held back, so text that a stop string later cuts is never sent; `stream_options.include_usage`
adds a last chunk with the usage. Every bad request gets OpenAI's error body with 400 (validation errors
included), 401 (--api-key), 404 (unknown model or path) or 413 (body over the cap); a prompt longer than the
context is refused before it is tokenized whole.
"""

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from prestage.stages.errors import UsageError
from prestage.stages.launch.openai_protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    error_body,
    refuse_unimplemented,
    validation_message,
)

_OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
_DISCONNECT_POLL_S = 0.1


def _text_of(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(parts) != len(content):
        raise ApiError(400, "only text content parts are supported by this model", "messages")
    if not all(isinstance(p, str) for p in parts):
        raise ApiError(400, 'a text content part needs a string \'text\': {"type": "text", "text": "..."}', "messages")
    return "".join(parts)


def max_token_chars(tokenizer) -> int:
    """An upper bound of the characters one token decodes to (the longest vocabulary entry), so a text longer
    than max_model_len times this is too long without tokenizing it."""
    try:
        vocab = tokenizer.get_vocab()
        return max(1, max((len(k) for k in vocab), default=1))
    except Exception:  # a tokenizer without a vocabulary listing: no early refusal
        return 1 << 30


class _BodyCap:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before it is read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= 8 * self.limit:  # read it off (discarded) so the client sees the answer
                while (await receive()).get("more_body"):
                    pass
            return await self._refuse(send, int(declared))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig(seen)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooBig as e:
            await self._refuse(send, e.args[0])

    # a body without a declared length is counted as it arrives and refused once over the limit

    async def _refuse(self, send, size: int):
        body = json.dumps(
            error_body(
                f"the request body has {size} bytes or more, over this server's limit of {self.limit}; "
                "send a shorter prompt",
                "invalid_request_error",
                None,
                413,
            )
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _ApiKey:
    """ASGI middleware: /v1 requests need `Authorization: Bearer <key>`, else a 401 in OpenAI's error body.
    (A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from the routes.)"""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if given != self.expected:
                e = ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'")
                body = json.dumps(e.body()).encode()
                start = {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [(b"content-type", b"application/json")],
                }
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class _TooBig(Exception):
    pass


class _NewTokens:
    """A step's new tokens for one request and their logprob entries (empty unless asked for)."""

    def __init__(self, token_ids: list[int], entries: list):
        self.token_ids, self.entries = token_ids, entries


def create_app(
    inference,
    served_model_name: str,
    max_model_len: int,
    generation_defaults: dict | None = None,
    api_key: str | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
):
    """A FastAPI app serving `inference` (from prestage.stages.launch.inference.load_for_inference); a field a
    request leaves out takes `generation_defaults` (the model's generation_config.json), else the OpenAI
    default. With `api_key`, /v1 requests need `Authorization: Bearer <api_key>`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from prestage.stages.launch.engine_loop import EngineLoop
    from prestage.stages.launch.sampling import SamplingParams

    app = FastAPI(title="prestage", version="1")
    tokenizer = inference.tokenizer
    engine = inference.engine
    loop = EngineLoop.of(engine)
    created = int(time.time())
    char_bound = max_model_len * max_token_chars(tokenizer)
    # tokenizing and chat templates run on one worker thread, off the event loop (as vLLM's server does), so a
    # long prompt does not hold up the other requests' streams; one thread, so requests are tokenized in turn
    # (transformers' fast tokenizer may reset its truncation settings on a call to encode)
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prestage-tokenize")
    app.router.on_shutdown.append(lambda: tokenizing.shutdown(wait=False))

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    vocab_bound = (getattr(engine.model, "vocab_size", None) or len(tokenizer)) - 1
    token_text: dict[int, str] = {}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return JSONResponse(status_code=e.status, content=e.body())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        message, param = validation_message(list(e.errors()))
        return JSONResponse(status_code=400, content=error_body(message, "invalid_request_error", param, 400))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(status_code=e.status_code, content=error_body(message, kind, None, e.status_code))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        return JSONResponse(status_code=500, content=error_body(f"internal error: {e}", "server_error", None, 500))

    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    app.add_middleware(_BodyCap, limit=max_body_bytes)

    async def parse(request: Request, model_cls):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:  # arrays or objects nested deeper than the JSON parser goes
            raise ApiError(400, "the request body is nested too deeply to be a request") from None
        refuse_unimplemented(body)
        try:
            return model_cls.model_validate(body)
        except Exception as e:  # pydantic.ValidationError
            message, param = validation_message(list(e.errors()) if hasattr(e, "errors") else [])
            raise ApiError(400, message, param) from None

    def check_common(req) -> None:
        if req.model not in (None, served_model_name):
            raise ApiError(
                404, f"model '{req.model}' does not exist; this server serves '{served_model_name}'", "model"
            )
        if req.n != 1:
            raise ApiError(400, f"n={req.n} is not supported; send n=1 (one completion per prompt)", "n")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true (as vLLM)", "stream_options")

    defaults = {**_OPENAI_DEFAULTS, **{k: v for k, v in (generation_defaults or {}).items() if k != "max_tokens"}}
    default_max_tokens = (generation_defaults or {}).get("max_tokens")

    def sampling(req, max_tokens, prompt_len: int, fallback_max_tokens, logprobs) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        budget = max_model_len - prompt_len
        if budget <= 0:
            raise ApiError(
                400,
                f"the prompt has {prompt_len} tokens and this model's context is {max_model_len}; shorten it",
                "prompt",
            )
        if max_tokens is None:
            max_tokens = default_max_tokens or fallback_max_tokens
        tokens = budget if max_tokens is None else max_tokens
        if tokens > budget:
            raise ApiError(
                400,
                f"max_tokens={tokens}: must be between 1 and {budget} (context {max_model_len} "
                f"minus {prompt_len} prompt tokens)",
                "max_tokens",
            )
        values = {k: defaults[k] if getattr(req, k) is None else getattr(req, k) for k in _OPENAI_DEFAULTS}
        return SamplingParams(
            max_tokens=tokens,
            seed=req.seed,
            stop=stop,
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            logprobs=logprobs,
            **values,
        )

    def encode_text(text: str, param: str) -> list[int]:
        if not text:
            raise ApiError(400, f"{param} is empty: give at least one character", param)
        if len(text) > char_bound:
            raise ApiError(
                400,
                f"{param} has {len(text)} characters, more than this model's context of {max_model_len} tokens "
                "can hold; shorten it",
                param,
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (JSON "\\ud800"): no tokenizer takes it
            raise ApiError(
                400, f"{param} is not valid Unicode: {e.reason} at character {e.start}; send UTF-8 text", param
            ) from None
        return fits(list(tokenizer.encode(text)), param)  # checked now, before the request's next prompt

    def fits(ids: list[int], param: str) -> list[int]:
        if len(ids) >= max_model_len:
            raise ApiError(
                400, f"{param} has {len(ids)} tokens and this model's context is {max_model_len}; shorten it", param
            )
        return ids

    def check_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, f"{param} is an empty list of token ids: give at least one token", param)
        fits(ids, param)
        for i in ids:
            if not 0 <= i <= vocab_bound:
                raise ApiError(400, f"{param}: token id {i} is out of vocabulary (0..{vocab_bound})", param)
        return ids

    def prompts_of(raw) -> list[list[int]]:
        if isinstance(raw, str):
            return [encode_text(raw, "prompt")]
        if not raw:
            raise ApiError(400, "prompt is an empty list: give a string, strings, or token ids", "prompt")
        if all(isinstance(x, int) for x in raw):
            return [check_ids(list(raw), "prompt")]
        if all(isinstance(x, str) for x in raw):
            return [encode_text(x, f"prompt[{i}]") for i, x in enumerate(raw)]
        return [check_ids(list(x), f"prompt[{i}]") for i, x in enumerate(raw)]

    def piece(token: int) -> str:
        text = token_text.get(token)
        if text is None:
            text = token_text[token] = tokenizer.decode([token])
        return text

    # ---- running requests through the engine loop ------------------------------------------------------------
    def submit(prompts, params):
        """Submit every prompt; (asyncio queue of (index, output | Exception), tickets)."""
        aloop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets = []
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            tickets.append(loop.submit(p, sp, lambda out, i=i: aloop.call_soon_threadsafe(events.put_nowait, (i, out))))
        return events, tickets

    def engine_error(e: Exception) -> ApiError:
        """What the engine loop sent a request instead of tokens: the engine refusing it (a UsageError: the
        request's fault, a 400), or a failed step (every running request gets it: the server's fault, a 500)."""
        if isinstance(e, UsageError):
            return ApiError(400, str(e), "prompt")
        return ApiError(
            500, f"the engine failed while running this request: {type(e).__name__}: {e}", None, "server_error"
        )

    def abort_all(tickets, done: set) -> None:
        for i, t in enumerate(tickets):
            if i not in done:
                loop.abort(t)

    async def run(request: Request, prompts, params) -> list[dict]:
        events, tickets = submit(prompts, params)
        finals: dict[int, dict] = {}
        acc = [{"logprobs": []} for _ in prompts]
        try:
            checked = time.monotonic()
            while len(finals) < len(prompts):
                try:
                    i, out = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    i, out = None, None
                if time.monotonic() - checked >= _DISCONNECT_POLL_S:  # the client may have gone: stop its work
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return []
                if out is None:
                    continue
                if isinstance(out, Exception):
                    raise engine_error(out)
                acc[i]["logprobs"].extend(out.new_logprobs)
                if out.finished:
                    finals[i] = {
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                        "logprobs": acc[i]["logprobs"],
                    }
            return [finals[i] for i in range(len(prompts))]
        finally:
            abort_all(tickets, set(finals))

    def stream(prompts, params, chunk, usage_chunk, include_usage: bool):
        """Server-sent events fed from the engine loop: `chunk(index, delta, finish_reason, new_logprobs)` per
        step that adds text, holding back what a stop string could still cut."""
        hold = [max((len(x) for x in p.stop), default=1) - 1 for p in params]

        async def body():
            events, tickets = submit(prompts, params)
            sent = [0] * len(prompts)
            done: set[int] = set()
            completion = [0] * len(prompts)
            failed = False
            try:
                while len(done) < len(prompts):
                    i, out = await events.get()
                    if isinstance(out, Exception):  # then [DONE], as vLLM ends a stream that failed
                        yield f"data: {json.dumps(engine_error(out).body())}\n\n"
                        failed = True
                        break
                    text, finish = out.text, out.finish_reason
                    completion[i] = len(out.token_ids)
                    upto = len(text) if finish else max(sent[i], len(text) - hold[i])
                    if upto > sent[i] or finish or out.new_logprobs:
                        new = _NewTokens(out.new_token_ids, out.new_logprobs)
                        yield f"data: {json.dumps(chunk(i, text[sent[i] : upto], finish, new))}\n\n"
                        sent[i] = upto
                    if finish:
                        done.add(i)
                if include_usage and not failed:
                    yield f"data: {json.dumps(usage_chunk(usage_of(prompts, completion)))}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the generator is closed) or the stream ended
                abort_all(tickets, done)

        return StreamingResponse(body(), media_type="text/event-stream")

    def usage_of(prompts, completion_tokens: list[int]) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(completion_tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def completion_logprobs(entries, token_ids, start: int = 0) -> dict:
        """`start`: the text offset of the first of these tokens (a stream's chunks continue the offsets)."""
        tokens = [piece(t) for t in token_ids[: len(entries)]]
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{piece(t): v for t, v in top} for _, top in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(entries, token_ids) -> dict:
        def item(t, lp):
            text = piece(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(t, lp), "top_logprobs": [item(tt, v) for tt, v in top]}
                for t, (lp, top) in zip(token_ids, entries, strict=False)
            ]
        }

    # ---- routes --------------------------------------------------------------------------------------------
    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return Response(loop.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served_model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "prestage",
                    "root": served_model_name,
                    "max_model_len": max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        check_common(req)
        if req.echo:
            raise ApiError(400, "echo=true is not supported; send echo=false", "echo")
        prompts = await off_loop(prompts_of, req.prompt)
        params = [sampling(req, req.max_tokens, len(p), 16, req.logprobs) for p in prompts]
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": now, "model": served_model_name}
        want_lp = req.logprobs is not None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            offset = [0] * len(prompts)  # per prompt: where the next chunk's tokens start in the text

            def chunk(i, delta, finish, new):
                lp = None
                if want_lp:
                    lp = completion_logprobs(new.entries, new.token_ids, offset[i])
                    offset[i] += sum(len(t) for t in lp["tokens"])
                choice = {"index": i, "text": delta, "logprobs": lp, "finish_reason": finish}
                return {**head, "choices": [choice], **({"usage": None} if include_usage else {})}

            return stream(prompts, params, chunk, lambda u: {**head, "choices": [], "usage": u}, include_usage)
        outs = await run(request, prompts, params)
        if not outs:
            return Response(status_code=499)
        return {
            **head,
            "choices": [
                {
                    "index": i,
                    "text": o["text"],
                    "logprobs": completion_logprobs(o["logprobs"], o["token_ids"]) if want_lp else None,
                    "finish_reason": o["finish_reason"],
                }
                for i, o in enumerate(outs)
            ],
            "usage": usage_of(prompts, [len(o["token_ids"]) for o in outs]),
        }

    def chat_ids(messages: list[dict]) -> list[int]:
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
            raise ApiError(
                400, f"the chat template rejected the messages: {' '.join(str(e).split())}", "messages"
            ) from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return check_ids(list(ids), "messages")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(
                400,
                "this model has no chat template (tokenize-prep recorded none); use "
                "/v1/completions or re-run tokenize-prep with --chat-template",
                "messages",
            )
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in req.messages]
        if sum(len(m["content"]) for m in messages) > char_bound:
            raise ApiError(
                400, f"the messages are longer than this model's context of {max_model_len} tokens", "messages"
            )
        ids = await off_loop(chat_ids, messages)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, req.max_completion_tokens or req.max_tokens, len(ids), None, logprobs)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": now, "model": served_model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = [True]

            def chunk(_, delta, finish, new):
                # the first chunk carries the role, as OpenAI's stream does
                body = {"role": "assistant", "content": delta} if first[0] else {"content": delta}
                first[0] = False
                lp = chat_logprobs(new.entries, new.token_ids) if logprobs is not None else None
                choice = {"index": 0, "delta": body, "logprobs": lp, "finish_reason": finish}
                return {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [choice],
                    **({"usage": None} if include_usage else {}),
                }

            def usage_chunk(u):
                return {**head, "object": "chat.completion.chunk", "choices": [], "usage": u}

            return stream([ids], [params], chunk, usage_chunk, include_usage)
        outs = await run(request, [ids], [params])
        if not outs:
            return Response(status_code=499)
        out = outs[0]
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["text"]},
                    "logprobs": chat_logprobs(out["logprobs"], out["token_ids"]) if logprobs is not None else None,
                    "finish_reason": out["finish_reason"],
                }
            ],
            "usage": usage_of([ids], [len(out["token_ids"])]),
        }

    return app
