"""Options and number parsing shared by the commands that read a save in
place through its page index (`cat`, `index`)."""
import argparse


def number(text):
    """A non-negative integer in decimal or 0x-hex (also 0o/0b)."""
    try:
        value = int(text, 0)
    except ValueError:
        try:
            value = int(text, 10)          # "010": decimal, not an error
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a number: {text!r} (decimal, or hex with 0x)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def index_options(p):
    p.add_argument("stream", help="legacy save file (a regular file: the index seeks in it)")
    p.add_argument("--width", type=int, choices=(32, 64),
                   help="toolstack width; inferred if omitted")
    p.add_argument("--guest", choices=("pv", "hvm"), help="guest type; inferred if omitted")
    p.add_argument("--checkpoint", type=int, metavar="N",
                   help="state after checkpoint N (default: the last complete one)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where a compressed Remus stream is restored once (default: "
                        "$XLEGACY_CACHE_DIR or ~/.cache/xlegacy)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def open_map(args, index=None):
    from ..pagemap import open_pagemap
    return open_pagemap(args.stream, checkpoint=args.checkpoint, cache_dir=args.cache_dir,
                        index=index, width=args.width, guest=args.guest)
