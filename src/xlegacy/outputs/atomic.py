"""Every file a command writes: refused when it would destroy an input,
created so that nothing is left when the command fails or is killed, and
named only when complete.

open_output(spec) gives one of two kinds of output:

AtomicFile  a path naming a regular file, or nothing yet.  The data goes to
            an unnamed file (O_TMPFILE) in the target's directory, so that a
            process killed even by SIGKILL leaves nothing behind; where the
            file system refuses O_TMPFILE, a hidden `.NAME.XXXXXXXX.partial`
            is used instead (removed on any failure the process survives,
            and, after a SIGKILL, by the next output made under that name:
            a live one is told apart by the lock its process holds).
            commit() syncs the data, links the file into the directory under
            a hidden name and renames it onto the name, then syncs the
            directory: after a crash the name never points at a file whose
            pages did not reach the disk.  A symlink is followed: the file is
            made beside its target, and the link stays a link.  Files are
            created with mode 0666 & ~umask (the kernel applies the umask),
            as cp and Xen's tools create theirs.
StreamOutput a character device (/dev/null), FIFO, socket or `-` (standard
            output), or a caller's file descriptor: written in place, in
            order (`seekable` is False; writers that need to seek refuse or
            go through a scratch file).  On failure the caller says so and
            exits nonzero: a consumer must not take a prefix for the whole.

Before anything is opened for writing, check_outputs() refuses an output
that is the same file as an input (same device and inode: hard links,
symlinks and /proc/self/fd paths count) or as another output, and an output
that is a directory.  Outputs (the outputs of one command) creates them all
before the work starts and, at commit, names them together: every output
takes its name or none does.
"""
import errno
import os
import stat
import sys

from ..errors import OutputError

STDOUT = "-"
# O_TMPFILE fails with these where the file system (or an old kernel) lacks it.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS})
_use_tmpfile = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


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


def describe(spec, what="output"):
    """How messages name an input or output: as the user wrote it."""
    if spec == STDOUT:
        return "standard output" if what == "output" else "standard input"
    if isinstance(spec, int) and not isinstance(spec, bool):
        return f"file descriptor {spec}"
    return os.fspath(spec)


# What only writing fails with: an image's copy error of this kind names the
# output (the input is read by the same calls).
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def named(exc, path):
    """exc naming the output `path` (as the user wrote it) when it names no
    file itself."""
    if path is not None and exc.filename is None:
        return OSError(exc.errno, exc.strerror, describe(path))
    return exc


def _renamed(exc, path):
    """The same OSError, naming the user's path rather than a temporary one."""
    new = OSError(exc.errno, exc.strerror or str(exc), path)
    new.__cause__ = exc
    return new


# ------------------------------------------------------------------ checks
def _is_fd(spec):
    return isinstance(spec, int) and not isinstance(spec, bool)


def _stat_input(src):
    """os.stat_result of an input (a path, '-', a descriptor, a file object),
    or None for what has no file behind it (bytes, an unreadable path: the
    reading will report that)."""
    try:
        if _is_fd(src):
            return os.fstat(src)
        if isinstance(src, (str, os.PathLike)):
            return os.fstat(0) if src == "-" else os.stat(src)
        fileno = getattr(src, "fileno", None)
        if fileno is not None:
            return os.fstat(fileno())
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def _stat_output(spec):
    try:
        if _is_fd(spec):
            return os.fstat(spec)
        if spec == STDOUT:
            return os.fstat(1)
        return os.stat(spec)               # follows symlinks, as writing would
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _renamed(exc, describe(spec)) from None


def _holds_data(mode):
    # Writing these destroys what a reader of the same file would read; a
    # tty, pipe or socket given as both input and output is two directions
    # of one channel (xenopsd may pass one socket for both).
    return stat.S_ISREG(mode) or stat.S_ISBLK(mode)


