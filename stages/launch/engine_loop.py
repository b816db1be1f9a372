"""The server's engine loop: one thread owns the engine; requests reach it through a queue.

    loop = EngineLoop.of(engine)                  # one per engine, started on first use (its own thread)
    loop = EngineLoop.on_this_thread(engine); loop.run_here()   # `serve`: the loop on the thread that loaded
                                                                 # the model, until loop.stop()
    ticket = loop.submit(prompt_ids, params, sink) # sink(RequestOutput | Exception) is called on the loop thread
    loop.abort(ticket)                             # the request ends ("abort") and frees its slot next step

Between steps the loop takes every queued submission and abort, so a new request joins the running batch at
the next step. It keeps the Prometheus metrics (its own registry): requests by final status, prompt and
generation tokens, time to first token and inter-token latency histograms, running and waiting requests, KV
slots in use; and logs one line per finished request (id, status, tokens, latency).

Why `serve` runs the loop on the loading thread: torch's CPU kernels run on an OpenMP team that belongs to the
thread calling them. Loading the model makes one for the main thread; a loop thread of its own would make a
second, and with more OpenMP threads than cores the OpenMP runtime stops spinning between parallel regions:
every decode step measured about 30% slower on 2 cores (tests/test_server_openai.py and bench_decode's server
rows run it the way `serve` does).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("prestage.serve")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("prestage_requests", "Finished requests by status", ["status"], registry=r)
        self.prompt_tokens = Counter("prestage_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("prestage_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "prestage_time_to_first_token_seconds", "Submission to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "prestage_inter_token_latency_seconds", "Between consecutive tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("prestage_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("prestage_num_requests_waiting", "Requests waiting for a slot", registry=r)
        self.slots = Gauge("prestage_kv_cache_slots_in_use", "KV-cache slots held by requests", registry=r)
        self.slots_total = Gauge("prestage_kv_cache_slots_total", "KV-cache slots", registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


@dataclass
class Ticket:
    """One submitted request, as the submitter sees it."""

    prompt: list
    params: object
    sink: object
    request_id: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    tokens: int = 0


class EngineLoop:
    def __init__(self, engine, thread: bool = True):
        self.engine = engine
        self.metrics = Metrics()
        self.metrics.slots_total.set(engine.num_slots)
        # SimpleQueue: its put is reentrant, so serve's signal handler (on the loop's own thread) can abort
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, Ticket] = {}
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self._run, name="prestage-engine", daemon=True)
            self._thread.start()

    @classmethod
    def of(cls, engine) -> EngineLoop:
        """The engine's loop; a new one on its own thread when it has none."""
        loop = getattr(engine, "_engine_loop", None)
        if loop is None:
            loop = engine._engine_loop = cls(engine)
        return loop

    @classmethod
    def on_this_thread(cls, engine) -> EngineLoop:
        """The engine's loop, to be run by `run_here()` on the calling thread (see the module docstring)."""
        if getattr(engine, "_engine_loop", None) is not None:
            raise RuntimeError("this engine already has a loop")
        loop = engine._engine_loop = cls(engine, thread=False)
        return loop

    def run_here(self) -> None:
        """Run the loop on the calling thread until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("this loop runs on its own thread")
        self._run()

    def stop(self) -> None:
        """End the loop after the step under way (any thread)."""
        self._commands.put(("stop", None))

    # ---- any thread ----------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params, sink) -> Ticket:
        ticket = Ticket(list(prompt_ids), params, sink)
        self._commands.put(("add", ticket))
        return ticket

    def abort(self, ticket: Ticket) -> None:
        self._commands.put(("abort", ticket))

    def abort_all(self) -> None:
        """Abort every running and waiting request (any thread): each ends at the next step, finish_reason
        "abort" (the server's shutdown: streams end at once instead of being cut at uvicorn's grace period)."""
        self._commands.put(("abort_all", None))

    # ---- the loop thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            block = not engine.has_unfinished()
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return
                self._apply(*command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            try:
                outputs = engine.step()
            except Exception as e:  # the step itself failed: every live request gets the error
                log.exception("engine step failed")
                for rid, ticket in list(self._live.items()):
                    engine.abort(rid)
                    self._finish(ticket, "error", e)
                continue
            now = time.perf_counter()
            for out in outputs:
                ticket = self._live.get(out.request_id)
                if ticket is None:
                    continue
                if out.new_token_ids:
                    if ticket.last_token is None:
                        self.metrics.ttft.observe(now - ticket.submitted)
                    else:
                        self.metrics.itl.observe(now - ticket.last_token)
                    ticket.last_token = now
                    ticket.tokens += len(out.new_token_ids)
                    self.metrics.generation_tokens.inc(len(out.new_token_ids))
                if out.finished:  # counted before the answer goes out, so a client reading /metrics next sees it
                    self._finish(ticket, out.finish_reason, None)
                self._deliver(ticket, out)
            self.metrics.running.set(engine.num_running)
            self.metrics.waiting.set(engine.num_waiting)
            self.metrics.slots.set(engine.slots_in_use)

    def _apply(self, kind: str, ticket: Ticket | None) -> None:
        if kind == "add":
            try:
                ticket.request_id = self.engine.add_request(ticket.prompt, ticket.params)
            except Exception as e:
                self._deliver(ticket, e)
                return
            self._live[ticket.request_id] = ticket
            self.metrics.prompt_tokens.inc(len(ticket.prompt))
        elif kind == "abort_all":
            for request_id in list(self._live):
                self.engine.abort(request_id)
        elif ticket.request_id is not None and ticket.request_id in self._live:
            self.engine.abort(ticket.request_id)

    def _deliver(self, ticket: Ticket, item) -> None:
        """Hand `item` to the ticket's sink; a sink that fails (its receiver is gone, e.g. the HTTP server's event
        loop closed at shutdown while a stream ran) ends its request instead of the loop."""
        try:
            ticket.sink(item)
        except Exception as e:
            log.debug("request %s: its receiver failed (%s); aborting it", ticket.request_id, e)
            if ticket.request_id is not None and ticket.request_id in self._live:
                self.engine.abort(ticket.request_id)

    def _finish(self, ticket: Ticket, status: str, error: Exception | None) -> None:
        self._live.pop(ticket.request_id, None)
        self.metrics.requests.labels(status=status).inc()
        if error is not None:
            self._deliver(ticket, error)
        log.info(
            "request %s %s prompt_tokens=%d completion_tokens=%d latency=%.3fs",
            ticket.request_id,
            status,
            len(ticket.prompt),
            ticket.tokens,
            time.perf_counter() - ticket.submitted,
        )
