"""What the user reads: one meaning for truncation messages everywhere
(issue 10.8): "expected N bytes, found M" always means the item (field,
page, run) is N bytes long from its start and only M of them are there."""
import subprocess
import sys

import pytest

import xlegacy
from support import hostile_streams as H
from support.hostile_streams import PipeLike
from xlegacy.errors import TruncatedStream
from xlegacy.kernels import faults

from conftest import load_sample

PAGE_CUT = ("stream truncated in data page 3 (pfn 1147) of the 128-entry batch at offset "
            "368676, which starts at offset 381992: expected 4096 bytes, found 2222 before "
            "the stream ends at offset 384214")


def xlegacy_cli(*args):
    return subprocess.run([sys.executable, "-m", "xlegacy", *args], capture_output=True,
                          text=True)


def test_truncated_page_same_words_in_every_command(samples, tmp_path):
    path, meta = load_sample("bad_truncated_page")
    assert meta["options"]["truncated_at"] == 384214
    for args in (["info", str(path)], ["restore", str(path), "-o", str(tmp_path / "x.raw")],
                 ["convert", "-i", str(path), "-o", str(tmp_path / "x.v3")]):
        r = xlegacy_cli(*args)
        assert r.returncode == 1 and PAGE_CUT in r.stderr, (args, r.stderr)
    r = xlegacy_cli("verify", str(path))
    assert r.returncode == 1 and "expected 4096 bytes, found 2222 before the stream ends" \
        in r.stdout, r.stdout


@pytest.mark.parametrize("kind", ["bytes", "path", "pipe", "file image"])
def test_truncated_page_same_words_from_every_source(samples, tmp_path, kind):
    path, _ = load_sample("bad_truncated_page")
    data = path.read_bytes()
    src = {"bytes": data, "path": str(path), "pipe": PipeLike(data),
           "file image": str(path)}[kind]
    kw = {"output": str(tmp_path / "img")} if kind == "file image" else {}
    with pytest.raises(TruncatedStream) as exc:
        xlegacy.restore(src, **kw)
    assert str(exc.value) == PAGE_CUT
    assert (exc.value.needed, exc.value.available, exc.value.offset) == (4096, 2222, 384214)


@pytest.mark.parametrize("make", [H.hvm_stream, H.pv_stream])
@pytest.mark.parametrize("as_file", [False, True])
def test_every_cut_reports_the_whole_item(tmp_path, make, as_file):
    """At every cut: offset = where the stream ends, needed = the item's whole
    size, available = the part of it before the cut, and the item starts at
    offset - available, inside the element the cut falls in (or at its start)."""
    built = make()
    path = tmp_path / "s"
    cuts = sorted({c for start, end, _ in built.layout
                   for c in (start, start + 1, (start + end) // 2, end - 1)
                   if built.image_offset < c < len(built.data)})
    for cut in cuts:
        if built.element_at(cut) is None:
            continue
        start, end, what = built.element_at(cut)
        path.write_bytes(built.data[:cut])
        src = str(path) if as_file else built.data[:cut]
        with pytest.raises(TruncatedStream) as exc:
            xlegacy.restore(src, **H.reader_args(built))
        e = exc.value
        assert e.offset == cut, (cut, what, str(e))
        assert 0 <= e.available < e.needed, (cut, what, str(e))
        assert start <= e.offset - e.available <= cut, (cut, what, str(e))
        assert f": expected {e.needed} bytes, found {e.available} before the stream ends " \
               f"at offset {cut}" in str(e), str(e)


def test_kernel_runs_past_the_data_in_the_same_words():
    with pytest.raises(faults.KernelFault) as exc:
        faults.raise_fault(faults.RUN_PAST_BUFFER, 5, 10, 4096, 100, locate=1000)
    assert "expected 4096 bytes, found 100 before the end of the compressed data at " \
           "offset 1010" in str(exc.value)


def test_cpu_record_warnings_in_info_text_and_verify(samples):
    path, meta = load_sample("xensaver_hvm64_live")
    assert meta["expected"]["vcpus"]["online"] == [0, 1, 3]
    warning = "VCPU_INFO marks vcpu 2 offline, but the HVM context carries its CPU state"
    r = xlegacy_cli("info", str(path))
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("vcpu 2:"))
    assert lines[at + 1].strip().startswith("warning: " + warning)
    r = xlegacy_cli("verify", str(path))
    assert r.returncode == 0 and warning in r.stdout
    r = xlegacy_cli("verify", "--strict", str(path))
    assert r.returncode == 1
    from xlegacy.verifier import verify
    (p,) = [p for p in verify(str(path))["problems"] if p["rule"] == "cpu-record"]
    # at vcpu 2's CPU record: HEADER (8 + 24) and two 8 + 1024-byte CPU records before it
    context = xlegacy.restore_result(str(path), inspect_only=True).meta.hvm_tail.context_offset
    assert p["offset"] == context + 8 + 24 + 2 * (8 + 1024) + 8


@pytest.mark.parametrize("fmt,words", [
    ("libxc", "this is a libxc migration stream v3 (marker + 'XENF'), not a legacy stream"),
    ("libxl", "this is a libxl migration stream v2 ('LibxlFmt', converted from a legacy "
              "stream), not a legacy stream"),
])
def test_info_names_a_v2_stream(samples, tmp_path, fmt, words):
    """What `xlegacy convert` writes (and Xen 4.6+ saves) is named as such."""
    path, _ = load_sample("hvm64_save")
    out = tmp_path / "s.v2"
    assert xlegacy_cli("convert", "-i", str(path), "-o", str(out), "-f", fmt).returncode == 0
    for command in ("info", "restore", "verify"):
        args = [command, str(out)] + (["-o", str(tmp_path / "x.raw")]
                                      if command == "restore" else [])
        r = xlegacy_cli(*args)
        assert r.returncode == 1 and words in r.stderr + r.stdout, (command, r)


@pytest.mark.parametrize("name,fmt,magic", [
    ("guest.elf", None, b"\x7fELF"),
    ("guest.ELF", None, b"\x7fELF"),
    ("guest.lime", None, b"EMiL"),
    ("guest.elf", "raw", None),
    ("guest.img", None, None),
])
def test_restore_format_follows_the_extension(samples, tmp_path, name, fmt, magic):
    """`-o x.elf` without --format writes an ELF core (a raw image under that
    name would look like a broken core); --format always wins."""
    path, _ = load_sample("hvm64_save")
    out = tmp_path / name
    r = xlegacy_cli("restore", str(path), "-o", str(out), *(["--format", fmt] if fmt else []))
    assert r.returncode == 0, r.stderr
    head = out.read_bytes()[:4]
    if magic is None:
        image, _ = xlegacy.restore(str(path))
        assert out.read_bytes() == bytes(image) and r.stderr.rstrip().endswith("(raw)")
    else:
        assert head == magic
