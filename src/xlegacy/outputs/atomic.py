"""Output files that appear under their name only when they are complete.

Every output xlegacy writes (raw images, ELF/LiME/xc-core exports, metadata
JSON) goes through AtomicFile: it is written under a temporary name in the
target's directory, and commit() renames it into place -- after an fsync of
the data, and followed by one of the directory, so that after a crash the
name never points at a file whose pages did not reach the disk.  abort()
(any failure, Ctrl-C, SIGTERM) removes the temporary file.
"""
import os
import tempfile


def fsync_dir(path):
    """Make a rename in directory `path` durable (best effort where the
    filesystem does not support syncing a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicFile:
    """`fd` is open on a temporary file beside `path` until commit()/abort()."""

    def __init__(self, path, sync=True):
        self.path = os.fspath(path)
        self.sync = sync
        self.dir = os.path.dirname(os.path.abspath(self.path))
        self.fd, self.tmp = tempfile.mkstemp(
            prefix="." + os.path.basename(self.path) + ".", suffix=".partial", dir=self.dir)

    def close_fd(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def commit(self):
        """Data to disk (with sync), then the name, then the directory entry."""
        if self.sync:
            os.fsync(self.fd)
        self.close_fd()
        os.replace(self.tmp, self.path)
        self.tmp = None
        if self.sync:
            fsync_dir(self.dir)
        return self.path

    def abort(self):
        self.close_fd()
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def write_atomic(path, data, sync=True):
    """Write bytes (or text, as UTF-8) to path through an AtomicFile."""
    if isinstance(data, str):
        data = data.encode()
    out = AtomicFile(path, sync=sync)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(out.fd, view):]
        return out.commit()
    except BaseException:
        out.abort()
        raise
