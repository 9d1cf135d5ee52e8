"""Work done on a thread of its own, in the order queued: a converted
stream's writing (Output.background) and a restore's copies of checkpoint
1's pages (inspector.restore_to_file), while the caller's thread reads,
decodes and applies the later checkpoints of a Remus stream on the other
CPU.  The work itself is system time with the GIL released (splice,
copy_file_range, pwrite), so the two threads really do run at once."""
import sys
import threading
from collections import deque


class Background:
    """Jobs done by do(job) on a thread of its own, in the order put().

    Queued jobs are bounded by the bytes they hold (LIMIT; a copy job costs
    only its small records), so a reader far ahead of the writing waits
    rather than holding the stream in memory.  The first error stops the
    work, drops what is queued and is raised in the caller's thread by its
    next put() or by drain().  With fast_switch, while the thread lives the
    interpreter switches threads every 0.5 ms instead of every 5 ms
    (switching): the thread wants the GIL only for the moment between two
    jobs, and a caller busy in Python would otherwise keep it waiting that
    long after each one."""

    LIMIT = 32 << 20

    def __init__(self, do, name="xlegacy-background", fast_switch=False):
        self.do = do
        self.ops = deque()
        self.cv = threading.Condition()
        self.queued = 0          # bytes held by queued ops
        self.pending = 0         # ops queued or being done
        self.error = None
        self.stopping = False
        self.started = self.finished = 0     # jobs taken up, jobs ended
        self._switching = switching() if fast_switch else None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
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

    def drain(self, tick=None, every=0.25):
        """Wait until every job is done; raises what a job raised.  tick(),
        if given, is called about every `every` seconds meanwhile (progress
        of long work)."""
        while True:
            with self.cv:
                if not self.pending or self.error is not None:
                    break
                self.cv.wait(every if tick is not None else None)
            if tick is not None:        # (not holding the lock the thread needs)
                tick()
        with self.cv:
            if self.error is not None:
                raise self.error

    def settle_current(self):
        """Wait for the job being done now, if any, to end (not for those
        still queued): what the caller changed before this call is seen by
        every job the thread takes up after it."""
        with self.cv:
            target = self.started
            while self.finished < target:
                self.cv.wait()

    def stop(self, discard=False):
        """End the thread after what is queued (nothing more once a job
        failed, or with `discard`) and wait for it: once this returns, no
        job touches anything again."""
        with self.cv:
            self.stopping = True
            if discard or self.error is not None:
                self.ops.clear()
                self.pending = 0
            self.cv.notify_all()
        self.thread.join()
        if self._switching is not None:
            self._switching.close()

    def _run(self):
        while True:
            with self.cv:
                while not self.ops and not self.stopping:
                    self.cv.wait()
                if not self.ops:
                    return
                op, size = self.ops.popleft()
                self.started += 1
                failed = self.error is not None
            if not failed:
                try:
                    self.do(op)
                except BaseException as exc:   # noqa: BLE001 - raised in the caller's thread
                    with self.cv:
                        self.error = exc
                        self.ops.clear()
            with self.cv:
                self.finished += 1
                self.queued -= size
                self.pending = len(self.ops) if self.error is not None else \
                    max(0, self.pending - 1)        # (0 already when stop() discarded)
                self.cv.notify_all()


_FAST = 0.0005
_lock = threading.Lock()
_users = 0
_saved = None


class switching:
    """While one of these is open, threads switch every 0.5 ms (or faster,
    if so set): a thread that waits for the GIL between two calls that
    release it gets it back within 0.5 ms.  Nested and concurrent uses
    count; the last close() restores the interval found by the first."""

    def __init__(self):
        global _users, _saved
        with _lock:
            if not _users:
                _saved = sys.getswitchinterval()
                sys.setswitchinterval(min(_saved, _FAST))
            _users += 1
        self._open = True

    def close(self):
        global _users
        with _lock:
            if self._open:
                self._open = False
                _users -= 1
                if not _users:
                    sys.setswitchinterval(_saved)
