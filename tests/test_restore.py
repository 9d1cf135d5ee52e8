"""Restore semantics beyond the samples' headline results."""
import hashlib

import numpy as np
import pytest

import xlegacy
import importlib
from xlegacy.errors import StreamError

from conftest import load_sample

restore_mod = importlib.import_module("xlegacy.restorer")


def sha(a):
    return hashlib.sha256(a).hexdigest()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_delta_apply_matches(samples, monkeypatch, threads):
    monkeypatch.setattr(restore_mod, "PARALLEL_MIN_PAGES", 1)
    path, j = load_sample("remus_compressed_3cp")
    img, meta = xlegacy.restore(str(path), threads=threads)
    assert sha(img) == j["expected"]["memory"]["sha256"]


def test_checkpoint_beyond_stream(samples):
    path, j = load_sample("remus_compressed_cut_cp3")
    with pytest.raises(StreamError, match="checkpoint 3 was asked for"):
        xlegacy.restore(str(path), checkpoint=3)


def test_caller_buffer_too_small(samples):
    path, j = load_sample("hvm64_save")
    with pytest.raises(ValueError, match="needs"):
        xlegacy.restore(str(path), image=np.zeros(4096, np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        buf = np.zeros(j["expected"]["memory"]["image_size"], np.uint8)
        buf.flags.writeable = False
        xlegacy.restore(str(path), image=buf)


def test_info_does_not_need_pages(samples):
    path, j = load_sample("remus_compressed_3cp")
    res = xlegacy.restore_result(str(path), inspect_only=True)
    assert res.image is None
    meta = res.to_dict()
    assert meta["pfns"] == j["expected"]["pfns_with_data"]["count"]
    kinds = [c["page_kinds"] for c in meta["checkpoint_details"][1:]]
    assert kinds[0]["full"] == 1040            # checkpoint 2 is all FULL_PAGE
    assert kinds[1]["empty"] > kinds[1]["delta"] > 0


def test_deferred_and_read_paths_agree(samples, tmp_path):
    path, j = load_sample("xl_hvm_json_physmap")
    with xlegacy.open(str(path), defer_pages=True) as s:
        a, _ = xlegacy.restore(s)
    with xlegacy.open(str(path), defer_pages=False) as s:
        b, _ = xlegacy.restore(s)
    assert sha(a) == sha(b) == j["expected"]["memory"]["sha256"]
