"""xlegacy verify: verdicts, problems with offsets, --json, --strict, --pages,
on the shared samples and on streams from xlegacy.testing.writer."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import xlegacy
from conftest import SAMPLES, load_sample, sample_names

from xlegacy.cli.verify import format_report
from xlegacy.verifier import RULES, verify

try:
    from xlegacy.testing import writer as W
except ImportError:     # pragma: no cover
    W = None

needs_writer = pytest.mark.skipif(W is None, reason="xlegacy.testing.writer not available")


def _samples():
    names = sample_names()
    return names or [pytest.param(None, marks=pytest.mark.skip(
        reason=f"shared samples not available ({SAMPLES} is missing)"))]


def _rules(rep, severity=None, exclude=None):
    return [p["rule"] for p in rep["problems"]
            if (severity is None or p["severity"] == severity) and p["rule"] != exclude]


@pytest.mark.parametrize("name", _samples())
def test_samples(name):
    path, meta = load_sample(name)
    rep = verify(path)
    if meta["expect"] == "ok":
        assert rep["valid"], rep["problems"]
        assert rep["errors"] == 0
        s = rep["summary"]
        assert s["p2m_size"] == meta["expected"]["p2m_size"]
        assert s["committed_checkpoint"] == meta["expected"]["committed_checkpoint"]
        assert s["width"] == meta["options"]["toolstack_width_bits"]
        torn = meta["expected"]["complete_checkpoints"] < meta["options"].get(
            "checkpoints_in_file", 1)
        assert ("torn" in _rules(rep)) == torn
        # Some writers filled the CPU records with noise: their warnings
        # (issue 10.8) are the only other thing --strict may refuse.
        cpu_noise = any(s.get("warnings") for s in xlegacy.restore_result(
            str(path), inspect_only=True).to_dict()["vcpus"]["state"])
        assert ("cpu-record" in _rules(rep)) == cpu_noise
        assert set(_rules(rep, "warning")) <= {"torn", "cpu-record"}
        assert verify(path, strict=True)["valid"] == (not torn and not cpu_noise)
    else:
        assert not rep["valid"] and rep["errors"] >= 1
        err = [p for p in rep["problems"] if p["severity"] == "error"][0]
        e = meta["error"]
        if e["kind"] == "truncated":
            assert err["offset"] == e["end_of_file"]
            assert err["checkpoint"] == 1
        else:
            page = e["chunk_offset"] + 4 + 8 + e["page_encoding_offset_in_chunk"]
            assert page <= err["offset"] < page + 4097
            assert err["checkpoint"] == e["checkpoint"]


def test_cli_exit_status_and_json(samples):
    ok, _ = load_sample("hvm64_save")
    bad, meta = load_sample("bad_truncated_page")
    run = [sys.executable, "-m", "xlegacy", "verify"]
    p = subprocess.run(run + [str(ok)], capture_output=True, text=True)
    assert p.returncode == 0 and "valid legacy stream" in p.stdout
    p = subprocess.run(run + ["--json", str(bad)], capture_output=True, text=True)
    assert p.returncode == 1
    rep = json.loads(p.stdout)
    assert rep["valid"] is False
    assert rep["problems"][0]["offset"] == meta["error"]["end_of_file"]
    p = subprocess.run(run + [str(bad)], capture_output=True, text=True)
    assert f"offset {meta['error']['end_of_file']}" in p.stdout
    cut, _ = load_sample("remus_compressed_cut_cp3")
    assert subprocess.run(run + ["-q", str(cut)]).returncode == 0
    assert subprocess.run(run + ["-q", "--strict", str(cut)]).returncode == 1


def test_stdin(samples):
    path, _ = load_sample("xl_hvm_json_physmap")
    with open(path, "rb") as stdin:
        p = subprocess.run([sys.executable, "-m", "xlegacy", "verify", "-"], stdin=stdin,
                           capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_not_a_stream(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(range(256)) * 64)
    rep = verify(junk)
    assert not rep["valid"] and rep["errors"] == 1
    rep = verify(tmp_path / "missing")
    assert not rep["valid"] and "No such file" in rep["problems"][0]["message"]
    assert format_report(rep)[0].endswith("INVALID (1 error(s), 0 warning(s))")


# ---------------------------------------------------------------- writer streams
def _image(p2m, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=p2m * 4096, dtype=np.uint8)


def _hvm_writer(p2m=64, **kw):
    return W.StreamWriter(None, width=8, guest="hvm", p2m_size=p2m, **kw)


def _finish(w, p2m=64, context=None):
    w.end_body()
    w.hvm_tail((p2m - 3, p2m - 2, p2m - 1), context if context is not None else
               W.hvm_context_blob(), W.qemu_blob(100))
    return w.getvalue()


@needs_writer
def test_duplicate_pfns_and_trailing_bytes(tmp_path):
    w = _hvm_writer()
    w.batch([1, 2, 1], pages=bytes(3 * 4096))
    w.last_checkpoint()
    data = _finish(w) + b"junk!"
    path = tmp_path / "s.bin"
    path.write_bytes(data)
    rep = verify(path)
    assert rep["valid"] and set(_rules(rep, "warning")) == {"dup-pfn", "trailing"}
    trailing = [p for p in rep["problems"] if p["rule"] == "trailing"][0]
    assert trailing["offset"] == len(data) - 5
    dup = [p for p in rep["problems"] if p["rule"] == "dup-pfn"][0]
    assert dup["offset"] == data.index(struct.pack("<i", 3))


@needs_writer
def test_bad_hvm_context(tmp_path):
    w = _hvm_writer()
    w.batch([1], pages=bytes(4096))
    data = _finish(w, context=struct.pack("<HHI", 2, 0, 4) + bytes(4))
    rep = verify(data)
    assert not rep["valid"] and _rules(rep, "error") == ["hvm-context"]
    w = _hvm_writer()
    w.batch([1], pages=bytes(4096))
    blob = W.hvm_context_blob()[:-8]          # no END record
    assert _rules(verify(_finish(w, context=blob)), "error") == ["hvm-context"]


@needs_writer
def test_pv_header_warnings():
    data, _ = W.make_stream(_image(32), width=8, guest="pv",
                            pv={"extra_blocks": [(b"zzzz", b"1234")]})
    rep = verify(data)
    # (the writer's default vCPU context points cr3 at no page table: cpu-record)
    assert rep["valid"] and _rules(rep, exclude="cpu-record") == ["ext-unknown"]
    assert rep["summary"]["extended_info"][-1] == "zzzz"


@needs_writer
def test_hvm_param_in_pv():
    w = W.StreamWriter(None, width=8, guest="pv", p2m_size=32, check=False)
    w.vcpu_info([0])
    w.batch([1], pages=bytes(4096))
    w.hvm_param("viridian", 1)
    w.end_body()
    w.pv_tail()
    rep = verify(w.getvalue())
    assert rep["valid"] and _rules(rep, exclude="cpu-record") == ["hvm-param-in-pv"]


@needs_writer
def test_verify_pass_compared_with_pages():
    p2m = 32
    img = _image(p2m, 2)
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=p2m)
    w.send(np.arange(p2m), image=img)
    w.verify_mode()
    other = img.reshape(-1, 4096).copy()
    other[7] ^= 0xFF
    w.send(np.arange(p2m), pages=other)
    data = _finish(w, p2m)
    rep = verify(data)
    assert rep["valid"] and rep["summary"]["verify"]["checked"] is False
    assert any("not compared" in line for line in format_report(rep))
    rep = verify(data, pages=True)
    assert rep["valid"] and _rules(rep) == ["verify-mismatch"]
    assert "[7]" in rep["problems"][0]["message"]
    assert not verify(data, pages=True, strict=True)["valid"]


@needs_writer
def test_compressed_page_before_its_entry():
    """Format B: a COMPRESSED_DATA chunk that carries a page before the PFN
    array naming it breaks the saver's invariant (libxc still restores it)."""
    p2m = 16
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=p2m, defer_metadata=False)
    w.batch([1, 2], pages=bytes(2 * 4096))
    w.enable_compression()
    _finish(w, p2m)
    w.compressed_data(b"\x80" + bytes(4096))     # page for the entry that follows
    w.batch([3], pages=None)
    data = _finish(w, p2m)
    rep = verify(data)
    assert rep["valid"] and _rules(rep) == ["compressed-order"], rep["problems"]
    assert rep["problems"][0]["checkpoint"] == 2


@needs_writer
def test_late_enable_compression_and_torn(tmp_path):
    p2m = 16
    w = W.StreamWriter(None, width=8, guest="hvm", p2m_size=p2m)
    w.batch([1], pages=bytes(4096))
    _finish(w, p2m)
    w.batch([2], pages=bytes(4096))
    w.enable_compression()
    data = _finish(w, p2m)
    w.batch([3], pages=bytes(4096))
    cut = w.getvalue()[:len(data) + 100]
    rep = verify(cut)
    assert rep["valid"] and sorted(_rules(rep)) == ["late-compression", "torn"]


def test_rules_documented():
    assert all(isinstance(v, str) and v for v in RULES.values())


def test_json_is_plain(samples):
    path, _ = load_sample("pv64_xl_xsave")
    json.dumps(verify(path))
    assert os.path.exists(path)
