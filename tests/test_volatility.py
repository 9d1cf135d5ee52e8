"""The Volatility 3 layer shipped in xlegacy: the real `vol` command line
with `-p "$(xlegacy vol-path)"` (a few runs, each ~2 s), and the layer and
stacker in-process for what needs no command line."""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLES, vol_context

import xlegacy
from xlegacy import cli
from xlegacy.testing.writer import hvm_context_blob, make_stream
from xlegacy.volatility import plugin_dir

pytest.importorskip("volatility3")
from volatility3.framework import exceptions  # noqa: E402
from volatility3.framework.layers import lime, physical  # noqa: E402

from xlegacy.volatility.layer import XenLegacySaveLayer, XenLegacySaveStacker  # noqa: E402

PAGE = 4096
VOL = shutil.which("vol") or os.path.join(os.path.dirname(sys.executable), "vol")
needs_vol = pytest.mark.skipif(not os.path.exists(VOL), reason="the vol command is not installed")
BANNER = b"Linux version 5.10.0-21-amd64 (debian-kernel@lists.debian.org) (gcc-10 (Debian " \
         b"10.2.1-6) 10.2.1 20210110, GNU ld (GNU Binutils for Debian) 2.35.2) #1 SMP " \
         b"Debian 5.10.162-1 (2023-01-21)\n\x00"


def vol(tmp_path, save, *plugin):
    r = subprocess.run([VOL, "-q", "-r", "csv", "-p", plugin_dir(), "-f", str(save),
                        "-o", str(tmp_path), *plugin], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _guest(tmp_path, wrapper="libvirt", p2m=64, banner_pfn=None, compress=False):
    img = np.random.default_rng(3).integers(0, 256, p2m * PAGE, dtype=np.uint8)
    if banner_pfn is not None:
        img[banner_pfn * PAGE + 100:banner_pfn * PAGE + 100 + len(BANNER)] = \
            np.frombuffer(BANNER, np.uint8)
    extra = {}
    if compress:
        rng = np.random.default_rng(4)
        extra = {"checkpoints": [{"image": img, "pfns": rng.choice(np.r_[0:20, 30:p2m], 10,
                                                                   replace=False)}],
                 "compress": True}
    data, _ = make_stream(img, wrapper=wrapper, width=4 if wrapper == "xenserver" else 8,
                          config=None if wrapper == "none" else "name='g'",
                          pfns=np.r_[0:20, 30:p2m], hvm_context=hvm_context_blob(2, cr3=0x5000),
                          **extra)
    path = tmp_path / f"{wrapper}.save"
    path.write_bytes(data)
    return path


def _stack(path):
    ctx = vol_context()
    ctx.config["base.location"] = pathlib.Path(path).as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "base", "base"))
    layer = XenLegacySaveStacker.stack(ctx, "base")
    if layer is not None:
        ctx.layers.add_layer(layer)
    return ctx, layer


# ------------------------------------------------------------------ the vol command line
@needs_vol
@pytest.mark.parametrize("which", ["sample:xl_hvm_json_physmap", "sample:remus_compressed_3cp",
                                   "writer:xend"])
