"""A small progress line for long operations: bytes done, percent, GB/s.

Shown only on a terminal (stderr is a TTY) and not with -q; redrawn at most
five times a second so it costs nothing measurable on the hot path.
"""
import sys
import time


def _fmt_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class Progress:
    def __init__(self, label, total=None, enabled=None, stream=None):
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.label = label
        self.total = total
        self.start = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.shown = False

    def __call__(self, done):
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        self._draw(now)

    def _draw(self, now):
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed / 1e9
        text = f"\r{self.label}: {_fmt_bytes(self.done)}"
        if self.total:
            text += f" of {_fmt_bytes(self.total)} ({100 * self.done / self.total:.0f}%)"
        text += f"  {rate:.2f} GB/s "
        self.stream.write(text)
        self.stream.flush()
        self.shown = True

    def close(self):
        if self.enabled and self.shown:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
