"""The `info --json` / `restore --meta` object, built from either result
that holds a stream's checkpoints: restorer.Result (numpy per-PFN state) or
inspector.Inspection (bytearrays, for an `info` that never imports numpy).
No numpy here: the per-PFN facts are the result's own methods."""
from . import format as F
from . import cpu as _cpu
from .stream.metadata import decode_libxl_toolstack, sha256
from .stream.records import HVMTail, PVTail, QemuRecord, Record


def note_tail(meta, rec):
    """Record a checkpoint's tail pieces (HVM tail, qemu record, PV tail) in
    meta; returns False for any other record."""
    if isinstance(rec, HVMTail):
        meta.hvm_tail = rec
    elif isinstance(rec, QemuRecord):
        meta.qemu = rec
    elif isinstance(rec, PVTail):
        meta.pv_tail = rec
    else:
        return False
    return True


def note_chunk(meta, chunk):
    """Record in meta what a metadata chunk says of the checkpoint being
    read: HVM params, the vCPU map, TSC info, the toolstack record,
    LAST_CHECKPOINT and verify mode.  Returns False for the chunks whose
    handling is the reader's own (compression, compressed data, others)."""
    cid = chunk.id
    if cid in F.HVM_PARAM_CHUNKS:
        meta.hvm_params[F.HVM_PARAM_CHUNKS[cid][0]] = chunk.value
    elif cid == F.VCPU_INFO:
        meta.vcpus = chunk.value
    elif cid == F.TSC_INFO:
        meta.tsc_info = chunk.value
    elif cid == F.TOOLSTACK:
        meta.toolstack = chunk.value
    elif cid == F.LAST_CHECKPOINT:
        meta.flags.add("last")
    elif cid == F.ENABLE_VERIFY_MODE:
        meta.flags.add("verify")
    else:
        return False
    return True


class CheckpointStats(Record):
    """(A Record, not a dataclass: importing dataclasses costs a restore's
    start-up ~5 ms.)"""
    number: int
    offset: int
    end: int = 0
    batches: int = 0                                # PFN arrays read
    entries: int = 0                                # entries in them
    data_pages: int = 0
    verify_pages: int = 0
    compressed: bool = False
    compressed_bytes: int = 0
    compressed_chunks: int = 0
    page_kinds: dict | None = None                         # empty/full/delta (format B)

    def as_dict(self):
        d = {"number": self.number, "offset": self.offset, "end": self.end,
             "batches": self.batches, "entries": self.entries,
             "data_pages": self.data_pages, "compressed": self.compressed}
        if self.verify_pages:
            d["verify_pages"] = self.verify_pages
        if self.compressed:
            d["compressed_bytes"] = self.compressed_bytes
            d["compressed_chunks"] = self.compressed_chunks
            d["page_kinds"] = self.page_kinds
            raw = self.data_pages * F.PAGE_SIZE
            d["compression_ratio"] = round(raw / self.compressed_bytes, 3) \
                if self.compressed_bytes else None
        return d



def _type_counts(counts):
    return {F.TYPE_NAMES[t]: int(counts[t]) for t in range(16) if counts[t]}


