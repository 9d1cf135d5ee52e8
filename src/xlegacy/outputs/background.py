"""Writing on a thread of its own, in the order queued: Output.background
(moved here from stream_output.py)."""
from ..errors import TruncatedStream


class Background:
    """An Output's writing on a thread of its own, in the order queued.

    A Remus stream's first checkpoint is mostly page data copied in the
    kernel (system time, the GIL released); the later checkpoints are read,
    decoded and applied to the shadow in the meantime, on the other CPU.
    Queued bytes are bounded (LIMIT; a copy job costs only its small
    records); the first error stops the writing, drops what is queued and
    is raised in the converter's thread by its next put() or by drain()."""

    LIMIT = 32 << 20

    def __init__(self, out):
        import threading
        from collections import deque
        self.out = out
        self.ops = deque()
        self.cv = threading.Condition()
        self.queued = 0          # bytes held by queued ops
        self.pending = 0         # ops queued or being done
        self.error = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="xlegacy-convert-writer",
                                       daemon=True)
        self.thread.start()

    def put(self, op, size):
        with self.cv:
            while self.queued > self.LIMIT and self.error is None:
                self.cv.wait()
            if self.error is not None:
                raise self.error
            self.ops.append((op, size))
            self.queued += size
            self.pending += 1
            self.cv.notify_all()

    def drain(self):
        with self.cv:
            while self.pending and self.error is None:
                self.cv.wait()
            if self.error is not None:
                raise self.error

    def stop(self, discard=False):
        with self.cv:
            self.stopping = True
            if discard or self.error is not None:
                self.ops.clear()
                self.pending = 0
            self.cv.notify_all()
        self.thread.join()

    def _run(self):
        while True:
            with self.cv:
                while not self.ops and not self.stopping:
                    self.cv.wait()
                if not self.ops:
                    return
                op, size = self.ops.popleft()
                failed = self.error is not None
            if not failed:
                try:
                    self._do(op)
                except BaseException as exc:   # noqa: BLE001 - raised in the converter's thread
                    with self.cv:
                        self.error = exc
                        self.ops.clear()
            with self.cv:
                self.queued -= size
                self.pending = len(self.ops) if self.error is not None else \
                    max(0, self.pending - 1)        # (0 already when stop() discarded)
                self.cv.notify_all()

    def _do(self, op):
        out = self.out
        if op[0] == "bytes":
            out._write_now(op[1])
            return
        _, in_fd, offset, n, pend = op
        done = out._move(in_fd, offset, n, pend)
        if done < n:
            raise TruncatedStream("page data (the input file shrank during the conversion)",
                                  offset + done, n, done)
