"""Every output a command writes (outputs/atomic.py): never an input, devices
and pipes written in place, symlinks followed, nothing left on failure,
0666 & ~umask, all outputs of a command named together or not at all.
(Signals and SIGKILL: test_hostile.py, test_signal_cli / test_sigkill_*.)"""
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading

import pytest
from support import hostile_streams as H

import xlegacy
from xlegacy.cli import main
from xlegacy.converter import convert
from xlegacy.outputs import atomic

STREAM = H.catalogue()["hvm64"].data
BAD = STREAM[:len(STREAM) - 7]          # ends inside the stream: every command fails


def run(*args, stdin=None, stdout=subprocess.PIPE, **kw):
    return subprocess.run([sys.executable, "-m", "xlegacy", *map(str, args)], check=False,
                          stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, **kw)


def err(r):
    return r.stderr.decode(errors="replace")


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "s.bin"
    p.write_bytes(STREAM)
    return p


@pytest.fixture(params=["tmpfile", "named"])
def both_kinds(request, monkeypatch):
    """Run a test with O_TMPFILE outputs and with the named-temp fallback."""
    if request.param == "named":
        monkeypatch.setattr(atomic, "_use_tmpfile", False)
    return request.param


def raw_image(tmp_path):
    p = tmp_path / "ref.raw"
    xlegacy.restore(STREAM, output=p)
    data = p.read_bytes()
    p.unlink()
    return data


# ====================================================== 1: output is an input
def _same_file_cases(src, tmp_path):
    link = tmp_path / "hard.bin"
    os.link(src, link)
    sym = tmp_path / "sym.bin"
    sym.symlink_to(src)
    return {"restore -o": ["restore", src, "-o", src],
            "restore -o hard link": ["restore", src, "-o", link],
            "restore -o symlink": ["restore", src, "-o", sym],
            "restore --meta": ["restore", src, "-o", tmp_path / "o.raw", "--meta", src],
            "restore --format elf": ["restore", src, "-o", link, "--format", "elf"],
            "convert -o": ["convert", "-i", src, "-o", src],
            "convert -o hard link": ["convert", "-i", src, "-o", link]}


@pytest.mark.parametrize("case", ["restore -o", "restore -o hard link", "restore -o symlink",
                                  "restore --meta", "restore --format elf", "convert -o",
                                  "convert -o hard link"])
def test_output_that_is_the_input_is_refused(case, src, tmp_path):
    argv = _same_file_cases(src, tmp_path)[case]
    before = sorted(os.listdir(tmp_path))
    r = run(*argv)
    assert r.returncode == 1, err(r)
    lines = err(r).strip().splitlines()
    assert len(lines) == 1 and "same file as the input" in lines[0], lines
    assert src.read_bytes() == STREAM, "the input was changed"
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_output_through_proc_fd_and_stdin_is_refused(src):
    with open(src, "rb") as f:
        r = run("restore", "-", "-o", "/proc/self/fd/0", stdin=f)
    assert r.returncode == 1 and "same file as the input" in err(r)
    with open(src, "rb") as f, open(src, "ab") as out:
        r = run("convert", "-i", "0", "-o", "1", stdin=f, stdout=out)
    assert r.returncode == 1 and "same file as the input" in err(r)
    assert src.read_bytes() == STREAM


def test_api_refuses_output_that_is_the_input(src):
    with pytest.raises(xlegacy.XLegacyError, match="same file as the input"):
        xlegacy.restore(str(src), output=src)
    with pytest.raises(xlegacy.XLegacyError, match="same file as the input"):
        convert(str(src), str(src))
    assert src.read_bytes() == STREAM


def test_two_outputs_naming_one_file_are_refused(src, tmp_path):
    r = run("restore", src, "-o", tmp_path / "x", "--meta", tmp_path / "x")
    assert r.returncode == 1 and "are the same file" in err(r)
    assert not (tmp_path / "x").exists()


def test_same_channel_for_input_and_output_is_allowed():
    """One socket (or tty) as both input and output is two directions of one
    channel, not one file: not refused."""
    a, b = socket.socketpair()
    with a, b:
        atomic.check_outputs([a.fileno()], [a.fileno()])


