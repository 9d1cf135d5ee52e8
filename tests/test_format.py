"""xlegacy.format: the one home of the stream's format facts, checked
against the kernels that apply them."""
import numpy as np

from xlegacy import format as F
from xlegacy import kernels


def test_entry_split_and_data_table_match_the_kernel():
    # Every valid type nibble once, with a pfn each; the kernel decides which
    # carry a page, and the table in format.py must say the same.
    valid = [t for t in range(16) if t not in F.INVALID_TYPES]
    entries = np.array([(t << F.ENTRY_TYPE_SHIFT) | (100 + t) for t in valid], "<u8")
    types, pfns, data_pfns = kernels.decode_pfns(entries.tobytes(), 8, 1 << 20)
    assert [F.entry_type(int(e)) for e in entries] == list(types)
    assert [F.entry_pfn(int(e)) for e in entries] == list(pfns)
    assert list(data_pfns) == [100 + t for t in valid if F.DATA_TYPES[t]]
    assert F.BARE_XTAB == F.ENTRY_TYPE_MASK & (F.XTAB << F.ENTRY_TYPE_SHIFT)


def _rec(typecode, data):
    return F.HVM_SAVE_DESC.pack(typecode, 0, len(data)) + data


def test_walk_hvm_save_stops():
    blob = _rec(F.HVM_SAVE_HEADER, b"x" * 16) + _rec(2, b"y" * 8) + _rec(F.HVM_SAVE_END, b"")
    recs, stop, pos = F.walk_hvm_save(blob + b"tail")
    assert [r[1] for r in recs] == [1, 2, 0] and stop == "end" and pos == len(blob)
    recs, stop, pos = F.walk_hvm_save(blob[:36])        # the second header claims too much
    assert stop == "overrun" and pos == 24 and len(recs) == 1
    recs, stop, pos = F.walk_hvm_save(blob[:27])        # no room for a header
    assert stop == "short" and pos == 24