def check_outputs(outputs, inputs=()):
    """Refuse (OutputError) an output that is a directory, the same file as
    an input, or the same file as another output.  Nothing is opened for
    writing here; call it before opening any output."""
    ins = []
    for src in inputs:
        # (object, spec): the file is object's, the message names spec
        src, st = (src[1], _stat_input(src[0])) if isinstance(src, tuple) else \
            (src, _stat_input(src))
        if st is not None and _holds_data(st.st_mode):
            ins.append((src, (st.st_dev, st.st_ino)))
    seen = {}
    for spec in outputs:
        st = _stat_output(spec)
        name = describe(spec)
        if st is None:
            key = ("new", os.path.realpath(spec))
        else:
            if stat.S_ISDIR(st.st_mode):
                raise OutputError(f"output {name} is a directory; expected a file name")
            key = (st.st_dev, st.st_ino)
            if _holds_data(st.st_mode):
                for src, ident in ins:
                    if ident == key:
                        raise OutputError(
                            f"output {name} is the same file as the input "
                            f"{describe(src, 'input')}: refusing to overwrite the input")
            elif stat.S_ISCHR(st.st_mode):
                continue                   # /dev/null may take two outputs
        if key in seen:
            raise OutputError(f"outputs {seen[key]} and {name} are the same file; "
                              "give each output its own")
        seen[key] = name


