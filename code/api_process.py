"""The API server's engine in a process of its own.

api_server.py answers HTTP in one process (request parsing, tokenizing prompts, streaming events)
and generates in another: this module's child process loads the model and runs api_queue.Engine
(transformers' continuous batching).  Python runs one thread at a time per process, so with both in
one process every token streamed to a client took time from the batch's decoding loop; apart, the
loop keeps its process to itself (bench/bench_serve.py measures the difference, BENCHMARKS.md).

The two talk over a pipe in JSON, one message each way per event:

    server -> engine   {"op": "submit", "id", "input_ids", "query", "request"}, {"op": "cancel", "id"},
                       {"op": "close"}
    engine -> server   {"ready": {...}} or {"failed": message} once, then [id, kind, payload] per job
                       event: ("text", str), ("done", [finish_reason, prompt_tokens, completion_tokens]),
                       ("error", "TypeName: message")

The server side (ProcessEngine) answers for capacity itself (429 and Retry-After, /health's counts),
so no request waits on the pipe to be refused.  When the engine process dies, its requests end with
an error and /health says so; when the server ends, so does the engine (also when the server is
killed: the engine stops when its pipe closes).
"""
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import threading
from dataclasses import asdict

import torch

import chat
import config
import demo_model
import model_loader
from api_protocol import GenerationRequest
from api_queue import Capacity, Engine, EngineError, Job, Outcome, describe
from data_io import DataError


# ----------------------------------------------------------------------------------------------
# the engine's process
# ----------------------------------------------------------------------------------------------
class _Sender:
    """JSON messages into a pipe from any thread; on the engine's side job events go as lists: within
    a ``round()`` (the dispatcher's, see api_queue.Batcher) a thread's events are held and sent in one
    message.  A message to a process that is gone is dropped."""

    def __init__(self, conn):
        self.conn, self.lock, self.held = conn, threading.Lock(), threading.local()

    def send(self, message):
        data = json.dumps(message, ensure_ascii=False).encode()
        with self.lock:
            try:
                self.conn.send_bytes(data)
            except OSError:   # the other side is gone (its end is handled where the pipe is read)
                pass

    def event(self, event):
        held = getattr(self.held, "events", None)
        if held is None:
            self.send([event])
        else:
            held.append(event)

    @contextlib.contextmanager
    def round(self):
        self.held.events = []
        try:
            yield
        finally:
            events, self.held.events = self.held.events, None
            if events:
                self.send(events)


class _PipedJob(Job):
    """A job of the engine process: its events go up the pipe, tagged with the server's id."""

    def __init__(self, ident, prepared, request, send, jobs):
        super().__init__(prepared, request, None)
        self.ident, self.send, self.jobs = ident, send, jobs

    def emit(self, kind, payload=None):
        if kind == "done":
            payload = [payload.finish_reason, payload.prompt_tokens, payload.completion_tokens]
        elif kind == "error":
            payload = describe(payload)
        if kind != "text":
            self.jobs.pop(self.ident, None)
        self.send.event([self.ident, kind, payload])