# ====================================================== 2: non-regular outputs
class _Reader(threading.Thread):
    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.data = path, b""

    def run(self):
        with open(self.path, "rb") as f:
            self.data = f.read()


def test_restore_to_a_fifo_streams_the_image(src, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = _Reader(fifo)
    reader.start()
    r = run("restore", src, "-o", fifo, "-q")
    reader.join(60)
    assert r.returncode == 0, err(r)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced"
    assert reader.data == raw_image(tmp_path)       # holes written as zeros


def test_convert_to_a_fifo(src, tmp_path):
    ref = tmp_path / "ref.v3"
    convert(str(src), str(ref))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = _Reader(fifo)
    reader.start()
    r = run("convert", "-i", src, "-o", fifo)
    reader.join(60)
    assert r.returncode == 0, err(r)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert reader.data == ref.read_bytes()


@pytest.mark.parametrize("fmt", ["raw", "elf", "lime", "xc-core"])
def test_dash_is_standard_output(fmt, src, tmp_path):
    ref = tmp_path / f"ref.{fmt}"
    assert run("restore", src, "-o", ref, "--format", fmt, "-q").returncode == 0
    r = run("restore", src, "-o", "-", "--format", fmt, "-q", cwd=tmp_path)
    assert r.returncode == 0, err(r)
    assert r.stdout == ref.read_bytes()
    assert not (tmp_path / "-").exists()


def test_convert_dash_is_standard_output(src, tmp_path):
    ref = tmp_path / "ref.v3"
    convert(str(src), str(ref))
    r = run("convert", "-i", src, "-o", "-", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == ref.read_bytes()
    assert not (tmp_path / "-").exists()


def test_character_device_is_written_in_place(src, tmp_path):
    """A private twin of /dev/null (never the real one: the code before this
    change replaced the output with a regular file)."""
    dev = tmp_path / "null"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot make a device node here")
    for argv in (["restore", src, "-o", dev, "--meta", dev],
                 ["restore", src, "-o", dev, "--format", "elf"],
                 ["convert", "-i", src, "-o", dev]):
        r = run(*argv)
        assert r.returncode == 0, err(r)
        assert stat.S_ISCHR(os.lstat(dev).st_mode), f"{argv}: the device was replaced"
    assert sorted(os.listdir(tmp_path)) == ["null", "s.bin"]


def test_unix_socket_output(src, tmp_path):
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got = []

    def serve():
        conn, _ = server.accept()
        with conn:
            chunks = []
            while chunk := conn.recv(1 << 16):
                chunks.append(chunk)
            got.append(b"".join(chunks))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = run("restore", src, "-o", path, "-q")
    t.join(60)
    server.close()
    assert r.returncode == 0, err(r)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert got == [raw_image(tmp_path)]


@pytest.mark.parametrize("cmd", ["restore", "convert"])
def test_symlink_is_followed_rename_beside_target(cmd, both_kinds, src, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    target = b / "image"
    target.write_bytes(b"old")
    link = a / "link"
    link.symlink_to(target)
    if cmd == "restore":
        xlegacy.restore(str(src), output=link)
        want = raw_image(tmp_path)
    else:
        convert(str(src), str(link))
        convert(str(src), str(tmp_path / "ref"))
        want = (tmp_path / "ref").read_bytes()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == want
    assert os.listdir(a) == ["link"] and os.listdir(b) == ["image"]


def test_dangling_symlink_creates_its_target(src, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "new.raw")
    assert run("restore", src, "-o", link, "-q").returncode == 0
    assert link.is_symlink() and (tmp_path / "new.raw").read_bytes() == raw_image(tmp_path)


# ====================================================== 3: convert is atomic
@pytest.mark.parametrize("existing", [False, True])
def test_failed_convert_leaves_nothing(existing, both_kinds, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(BAD)
    out = tmp_path / "out.v3"
    if existing:
        out.write_bytes(b"previous")
    with pytest.raises(xlegacy.StreamError):
        convert(str(bad), str(out))
    r = run("convert", "-i", bad, "-o", out)
    assert r.returncode == 1
    assert "incomplete" not in err(r)
    assert sorted(os.listdir(tmp_path)) == (["bad.bin", "out.v3"] if existing else ["bad.bin"])
    if existing:
        assert out.read_bytes() == b"previous"


def test_failed_convert_to_a_pipe_says_so(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(BAD)
    r = run("convert", "-i", bad, "-o", "1")
    assert r.returncode == 1
    assert err(r).count("\n") == 1 and "is incomplete" in err(r)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("how", ["fd", "path"])
def test_convert_to_a_full_device_reports_enospc(how, src):
    with open("/dev/full", "wb") as full:
        if how == "fd":
            r = run("convert", "-i", src, "-o", "1", stdout=full)
        else:
            r = run("convert", "-i", src, "-o", "/dev/full")
    assert r.returncode == 1, err(r)
    assert "No space left on device" in err(r) and "is incomplete" in err(r)
    assert "BufferError" not in err(r) and "Traceback" not in err(r)


def _fsize_limit(limit):
    import resource

    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


@pytest.mark.parametrize("argv", [["restore", "{src}", "-o", "out.img"],
                                  ["restore", "{src}", "-o", "out.img", "--format", "elf"],
                                  ["convert", "-i", "{src}", "-o", "out.img"]])
def test_write_error_names_the_users_output(argv, src, tmp_path):
    """A write that fails (here EFBIG, from RLIMIT_FSIZE) is reported under
    the name the user gave, never a temporary file, and leaves nothing."""
    argv = [a.format(src=src) for a in argv]
    r = run(*argv, cwd=tmp_path, preexec_fn=_fsize_limit(4096))
    assert r.returncode == 1, err(r)
    assert "File too large: out.img" in err(r), err(r)
    assert ".partial" not in err(r)
    assert sorted(os.listdir(tmp_path)) == ["s.bin"]


def test_open_error_names_the_users_output(both_kinds, src, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with pytest.raises(OSError) as info:
        xlegacy.restore(str(src), output=ro / "missing" / "x.raw")
    assert info.value.filename == str(ro / "missing" / "x.raw")


# ====================================================== 5: file modes
@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_are_0666_minus_umask(mask, both_kinds, src, tmp_path):
    with umask(mask):
        assert main(["restore", str(src), "-o", str(tmp_path / "a.raw"), "-q",
                     "--meta", str(tmp_path / "a.json")]) == 0
        assert main(["restore", str(src), "-o", str(tmp_path / "a.elf"), "-q",
                     "--format", "elf"]) == 0
        convert(str(src), str(tmp_path / "a.v3"))
    for name in ("a.raw", "a.json", "a.elf", "a.v3"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask, name


# ====================================================== 14.6: all or nothing
@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a restore starts."""
    import xlegacy.inspector
    import xlegacy.restorer

    def refuse(*a, **kw):
        raise AssertionError("the restore ran before the outputs were checked")
    monkeypatch.setattr(xlegacy.restorer, "restore_result", refuse)
    # (a raw image from a stream file starts in the numpy-free restore)
    monkeypatch.setattr(xlegacy.inspector, "restore_to_file", refuse)


def test_meta_in_missing_directory_fails_before_work(no_work, src, tmp_path, capsys):
    rc = main(["restore", str(src), "-o", str(tmp_path / "out.img"),
               "--meta", "/nonexistent/dir/m.json"])
    assert rc == 1
    assert "No such file or directory: /nonexistent/dir/m.json" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["s.bin"]


@pytest.mark.parametrize("which", ["-o", "--meta"])
def test_output_that_is_a_directory_fails_before_work(which, no_work, src, tmp_path, capsys):
    d = tmp_path / "dir"
    d.mkdir()
    argv = ["restore", str(src), "-o", str(tmp_path / "out.img"), "--meta",
            str(tmp_path / "m.json")]
    argv[argv.index(which) + 1] = str(d)
    assert main(argv) == 1
    assert "is a directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["dir", "s.bin"] and os.listdir(d) == []


def test_outputs_are_named_together(both_kinds, src, tmp_path, monkeypatch, capsys):
    """The metadata cannot take its name (its directory vanished during the
    restore): the image must not take its name either."""
    import xlegacy.inspector
    import xlegacy.restorer
    mdir = tmp_path / "m"
    mdir.mkdir()

    def then_remove(real):
        def restore_then_remove(*a, **kw):
            res = real(*a, **kw)
            for n in os.listdir(mdir):
                os.unlink(mdir / n)
            mdir.rmdir()
            return res
        return restore_then_remove
    # (a raw image from a stream file restores through the numpy-free path)
    for module, name in ((xlegacy.restorer, "restore_result"),
                         (xlegacy.inspector, "restore_to_file")):
        monkeypatch.setattr(module, name, then_remove(getattr(module, name)))
    (tmp_path / "out.img").write_bytes(b"previous")
    rc = main(["restore", str(src), "-o", str(tmp_path / "out.img"),
               "--meta", str(mdir / "m.json")])
    assert rc == 1
    assert str(mdir / "m.json") in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["out.img", "s.bin"]
    assert (tmp_path / "out.img").read_bytes() == b"previous"


def test_failed_restore_leaves_every_output_untouched(both_kinds, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(BAD)
    (tmp_path / "m.json").write_text("old")
    assert main(["restore", str(bad), "-o", str(tmp_path / "out.img"),
                 "--meta", str(tmp_path / "m.json")]) == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.bin", "m.json"]
    assert (tmp_path / "m.json").read_text() == "old"


# ====================================================== 14.5: start-up signals
def test_sigint_during_startup_is_one_line(monkeypatch, capsys):
    from xlegacy import cli

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info", "x"]) == 130
    assert capsys.readouterr().err == "xlegacy: interrupted\n"


def test_sigint_during_startup_convert_script(monkeypatch, capsys):
    import xlegacy.cli.convert as conv

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(conv, "build_parser", interrupted)
    assert conv.main(["-i", "0", "-o", "1"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("how", ["same path", "hard link"])
def test_index_output_that_is_the_stream_is_refused(how, src, tmp_path):
    out = src
    if how == "hard link":
        out = tmp_path / "link"
        os.link(src, out)
    r = run("index", src, "-o", out)
    assert r.returncode == 1 and "same file as the input" in err(r), err(r)
    assert src.read_bytes() == STREAM
    from xlegacy.pagemap import open_pagemap
    pm = open_pagemap(str(src), index=False)
    with pytest.raises(xlegacy.XLegacyError, match="same file as the input"):
        pm.save(out)
    assert src.read_bytes() == STREAM


@pytest.mark.parametrize("sync", [True, False])
def test_convert_to_a_path_syncs_before_rename(sync, src, tmp_path, monkeypatch):
    """Like restore: the name never points at data that did not reach the
    disk (--no-sync skips that, as for restore)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("sync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(a, b, **kw):
        events.append(("replace", os.stat(a).st_ino))
        return real_replace(a, b, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out.v3"
    assert main(["convert", "-i", str(src), "-o", str(out)] + ([] if sync else ["--no-sync"])) == 0
    inode = out.stat().st_ino
    assert ("replace", inode) in events
    assert (("sync", inode) in events) == sync
    if sync:
        assert events.index(("sync", inode)) < events.index(("replace", inode))


@pytest.mark.parametrize("previous", [False, True])
def test_a_failed_rename_gives_back_the_names_taken(previous, both_kinds, src, tmp_path,
                                                     monkeypatch):
    """Even the last step, the renames: if the metadata cannot take its
    name, the image already renamed gets its old file back (or goes)."""
    out, meta = tmp_path / "out.img", tmp_path / "m.json"
    if previous:
        out.write_bytes(b"old image")
        meta.write_text("old meta")
    real_replace = os.replace

    def replace(a, b, **kw):
        if os.fspath(b) == str(meta):
            raise OSError(5, "Input/output error")
        return real_replace(a, b, **kw)
    monkeypatch.setattr(os, "replace", replace)
    assert main(["restore", str(src), "-o", str(out), "--meta", str(meta), "-q"]) == 1
    monkeypatch.undo()
    if previous:
        assert sorted(os.listdir(tmp_path)) == ["m.json", "out.img", "s.bin"]
        assert out.read_bytes() == b"old image" and meta.read_text() == "old meta"
    else:
        assert sorted(os.listdir(tmp_path)) == ["s.bin"]


@pytest.mark.parametrize("fmt", ["raw", "elf"])
def test_failed_restore_to_a_stream_says_so(fmt, tmp_path):
    """A pipe cannot be taken back: the error says its content is not the
    whole, and the exit status is nonzero."""
    bad = tmp_path / "bad.bin"
    bad.write_bytes(BAD)
    r = run("restore", bad, "-o", "-", "--format", fmt)
    assert r.returncode == 1
    lines = err(r).strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "; the output written to standard output is incomplete"), lines
    r = run("restore", bad, "-o", tmp_path / "out.raw", "--format", fmt)
    assert r.returncode == 1 and "incomplete" not in err(r)


# ====================================================== a killed run's hidden file
def _claimed(path):
    """An open descriptor of path holding the lock a live output holds."""
    import fcntl
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_killed_runs_hidden_file_goes_with_the_next_output(tmp_path, monkeypatch):
    """Without O_TMPFILE, a run killed before its commit leaves its hidden
    `.NAME.XXXXXXXX.partial`; the next output under that name removes it,
    and nothing else: not a live output's (its lock is held), not a file
    whose name only looks alike, not a symlink or a directory, not another
    name's."""
    monkeypatch.setattr(atomic, "_use_tmpfile", False)
    stale = tmp_path / ".guest.raw.0123abcd.partial"
    stale.write_bytes(b"x" * 8192)
    live = tmp_path / ".guest.raw.89abcdef.partial"
    live.write_bytes(b"live")
    keep = [".guest.raw.partial", ".guest.raw.0123abcZ.partial", ".guest.raw.0123abc.partial",
            ".other.raw.0123abcd.partial", ".guest.raw.0123abcd.partial.x",
            "guest.raw.0123abcd.partial"]
    for name in keep:
        (tmp_path / name).write_bytes(b"k")
    (tmp_path / ".guest.raw.11111111.partial").mkdir()
    (tmp_path / "target").write_bytes(b"t")
    (tmp_path / ".guest.raw.22222222.partial").symlink_to(tmp_path / "target")
    fd = _claimed(live)
    try:
        xlegacy.restore(STREAM, output=tmp_path / "guest.raw")
    finally:
        os.close(fd)
    left = set(os.listdir(tmp_path))
    assert stale.name not in left
    assert {live.name, *keep, ".guest.raw.11111111.partial", ".guest.raw.22222222.partial",
            "target", "guest.raw"} == left
    assert (tmp_path / "target").read_bytes() == b"t"


def test_an_output_claims_its_hidden_file_while_it_lives(tmp_path, monkeypatch):
    """Two outputs under one name at once (or one command's kept previous
    file during a joint commit): neither removes the other's hidden file."""
    monkeypatch.setattr(atomic, "_use_tmpfile", False)
    first = atomic.open_output(tmp_path / "img", sync=False)
    second = atomic.open_output(tmp_path / "img", sync=False)
    try:
        assert os.path.exists(first.tmp) and os.path.exists(second.tmp)
    finally:
        second.abort()
        first.abort()
    assert os.listdir(tmp_path) == []
    (tmp_path / "img").write_bytes(b"old")
    kept = atomic.open_output(tmp_path / "img", sync=False, deferred=True)
    try:
        assert kept.keep_previous()
        other = atomic.open_output(tmp_path / "img", sync=False)
        other.abort()
        assert os.path.exists(kept.previous)
    finally:
        kept.drop_previous()
        kept.abort()
    assert os.listdir(tmp_path) == ["img"]


def test_a_sigkilled_restore_leaves_nothing_once_the_next_one_ran(tmp_path):
    """SIGKILL without O_TMPFILE: the hidden file stays (nothing can run in
    a killed process), and the next restore to that name takes it away."""
    child = ("import sys, time\nfrom xlegacy.outputs import atomic\n"
             "atomic._use_tmpfile = False\n"
             "out = atomic.open_output(sys.argv[1])\n"
             "print(out.tmp, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path / "guest.raw")],
                            stdout=subprocess.PIPE, text=True)
    try:
        hidden = proc.stdout.readline().strip()
        assert os.path.exists(hidden)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert os.listdir(tmp_path) == [os.path.basename(hidden)]
    r = subprocess.run([sys.executable, "-c", "import sys, xlegacy\n"
                        "from xlegacy.outputs import atomic\natomic._use_tmpfile = False\n"
                        "xlegacy.restore(sys.stdin.buffer.read(), output=sys.argv[1])",
                        str(tmp_path / "guest.raw")], input=STREAM, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["guest.raw"]
