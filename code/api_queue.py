"""The API server's engine: requests run together through transformers' continuous batching (one
paged KV cache, one forward pass per step for every running request), handing text pieces back to
each request's event loop.

A request the batch cannot honour runs on the one-at-a-time path (chat.Reply, generate()) while the
batch is paused: a ``seed`` (the batch draws every request's samples from one random generator), a
``repetition_penalty`` other than 1 (the batch's logits processors see only the tokens of the current
step, not a request's history), and, where the batch samples with the server's own settings
(config.SERVER batching ``per_request_sampling`` off: the CPU default), a temperature, top_p or top_k
other than the server's.  A model the batch cannot take (bitsandbytes int8/nf4 or torchao
weights, --fast's static cache) serves every request on that path.  A LoRA adapter over float weights
is merged into them at start (the same answers, one matrix product less per layer).

Beyond the requests being generated (config.SERVER['batching']['max_requests_per_batch']) at most
``max_waiting`` wait; more get 429 with a Retry-After header.  A request whose client leaves is
cancelled: it leaves the batch (its cache pages freed) before the next step.
"""
import asyncio
import contextlib
import copy
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import transformers
from transformers import ContinuousBatchingConfig, GenerationConfig

import chat
import config
import model_loader
from api_protocol import ApiError, StopText
from data_io import DataError, note


@dataclass
class Outcome:
    finish_reason: str      # stop, length, cancelled
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated (the end marker among them)


class Job:
    """One request's generation.  The engine sends events to the request's event loop:
    ('text', str), then ('done', Outcome) or ('error', exception).  With ``events`` (an asyncio.Queue
    several jobs share) and a ``tag``, each event goes there as (tag, kind, payload): one queue for the
    choices of a request, read without a task per choice."""

    def __init__(self, prepared, request, loop, events=None, tag=None):
        self.prepared, self.request, self.loop = prepared, request, loop
        self.events = asyncio.Queue() if events is None else events
        self.tag = tag
        self.cancelled = threading.Event()
        self.reply = None
        self.canceller = None    # set by the path running the job: stops its generation
        self.started = None      # time.monotonic() at submission
        self._lock = threading.Lock()

    def emit(self, kind, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.put, kind, payload)
        except RuntimeError:   # the event loop is gone (server shutting down)
            pass

    def put(self, kind, payload=None):
        """The event into the queue: in the event loop's thread only (``emit`` is for other threads)."""
        self.events.put_nowait((kind, payload) if self.tag is None else (self.tag, kind, payload))

    def attach(self, reply):
        with self._lock:
            self.reply = reply
            if self.cancelled.is_set():
                reply.cancel()

    def on_cancel(self, canceller):
        """Run ``canceller()`` when the job is cancelled (now, if it already was)."""
        with self._lock:
            self.canceller = canceller
            now = self.cancelled.is_set()
        if now:
            canceller()

    def cancel(self):
        """Safe from any thread, at any time (also after the end)."""
        with self._lock:
            self.cancelled.set()
            if self.reply is not None:
                self.reply.cancel()
            canceller = self.canceller
        if canceller is not None:
            canceller()


def sampling_values(settings, vocab):
    """A request's temperature, top_k and top_p as the batch applies them: greedy is top-k 1 (the one most
    likely token is sampled)."""
    if not settings["do_sample"]:
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    top_k = int(settings["top_k"])
    return {"temperature": float(settings["temperature"]), "top_p": float(settings["top_p"]),
            "top_k": vocab if top_k <= 0 else min(top_k, vocab)}


def batchable_model(model, notice=note):
    """(model for the batch, None) or (model as given, why it cannot batch).  A PeftModel over float
    weights is merged (merge_and_unload: the adapter's product added to the weights once)."""
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None
    base = getattr(model, "base_model", None)
    quantized = quantized or getattr(getattr(base, "model", None), "is_quantized", False)
    if quantized:
        return model, "quantized weights (bitsandbytes / torchao) are not supported by continuous batching"
    if model_loader.fast_path_active(model):
        return model, "--fast's static cache and compiled step serve one request at a time"
    if hasattr(model, "merge_and_unload"):   # a PeftModel (LoRA) over float weights
        notice("merging the LoRA adapter into the weights for batched serving")
        model = model.merge_and_unload()
    if not hasattr(model, "init_continuous_batching"):
        return model, f"{type(model).__name__} has no continuous batching"
    return model, None


