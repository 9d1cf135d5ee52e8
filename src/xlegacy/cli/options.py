"""The options several commands share, with the same names everywhere and
checked by the library's own checks (xlegacy.options): a bad value is
argparse's usual usage error (exit 2), in the words the API uses."""
import argparse

from .. import options as _check


def argtype(check, convert=int, name=None):
    """An argparse type: `convert` the text, then `check` it (ValueError ->
    the usage error naming the option)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name or check.__name__     # argparse names the type in some errors
    return parse


def add_width(p, dest="width"):
    p.add_argument("-w", "--width", dest=dest, type=argtype(_check.width), metavar="32|64",
                   help="toolstack width (unsigned long of the saving dom0); inferred if omitted")


def add_guest(p, dest="guest"):
    # --guest and Xen's convert-legacy-stream spelling -g/--guest-type, everywhere.
    p.add_argument("-g", "--guest", "--guest-type", dest=dest, type=argtype(_check.guest, str),
                   metavar="pv|hvm", help="guest type; inferred if omitted")


def add_checkpoint(p):
    p.add_argument("--checkpoint", type=argtype(_check.checkpoint), metavar="N",
                   help="state after checkpoint N, counted from 1 (default: the last "
                        "complete one)")


def add_force_reading(p, given="--width/--guest"):
    p.add_argument("--force-reading", action="store_true",
                   help=f"read the stream as {given} say even where the bytes contradict "
                        "them (default: refuse, naming the width/guest they fit)")


def mib(text):
    """An argparse type: a size in MiB >= 0, as bytes."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a size in MiB >= 0, not {text!r}")
    return n << 20


def add_checkpoint_buffer(p):
    p.add_argument("--checkpoint-buffer", type=mib, metavar="MIB", default=None,
                   help="memory for one held Remus checkpoint (default 256); beyond it "
                        "the checkpoint is held in an unnamed file beside the output")


def add_threads(p, help):
    p.add_argument("--threads", type=argtype(_check.threads), default=None, metavar="N",
                   help=help)
