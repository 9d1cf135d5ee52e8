"""The shared sample streams (written by nobody in this project, checked
against Xen's own restore code) restore to their recorded results."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

import xlegacy
from xlegacy.errors import CorruptCheckpoint, TruncatedStream

from conftest import SAMPLES, load_sample, sample_names

NAMES = sample_names()
OK = [n for n in NAMES if json.loads((SAMPLES / f"{n}.json").read_text())["expect"] == "ok"]
BAD = [n for n in NAMES if n not in OK]

if not NAMES:
    pytestmark = pytest.mark.skip(reason=f"shared samples not available ({SAMPLES} is missing)")


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def restored():
    cache = {}

    def get(name):
        if name not in cache:
            path, meta = load_sample(name)
            res = xlegacy.restore_result(str(path))
            cache[name] = (res, res.to_dict(), meta)
        return cache[name]
    return get


@pytest.mark.parametrize("name", OK)
def test_memory_image(name, restored):
    res, meta, j = restored(name)
    e = j["expected"]
    assert res.image.size == e["memory"]["image_size"]
    assert sha(res.image) == e["memory"]["sha256"]


# The JSON files come in two schemas: the writer-made samples record the full
# model (data_pages, entry_counts, xalloc_pfns, final_pagetable_types, per-vcpu
# PV hashes); the xensaver_ ones record what the harness around Xen's saver
# knew (pfns, checkpoints, hvm_params, pagetable_pfns, extended_info,
# vcpu_block_size, xcnt).  Every key a file holds is compared; none is assumed.
PT_LEVELS = ("L1TAB", "L2TAB", "L3TAB", "L4TAB")


def _pt_summary(pfns):
    """{"pfn": "L2TAB|LPINTAB"} -> the counts/pinned summary info reports."""
    counts, pinned = {}, {}
    for name in pfns.values():
        level = name.split("|")[0]
        counts[level] = counts.get(level, 0) + 1
        if "LPINTAB" in name:
            pinned[level] = pinned.get(level, 0) + 1
    return counts, pinned


def _pt_map(res):
    from xlegacy.restorer import pagetable_pfns
    return {str(pfn): level + ("|LPINTAB" if pin else "")
            for level, rows in pagetable_pfns(res).items() for pfn, pin in rows}


@pytest.mark.parametrize("name", OK)
def test_structure(name, restored):
    res, meta, j = restored(name)
    e, o = j["expected"], j["options"]
    assert meta["p2m_size"] == e["p2m_size"]
    assert meta["checkpoints"] == e["complete_checkpoints"] == e["committed_checkpoint"]
    if "checkpoints" in e:
        assert meta["checkpoints"] == e["checkpoints"]
    assert meta["width"] == o["toolstack_width_bits"]
    assert meta["guest"] == o["guest_type"]
    assert meta["wrapper"] == (o["wrapper"]["type"] if o["wrapper"] else "none")
    assert meta["wrapper_details"]["image_offset"] == o["libxc_image_offset"]
    assert meta["compressed"] == bool(o["compression"])
    assert meta["pfns"] == e["pfns_with_data"]["count"]
    if "pfns" in e:
        assert meta["pfns"] == e["pfns"]
    pfns = res.pfns_with_data.astype("<u8").tobytes()
    assert sha(pfns) == e["pfns_with_data"]["sha256_u64le_sorted"]
    assert meta["pfn_ranges"] == e["pfns_with_data"]["ranges"]
    if "data_pages" in e:
        assert meta["data_pages"] == e["data_pages"]["committed_total"]
        assert [c["data_pages"] for c in meta["checkpoint_details"]] == \
            e["data_pages"]["per_checkpoint"]
    if "entry_counts" in e:
        assert meta["entry_counts"] == e["entry_counts"]
    if "xalloc_pfns" in e:
        assert meta["xalloc_pfns"] == sorted(set(e["xalloc_pfns"]))
    assert meta["broken_pfns"] == sorted(set(e["broken_pfns"]))


@pytest.mark.parametrize("name", OK)
def test_metadata(name, restored):
    res, meta, j = restored(name)
    e = j["expected"]
    assert meta["vcpus"]["max_id"] == e["vcpus"]["max_vcpu_id"]
    if "max_id" in e["vcpus"]:
        assert meta["vcpus"]["max_id"] == e["vcpus"]["max_id"]
    assert meta["vcpus"]["online"] == e["vcpus"]["online"]
    assert meta["tsc_info"] == e["tsc_info"]
    if e["toolstack"] is None:
        assert meta["toolstack"] is None
    else:
        assert meta["toolstack"]["length"] == e["toolstack"]["length"]
        assert meta["toolstack"]["sha256"] == e["toolstack"]["sha256"]
        if "libxl_v1_physmap" in e["toolstack"]:
            assert meta["toolstack"]["libxl_v1_physmap"] == e["toolstack"]["libxl_v1_physmap"]
    if "hvm_params" in e:
        assert meta["hvm_params"] == e["hvm_params"]
    if "hvm" in e:
        from xlegacy.format import HVM_PARAM_NUMBERS
        h = e["hvm"]
        assert meta["hvm_params"] == h["params"]
        assert {k: HVM_PARAM_NUMBERS[k] for k in meta["hvm_params"]} == h["param_numbers"]
        assert meta["hvm"]["magic_pfns"] == h["magic_pfns"]
        assert meta["hvm"]["context"]["length"] == h["context"]["length"]
        assert meta["hvm"]["context"]["sha256"] == h["context"]["sha256"]
        q = meta["qemu"]
        assert (q["signature"], q["length"], q["sha256"]) == \
            (h["qemu"]["signature"], h["qemu"]["length"], h["qemu"]["sha256"])
    if "pv" in e:
        p, mp = e["pv"], meta["pv"]
        assert mp["guest_width"] == p["guest_width"]
        assert mp["p2m_frame_list"] == p["p2m_frame_list"]
        assert mp["unmapped_pfns"] == p["unmapped_pfns"]
        assert mp["unmapped_pfns_count"] == p.get("unmapped_pfns_count", len(p["unmapped_pfns"]))
        if "shared_info_sha256" in p:
            assert mp["shared_info_sha256"] == p["shared_info_sha256"]
        blocks = {b["id"]: b for b in mp["extended_info_blocks"]}
        if "extended_info_blocks" in p:
            assert [{k: b[k] for k in ("id", "size")} for b in mp["extended_info_blocks"]] == \
                [{k: b[k] for k in ("id", "size")} for b in p["extended_info_blocks"]]
        if "extended_info" in p:
            assert list(blocks) == p["extended_info"]
        if "vcpu_block_size" in p:
            assert blocks["vcpu"]["size"] == p["vcpu_block_size"]
        if "xcnt" in p:
            assert blocks["xcnt"]["value"] == p["xcnt"]
        if "vcpus" in p:
            for ours, theirs in zip(mp["vcpus"], p["vcpus"], strict=True):
                assert ours["id"] == theirs["id"]
                assert ours["context_sha256"] == theirs["context_sha256"]
                if "extended_sha256" in theirs:
                    assert ours["extended_sha256"] == theirs["extended_sha256"]
        else:       # one tail context per online vcpu
            assert [v["id"] for v in mp["vcpus"]] == e["vcpus"]["online"]
        if "final_pagetable_types" in e:
            want = e["final_pagetable_types"]
        else:
            counts, pinned = _pt_summary(p["pagetable_pfns"])
            want = {"counts": counts, "pinned": pinned, "pfns": p["pagetable_pfns"]}
        assert mp["pagetables"]["counts"] == want["counts"]
        assert mp["pagetables"]["pinned"] == want["pinned"]
        assert _pt_map(res) == want["pfns"]


@pytest.mark.parametrize("name", [n for n in OK if "remus" in n])
def test_each_checkpoint(name):
    path, j = load_sample(name)
    hashes = j["expected"]["memory"]["sha256_after_each_checkpoint"]
    for n, want in enumerate(hashes, 1):
        img, meta = xlegacy.restore(str(path), checkpoint=n)
        assert meta["checkpoints"] == n
        assert sha(img) == want, f"after checkpoint {n}"


@pytest.mark.parametrize("name", OK)
def test_restore_to_file(name, tmp_path):
    path, j = load_sample(name)
    out = tmp_path / "image.raw"
    res = xlegacy.restore_result(str(path), output=out)
    assert res.image == str(out)
    assert out.stat().st_size == j["expected"]["memory"]["image_size"]
    assert sha(out.read_bytes()) == j["expected"]["memory"]["sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["image.raw"]


@pytest.mark.parametrize("name", OK)
def test_sources_agree(name):
    """Path, bytes, file object and a pipe give the same image."""
    path, j = load_sample(name)
    want = j["expected"]["memory"]["sha256"]
    data = path.read_bytes()
    img, _ = xlegacy.restore(data)
    assert sha(img) == want
    with open(path, "rb") as f:
        img, _ = xlegacy.restore(f)
    assert sha(img) == want
    buf = np.zeros(j["expected"]["memory"]["image_size"] + 4096, dtype=np.uint8)
    img, _ = xlegacy.restore(memoryview(data), image=buf)
    assert sha(img) == want and img.base is not None


@pytest.mark.parametrize("name", OK[:2] + [n for n in OK if "remus" in n])
def test_pipe_input(name, tmp_path):
    path, j = load_sample(name)
    out = tmp_path / "img"
    with open(path, "rb") as f:
        r = subprocess.run([sys.executable, "-m", "xlegacy", "restore", "-", "-o", str(out),
                            "-q"], stdin=f, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sha(out.read_bytes()) == j["expected"]["memory"]["sha256"]


def test_bad_truncated_page(samples):
    path, j = load_sample("bad_truncated_page")
    err = j["error"]
    with pytest.raises(TruncatedStream) as ei:
        xlegacy.restore(str(path))
    assert ei.value.offset == err["end_of_file"]
    assert "data page 3" in str(ei.value)
    assert f"offset {err['page_offset']}" in str(ei.value)


def test_bad_compressed_run(samples, tmp_path):
    path, j = load_sample("bad_compressed_run")
    err = j["error"]
    out = tmp_path / "img"
    with pytest.raises(CorruptCheckpoint) as ei:
        xlegacy.restore(str(path), output=out)
    e = ei.value
    assert e.checkpoint == err["checkpoint"] and e.last_good == err["checkpoint"] - 1
    assert "page 5" in str(e) and "checkpoint 3 was the last good one" in str(e)
    page_start = err["chunk_offset"] + 4 + 8 + err["page_encoding_offset_in_chunk"]
    assert page_start <= e.offset < page_start + 4097
    assert list(tmp_path.iterdir()) == []
    img, meta = xlegacy.restore(str(path), checkpoint=3)
    assert sha(img) == j["info"]["state_after_checkpoint_3"]


@pytest.mark.parametrize("name", BAD)
def test_bad_samples_cli(name, tmp_path):
    path, _ = load_sample(name)
    out = tmp_path / "img"
    r = subprocess.run([sys.executable, "-m", "xlegacy", "restore", str(path), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xlegacy: error: ") and "offset" in lines[0]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