def batch_sizes(model):
    """config.SERVER's batching sizes for the model's device, checked: one whole context must fit the cache."""
    sizes = dict(config.SERVER["batching_gpu" if model.device.type == "cuda" else "batching"])
    context = chat.context_length_of(model)
    if sizes["num_blocks"] is not None and sizes["num_blocks"] * sizes["page_size"] < context:
        raise DataError(f"config.SERVER batching: num_blocks {sizes['num_blocks']} x page_size {sizes['page_size']} "
                        f"tokens cannot hold one request of the model's context ({context} tokens); raise num_blocks "
                        f"to at least {math.ceil(context / sizes['page_size'])}")
    return sizes


def job_tail(job, stopper, streamed, response):
    """Send what the final ``response`` holds beyond the ``streamed`` text, and what ``stopper`` held back."""
    tail = response[len(streamed):] if response.startswith(streamed) else ""
    text = stopper.feed(tail) if tail else ""
    if not stopper.hit:
        text += stopper.flush()
    if text:
        job.emit("text", text)


@dataclass
class _Run:
    """A job in the batch: what it generated and streamed so far."""
    job: Job
    stopper: StopText
    max_new_tokens: int
    generated: list = field(default_factory=list)
    streamed: str = ""
    started: bool = False


class Batcher:
    """transformers' ContinuousBatchingManager, its results routed to the jobs by one dispatcher thread
    (which decodes and applies the end marker and stop strings; a job that ends early is cancelled in
    the batch)."""

    def __init__(self, model, tokenizer, on_end, sizes, defaults, round=contextlib.nullcontext):
        self.tokenizer, self.on_end = copy.deepcopy(tokenizer), on_end   # the dispatcher's own tokenizer
        self.round = round
        self.eos = chat.stop_token_ids(tokenizer)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        sizes = dict(sizes)
        self.slots = int(sizes.pop("max_requests_per_batch"))
        per_request = bool(sizes.pop("per_request_sampling"))
        # per request: placeholders that make transformers build the temperature / top-k / top-p
        # processors, every request passing its own three values; else the server's own settings, for all
        self.fixed = None if per_request else sampling_values(defaults, self.vocab)
        if per_request:
            sampling = dict(do_sample=True, temperature=0.5, top_k=2, top_p=0.5)
        elif self.fixed["top_k"] == 1:
            sampling = dict(do_sample=False)   # greedy: the most likely token, no logits processors at all
        else:   # (top_k of the whole vocabulary is no limit: 0 builds no top-k processor)
            top_k = self.fixed["top_k"]
            sampling = dict(self.fixed, do_sample=True, top_k=0 if top_k >= self.vocab else top_k)
        generation = GenerationConfig(**sampling, max_new_tokens=16, eos_token_id=self.eos,
                                      pad_token_id=tokenizer.pad_token_id)
        batching = ContinuousBatchingConfig(**sizes, max_requests_per_batch=self.slots,
                                            per_request_processors=per_request, allow_block_sharing=False,
                                            auto_switch_to_flash=model.device.type == "cuda")
        self.manager = model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=batching)
        self.manager.start()
        self.runs, self.lock, self.closed = {}, threading.Lock(), False
        threading.Thread(target=self._dispatch, name="cutegpt-batch-results", daemon=True).start()

    def refusal(self, request):
        """Why the batch cannot honour ``request`` (a GenerationRequest), or None."""
        if request.seed is not None:
            return "seed"
        if float(request.settings["repetition_penalty"]) != 1.0:
            return "repetition_penalty"
        if self.fixed is not None and sampling_values(request.settings, self.vocab) != self.fixed:
            return "sampling settings other than the server's (per_request_sampling is off)"
        return None

    def add(self, job):
        settings = job.request.settings
        run = _Run(job, StopText(job.request.stops), int(settings["max_new_tokens"]))
        sampling = sampling_values(settings, self.vocab) if self.fixed is None else {}
        with self.lock:
            rid = self.manager.add_request(list(job.prepared.input_ids), max_new_tokens=run.max_new_tokens,
                                           streaming=True, eos_token_id=self.eos, **sampling)
            if rid is None:
                raise RuntimeError("the batch generation loop has stopped")
            self.runs[rid] = run
        job.on_cancel(lambda: self._cancel(rid))

    def waiting(self):
        with self.lock:
            return sum(not run.started for run in self.runs.values())

    def _cancel(self, rid):
        self.manager.cancel_request(rid)
        self._end(rid, None, cancelled=True)

    def _dispatch(self):
        """Each round takes every result waiting and advances each request once, to its latest result (a
        result holds all its tokens so far): a dispatcher that falls behind the batch catches up in one
        round, sending fewer, longer pieces.  ``round()`` wraps each round (the engine process sends a
        round's events in one message)."""
        while not self.closed:
            out = self.manager.get_result(timeout=0.5)
            if out is None:
                if not self.manager.is_running():
                    self._fail_all(RuntimeError("the batch generation loop stopped"))
                    time.sleep(0.5)
                continue
            latest = {}
            while out is not None:
                latest[out.request_id] = out
                out = self.manager.get_result(timeout=0)
            with self.round():
                for rid, out in latest.items():
                    with self.lock:
                        run = self.runs.get(rid)
                    if run is None:   # ended already (cancelled, or cut by a stop string)
                        continue
                    try:
                        self._advance(rid, run, out)
                    except Exception as e:   # never let the dispatcher die
                        self._end(rid, None, error=e)

    def _advance(self, rid, run, out):
        run.started = True
        if out.error is not None:
            self._end(rid, None, error=RuntimeError(out.error))
            return
        run.generated = list(out.generated_tokens)
        text = self.tokenizer.decode(run.generated, skip_special_tokens=False)
        piece = chat.next_piece(text, run.streamed)
        run.streamed += piece
        sent = run.stopper.feed(piece) if piece else ""
        if sent:
            run.job.emit("text", sent)
        if run.stopper.hit or config.END_MARKER in text or out.is_finished():
            if not out.is_finished():
                self.manager.cancel_request(rid)
            self._end(rid, text)

    def _end(self, rid, text, cancelled=False, error=None):
        with self.lock:
            run = self.runs.pop(rid, None)
        if run is None:
            return
        job = run.job
        if error is not None:
            self.on_end(job, "failed")   # counted first: a client that sees the end sees it in /health
            job.emit("error", error)
            return
        if text is None:
            text = self.tokenizer.decode(run.generated, skip_special_tokens=False)
        if not run.stopper.hit and not cancelled:
            job_tail(job, run.stopper, run.streamed, chat.clean_response(text))
        reason = "stop" if run.stopper.hit else chat.finish_reason(text, run.generated, self.eos, run.max_new_tokens,
                                                                    cancelled)
        self.on_end(job, "cancelled" if reason == "cancelled" else "finished")
        job.emit("done", Outcome(reason, len(job.prepared.input_ids), len(run.generated)))

    def _fail_all(self, error):
        with self.lock:
            rids = list(self.runs)
        for rid in rids:
            self._end(rid, None, error=error)

    @contextlib.contextmanager
    def paused(self):
        """The model to one thread: the batch waits (its requests keep their cache) until the block ends."""
        with self.manager.pause():
            yield

    def close(self):
        if not self.closed:
            self.closed = True
            self.manager.stop(block=True, timeout=10, hard_stop=True)


