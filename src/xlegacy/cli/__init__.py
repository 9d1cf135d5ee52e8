"""The `xlegacy` command line: demo, info, restore, convert, verify, bench,
translate.  Errors print one line (`xlegacy: error: ...`) and exit 1; --debug
shows the traceback as well."""
import argparse
import importlib
import json
import os
import signal
import sys

from .. import __version__
from ..errors import CorruptCheckpoint, XLegacyError
from ..format import PAGE_SIZE
from . import options
from .progress import Progress

DEMO = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "demo.xlsave")

# Subcommands implemented in their own modules: name -> (module, help).
# Each module offers configure(parser) and run(args) -> exit code.  Only the
# module of the command being run is imported (the others may pull in numpy,
# ~100 ms of a start-up that is otherwise ~20 ms): `xlegacy --help` lists
# them from this table.
PLUGINS = {
    "convert": ("xlegacy.cli.convert", "convert to a v2/v3 stream today's Xen restores "
                                       "(drop-in for Xen's convert-legacy-stream)"),
    "verify": ("xlegacy.cli.verify", "check every rule of the format and report every problem"),
    "bench": ("xlegacy.cli.bench", "measure decoding and restore throughput beside baselines"),
    "translate": ("xlegacy.cli.translate", "walk the guest page tables: virtual -> physical"),
    "cat": ("xlegacy.cli.cat", "guest-physical bytes read in place through the page index"),
    "index": ("xlegacy.cli.index", "write the page index (PFN -> file offset) beside a save"),
    "vol-path": ("xlegacy.cli.volpath", "the Volatility 3 plugin directory (vol -p ...)"),
}


class CliError(XLegacyError):
    pass


def _common(p):
    g = p.add_argument_group("common options")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress, no warnings")
    g.add_argument("-v", "--verbose", action="store_true", help="say more")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _stream_options(p):
    p.add_argument("stream", help="legacy stream: a path, or - for standard input")
    options.add_width(p)
    options.add_guest(p)
    options.add_force_reading(p)
    options.add_checkpoint(p)
    options.add_checkpoint_buffer(p)


class _Version(argparse.Action):
    """--version; names the kernel backend, whose import is left until asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show the version and the kernel backend, and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..kernels import BACKEND_NOTE
        print(f"xlegacy {__version__} (backend: {BACKEND_NOTE})")
        parser.exit()


def command_of(argv):
    """The subcommand named in argv (the first word that is not an option;
    the top-level options take no values), or None."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def build_parser(command="*"):
    """The parser.  Of the commands in PLUGINS only `command`'s module is
    imported and configured ("*": all of them; None: none)."""
    parser = argparse.ArgumentParser(
        prog="xlegacy",
        description="Read Xen's legacy (Xen 3.x-4.5) save, migration and Remus streams.",
        epilog="Run 'xlegacy COMMAND --help' for a command's options and an example.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="restore the small stream shipped with xlegacy",
                       description="Restore the embedded demo stream (an xl save of a small "
                                   "HVM guest) in memory and print what it holds.",
                       epilog="example: xlegacy demo")
    p.add_argument("-o", "--output", help="also write the raw image here")
    _common(p)

    p = sub.add_parser("info", help="what a stream holds (wrapper, guest, pages, metadata)",
                       description="Read a whole stream and print what it holds: wrapper and "
                                   "config, toolstack width, guest type, p2m size, pages by "
                                   "type, checkpoints, every metadata chunk, the tail and the "
                                   "qemu record.  No image is written.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  xlegacy info guest.save\n"
                              "  xlegacy info --json remus.stream | jq .checkpoints")
    _stream_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--pagetables", action="store_true",
                   help="list PV page-table pages by level and pinned state")
    _common(p)

    p = sub.add_parser("restore", help="write guest memory as a sparse raw image",
                       description="Restore guest memory: an image of p2m_size*4096 bytes with "
                                   "the page of PFN p at offset p*4096; never-sent pages are "
                                   "holes.  The image appears under its name only when the "
                                   "restore succeeded.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  xlegacy restore guest.save -o guest.raw --meta guest.json\n"
                              "  ssh host cat remus.stream | xlegacy restore - -o replica.raw")
    _stream_options(p)
    p.add_argument("-o", "--output", required=True, help="image file to write")
    p.add_argument("--meta", help="also write the metadata (info --json) here")
    p.add_argument("--format", default=None,
                   help="image format: raw, elf, lime, xc-core; by default from the "
                        "output's extension (.elf, .lime, .xc-core), else raw")
    options.add_threads(p, "threads for decoding large compressed checkpoints (default: 1, "
                           "a single pass; more index the buffer first, then split it)")
    p.add_argument("--no-sync", dest="sync", action="store_false",
                   help="do not fsync the image before renaming it into place (faster; "
                        "a crash may then leave a complete-looking file with missing data)")
    _common(p)

    for name, (module, help_text) in PLUGINS.items():
        if command not in (name, "*"):
            sub.add_parser(name, help=help_text)
            continue
        mod = _plugin(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_text, description=getattr(mod, "DESCRIPTION", help_text),
                           epilog=getattr(mod, "EPILOG", None),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           conflict_handler="resolve")
        mod.configure(p)
        if not any(a.dest == "debug" for a in p._actions):
            p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        p.set_defaults(plugin=mod)
    return parser


