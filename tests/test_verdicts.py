"""One verdict per stream: restore, info, verify and convert give the same
answer (the same checkpoint, or the same error at the same offset) on torn
and corrupt Remus streams (support/verdict_streams.py)."""
import pytest

import xlegacy
from xlegacy.converter import convert
from xlegacy.errors import CorruptCheckpoint, XLegacyError
from xlegacy.restorer import restore_result
from xlegacy.verifier import verify

from support import verdict_streams as V

CASES = V.cases()


def _restore(path, tmp_path):
    try:
        res = restore_result(str(path))
    except XLegacyError as exc:
        return ("error", type(exc).__name__, exc.offset, getattr(exc, "checkpoint", None))
    return ("ok", len(res.checkpoints), res.torn and res.torn["checkpoint"])


def _info(path, tmp_path):
    try:
        res = restore_result(str(path), inspect_only=True)
    except XLegacyError as exc:
        return ("error", type(exc).__name__, exc.offset, getattr(exc, "checkpoint", None))
    return ("ok", len(res.checkpoints), res.torn and res.torn["checkpoint"])


def _convert(path, tmp_path):
    try:
        st = convert(str(path), str(tmp_path / "out.v3"))
    except XLegacyError as exc:
        return ("error", type(exc).__name__, exc.offset, getattr(exc, "checkpoint", None))
    return ("ok", st.committed_checkpoint, st.torn and st.torn["checkpoint"])


def _verify(path, tmp_path):
    rep = verify(str(path))
    errors = [p for p in rep["problems"] if p["severity"] == "error"]
    if errors:
        return ("error", "CorruptCheckpoint" if errors[0]["rule"] == "checkpoint" else "?",
                errors[0]["offset"], errors[0]["checkpoint"])
    s = rep["summary"]
    return ("ok", s["committed_checkpoint"], s["torn_checkpoint"] and
            s["torn_checkpoint"]["checkpoint"])


COMMANDS = {"restore": _restore, "info": _info, "verify": _verify, "convert": _convert}


@pytest.mark.parametrize("name,data,want", [pytest.param(*c, id=c[0]) for c in CASES])
def test_one_verdict_per_stream(name, data, want, tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(data)
    got = {cmd: fn(path, tmp_path) for cmd, fn in COMMANDS.items()}
    assert len(set(got.values())) == 1, got
    verdict = got["restore"]
    if want[0] == "ok":
        assert verdict == ("ok", want[1], want[2])
    elif want[0] == "tolerated":
        assert verdict == ("ok", want[1], None)
        rep = verify(str(path))
        assert [p["checkpoint"] for p in rep["problems"]
                if p["rule"] == "compressed-without-pages"] == [want[2]]
    else:
        _, cls, offset, checkpoint = verdict
        assert cls == "CorruptCheckpoint" and checkpoint == want[1]
        if want[2] is not None:
            assert offset == want[2]


@pytest.mark.parametrize("name,data,want",
                         [pytest.param(*c, id=c[0]) for c in CASES if c[2][0] == "corrupt"])
def test_corrupt_checkpoint_names_the_last_good_one(name, data, want):
    with pytest.raises(CorruptCheckpoint) as info:
        xlegacy.restore(data)
    assert info.value.last_good == want[1] - 1
    assert f"--checkpoint {want[1] - 1}" in str(info.value)