def test_layerwriter_equals_restore(which, tmp_path):
    kind, name = which.split(":")
    if kind == "sample":
        if not SAMPLES.is_dir():
            pytest.skip("shared samples not available")
        save = SAMPLES / f"{name}.bin"
    else:
        save = _guest(tmp_path, wrapper=name)
    os.environ["XLEGACY_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        vol(tmp_path, save, "layerwriter.LayerWriter", "--layers", "primary")
    finally:
        del os.environ["XLEGACY_CACHE_DIR"]
    written = (tmp_path / "primary.raw").read_bytes()
    res = xlegacy.restore_result(str(save))
    image = res.image.tobytes()
    pfns = res.pfns_with_data.astype(np.intp)
    # every present page byte for byte; the layer ends with the last present page
    assert len(written) == (int(pfns[-1]) + 1) * PAGE
    w = np.frombuffer(written, np.uint8).reshape(-1, PAGE)
    assert np.array_equal(w[pfns], np.frombuffer(image, np.uint8).reshape(-1, PAGE)[pfns])
    # holes are written as Volatility pads them: zeros
    holes = np.setdiff1d(np.arange(w.shape[0]), pfns)
    assert not w[holes].any()


@needs_vol
def test_banners_finds_a_banner_written_into_a_guest_page(tmp_path):
    save = _guest(tmp_path, wrapper="xl", banner_pfn=40)
    out = vol(tmp_path, save, "banners.Banners")
    assert BANNER[:40].decode() in out
    assert f"{40 * PAGE + 100:#x}" in out.lower()


# ------------------------------------------------------------------ in-process
@pytest.mark.parametrize("wrapper", ["none", "xl", "xend", "xenserver", "libvirt"])
def test_stacker_recognises_every_wrapper(wrapper, tmp_path):
    ctx, layer = _stack(_guest(tmp_path, wrapper=wrapper))
    assert isinstance(layer, XenLegacySaveLayer)
    assert layer.metadata["xen_wrapper"] == wrapper
    assert layer.maximum_address == 64 * PAGE - 1 and layer.minimum_address == 0


def test_stacker_leaves_other_files_alone(tmp_path):
    raw = tmp_path / "mem.raw"
    raw.write_bytes(os.urandom(3 * PAGE))
    assert _stack(raw)[1] is None


def test_holes_read_as_in_volatilitys_own_lime_layer(tmp_path):
    save = _guest(tmp_path, wrapper="xl")
    limef = tmp_path / "g.lime"
    assert cli.main(["restore", str(save), "-o", str(limef), "--format", "lime",
                             "-q"]) == 0
    _, ours = _stack(save)
    ctx = vol_context()
    ctx.config["f.location"] = limef.as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "f", "f"))
    theirs = lime.LimeStacker.stack(ctx, "f")
    ctx.layers.add_layer(theirs)
    for addr, n in ((25 * PAGE, 16), (19 * PAGE + 4000, 200), (10 * PAGE, 4 * PAGE)):
        assert ours.is_valid(addr, n) == theirs.is_valid(addr, n)
        assert ours.read(addr, n, pad=True) == theirs.read(addr, n, pad=True)
        for layer in (ours, theirs):
            if not layer.is_valid(addr, n):
                with pytest.raises(exceptions.InvalidAddressException):
                    layer.read(addr, n)
    assert not ours.is_valid(25 * PAGE) and ours.read(25 * PAGE, 8, pad=True) == bytes(8)


def test_layer_is_lazy_and_carries_the_vcpu_state(tmp_path, monkeypatch):
    save = _guest(tmp_path, wrapper="none")
    assert cli.main(["index", str(save)]) == 0
    import xlegacy.restorer as R
    monkeypatch.setattr(R, "restore_result", lambda *a, **k: pytest.fail("restored"))
    read = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real(fd, n, off))
    _, layer = _stack(save)
    from xlegacy.pagemap import STAMP_BYTES
    # the stacker and the layer each check the index stamp; no page is read
    assert sum(read) <= 2 * STAMP_BYTES + PAGE
    md = layer.metadata
    assert md["page_map_offset"] == 0x5000 and md["architecture"] == "Intel64"
    assert md["xen_guest"] == "hvm" and [v[0] for v in md["xen_vcpus"]] == [0, 1]


def test_compressed_remus_layer_reads_the_restored_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("XLEGACY_CACHE_DIR", str(tmp_path / "cache"))
    save = _guest(tmp_path, wrapper="xl", compress=True)
    _, layer = _stack(save)
    assert layer.metadata["xen_in_place"] is False
    img = xlegacy.restore_result(str(save)).image
    assert layer.read(0, 20 * PAGE) == img[:20 * PAGE].tobytes()
