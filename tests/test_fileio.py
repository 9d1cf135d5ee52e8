"""The one exact positional read (xlegacy.fileio) and the copy loop built on
it (outputs.fdio.pread_copy): short reads resumed, the end of the file said."""
import os

import pytest

from xlegacy import fileio
from xlegacy.errors import TruncatedStream
from xlegacy.outputs import fdio

DATA = bytes(range(256)) * 4


@pytest.fixture
def fd(tmp_path):
    p = tmp_path / "data"
    p.write_bytes(DATA)
    fd = os.open(p, os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.fixture
def dribble(monkeypatch):
    """preadv() that returns at most 7 bytes a call, as a signal or a file
    system may make it: the helper must resume, not stop."""
    calls = []
    real = os.preadv

    def preadv(fd, bufs, offset):
        calls.append(offset)
        return real(fd, [memoryview(bufs[0])[:7]], offset)
    monkeypatch.setattr(fileio.os, "preadv", preadv)
    return calls


def test_reads_the_whole_span(fd):
    buf = bytearray(100)
    assert fileio.pread_exact(fd, buf, 10) == 100
    assert buf == DATA[10:110]


def test_short_reads_are_resumed(fd, dribble):
    buf = bytearray(50)
    assert fileio.pread_exact(fd, buf, 900, "x") == 50
    assert buf == DATA[900:950]
    assert dribble == list(range(900, 950, 7))


def test_end_of_file_returns_what_was_read(fd, dribble):
    buf = bytearray(40)
    assert fileio.pread_exact(fd, buf, len(DATA) - 30) == 30
    assert buf[:30] == DATA[-30:]


def test_end_of_file_with_what_raises_truncated(fd):
    buf = memoryview(bytearray(40))
    with pytest.raises(TruncatedStream) as e:
        fileio.pread_exact(fd, buf, len(DATA) - 30, "page data", at=5000)
    assert e.value.offset == 5030
    assert (e.value.needed, e.value.available) == (40, 30)
    assert "page data" in str(e.value)
    with pytest.raises(TruncatedStream) as e:
        fileio.pread_exact(fd, buf, len(DATA) - 30, "page data")
    assert e.value.offset == len(DATA)


def test_fills_a_numpy_array(fd):
    np = pytest.importorskip("numpy")
    a = np.zeros(16, np.uint64)
    assert fileio.pread_exact(fd, a, 0) == 128
    assert a.tobytes() == DATA[:128]


def test_pread_copy_passes_every_byte_once(fd, dribble):
    got = []
    n = fdio.pread_copy(fd, 3, 1000, bytearray(64), lambda part: got.append(bytes(part)))
    assert n == 1000 and b"".join(got) == DATA[3:1003]
    assert all(len(p) == 64 for p in got[:-1])


def test_pread_copy_stops_at_the_end(fd):
    got = []
    n = fdio.pread_copy(fd, 1000, 100, bytearray(16), lambda part: got.append(bytes(part)))
    assert n == 24 and b"".join(got) == DATA[1000:]
