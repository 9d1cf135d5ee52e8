"""`xlegacy cat STREAM PADDR LENGTH`: guest-physical bytes read in place
through the page index (no restore)."""
import sys

from ..errors import XLegacyError
from .pages import index_options, number, open_map

DESCRIPTION = ("Write LENGTH bytes of guest-physical memory from PADDR to standard output, "
               "read where they lie in the save file through its page index (made on the "
               "fly from the framing, or the fresh STREAM.xlidx written by 'xlegacy index').  "
               "Pages the save does not hold read as zeros (--strict: an error).  Numbers in "
               "decimal or 0x-hex.")
EPILOG = ("examples:\n"
          "  xlegacy cat guest.save 0x1000 4096 > page1.bin\n"
          "  xlegacy cat guest.save 0x9f000 64 --hex")
# Bytes written per step: the output never holds more than this in memory.
STEP = 16 << 20


def configure(p):
    index_options(p)
    p.add_argument("paddr", type=number, help="guest-physical address")
    p.add_argument("length", type=number, help="number of bytes")
    p.add_argument("--hex", action="store_true",
                   help="a hex dump (address, 16 bytes, ASCII) instead of raw bytes")
    p.add_argument("--strict", action="store_true",
                   help="fail on a page the save does not hold instead of reading zeros")


def hexdump(data, base):
    """hexdump -C style lines, addresses counted from base."""
    lines = []
    for i in range(0, len(data), 16):
        row = data[i:i + 16]
        hexes = row.hex(" ")
        if len(row) > 8:
            hexes = hexes[:23] + " " + hexes[23:]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + i:016x}  {hexes:<49} |{text}|\n")
    return "".join(lines)


class CatError(XLegacyError):
    pass


def run(args):
    pm = open_map(args)
    end = args.paddr + args.length
    limit = pm.p2m_size * 4096
    if end > limit:
        raise CatError(f"{args.paddr:#x}+{args.length:#x} runs past the guest's memory: "
                       f"expected an end at most {limit:#x} (p2m_size {pm.p2m_size} * 4096), "
                       f"found {end:#x}")
    out = sys.stdout if args.hex else sys.stdout.buffer
    at = args.paddr
    while at < end:
        n = min(STEP, end - at)
        data = pm.read(at, n, strict=args.strict)
        out.write(hexdump(data, at) if args.hex else data)
        at += n
    out.flush()
    return 0
