"""The one thread that runs every model.generate() of the process (chat.Reply submits its work here)."""
import atexit
import queue
import threading


class GenerationWorker:
    """One long-lived thread runs every generate() of the process, one after the other.

    Compiled CUDA graphs (--fast) are kept per thread by PyTorch, so a new thread for every answer
    would record them again each time; one thread records them once.  At exit the thread is told to
    end and joined (a thread of torch still alive while the interpreter shuts down can abort it); it
    is a daemon, so an exit waits at most EXIT_WAIT_S for a generation still running."""

    EXIT_WAIT_S = 10

    def __init__(self):
        self._jobs = queue.Queue()
        self._thread = None
        self._lock = threading.Lock()
        self._exit_hook = False

    def submit(self, job):
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="cutegpt-generate")
                self._thread.start()
            if not self._exit_hook:
                atexit.register(self.stop)
                self._exit_hook = True
        self._jobs.put(job)

    def stop(self):
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(self.EXIT_WAIT_S)

    def _loop(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()


_WORKER = GenerationWorker()


def submit(job):
    """Run ``job()`` on the generation thread, after the jobs submitted before it."""
    _WORKER.submit(job)
