"""`xlegacy index STREAM`: build (or refresh) the page index beside a save
file and print what it holds."""
import json

from .pages import index_options, open_map

DESCRIPTION = ("Read the framing of a save file (seeking over the page data) and write its "
               "page index, PFN -> file offset, to STREAM.xlidx (or -o): later 'cat', "
               "'translate', the Python API and the Volatility 3 layer open the save without "
               "reading it again.  The index holds the stream's size, mtime and a hash of its "
               "start, and is ignored (by 'cat'/'translate'/Volatility) or refused "
               "(PageMap.load) once the save changes.  Compressed Remus streams have no page "
               "in place: they are restored once into --cache-dir and indexed there.")
EPILOG = ("examples:\n"
          "  xlegacy index guest.save\n"
          "  xlegacy index remus.stream --checkpoint 2 --cache-dir /var/tmp/xl --json")


def configure(p):
    index_options(p)
    p.add_argument("-o", "--output", help="index file (default: STREAM.xlidx)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args):
    if args.output is not None:
        # never the stream itself, never a directory: refused before the work
        from ..outputs.atomic import check_outputs
        check_outputs([args.output], [args.stream])
    pm = open_map(args, index=False)
    path = pm.save(args.output)
    s = dict(pm.summary(), index=path)
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"index:      {path}")
    print(f"pages:      {s['pages']} in {s['runs']} pfn runs ({s['file_runs']} file runs), "
          f"pfns {s['first_pfn']}..{s['last_pfn']} of p2m_size {s['p2m_size']}")
    print(f"guest:      {s['guest'].upper()}, {s['width']}-bit toolstack, wrapper {s['wrapper']}")
    print(f"checkpoint: {s['checkpoint']}")
    print("pages from: " + ("the stream itself (in place)" if s["in_place"] else
                            f"a restored copy, {s['backing']} (compressed Remus stream)"))
    for v in s["vcpus"]:
        if "id" in v:
            root = v.get("cr3_paddr", v.get("page_table_base", v.get("cr3")))
            print(f"vcpu {v['id']}:     {v.get('paging')} paging, top-level table "
                  + (f"{root:#x}" if isinstance(root, int) else "unknown"))
    for w in s["warnings"]:
        print(f"warning:    {w}")
    return 0
