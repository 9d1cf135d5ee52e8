"""`xlegacy cat`, `xlegacy index`, `xlegacy vol-path` and `translate` on the
page index: read a save in place, with no restore."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support import xlbuild as B

from xlegacy import cli
from xlegacy.pagemap import PageMap
from xlegacy.testing.writer import make_stream

PAGE = 4096


@pytest.fixture
def save(tmp_path):
    p2m = 48
    img = np.random.default_rng(1).integers(0, 256, p2m * PAGE, dtype=np.uint8)
    data, res = make_stream(img, pfns=np.r_[0:20, 30:48], wrapper="xl", config="name='g'")
    path = tmp_path / "guest.save"
    path.write_bytes(data)
    return path, res.image_after().tobytes()


def _cat(capsysbinary, *argv):
    rc = cli.main(["cat", *map(str, argv)])
    cap = capsysbinary.readouterr()
    return rc, cap.out, cap.err.decode()


def test_cat_raw_bytes_equal_the_restored_image(save, capsysbinary):
    path, image = save
    for paddr, n in ((0, 10), (0x1000 - 3, 9), (19 * PAGE + 5, 12 * PAGE), (0, 48 * PAGE)):
        rc, out, _ = _cat(capsysbinary, path, hex(paddr), n)
        assert rc == 0 and out == image[paddr:paddr + n], (paddr, n)
    rc, out, _ = _cat(capsysbinary, path, str(PAGE * 21), "0x20")      # decimal and hex
    assert rc == 0 and out == bytes(32)                                # a hole: zeros
    rc, out, _ = _cat(capsysbinary, path, "010", "4")                  # decimal, not octal
    assert out == image[10:14]


def test_cat_hex_dump(save, capsys):
    path, image = save
    assert cli.main(["cat", str(path), "0x1008", "20", "--hex"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("0000000000001008  " + image[0x1008:0x1010].hex(" "))
    assert lines[1].startswith("0000000000001018  " + image[0x1018:0x101c].hex(" "))
    assert lines[0].endswith("|")


def test_cat_errors(save, capsysbinary):
    path, _ = save
    rc, out, err = _cat(capsysbinary, path, 21 * PAGE, 16, "--strict")
    assert rc == 1 and out == b"" and "pfn 21 " in err and "holds no page" in err
    rc, out, err = _cat(capsysbinary, path, 47 * PAGE, 2 * PAGE)
    assert rc == 1 and out == b"" and "past the guest's memory" in err and "0x30000" in err
    with pytest.raises(SystemExit):
        cli.main(["cat", str(path), "-5", "1"])
    with pytest.raises(SystemExit):
        cli.main(["cat", str(path), "0xzz", "1"])


def test_cat_from_a_pipe_says_it_needs_a_seekable_file(save):
    path, _ = save
    r = subprocess.run([sys.executable, "-m", "xlegacy", "cat", "-", "0", "16"],
                       input=path.read_bytes(), capture_output=True)
    assert r.returncode == 1 and r.stdout == b""
    assert b"seekable" in r.stderr


def test_index_writes_and_reports(save, capsys):
    path, image = save
    assert cli.main(["index", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{path}.xlidx" in text and "38 in 2 pfn runs" in text and "in place" in text
    pm = PageMap.load(f"{path}.xlidx")
    assert pm.read(0, 48 * PAGE) == image
    out = path.parent / "x.idx"
    assert cli.main(["index", str(path), "-o", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["pages"] == 38 and obj["wrapper"] == "xl" and obj["index"] == str(out)
    assert out.exists()


def test_translate_reads_in_place_without_a_restore(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(9)
    pages = B.random_pages(rng, [0x30, 0x31])
    types = {}
    kern = B.PageTables("4-level", pages, next_pfn=0x10, types=types)
    kern.map(0xFFFFFFFF81000000, 0x30 << 12)
    types[kern.root] |= 0x8
    src = tmp_path / "pv.save"
    src.write_bytes(B.pv_stream(0x40, pages, {0: B.pv64_context(cr3_pfn=kern.root)},
                                types=types))
    import xlegacy.restorer as R

    def no_restore(*a, **k):
        raise AssertionError("translate restored the stream")
    monkeypatch.setattr(R, "restore_result", no_restore)
    rc = cli.main(["translate", str(src), "0xffffffff81000042", "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and obj["results"][0]["paddr"] == (0x30 << 12) + 0x42
    assert obj["guest"] == "pv" and obj["paging"] == "4-level"
def test_vol_path_prints_the_plugin_directory(capsys):
    assert cli.main(["vol-path"]) == 0
    d = capsys.readouterr().out.strip()
    assert os.path.isdir(d) and any(n.endswith(".py") for n in os.listdir(d))
    assert not os.path.exists(os.path.join(d, "__init__.py"))