# ------------------------------------------------------------------ outputs
class AtomicFile:
    """A regular-file output: `fd` (read-write, seekable) is open on an
    unnamed (or hidden) file in the target's directory until commit() or
    abort().  deferred: commit() only syncs the data; an Outputs names it."""

    seekable = True

    def __init__(self, path, sync=True, deferred=False):
        self.path = os.fspath(path)
        self.sync = sync
        self.deferred = deferred
        self.target = os.path.realpath(self.path)      # beside a symlink's target
        self.dir = os.path.dirname(self.target)
        self.tmp = None                # the data's name in dir, once it has one
        self.fd = None
        self._synced = False
        self.previous = None           # see keep_previous()
        self._previous_fd = None       # holds the claim on it
        try:
            if os.path.isdir(self.target):
                raise OutputError(f"output {self.path} is a directory; expected a file name")
            if _use_tmpfile:
                try:
                    self.fd = os.open(self.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
                except OSError as exc:
                    if exc.errno not in _NO_TMPFILE:
                        raise
            if self.fd is None:
                _sweep(self.dir, os.path.basename(self.target))
                self.fd, self.tmp = self._named(lambda p: os.open(
                    p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            _claim(self.fd)
        except OutputError:
            raise
        except OSError as exc:
            raise _renamed(exc, self.path) from None

    def _named(self, make):
        """make(path) under a fresh hidden name beside the target."""
        base = os.path.basename(self.target)
        while True:
            path = os.path.join(self.dir, f".{base}.{os.urandom(4).hex()}.partial")
            try:
                return make(path), path
            except FileExistsError:
                continue

    def close_fd(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    # The two steps of a commit, apart so that Outputs can take every step
    # that may fail (writing out, syncing, linking) for all outputs before
    # any of them takes its name.
    def prepare(self):
        """Data to disk (with sync), and a hidden name in the directory."""
        try:
            if self.sync and not self._synced:
                os.fsync(self.fd)
                self._synced = True
            if self.tmp is not None:
                # a named temporary: still there, still ours?
                a, b = os.stat(self.tmp), os.fstat(self.fd)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    raise OSError(errno.ENOENT, "the temporary file was replaced")
            else:
                proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    _, self.tmp = self._named(lambda p: os.link(
                        str(self.fd), p, src_dir_fd=proc, follow_symlinks=True))
                finally:
                    os.close(proc)
        except OSError as exc:
            raise _renamed(exc, self.path) from None

    def publish(self):
        """Take the name (one rename in the directory), then sync the directory."""
        try:
            self.close_fd()
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise _renamed(exc, self.path) from None
        self.tmp = None
        if self.sync:
            fsync_dir(self.dir)
        return self.path

    # For Outputs: what was under the name before, so that a later output
    # failing to take its name can give this one back its old file.
    def keep_previous(self):
        """Hard-link the file now under the name to a hidden name; False
        when that cannot be done (then a rollback cannot restore it).  The
        link is claimed (_claim) while it is kept, so that no other output
        made meanwhile takes it for a killed run's leftover."""
        self.previous = None
        try:
            _, self.previous = self._named(lambda p: os.link(self.target, p))
        except FileNotFoundError:
            self.previous = ""          # no file under the name: undo = unlink
        except OSError:
            return False
        try:
            self._previous_fd = os.open(self.previous, os.O_RDONLY | os.O_CLOEXEC)
            _claim(self._previous_fd)
        except OSError:
            pass
        return True

    def _release_previous(self):
        fd, self._previous_fd = self._previous_fd, None
        if fd is not None:
            os.close(fd)

    def undo_publish(self):
        """After publish(): put back what keep_previous() kept."""
        if self.previous:
            os.replace(self.previous, self.target)
            self.previous = None
        elif self.previous == "":
            os.unlink(self.target)
        self._release_previous()

    def drop_previous(self):
        if getattr(self, "previous", None):
            try:
                os.unlink(self.previous)
            except OSError:
                pass
        self.previous = None
        self._release_previous()

    def commit(self):
        if self.deferred:
            try:
                if self.sync and not self._synced:
                    os.fsync(self.fd)
                    self._synced = True
            except OSError as exc:
                raise _renamed(exc, self.path) from None
            return self.path
        try:
            self.prepare()
            return self.publish()
        except BaseException:
            self.abort()
            raise

    def abort(self):
        try:
            self.close_fd()
        except OSError:
            pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def _claim(fd):
    """Mark a hidden output file as live for as long as fd stays open: an
    exclusive advisory lock, which the kernel drops with the process, even
    one killed by SIGKILL.  Where locks are not to be had, nothing is
    claimed, and _sweep leaves such files alone."""
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass


def _is_partial_name(name, base):
    """`.BASE.XXXXXXXX.partial` with 8 lowercase hex digits: the names
    AtomicFile gives its hidden files, nothing else."""
    head, tail = f".{base}.", ".partial"
    if not (name.startswith(head) and name.endswith(tail)):
        return False
    mid = name[len(head):-len(tail)]
    return len(mid) == 8 and all(c in "0123456789abcdef" for c in mid)


def _sweep(directory, base):
    """Remove the hidden files of outputs named `base` in `directory` that
    no live process claims: what a run killed before its commit leaves
    where the file system has no O_TMPFILE.  Only regular files with
    AtomicFile's exact names whose lock can be taken go, and only if the
    name still leads to the file that was locked; anything else (a live
    output, a file system without locks, a symlink) is left alone."""
    import fcntl
    try:
        entries = [e for e in os.scandir(directory) if _is_partial_name(e.name, base)]
    except OSError:
        return
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = os.lstat(entry.path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(entry.path)
        except OSError:
            continue            # claimed (a live output), or gone meanwhile
        finally:
            os.close(fd)


class StreamOutput:
    """An output written in place and in order: a character device, FIFO,
    socket, standard output (`-`) or a caller's descriptor (not closed)."""

    seekable = False
    sync = False

    def __init__(self, spec, deferred=False):
        self.path = spec if _is_fd(spec) else os.fspath(spec)
        self.name = describe(spec)
        self.deferred = deferred
        self._own = False
        if _is_fd(spec):
            self.fd = spec
        elif spec == STDOUT:
            sys.stdout.flush()             # what Python buffered goes first
            self.fd = 1
        else:
            try:
                if stat.S_ISSOCK(os.stat(spec).st_mode):
                    import socket
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    try:
                        s.connect(os.fspath(spec))
                    except OSError:
                        s.close()
                        raise
                    self.fd = s.detach()
                else:
                    self.fd = os.open(spec, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise _renamed(exc, self.path) from None
            self._own = True

    def prepare(self):
        pass

    def publish(self):
        self.close_fd()
        return self.path

    def keep_previous(self):
        return True

    def undo_publish(self):
        pass                    # written in place: it cannot be taken back

    def drop_previous(self):
        pass

    def commit(self):
        return self.path if self.deferred else self.publish()

    def close_fd(self):
        if self._own and self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def abort(self):
        try:
            self.close_fd()
        except OSError:
            pass


def _is_stream(spec):
    if _is_fd(spec) or spec == STDOUT:
        return True
    try:
        return not stat.S_ISREG(os.stat(spec).st_mode)
    except OSError:
        return False                       # nothing there yet: a new file


def open_output(spec, sync=True, deferred=False, inputs=()):
    """Check `spec` against `inputs` (check_outputs) and open it: an
    AtomicFile, or a StreamOutput for `-`, a descriptor or a non-regular
    file.  Nothing appears under a new name before commit()."""
    check_outputs([spec], inputs)
    return _open(spec, sync, deferred)


def _open(spec, sync, deferred):
    if _is_stream(spec):
        return StreamOutput(spec, deferred=deferred)
    return AtomicFile(spec, sync=sync, deferred=deferred)


class Outputs:
    """The outputs of one command, all checked and created before the work
    starts, named together by commit().  Members are deferred: their own
    commit() (called by the code that writes them) only syncs the data."""

    def __init__(self, specs, inputs=(), sync=True):
        specs = [s for s in specs if s is not None]
        check_outputs(specs, inputs)
        self.items = []
        try:
            for spec in specs:
                self.items.append(_open(spec, sync, deferred=True))
        except BaseException:
            self.abort()
            raise

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)

    def commit(self):
        """Every step that can fail, for every output, then the names; if a
        rename still fails, the names already taken are given back."""
        published = []
        try:
            for out in self.items:
                out.prepare()
            if len(self.items) > 1:
                for out in self.items:
                    out.keep_previous()
            for out in self.items:
                out.publish()
                published.append(out)
        except BaseException:
            for out in reversed(published):
                try:
                    out.undo_publish()
                except OSError:
                    pass
            self.abort()
            raise
        finally:
            for out in self.items:
                out.drop_previous()

    def abort(self):
        for out in self.items:
            out.abort()

    def __enter__(self):
        return self

    def streamed(self):
        """Names of the outputs written in place (a pipe, device, stdout): on
        a failure these hold a prefix the consumer must not take for the
        whole, and the command must say so."""
        return [out.name for out in self.items if isinstance(out, StreamOutput)]

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            if isinstance(exc, Exception) and self.streamed():
                exc.incomplete_outputs = self.streamed()
        return False


def scratch_file(directory=None):
    """A read-write descriptor on an unnamed file (nothing to clean up, even
    after SIGKILL): in `directory` (the file system of an output, so that
    the kernel can share extents when copying) or the temporary directory."""
    import tempfile
    if directory is not None and _use_tmpfile:
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            pass
    with tempfile.TemporaryFile(dir=directory) as f:    # O_TMPFILE where it can
        return os.dup(f.fileno())


class ScratchFile:
    """An intermediate file with no name (a raw image for an export): usable
    as FileImage's output; commit() keeps it open for reading, close() ends it."""

    seekable = True
    sync = False
    deferred = True

    def __init__(self, directory=None, name=None):
        self.fd = scratch_file(directory)
        self.path = name             # the output it is made for (messages)

    def commit(self):
        return self.path

    def abort(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    close = abort


def write_to(out, data):
    """Write bytes (or text, as UTF-8) to an opened output, naming the
    output in an error."""
    if isinstance(data, str):
        data = data.encode()
    from .fdio import write_all
    try:
        write_all(out.fd, data)
    except OSError as exc:
        raise _renamed(exc, describe(out.path)) from None


def write_atomic(path, data, sync=True, inputs=()):
    """Write bytes (or text, as UTF-8) to path through open_output."""
    out = open_output(path, sync=sync, inputs=inputs)
    try:
        write_to(out, data)
        return out.commit()
    except BaseException:
        out.abort()
        raise
