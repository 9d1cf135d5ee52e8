#!/usr/bin/env python3
"""Write src/xlegacy/data/demo.xlsave, the stream `xlegacy demo` uses.

Provenance
----------
The file is synthetic.  It did not come from a Xen host: this script lays
out every byte with xlegacy.testing.writer, which follows the order and layouts of
Xen's legacy saver (libxc xc_domain_save() as of Xen 4.5, wrapped by xl).
It is deterministic: page contents, vcpu state and device-model bytes come
from fixed text and SHAKE-256 of fixed labels, never from a random
generator or the clock, so the same xlegacy version writes the same bytes
on every machine.  `python tools/make_demo.py --check` verifies the
committed file; regenerate it only on purpose, and say why in the commit.

What is in it
-------------
* xl header (Xen 4.5 `xl save`): mandatory flag JSON, a NUL-terminated
  libxl JSON domain configuration for a guest named "xlegacy-demo".
* libxc image, 64-bit toolstack, HVM guest, p2m_size 320 (a 1.25 MiB
  guest: a toy, so the file stays small):
  - TSC_INFO (non-live save: before the pages),
  - one batch of 320 entries: 60 data pages (pfns 0-39 "low memory" with
    readable text, 0xc0-0xcf an "option ROM", 0x13c-0x13f the ioreq,
    buffered-ioreq, xenstore and console pages) and 260 bare XTAB entries
    (0xf0000000) for the unpopulated pfns,
  - VCPU_INFO with vcpus 0 and 1 online,
  - HVM params IDENT_PT, VM86_TSS, CONSOLE_PFN, ACPI_IOPORTS_LOCATION,
    IOREQ_SERVER_PFN, NR_IOREQ_SERVER_PAGES (in Xen's order),
  - a libxl version-1 TOOLSTACK record with one physmap entry
    ("vga.vram", 8 MiB; 4 bytes of struct padding after the name, as a
    64-bit libxl leaks them),
  - LAST_CHECKPOINT, the end of the body,
  - the HVM tail: magic pfns 0x13c/0x13d/0x13e, an hvm_save context with a
    header record, 2 CPU records and the END record,
  - a DeviceModelRecord0002 qemu record ("QEVM" stand-in data).
"""
import argparse
import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(ROOT, "src", "xlegacy", "data", "demo.xlsave")

P2M_SIZE = 320
LOW = range(0, 40)
ROM = range(0xC0, 0xD0)
IOREQ, BUFIOREQ, STORE, CONSOLE = 0x13C, 0x13D, 0x13E, 0x13F

CONFIG = (
    '{\n'
    '    "c_info": {\n'
    '        "type": "hvm",\n'
    '        "name": "xlegacy-demo",\n'
    '        "uuid": "6c1e0d3a-5b7f-4e42-9a3c-0d5e8f1b2a47"\n'
    '    },\n'
    '    "b_info": {\n'
    '        "max_vcpus": 2,\n'
    '        "avail_vcpus": [0, 1],\n'
    '        "max_memkb": 1280,\n'
    '        "target_memkb": 1280,\n'
    '        "shadow_memkb": 0,\n'
    '        "device_model_version": "qemu_xen",\n'
    '        "type.hvm": {\n'
    '            "acpi": "True",\n'
    '            "viridian": "False",\n'
    '            "vga": {"kind": "std"},\n'
    '            "serial_list": ["pty"]\n'
    '        }\n'
    '    },\n'
    '    "on_poweroff": "destroy",\n'
    '    "on_reboot": "restart",\n'
    '    "on_crash": "destroy"\n'
    '}\n\0'
)


def _shake(label, n):
    return hashlib.shake_256(label.encode()).digest(n)


def _page(pfn):
    """Deterministic contents of one data page."""
    import numpy as np
    if pfn in (IOREQ, BUFIOREQ, STORE):
        return np.zeros(4096, np.uint8)            # fresh ring pages: all zero
    if pfn == CONSOLE:
        text = b"xlegacy demo console: Welcome to the legacy stream demo.\r\n"
        return np.frombuffer(text.ljust(4096, b"\0"), np.uint8)
    if pfn in ROM:
        body = (b"\x55\xaa\x20" if pfn == ROM.start else b"") + \
            _shake(f"xlegacy-demo option rom page {pfn}", 4096)
        return np.frombuffer(body[:4096], np.uint8)
    if pfn % 8 == 7:
        return np.zeros(4096, np.uint8)            # some zero pages, as real guests have
    line = (f"xlegacy demo guest page {pfn:#06x}: restored from a Xen legacy save "
            f"stream written by tools/make_demo.py\n").encode()
    head = (line * (2048 // len(line) + 1))[:2048]
    tail = _shake(f"xlegacy-demo low page {pfn}", 2048)
    return np.frombuffer(head + tail, np.uint8)


def build():
    """The demo stream as bytes."""
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from xlegacy.testing.writer import hvm_context_blob, libxl_toolstack, make_stream, qemu_blob

    image = np.zeros((P2M_SIZE, 4096), np.uint8)
    data_pfns = np.array(list(LOW) + list(ROM) + [IOREQ, BUFIOREQ, STORE, CONSOLE])
    for p in data_pfns:
        image[p] = _page(int(p))
    holes = np.setdiff1d(np.arange(P2M_SIZE), data_pfns)
    toolstack = libxl_toolstack([(0xF0000000, 0xF0000000, 0x800000, "vga.vram")],
                                width=8, leak=b"\x7f\x00\x00\x00")
    data, _res = make_stream(
        image, width=8, guest="hvm", p2m_size=P2M_SIZE,
        pfns=data_pfns, xtab=holes,
        wrapper="xl", config=CONFIG, json=True,
        tsc=(0, 123456789000, 2394000, 1),
        vcpus=[0, 1],
        params={"ident_pt": 0xFEFFD000, "vm86_tss": 0xFEFFC000, "console_pfn": CONSOLE,
                "acpi_ioports_location": 1, "ioreq_server_pfn": 0x138,
                "nr_ioreq_server_pages": 2},
        toolstack=toolstack,
        magic_pfns=(IOREQ, BUFIOREQ, STORE),
        hvm_context=hvm_context_blob(2, seed="xlegacy-demo", cpu_size=1024, gtsc_khz=2394000),
        qemu=qemu_blob(5120, seed="xlegacy-demo"),
        qemu_signature="DeviceModelRecord0002",
        last_checkpoint=True,
    )
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true",
                    help="compare with the existing file instead of writing it")
    args = ap.parse_args(argv)
    data = build()
    if args.check:
        try:
            with open(args.output, "rb") as f:
                old = f.read()
        except FileNotFoundError:
            print(f"{args.output}: missing", file=sys.stderr)
            return 1
        if old != data:
            print(f"{args.output}: differs from what make_demo.py writes "
                  f"({len(old)} vs {len(data)} bytes)", file=sys.stderr)
            return 1
        print(f"{args.output}: up to date ({len(data)} bytes, sha256 "
              f"{hashlib.sha256(data).hexdigest()})")
        return 0
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