def _plugin(module):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name and module.endswith(exc.name.split(".")[-1]):
            return None
        raise


# ------------------------------------------------------------------ output
def _size(n):
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s:
            return f"{n / s:.1f} {unit}"
    return f"{n} B"


def summary(meta, verbose=False):
    """Human-readable lines for an info/restore metadata object."""
    out = []
    w = meta["wrapper"]
    wd = meta["wrapper_details"]
    line = f"wrapper:      {w}"
    if w != "none":
        line += f" (libxc image at offset {wd['image_offset']}"
        if wd.get("config_format"):
            line += f", {wd['config_format']} config"
        line += ")"
    out.append(line)
    inf = meta.get("inferred", {})
    out.append(f"toolstack:    {meta['width']}-bit ({inf.get('width', '')})")
    out.append(f"guest:        {meta['guest'].upper()} ({inf.get('guest', '')})")
    if meta["guest"] == "pv":
        out.append(f"guest width:  {meta['pv']['guest_width'] * 8}-bit")
    out.append(f"p2m_size:     {meta['p2m_size']} pfns ({_size(meta['image_size'])} image)")
    out.append(f"pages:        {meta['pfns']} distinct pfns with data, "
               f"{meta['data_pages']} data pages applied")
    counts = ", ".join(f"{k} {v}" for k, v in meta["entry_counts"].items())
    out.append(f"entries:      {counts or 'none'}")
    cps = meta["checkpoint_details"]
    out.append(f"checkpoints:  {meta['checkpoints']} complete"
               + (" (Remus, compressed)" if meta["compressed"] else ""))
    for c in cps:
        text = (f"  #{c['number']}: offset {c['offset']}, {c['batches']} batches, "
                f"{c['entries']} entries, {c['data_pages']} pages")
        if c["compressed"]:
            k = c["page_kinds"] or {}
            text += (f", {c['compressed_chunks']} compressed chunks, "
                     f"{_size(c['compressed_bytes'])} (ratio {c['compression_ratio']}; "
                     f"full {k.get('full', 0)}, delta {k.get('delta', 0)}, "
                     f"empty {k.get('empty', 0)})")
        out.append(text)
    if meta.get("torn_checkpoint"):
        t = meta["torn_checkpoint"]
        out.append(f"  checkpoint {t['checkpoint']} is incomplete (stream ends at offset "
                   f"{t['offset']}) and was discarded")
    v = meta["vcpus"]
    out.append(f"vcpus:        max id {v['max_id']}, online {v['online']}")
    if v.get("state"):
        from ..cpu import summary_lines
        for state, line in zip(v["state"], summary_lines(v["state"])):
            out.append("  " + line)
            # each CPU-record warning in words, not only its count
            out.extend(f"    warning: {w}" for w in state.get("warnings") or ())
    if meta["tsc_info"]:
        t = meta["tsc_info"]
        out.append(f"tsc:          mode {t['mode']}, {t['khz']} kHz, nsec {t['nsec']}, "
                   f"incarnation {t['incarnation']}")
    if meta["hvm_params"]:
        out.append("hvm params:   " + ", ".join(f"{k}={v:#x}" if v > 9 else f"{k}={v}"
                                                for k, v in meta["hvm_params"].items()))
    if "hvm" in meta:
        h = meta["hvm"]
        out.append("magic pfns:   " + ", ".join(f"{k} {v:#x}" for k, v in h["magic_pfns"].items()))
        out.append(f"hvm context:  {h['context']['length']} bytes")
    if meta["toolstack"]:
        t = meta["toolstack"]
        text = f"toolstack:    {t['length']} bytes"
        if t["libxl_v1_physmap"] is not None:
            text += ", libxl physmap: " + (", ".join(
                f"{e['name']} @ {e['start_addr']:#x}+{e['size']:#x}"
                for e in t["libxl_v1_physmap"]) or "no entries")
        out.append(text)
    if meta["qemu"]:
        q = meta["qemu"]
        out.append(f"qemu record:  {q['signature']}, {q['length']} bytes, sha256 {q['sha256'][:16]}…")
    if "pv" in meta:
        pv = meta["pv"]
        blocks = ", ".join(f"{b['id']}({b['size']})" for b in pv["extended_info_blocks"])
        out.append(f"ext. info:    {blocks or 'none'}; p2m frame list {len(pv['p2m_frame_list'])} entries")
        if "unmapped_pfns_count" in pv:
            out.append(f"pv tail:      {pv['unmapped_pfns_count']} unmapped pfns, "
                       f"{len(pv['vcpus'])} vcpu contexts, shared info page")
    if meta["verify"]["pages"]:
        vf = meta["verify"]
        if vf["checked"]:
            out.append(f"verify pass:  {vf['pages']} pages, {vf['matched']} matched, "
                       f"{len(vf['differing_pfns'])} differ"
                       + (f": {vf['differing_pfns'][:16]}" if vf["differing_pfns"] else ""))
        else:
            out.append(f"verify pass:  {vf['pages']} pages (compared by restore, not info)")
    if meta["config"] and verbose:
        out.append("config:")
        out.extend("  " + line for line in meta["config"].splitlines())
    return out


