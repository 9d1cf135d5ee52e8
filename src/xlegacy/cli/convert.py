"""`xlegacy convert` and the `xlegacy-convert-legacy-stream` console script.

Both take exactly the options of Xen's tools/python/scripts/convert-legacy-stream
(same long and short names, same meanings) and exit as it does:

  0  converted
  1  the stream is bad or cannot be read (stream error, truncation, I/O error,
     a missing -i/-o: the help goes to stderr, as with the script)
  2  the stream is valid but cannot be converted (TMEM state), an internal
     error, or a command-line usage error

Beyond the script: -w and -g may be left out (inferred from the bytes, as
`xlegacy info` does), and errors are one line with the byte offset, not a
traceback.  The console script is a drop-in for LIBXL_CONVERT_HELPER and for
xenopsd, which runs it as

  --in FD --out FD --width 32 --skip-qemu --guest-type hvm|pv --syslog [--verbose]

and reads the qemu record from the same descriptor afterwards: with a
regular-file descriptor the file offset is left exactly after the last byte
used, with a pipe or socket nothing beyond it is read.
"""
import argparse
import os
import stat
import sys

DESCRIPTION = """\
Convert a legacy (Xen 3.x-4.5) save/migration stream to a v2 (or later)
stream that today's Xen restores: a libxc v3 stream, or with -f libxl a
libxl v2 stream around it.  The output is byte-identical to that of Xen's
convert-legacy-stream for every stream that script converts; beyond it,
width and guest type are inferred when -w/-g are omitted, the xend,
XenServer and libvirt wrappers are read, and Remus streams (checkpointed,
compressed) become the state of their last complete checkpoint.

-i and -o take a path or a decimal file descriptor number (0 = stdin,
1 = stdout); input and output may be pipes."""

EPILOG = """\
examples:
  xlegacy convert -i guest.save -o guest.v2                  # width/guest inferred
  xlegacy convert -i guest.save -o guest.v2 -w 64 -g hvm -f libxl
  xlegacy convert -x -f libxl -i xl-save.img -o xl-save.v2   # keep the xl header
  ssh oldhost cat remus.stream | xlegacy convert -i 0 -o 1 > replica.v2

exit status: 0 converted, 1 stream or I/O error, 2 cannot convert (TMEM) or
internal error."""

SYSLOG_IDENT = "convert-legacy-stream"