class Capacity:
    """Requests accepted and not ended, against the batch's slots and the waiting room: beyond both a
    429 with a Retry-After of about one request's time.  Counts how requests ended (for /health)."""

    def __init__(self, slots, max_waiting):
        self.slots, self.max_waiting = slots, max_waiting
        self.lock = threading.Lock()
        self.pending = 0                                     # accepted and not ended
        self.seconds = None                                  # mean seconds a request takes (moving average)
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0}

    def retry_after(self):
        """Seconds a refused client should wait: about one request's time (at least config's minimum)."""
        return max(int(config.SERVER["retry_after_min_s"]), math.ceil(self.seconds or 0))

    def check_room(self):
        with self.lock:
            if self.pending >= self.slots + self.max_waiting:
                waiting = self.pending - self.slots
                raise ApiError(429, f"the server is busy: {self.slots} requests are being answered and {waiting} "
                                    f"are waiting; retry after {self.retry_after()} s", code="server_busy",
                               retry_after=self.retry_after())

    def accept(self, job):
        job.started = time.monotonic()
        with self.lock:
            self.pending += 1

    def ended(self, job, key):
        """``key``: finished, cancelled or failed.  Called before the job's last event is sent, so that a
        client that sees its end sees it counted."""
        took = time.monotonic() - job.started
        with self.lock:
            self.pending -= 1
            self.counts[key] += 1
            self.seconds = took if self.seconds is None else 0.8 * self.seconds + 0.2 * took