def build_metadata(res):
    """The `info --json` / `--meta` object of a result: restorer.Result or
    inspector.Inspection.  Besides their attributes (stream, meta,
    checkpoints, verify, warnings, torn, last_type) it asks them for
    pfn_count(), pfn_ranges() and pagetable_counts() ({"L1TAB": (pages,
    pinned), ...})."""
    s, m = res.stream, res.meta
    w = s.wrapper
    qemu = None
    if m.qemu is not None:
        qemu = {"signature": m.qemu.signature, "length": len(m.qemu.data),
                "sha256": sha256(m.qemu.data), "offset": m.qemu.offset}
    vcpus = m.vcpus or {"max_id": 0, "online": [0], "implicit": True}
    out = {
        "format": "xen-legacy",
        "wrapper": w.kind,
        "wrapper_details": dict(w.details, image_offset=w.image_offset,
                                config_format=w.config_format),
        "config": w.config.rstrip(b"\0").decode("utf-8", "replace") if w.config else None,
        "width": s.width * 8,
        "guest": s.guest,
        "inferred": s.header.inferred,
        "p2m_size": s.p2m_size,
        "image_size": s.p2m_size * F.PAGE_SIZE,
        "checkpoints": len(res.checkpoints),
        "checkpoint_details": [c.as_dict() for c in res.checkpoints],
        "torn_checkpoint": res.torn,
        "compressed": "compression" in m.flags,
        "last_checkpoint_flag": "last" in m.flags,
        "pfns": res.pfn_count(),
        "pfn_ranges": res.pfn_ranges(),
        "data_pages": int(sum(c.data_pages for c in res.checkpoints)),
        "entry_counts": _type_counts(m.entry_counts),
        "xalloc_pfns": m.xalloc.tolist(),
        "broken_pfns": m.broken.tolist(),
        "vcpus": vcpus,
        "tsc_info": m.tsc_info,
        "hvm_params": dict(m.hvm_params) if s.guest == "hvm" else {},
        "toolstack": None,
        "qemu": qemu,
        "verify": res.verify,
        "warnings": list(res.warnings),
    }
    if m.toolstack is not None:
        out["toolstack"] = {"length": len(m.toolstack), "sha256": sha256(m.toolstack),
                            "libxl_v1_physmap": decode_libxl_toolstack(m.toolstack, s.width)}
    if s.guest == "hvm" and m.hvm_tail is not None:
        t = m.hvm_tail
        out["hvm"] = {
            "magic_pfns": dict(zip(("ioreq", "bufioreq", "store"), (int(x) for x in t.magic_pfns))),
            "context": {"length": len(t.context), "sha256": sha256(t.context),
                        "offset": t.context_offset},
        }
        records = _cpu.context_records(res)
        out["hvm"]["context"].update(records=records["records"], problems=records["problems"],
                                     header=records["header"])
    # Registers of each vCPU (CR3 and the top page table above all), decoded
    # from the HVM context or the PV tail's vcpu_guest_context.
    out["vcpus"] = dict(out["vcpus"], state=_cpu.vcpu_state(res))
    if s.guest == "pv":
        info = s.pv_info
        pv = {
            "guest_width": info.guest_width,
            "extended_info": info.extended,
            "extended_info_blocks": [
                dict({"id": b.id.decode("latin-1"), "size": b.size, "offset": b.offset},
                     **({"sha256": sha256(b.data)} if b.size else {}),
                     **({"value": F.U32.unpack_from(b.data, 0)[0]} if b.id == b"xcnt" else {}),
                     **({"known": False} if b.id not in (b"vcpu", b"extv", b"xcnt") else {}))
                for b in info.blocks],
            "p2m_frame_list": [int(x) for x in info.p2m_frames],
        }
        if m.pv_tail is not None:
            t = m.pv_tail
            pv["unmapped_pfns"] = [int(x) for x in t.unmapped_pfns]
            pv["unmapped_pfns_count"] = len(t.unmapped_pfns)
            pv["vcpus"] = [
                dict({"id": v.id, "context_size": len(v.context),
                      "context_sha256": sha256(v.context)},
                     **({"extended_sha256": sha256(v.extended)} if v.extended is not None else {}),
                     **({"xsave_mask": v.xsave_mask, "xsave_size": len(v.xsave),
                         "xsave_sha256": sha256(v.xsave)} if v.xsave is not None else {}))
                for v in t.vcpus]
            pv["shared_info_sha256"] = sha256(t.shared_info)
        kinds = {}
        pinned = {}
        for level, (n, pins) in res.pagetable_counts().items():
            if n:
                kinds[level] = n
                if pins:
                    pinned[level] = pins
        pv["pagetables"] = {"counts": kinds, "pinned": pinned}
        out["pv"] = pv
    return out
