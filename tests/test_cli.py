"""The commands as a user runs them: exit codes, one-line errors, outputs."""
import json
import subprocess
import sys

import pytest

import xlegacy
from xlegacy.cli import build_parser, main

from conftest import load_sample


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "xlegacy", *args], capture_output=True,
                          text=True, **kw)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and xlegacy.__version__ in r.stdout and "backend" in r.stdout


def test_every_command_has_help_with_example():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "example" in text.lower(), f"'{name} --help' shows no example"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_info_json_keys(samples):
    path, j = load_sample("hvm64_save")
    r = run("info", "--json", str(path))
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    for key in ("wrapper", "width", "guest", "p2m_size", "checkpoints", "compressed", "pfns",
                "hvm_params", "vcpus", "qemu"):
        assert key in meta
    assert meta["width"] == 64 and meta["guest"] == "hvm" and meta["wrapper"] == "none"
    assert meta["hvm_params"]["viridian"] == 7
    assert {k: meta["vcpus"][k] for k in ("max_id", "online")} == {"max_id": 2, "online": [0, 1, 2]}
    assert [v["id"] for v in meta["vcpus"]["state"]] == [0, 1, 2]
    assert set(meta["qemu"]) >= {"signature", "length", "sha256"}


def test_info_text(samples):
    path, _ = load_sample("pv64_xl_xsave")
    r = run("info", str(path))
    assert r.returncode == 0
    assert "PV" in r.stdout and "inferred" in r.stdout and "L4TAB|LPINTAB 2" in r.stdout


def test_info_pagetables(samples):
    path, _ = load_sample("pv64_xl_xsave")
    r = run("info", "--pagetables", "--json", str(path))
    pt = json.loads(r.stdout)["pagetable_pfns"]
    assert pt["L4TAB"] == [[57, True], [58, True]]
    assert [p for p, _ in pt["L1TAB"]] == [65, 66, 67, 68]


def test_restore_with_meta(samples, tmp_path):
    path, j = load_sample("xl_hvm_json_physmap")
    out, meta = tmp_path / "g.raw", tmp_path / "g.json"
    r = run("restore", str(path), "-o", str(out), "--meta", str(meta))
    assert r.returncode == 0, r.stderr
    m = json.loads(meta.read_text())
    assert m["pfns"] == j["expected"]["pfns_with_data"]["count"]
    assert out.stat().st_size == j["expected"]["memory"]["image_size"]
    # sparse: holes for never-sent pages (allocated blocks well below the size)
    assert out.stat().st_blocks * 512 < out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json", "g.raw"]


def test_remus_warning_exit_zero(samples, tmp_path):
    path, _ = load_sample("remus_compressed_cut_cp3")
    r = run("restore", str(path), "-o", str(tmp_path / "i"))
    assert r.returncode == 0
    assert "warning" in r.stderr and "checkpoint 2" in r.stderr
    r = run("restore", "-q", str(path), "-o", str(tmp_path / "i"))
    assert r.returncode == 0 and r.stderr == ""


def test_missing_file_one_line(tmp_path):
    r = run("info", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("xlegacy: error:")


def test_garbage_one_line(tmp_path):
    f = tmp_path / "junk"
    f.write_bytes(b"\x00" * 64)
    r = run("info", str(f))
    assert r.returncode == 1 and r.stderr.startswith("xlegacy: error:")
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    f = tmp_path / "junk"
    f.write_bytes(b"\x00" * 64)
    r = run("info", "--debug", str(f))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_width_flag():
    r = run("info", "--width", "16", "x")
    assert r.returncode == 2 and "32 or 64" in r.stderr
