"""The API server's queue: requests wait in arrival order (at most ``max_waiting``, beyond that 429) and
one worker thread generates their answers one at a time through chat.Reply, handing text pieces back to
each request's event loop.
"""
import asyncio
import queue
import threading
from dataclasses import dataclass

import transformers

import chat
from api_protocol import ApiError, StopText


@dataclass
class Outcome:
    finish_reason: str      # stop, length, cancelled
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated (the end marker among them)


class Job:
    """One request's generation.  The worker thread sends events to the request's event loop:
    ('text', str), then ('done', Outcome) or ('error', exception)."""

    def __init__(self, prepared, request, loop):
        self.prepared, self.request, self.loop = prepared, request, loop
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reply = None
        self._lock = threading.Lock()

    def emit(self, kind, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:   # the event loop is gone (server shutting down)
            pass

    def attach(self, reply):
        with self._lock:
            self.reply = reply
            if self.cancelled.is_set():
                reply.cancel()

    def cancel(self):
        """Safe from any thread, at any time (also after the end)."""
        with self._lock:
            self.cancelled.set()
            if self.reply is not None:
                self.reply.cancel()


class Engine:
    """Runs queued Jobs one at a time in a worker thread, in arrival order."""

    def __init__(self, model, tokenizer, max_waiting):
        self.model, self.tokenizer, self.max_waiting = model, tokenizer, max_waiting
        self.jobs = queue.Queue()
        self.state = threading.Lock()
        self.waiting, self.busy = 0, False
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}
        threading.Thread(target=self._work, name="cutegpt-generation", daemon=True).start()

    def check_room(self):
        with self.state:
            if self.waiting >= self.max_waiting:
                raise ApiError(429, f"the server is busy: {self.waiting} requests are already waiting; retry later",
                               code="server_busy")

    def submit(self, job):
        with self.state:
            self.waiting += 1
        self.jobs.put(job)

    def status(self):
        with self.state:
            return {"waiting": self.waiting, "busy": self.busy, **self.counts}

    def _work(self):
        while True:
            job = self.jobs.get()
            with self.state:
                self.waiting -= 1
                self.busy = True
            try:
                outcome = self._generate(job)
                key = "failed" if outcome is None else ("cancelled" if job.cancelled.is_set() else "finished")
            except BaseException as e:   # never let the worker die
                job.emit("error", e)
                key = "failed"
            with self.state:
                self.busy = False
                self.counts[key] += 1

    def _generate(self, job):
        if job.cancelled.is_set():   # the client left while waiting
            job.emit("done", Outcome("cancelled", len(job.prepared.input_ids), 0))
            return Outcome("cancelled", len(job.prepared.input_ids), 0)
        if job.request.seed is not None:
            transformers.set_seed(job.request.seed)
        reply = chat.Reply(self.model, self.tokenizer, job.prepared, job.request.settings, job.prepared.query)
        job.attach(reply)
        stopper = StopText(job.request.stops)
        try:
            for piece in reply:
                text = stopper.feed(piece)
                if text:
                    job.emit("text", text)
                if stopper.hit:
                    reply.cancel()
                    break
            result = reply.result()
        except Exception as e:
            job.emit("error", e)
            return None
        reason = "stop" if stopper.hit else result.finish_reason
        outcome = Outcome(reason, result.prompt_tokens, result.new_tokens)
        job.emit("done", outcome)
        return outcome