def configure(parser):
    """Add the options of Xen's convert-legacy-stream to an argparse parser."""
    parser.add_argument("-i", "--in", dest="fin", metavar="<FD or FILE>",
                        help="Legacy input to convert")
    parser.add_argument("-o", "--out", dest="fout", metavar="<FD or FILE>",
                        help="v2 (or later) format output")
    # -w and -g as every xlegacy command spells and checks them (-g is also
    # --guest-type, the script's name, and --guest, the other commands').
    from . import options
    options.add_width(parser, dest="twidth")
    options.add_guest(parser, dest="gtype")
    parser.add_argument("-f", "--format", dest="format", metavar="<libxc|libxl>", default="libxc",
                        choices=["libxc", "libxl"],
                        help="Desired format of the outgoing stream (defaults to libxc)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="Summarise stream contents")
    parser.add_argument("-x", "--xl", action="store_true", default=False,
                        help="Is an `xl` header present in the stream? (default no; an xl "
                             "header is recognised and copied either way)")
    parser.add_argument("--skip-qemu", action="store_true", default=False,
                        help="Skip processing of the qemu tail? (default no; libxc format only)")
    parser.add_argument("--syslog", action="store_true", default=False,
                        help="Log to syslog instead of stdout")
    parser.add_argument("--no-sync", dest="sync", action="store_false", default=True,
                        help="to a path: do not fsync the stream before renaming it into "
                             "place (faster; a crash may then leave a complete-looking file "
                             "with missing data); descriptors are never synced")
    options.add_checkpoint_buffer(parser)
    options.add_force_reading(parser, "-w/-g")
    parser.set_defaults(convert_parser=parser)


# ------------------------------------------------------------------ logging
class _Log:
    def __init__(self, prog, verbose=False, use_syslog=False, quiet=False, info_stream=None):
        self.prog = prog
        self.verbose = verbose
        self.quiet = quiet
        self.syslog = None
        self.info_stream = info_stream or sys.stdout
        if use_syslog:
            import syslog
            syslog.openlog(SYSLOG_IDENT, syslog.LOG_PID)
            self.syslog = syslog

    def _sys(self, level, msg):
        if self.syslog is not None:
            for line in msg.split("\n"):
                self.syslog.syslog(getattr(self.syslog, level), line)

    def info(self, msg):
        if not self.verbose:
            return
        if self.syslog is not None:
            self._sys("LOG_INFO", msg)
        else:
            print(msg, file=self.info_stream, flush=True)

    def warn(self, msg):
        self._sys("LOG_WARNING", f"warning: {msg}")
        if not self.quiet:
            print(f"{self.prog}: warning: {msg}", file=sys.stderr, flush=True)

    def error(self, msg):
        self._sys("LOG_ERR", f"error: {msg}")
        print(f"{self.prog}: error: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ -i / -o
def fd_or_path(value):
    """Xen's rule (xen.util.open_file_or_fd): a value that Python's
    int(value, 10) accepts is a file descriptor, unless it is -1 (which
    names a file called "-1"); anything else is a path."""
    try:
        fd = int(value, 10)
    except ValueError:
        return None
    return None if fd == -1 else fd


def _open_in(value):
    fd = fd_or_path(value)
    if fd is not None:
        os.fstat(fd)       # EBADF now rather than later
        return fd, False
    return os.open(value, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), True


def _open_out(value, source, sync=True):
    """(fd, output): a descriptor is written in place (output None); a path
    is an output of outputs/atomic.py, checked against the input first: a
    new file appears under its name only when the conversion succeeded; a
    device, FIFO or `-` (standard output) is written in place."""
    from ..outputs.atomic import check_outputs, open_output
    fd = fd_or_path(value)
    if fd is not None:
        os.fstat(fd)
        check_outputs([fd], [source])
        return fd, None
    out = open_output(value, inputs=[source], sync=sync)
    return out.fd, out


# ------------------------------------------------------------------ running
def _exit_code(exc):
    from ..errors import AmbiguousStream, StreamError, UnsupportedStream
    if isinstance(exc, UnsupportedStream):
        # A valid legacy stream holding what no v2 stream can carry (TMEM):
        # the script's "todo" (2).  Anything that is not a legacy stream: 1.
        return 2 if "TMEM" in str(exc) else 1
    if isinstance(exc, (StreamError, AmbiguousStream, OSError, EOFError)):
        return 1
    return 2


def _summary(stats):
    lines = [f"converted: {stats.format} stream, {stats.guest.upper() if stats.guest else '?'} "
             f"guest, {stats.width}-bit toolstack, p2m_size {stats.p2m_size}, wrapper "
             f"{stats.wrapper}"]
    cps = f"checkpoint {stats.committed_checkpoint}"
    if stats.checkpoints > 1 or stats.compressed:
        cps += f" of {stats.checkpoints} complete" + (" (compressed)" if stats.compressed else "")
    lines.append(f"  {cps}; {stats.page_records} PAGE_DATA records, {stats.pages} pages")
    lines.append("  records: " + ", ".join(f"{k} {v}" for k, v in stats.records.items()))
    lines.append(f"  {stats.bytes_in} input bytes used, {stats.bytes_out} bytes written"
                 + (f" ({', '.join(stats.copy_methods)})" if stats.copy_methods else ""))
    if stats.qemu:
        lines.append(f"  qemu record {stats.qemu['signature']}, {stats.qemu['length']} bytes")
    return lines


def execute(args, prog):
    """Run a conversion for parsed arguments; returns the exit status."""
    verbose = bool(getattr(args, "verbose", False))
    quiet = bool(getattr(args, "quiet", False))
    debug = bool(getattr(args, "debug", False)) or bool(os.environ.get("XLEGACY_DEBUG"))
    parser = getattr(args, "convert_parser", None)
    if args.fin is None or args.fout is None:
        if parser is not None:
            parser.print_help(sys.stderr)
        else:
            print(f"{prog}: -i/--in and -o/--out are required", file=sys.stderr)
        return 1
    log = _Log(prog, verbose, args.syslog, quiet)
    in_fd = out_fd = output = None
    own_in = False
    try:
        in_fd, own_in = _open_in(args.fin)
        fin = fd_or_path(args.fin)
        out_fd, output = _open_out(args.fout, (in_fd, args.fin if fin is None else fin),
                                   getattr(args, "sync", True))
    except OSError as exc:
        which = args.fin if in_fd is None else args.fout
        log.error(_message(exc) if exc.strerror is None else
                  f"{exc.strerror}: {exc.filename or which}")
        if own_in and in_fd is not None:
            os.close(in_fd)
        return 1
    if out_fd == 1 or _same_file(out_fd, 1):
        log.info_stream = sys.stderr          # keep the stream on stdout clean
    from ..converter import convert
    from .progress import Progress
    # A progress line only for a person at a terminal: never under syslog
    # (libxl/xenopsd), never when the output is the terminal itself.
    prog_line = Progress("converting", _regular_size(in_fd),
                         enabled=False if (quiet or args.syslog or out_fd == 2) else None)
    try:
        with prog_line:
            stats = convert(in_fd, out_fd if output is None else output,
                            fmt=args.format, xl=args.xl,
                            skip_qemu=args.skip_qemu,
                            width=args.twidth, guest=args.gtype,
                            force_reading=args.force_reading,
                            warn=log.warn, info=log.info,
                            progress=prog_line if prog_line.enabled else None,
                            checkpoint_buffer=args.checkpoint_buffer)
            if output is not None:
                output.commit()
                output = None
    except KeyboardInterrupt:
        log.error("interrupted" + _incomplete(args.fout, output))
        return 1
    except BaseException as exc:   # noqa: BLE001 - every failure becomes an exit status
        if isinstance(exc, SystemExit):
            raise
        rc = _exit_code(exc)
        if debug:
            import traceback
            traceback.print_exc()
        from ..errors import XLegacyError
        if rc == 2 and not isinstance(exc, XLegacyError):
            log.error(f"internal error: {type(exc).__name__}: {exc} (please report; "
                      "XLEGACY_DEBUG=1 shows the traceback)")
        else:
            log.error(_message(exc) + _incomplete(args.fout, output))
        return rc
    finally:
        if output is not None:
            output.abort()          # a file: removed; a stream: closed
        if own_in:
            try:
                os.close(in_fd)
            except OSError:
                pass
    for line in _summary(stats):
        log.info(line)
    return 0


def _incomplete(fout, output):
    """What a failed conversion leaves: nothing under a file name, or a
    prefix in a stream the consumer must not take for the whole."""
    if output is not None and getattr(output, "seekable", False):
        return ""           # an unnamed file, removed
    from ..outputs.atomic import describe
    fd = fd_or_path(fout)
    return f"; the output written to {describe(fd if fd is not None else fout)} is incomplete"


def _regular_size(fd):
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _message(exc):
    if isinstance(exc, OSError) and not exc.__class__.__module__.startswith("xlegacy"):
        if exc.filename:
            return f"{exc.strerror}: {exc.filename}"
        return f"I/O error: {exc.strerror or exc}"
    return str(exc)


def _same_file(a, b):
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and not stat.S_ISREG(sa.st_mode)


def run(args):
    """`xlegacy convert`: the exit codes of Xen's script (errors are reported here)."""
    return execute(args, "xlegacy")


def build_parser(prog=None):
    from .._version import __version__
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s [options] -i INPUT -o OUTPUT [-w WIDTH] [-g GUEST]",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s (xlegacy {__version__})")
    return parser


def main(argv=None):
    """The console script (drop-in for Xen's convert-legacy-stream)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else \
        "xlegacy-convert-legacy-stream"
    if not prog or prog in ("-c", "__main__.py", "-m"):
        prog = "xlegacy-convert-legacy-stream"
    try:
        parser = build_parser(prog)
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return 1
    try:
        # Like optparse, stray positional arguments are ignored; unknown
        # options are a usage error (exit 2).
        args, rest = parser.parse_known_args(argv)
        unknown = [a for a in rest if a.startswith("-") and a != "-"]
        if unknown:
            parser.error(f"no such option: {unknown[0]}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return execute(args, prog)


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())