# ------------------------------------------------------------------ commands
def _open_progress(args, label, path):
    total = None
    if path != "-":
        try:
            total = os.path.getsize(path)
        except OSError:
            pass
    return Progress(label, total, enabled=None if not args.quiet else False)


def _warn(args, meta):
    if args.quiet:
        return
    for w in meta["warnings"]:
        print(f"xlegacy: warning: {w}", file=sys.stderr)


def cmd_info(args):
    with _open_progress(args, "reading", args.stream) as prog:
        res = _inspect(args, prog)
    meta = res.to_dict()
    if args.pagetables:
        meta["pagetable_pfns"] = _pagetable_list(res)
    if args.json:
        json.dump(meta, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print("\n".join(summary(meta, args.verbose)))
        if args.pagetables:
            for level, rows in meta["pagetable_pfns"].items():
                print(f"{level}: " + (", ".join(f"{p}{'*' if pin else ''}" for p, pin in rows)
                                      or "none") + ("  (* pinned)" if any(p for _, p in rows)
                                                    else ""))
    _warn(args, meta)
    return 0


def _inspect(args, prog):
    """The common stream (one checkpoint, no compressed pages) through the
    numpy-free inspector, which starts ~4x faster; everything else, and a
    pipe (which cannot be read twice), through the restorer."""
    if args.stream != "-" and not args.pagetables:
        from ..inspector import NeedsNumpy, inspect
        try:
            return inspect(args.stream, width=args.width, guest=args.guest,
                           checkpoint=args.checkpoint, progress=prog,
                           force_reading=args.force_reading)
        except NeedsNumpy:
            pass
    from ..restorer import restore_result
    return restore_result(args.stream, width=args.width, guest=args.guest,
                          checkpoint=args.checkpoint, progress=prog, inspect_only=True,
                          checkpoint_buffer=args.checkpoint_buffer,
                          force_reading=args.force_reading)


def _pagetable_list(res):
    from ..restorer import pagetable_pfns
    return pagetable_pfns(res)


# An output named like a format gets that format unless --format says
# otherwise: `-o guest.elf` writing raw bytes would look like a broken core.
EXTENSIONS = {".elf": "elf", ".lime": "lime", ".xc-core": "xc-core", ".xccore": "xc-core"}


def image_format(given, output):
    """The --format to use: the one given, else the output's extension's,
    else raw."""
    if given:
        return given.lower()
    return EXTENSIONS.get(os.path.splitext(output)[1].lower(), "raw")


def cmd_restore(args):
    fmt = image_format(args.format, args.output)
    exporter = None
    if fmt != "raw":
        exporter = _plugin("xlegacy.outputs.exporters")
        if exporter is None or fmt not in getattr(exporter, "FORMATS", ()):
            raise CliError(f"unknown image format {args.format!r}: expected "
                           + ", ".join(["raw"] + list(getattr(exporter, "FORMATS", ()))))
    from ..outputs.atomic import Outputs, ScratchFile, write_to
    # Every output is checked against the input and created (unnamed) before
    # the work; they take their names together at the end (outputs/atomic.py).
    outs = Outputs([args.output, args.meta], inputs=[args.stream], sync=args.sync)
    with outs:
        image_out = outs[0]
        meta_out = outs[1] if args.meta else None
        if meta_out is not None:
            meta_out.sync = True
        # An export is made from a raw image in an unnamed scratch file (on
        # the output's file system, where the kernel can share extents).
        target = image_out if exporter is None else \
            ScratchFile(getattr(image_out, "dir", None), args.output)
        try:
            with _open_progress(args, "restoring", args.stream) as prog:
                res = _restore(args, target, prog, light=exporter is None)
            if exporter is not None:
                # Pages straight from the scratch file: no mapping of the
                # whole image, so an export needs the memory of a raw restore.
                exporter.export(fmt, res, None, image_out, image_fd=target.fd)
        finally:
            if target is not image_out:
                target.close()
        meta = res.to_dict()
        meta["output"] = {"path": args.output if args.output == "-" else
                          os.path.abspath(args.output), "format": fmt}
        if meta_out is not None:
            write_to(meta_out, json.dumps(meta, indent=1) + "\n")
        outs.commit()
    _warn(args, meta)
    if not args.quiet:
        cps = meta["checkpoints"]
        print(f"restored {meta['pfns']} pages ({_size(meta['pfns'] * PAGE_SIZE)}) of a "
              f"{_size(meta['image_size'])} {meta['guest'].upper()} guest"
              + (f" at checkpoint {cps}" if cps > 1 or meta["compressed"] else "")
              + f" to {args.output} ({fmt})", file=sys.stderr)
    return 0


def _restore(args, target, prog, light):
    """A raw image restored from a stream file starts without numpy
    (inspector.restore_to_file: checkpoint 1 copied by the kernel), which
    hands the rest of the stream, if it needs numpy, to the restorer."""
    kwargs = dict(width=args.width, guest=args.guest, checkpoint=args.checkpoint,
                  progress=prog, threads=args.threads, sync=args.sync,
                  checkpoint_buffer=args.checkpoint_buffer, force_reading=args.force_reading)
    if light and args.stream != "-":
        from ..inspector import restore_to_file
        return restore_to_file(args.stream, target, **kwargs)
    from ..restorer import restore_result
    return restore_result(args.stream, output=target, **kwargs)


def cmd_demo(args):
    import hashlib

    from ..restorer import restore_result
    if not os.path.exists(DEMO):
        raise CliError(f"the demo stream is missing from the installation ({DEMO})")
    res = restore_result(DEMO, output=args.output) if args.output else restore_result(DEMO)
    meta = res.to_dict()
    from ..kernels import BACKEND
    print(f"xlegacy {__version__} ({BACKEND} backend): demo stream {DEMO}")
    print("\n".join(summary(meta, args.verbose)))
    if args.output:
        print(f"image written to {args.output}")
    else:
        digest = hashlib.sha256(res.image).hexdigest()
        print(f"restored image: {_size(res.image.size)} in memory, sha256 {digest}")
    return 0


COMMANDS = {"info": cmd_info, "restore": cmd_restore, "demo": cmd_demo}


def _on_sigterm(signum, frame):
    # Unwind through the restore's cleanup (temporary files are removed).
    raise SystemExit(128 + signum)


def main(argv=None):
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while starting (imports, building the parser): one line,
        # as during the work.
        print("xlegacy: interrupted", file=sys.stderr)
        return 130


def _main(argv):
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(command_of(argv))  # None: no command, no plugin
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        # A closed terminal (SIGHUP) ends a restore as `kill` does: through
        # the cleanup, leaving nothing.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_sigterm)
    except ValueError:
        pass  # not the main thread (embedded use)
    debug = getattr(args, "debug", False)
    try:
        if hasattr(args, "plugin"):
            return args.plugin.run(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("xlegacy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): no message, but
        # not success either; point stdout at /dev/null so the interpreter's
        # final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except (XLegacyError, OSError, MemoryError, ValueError) as exc:
        if debug:
            raise
        msg = str(exc) if not isinstance(exc, OSError) or not exc.filename else \
            f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, CorruptCheckpoint) and exc.last_good and \
                args.command in ("restore", "info"):
            msg += f"; to get it: xlegacy {args.command} --checkpoint {exc.last_good} ..."
        for name in getattr(exc, "incomplete_outputs", ()):
            msg += f"; the output written to {name} is incomplete"
        print(f"xlegacy: error: {msg}", file=sys.stderr)
        return 1

