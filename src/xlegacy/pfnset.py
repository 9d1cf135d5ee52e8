"""A set of PFNs whose memory grows with the distinct PFNs it holds, never
with how often they were added.

Streams can repeat the same entries without end (25,000 batches of the same
1024 XALLOC entries are 104 MB of stream), so state kept per entry read is
unbounded; a PfnSet keeps added arrays until they outweigh the distinct
PFNs seen so far, then folds them into one sorted, unique uint32 array
(PFNs are 28-bit).  Peak memory stays within a small multiple of
4 bytes per distinct PFN plus one batch, and no Python object per PFN.
"""
import numpy as np

# Fold pending additions once they exceed this many PFNs and the folded
# array's size: the cost of np.unique is then amortised over what was added.
_FOLD_MIN = 1 << 16


class PfnSet:
    def __init__(self):
        self._sorted = np.zeros(0, np.uint32)
        self._pending = []
        self._npending = 0

    def add(self, pfns):
        """Add an array (or sequence) of PFNs below 2^32."""
        a = np.asarray(pfns)
        if a.size == 0:
            return
        self._pending.append(a.astype(np.uint32))
        self._npending += a.size
        if self._npending >= max(_FOLD_MIN, self._sorted.size):
            self._fold()

    def update(self, other):
        """Add every PFN of another PfnSet."""
        self.add(other.array())

    def _fold(self):
        if self._pending:
            self._sorted = np.unique(np.concatenate([self._sorted] + self._pending))
            self._pending = []
            self._npending = 0

    def array(self):
        """The distinct PFNs, ascending, as a uint32 array (shared: do not modify)."""
        self._fold()
        return self._sorted

    def tolist(self):
        return self.array().tolist()

    def __len__(self):
        return int(self.array().size)