def engine_cpu_threads():
    """config.SERVER['engine_cpu_threads'], or every core this process may use but one."""
    threads = config.SERVER["engine_cpu_threads"]
    if threads:
        return int(threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def engine_main(spec, demo, max_waiting, defaults, conn):
    """The engine process: load the model (``spec``: model_loader.load_spec's arguments; ``demo``: print
    the toy model's notice), report, then run jobs until told to close or until the server's end of
    the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the server stops this process
    send = _Sender(conn)
    try:
        model, tokenizer = model_loader.load_model_and_tokenizer(**spec)
        if model.device.type == "cpu":
            torch.set_num_threads(engine_cpu_threads())
        if demo:
            print(demo_model.toy_notice(model), flush=True)
        engine = Engine(model, tokenizer, max_waiting, defaults=defaults, round=send.round)
    except DataError as e:
        send.send({"failed": str(e)})
        return
    send.send({"ready": {"tokenizer": tokenizer.name_or_path, "tokens": len(tokenizer), "slots": engine.slots,
                         "context_length": chat.context_length_of(model, tokenizer),
                         "vocab_size": model.get_input_embeddings().weight.shape[0],
                         "batching": engine.batcher is not None}})
    jobs = {}
    try:
        while True:
            try:
                message = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if message["op"] == "submit":
                prepared = chat.Prompt(message["input_ids"], 0, message["query"], False)
                job = _PipedJob(message["id"], prepared, GenerationRequest(**message["request"]), send, jobs)
                jobs[job.ident] = job
                engine.submit(job)
            elif message["op"] == "cancel":
                job = jobs.get(message["id"])
                if job is not None:
                    job.cancel()
            else:   # close
                break
    finally:
        engine.close()


# ----------------------------------------------------------------------------------------------
# the server's side
# ----------------------------------------------------------------------------------------------
def _deliver(loop, items):
    """[(job, kind, payload)] into their queues, in ``loop``'s thread (one wake-up for all of them)."""
    def put_all():
        for job, kind, payload in items:
            job.put(kind, payload)
    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:   # the event loop is gone (server shutting down)
        pass


class ProcessEngine:
    """api_queue.Engine's interface (check_room, submit, status, close) over the engine process.

    Starting it loads the model there (minutes for a large one; the process prints its own notes) and
    raises DataError with the loader's message when that fails.  ``tokenizer``, ``context_length``
    and ``vocab_size`` then describe the model the engine serves."""

    def __init__(self, args, max_waiting, defaults):
        spec = model_loader.load_spec(args)   # (--demo: the toy model is built here, first when needed)
        context = multiprocessing.get_context("spawn")   # a fresh interpreter: no threads or CUDA state copied
        self.conn, child = context.Pipe()
        self.process = context.Process(target=engine_main, name="cutegpt-engine", daemon=True,
                                       args=(spec, args.demo, max_waiting, dict(defaults), child))
        self.process.start()
        child.close()
        try:
            info = self._started()
            self.tokenizer = model_loader.load_tokenizer(info["tokenizer"])
            if len(self.tokenizer) != info["tokens"]:
                raise DataError(f"the tokenizer of {info['tokenizer']} has {len(self.tokenizer)} tokens here and "
                                f"{info['tokens']} in the model process: serve a local model directory")
        except BaseException:   # (Ctrl-C while loading too) the engine process goes with the server
            self.process.kill()
            self.process.join()
            raise
        self.context_length, self.vocab_size = info["context_length"], info["vocab_size"]
        self.slots, self.batching = info["slots"], info["batching"]
        self.room = Capacity(self.slots, max_waiting)
        self.check_room = self.room.check_room
        self.jobs, self.ids = {}, itertools.count()
        self.streaming = set()   # ids of the jobs whose text has begun
        self.send = _Sender(self.conn)   # (a message to a dead process is dropped: the reader fails its jobs)
        self.lost, self.closing = None, False
        threading.Thread(target=self._read, name="cutegpt-engine-events", daemon=True).start()

    def _started(self):
        """The engine's ready message, or DataError when it failed or died while loading."""
        message = None
        while self.process.is_alive() or self.conn.poll():
            if self.conn.poll(0.5):
                try:
                    message = json.loads(self.conn.recv_bytes())
                except (EOFError, OSError):
                    pass
                break
        if message is None:
            self.process.join(5)
            raise DataError(f"the model process stopped while loading (exit code {self.process.exitcode}); "
                            f"its messages are above")
        if "failed" in message:
            self.process.join(10)
            raise DataError(message["failed"])
        return message["ready"]

    def submit(self, job):
        self.room.accept(job)
        with self.room.lock:
            lost, ident = self.lost, next(self.ids)
            if lost is None:
                self.jobs[ident] = job
        if lost is not None:
            self._end(job, "failed", EngineError(lost))
            return
        self.send.send({"op": "submit", "id": ident, "input_ids": list(job.prepared.input_ids),
                        "query": job.prepared.query, "request": asdict(job.request)})
        job.on_cancel(lambda: self._cancel(ident))

    def _cancel(self, ident):
        if ident in self.jobs:
            self.send.send({"op": "cancel", "id": ident})

    def _end(self, job, key, event):
        self.room.ended(job, key)
        job.emit("error" if key == "failed" else "done", event)

    def _read(self):
        """The engine's events to the jobs' event loops, each message's in one call per loop; when the
        pipe closes, every job fails."""
        while True:
            try:
                events = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            deliveries = collections.defaultdict(list)   # event loop -> [(job, kind, payload)]
            for ident, kind, payload in events:
                job = self.jobs.get(ident) if kind == "text" else self.jobs.pop(ident, None)
                if job is None:
                    continue
                if kind == "text":
                    self.streaming.add(ident)
                else:
                    self.streaming.discard(ident)
                    key = "failed" if kind == "error" else "finished"
                    payload = EngineError(payload) if kind == "error" else Outcome(*payload)
                    if kind == "done" and payload.finish_reason == "cancelled":
                        key = "cancelled"
                    self.room.ended(job, key)
                deliveries[job.loop].append((job, kind, payload))
            for loop, items in deliveries.items():
                _deliver(loop, items)
        self.process.join(5)
        with self.room.lock:
            self.lost = (f"the model process stopped (exit code {self.process.exitcode}); restart the server"
                         if not self.closing else "the server is shutting down")
            jobs, self.jobs = list(self.jobs.values()), {}
        for job in jobs:
            self._end(job, "failed", EngineError(self.lost))

    def status(self):
        """/health's queue figures: a job counts as waiting until its first text arrives."""
        with self.room.lock:
            pending = self.room.pending
            started = len(self.streaming)
            return {"waiting": pending - started, "running": started, "busy": started > 0,
                    "batching": self.batching, "engine": "stopped" if self.lost else "running",
                    **self.room.counts}

    def close(self):
        """Stop the engine process (its batch first); kill it when it does not end in 10 s."""
        if self.closing:
            return
        self.closing = True
        self.send.send({"op": "close"})
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