def describe(error):
    """An error event's payload as the client is told it: 'TypeName: message'."""
    return str(error) if isinstance(error, EngineError) else f"{type(error).__name__}: {error}"


class EngineError(Exception):
    """A failure told by the engine's process (api_process), its message already 'TypeName: message'."""


class Engine:
    """Runs Jobs: in the batch when the model and the request allow it, else one at a time in a worker
    thread (in arrival order, the batch paused meanwhile)."""

    def __init__(self, model, tokenizer, max_waiting, notice=note, defaults=None, round=contextlib.nullcontext):
        """``defaults``: the server's chat.generation_settings (what requests leave out); a batch that
        samples with the server's own settings takes them.  ``round``: see Batcher._dispatch."""
        self.tokenizer = tokenizer
        self.model, refusal = batchable_model(model, notice)
        self.batcher = None
        if refusal is None:
            self.batcher = Batcher(self.model, tokenizer, self._ended, batch_sizes(self.model),
                                   defaults or chat.default_settings(), round)
        else:
            notice(f"serving one request at a time: {refusal}")
        self.slots = self.batcher.slots if self.batcher else 1
        self.room = Capacity(self.slots, max_waiting)
        self.check_room = self.room.check_room
        self.jobs = queue.Queue()
        self.queued = 0   # jobs waiting for the one-at-a-time worker
        threading.Thread(target=self._work, name="cutegpt-generation", daemon=True).start()

    def submit(self, job):
        self.room.accept(job)
        refusal = self.batcher.refusal(job.request) if self.batcher else "no batching"
        if refusal is None:
            try:
                self.batcher.add(job)
                return
            except Exception as e:
                self._ended(job, "failed")
                job.emit("error", e)
                return
        with self.room.lock:
            self.queued += 1
        self.jobs.put(job)

    def status(self):
        with self.room.lock:
            waiting = self.queued + (self.batcher.waiting() if self.batcher else 0)
            pending = self.room.pending
            return {"waiting": waiting, "running": pending - waiting, "busy": pending > waiting,
                    "batching": self.batcher is not None, **self.room.counts}

    def close(self):
        if self.batcher is not None:
            self.batcher.close()

    def _ended(self, job, key):
        self.room.ended(job, key)

    def _work(self):
        while True:
            job = self.jobs.get()
            with self.room.lock:
                self.queued -= 1
            try:
                with self.batcher.paused() if self.batcher else contextlib.nullcontext():
                    outcome = self._generate(job)
                key = "cancelled" if outcome.finish_reason == "cancelled" else "finished"
                event = ("done", outcome)
            except BaseException as e:   # never let the worker die
                key, event = "failed", ("error", e)
            self._ended(job, key)        # counted first: a client that sees the end sees it in /health
            job.emit(*event)

    def _generate(self, job):
        """The job's Outcome, its text sent as it comes (raises what the generation raised)."""
        if job.cancelled.is_set():   # the client left while waiting
            return Outcome("cancelled", len(job.prepared.input_ids), 0)
        if job.request.seed is not None:
            transformers.set_seed(job.request.seed)
        reply = chat.Reply(self.model, self.tokenizer, job.prepared, job.request.settings, job.prepared.query)
        job.attach(reply)
        stopper = StopText(job.request.stops)
        streamed = ""
        for piece in reply:
            streamed += piece
            text = stopper.feed(piece)
            if text:
                job.emit("text", text)
            if stopper.hit:
                reply.cancel()
                break
        result = reply.result()
        if not stopper.hit:
            job_tail(job, stopper, streamed, result.response)
        return Outcome("stop" if stopper.hit else result.finish_reason, result.prompt_tokens, result.new_tokens)
