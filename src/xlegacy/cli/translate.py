"""`xlegacy translate STREAM VADDR...`: the command line of
xlegacy.translate (its parser and the printed walk)."""
import json
import sys
import textwrap

from ..format import PAGE_SHIFT, PAGE_SIZE
from . import options

DESCRIPTION = textwrap.fill(
    "Walk a guest's page tables (read in place through the save's page index; a pipe "
    "is restored first) and print the physical address of "
    "each virtual address.  HVM: 2-level (with PSE), PAE, 4- and 5-level paging from the "
    "vCPU's CR0/CR4/EFER and CR3.  PV: the canonical page tables from the vCPU's ctrlreg[3] "
    "(64-bit guests: 4 levels; 32-bit: PAE); --user walks a 64-bit PV guest's user table "
    "(ctrlreg[1]).  PV addresses are pseudo-physical (PFN * 4096), as in the restored "
    "image.  Exit status 1 when any address does not translate.", 79)
EPILOG = ("examples:\n"
          "  xlegacy translate guest.save 0xffffffff81000000\n"
          "  xlegacy translate guest.save 0xffff880000000000 0x400000 --vcpu 1 -v\n"
          "  xlegacy translate guest.save 0xc0100000 --image guest.raw --json\n"
          "  xlegacy translate guest.save 0x1000 --cr3 0x7000 --paging pae")


def _int(text):
    try:
        return int(text, 0)
    except ValueError:
        try:
            return int(text, 16)
        except ValueError:
            raise ValueError(f"not an address: {text!r}") from None


def configure(p):
    p.add_argument("stream", help="legacy stream: a path, or - for standard input")
    p.add_argument("vaddr", nargs="+", help="virtual address(es), hex (0x...) or decimal")
    p.add_argument("--vcpu", type=int, default=None, help="vCPU whose CR3 to use (default: the "
                                                          "first with saved state)")
    p.add_argument("--user", action="store_true",
                   help="64-bit PV guests: walk the user page table (ctrlreg[1])")
    p.add_argument("--cr3", type=_int, default=None,
                   help="walk from this physical address instead of the vCPU's CR3")
    p.add_argument("--paging", choices=("none", "2-level", "pae", "4-level", "5-level"),
                   default=None, help="paging mode (default: from the vCPU's CR0/CR4/EFER)")
    p.add_argument("--image", help="an already restored raw image of this stream (read "
                                   "instead of restoring again)")
    options.add_width(p)
    options.add_guest(p)
    options.add_checkpoint(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="show every level of the walk")
    p.add_argument("-q", "--quiet", action="store_true", help="no warnings")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _memory(args):
    """(physical memory, vCPU-state getter, guest type): the page index of
    the save file; for a pipe (no index possible) or --image, a restore."""
    import numpy as np

    from ..translate import PageMapMemory, PhysMemory, TranslationError
    if not args.image:
        from ..pagemap import NotSeekable, open_pagemap
        try:
            pm = open_pagemap(args.stream, checkpoint=args.checkpoint, width=args.width,
                              guest=args.guest)
        except NotSeekable:
            pass
        else:
            return PageMapMemory(pm), lambda: pm.vcpus, pm.guest
    from .. import cpu as _cpu
    from ..restorer import restore_result
    if args.image:
        res = restore_result(args.stream, width=args.width, guest=args.guest,
                             checkpoint=args.checkpoint, inspect_only=True)
        need = res.stream.p2m_size * PAGE_SIZE
        image = np.memmap(args.image, dtype=np.uint8, mode="r")
        if image.size < need:
            raise TranslationError(f"{args.image} holds {image.size} bytes; this stream's "
                                   f"image is {need} (p2m_size * 4096)")
    else:
        res = restore_result(args.stream, width=args.width, guest=args.guest,
                             checkpoint=args.checkpoint)
        image = res.image
    return PhysMemory(image, res.present), lambda: _cpu.vcpu_states(res), res.stream.guest


def run(args):
    from ..translate import Translation, TranslationError, translate_in
    vaddrs = [_int(v) for v in args.vaddr]
    mem, states, guest = _memory(args)
    results, state, cr3, mode = translate_in(mem, states, vaddrs, vcpu=args.vcpu,
                                             user=args.user, cr3=args.cr3, mode=args.paging)
    failed = sum(isinstance(r, TranslationError) for r in results)
    if args.json:
        obj = {"vcpu": None if state is None else state["id"], "cr3": cr3, "paging": mode,
               "guest": guest,
               "results": [r.as_dict() if isinstance(r, Translation) else
                           {"vaddr": r.vaddr, "error": str(r),
                            "steps": [s.as_dict() for s in r.steps]} for r in results]}
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        who = f"vcpu {state['id']}, " if state is not None else ""
        print(f"# {who}{mode} paging, top-level table at {cr3:#x}"
              + (" (PV: pseudo-physical, canonical tables)" if guest == "pv" else ""))
        for r in results:
            if isinstance(r, TranslationError):
                print(f"{r.vaddr:#x} -> not mapped: {r}")
            else:
                size = {4096: "4 KiB", 2 << 20: "2 MiB", 4 << 20: "4 MiB",
                        1 << 30: "1 GiB"}.get(r.page_size, f"{r.page_size} B")
                note = "" if r.present_in_image else " (page not in the image)"
                rights = ("w" if r.writable else "r") + ("u" if r.user else "s") + \
                    ("x" if not r.nx else "-")
                print(f"{r.vaddr:#x} -> {r.paddr:#x} (pfn {r.paddr >> PAGE_SHIFT}, "
                      f"{size} page, {rights}){note}")
            if args.verbose:
                for s in r.steps:
                    print(f"    {s.name:<4} table {s.table:#x} [{s.index}] @ {s.entry_addr:#x} "
                          f"= {s.entry:#x}")
    if state is not None and state.get("warnings") and not args.quiet:
        for w in state["warnings"]:
            print(f"xlegacy: warning: vcpu {state['id']}: {w}", file=sys.stderr)
    return 1 if failed else 0
