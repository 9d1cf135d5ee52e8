"""`xlegacy verify STREAM`: the command line of xlegacy.verifier (its parser,
the text report and the exit status)."""
import json
import os
import sys

DESCRIPTION = """\
Read a whole legacy stream, check it against every rule of the format and
print a summary and every problem found, each with its byte offset.  Nothing
is written.  Exit status 0 only for a valid stream."""

EPILOG = """\
examples:
  xlegacy verify guest.save
  xlegacy verify --json remus.stream | jq '.problems[] | select(.severity=="error")'
  xlegacy verify --pages debug-migration.stream     # compare verify-mode pages

exit status: 0 valid, 1 invalid (errors; with --strict also warnings),
2 internal error."""


def configure(parser):
    from . import options
    parser.add_argument("stream", help="legacy stream: a path, or - for standard input")
    options.add_width(parser)
    options.add_guest(parser)
    options.add_force_reading(parser, "-w/-g")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--pages", action="store_true",
                        help="restore into a temporary sparse file so that the pages of a "
                             "verification pass (xl migrate --debug) are compared")
    parser.add_argument("--strict", action="store_true",
                        help="warnings make the stream invalid too")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no output, only the exit status")


def _where(p):
    parts = []
    if p["offset"] is not None:
        parts.append(f"offset {p['offset']}")
    if p["checkpoint"]:
        parts.append(f"checkpoint {p['checkpoint']}")
    return ", ".join(parts) or "-"


def format_report(rep):
    lines = []
    s = rep["summary"]
    verdict = "valid legacy stream" if rep["valid"] else "INVALID"
    counts = f"{rep['errors']} error(s), {rep['warnings']} warning(s)"
    lines.append(f"{rep['stream']}: {verdict} ({counts})")
    if "guest" in s:
        inf = s.get("inferred", {})
        lines.append(f"  wrapper {s['wrapper']}, {s['width']}-bit toolstack "
                     f"({inf.get('width', '')}), {s['guest'].upper()} guest "
                     f"({inf.get('guest', '')}), p2m_size {s['p2m_size']}")
    if "checkpoints" in s:
        text = f"  checkpoints: {s['checkpoints']} complete"
        if s.get("compressed"):
            text += " (Remus, compressed)"
        if s.get("torn_checkpoint"):
            text += f"; checkpoint {s['torn_checkpoint']['checkpoint']} torn"
        lines.append(text)
        counts = ", ".join(f"{k} {v}" for k, v in s.get("entry_counts", {}).items())
        lines.append(f"  pages: {s['pfns']} distinct pfns with data, {s['data_pages']} data "
                     f"pages; entries: {counts or 'none'}")
        vf = s.get("verify") or {}
        if vf.get("pages"):
            if vf.get("checked"):
                lines.append(f"  verify pass: {vf['pages']} pages, {vf['matched']} matched")
            else:
                lines.append(f"  verify pass: {vf['pages']} pages (not compared; use --pages)")
    if rep["problems"]:
        lines.append("problems:")
        for p in rep["problems"]:
            text = f"  {p['severity']:7s} [{_where(p)}] {p['message']}"
            if "expected" in p or "found" in p:
                text += f" (expected {p.get('expected', '?')}, found {p.get('found', '?')})"
            lines.append(text)
    return lines


def run(args):
    debug = getattr(args, "debug", False)
    from ..verifier import verify
    from .progress import Progress
    total = None
    if args.stream != "-":
        try:
            total = os.path.getsize(args.stream)
        except OSError:
            pass
    line = Progress("verifying", total, enabled=False if args.quiet else None)
    try:
        with line:
            rep = verify(args.stream, width=args.width, guest=args.guest, pages=args.pages,
                         strict=args.strict, name=args.stream, force_reading=args.force_reading,
                         progress=line if line.enabled else None)
    except KeyboardInterrupt:
        print("xlegacy: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, not a verdict on the stream
        if debug:
            raise
        print(f"xlegacy: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "quiet", False):
        pass
    elif args.json:
        json.dump(rep, sys.stdout, indent=1, default=_json_default)
        sys.stdout.write("\n")
    else:
        print("\n".join(format_report(rep)))
    return 0 if rep["valid"] else 1


def _json_default(o):
    np = sys.modules.get("numpy")       # only numpy's own values can need it
    if np is not None and isinstance(o, (np.integer,)):
        return int(o)
    if np is not None and isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
