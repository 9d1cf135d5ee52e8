"""Toolstack wrappers around the libxc image: xl, xend, XenServer, libvirt.

detect() looks at the first bytes, consumes the wrapper's header and returns
a Wrapper record; what a wrapper puts after the image (a qemu record) is read
with the HVM tail.
"""
import struct

from .. import format as F
from ..errors import StreamError, UnsupportedStream
from .records import Wrapper

# Longest wrapper configuration we accept: bounded by what the source holds
# anyway, but a pipe with a bogus length should fail clearly, not after 4 GiB.
MAX_CONFIG = 64 << 20
# How the streams of Xen 4.6+ begin (v2.py holds their layouts): a libxc
# image header (marker ~0, "XENF", big-endian version) or a libxl stream
# header ("LibxlFmt", version, options).
V2_LIBXC_MARKER = b"\xff" * 8 + b"XENF"
V2_LIBXL_IDENT = b"LibxlFmt"


def detect(src):
    """Consume a wrapper header if there is one; returns a Wrapper."""
    start = src.pos
    head = src.peek(64)
    if head.startswith(F.XL_MAGIC):
        return _xl(src, start)
    if head.startswith(F.XEND_MAGIC):
        src.skip(len(F.XEND_MAGIC), "xend header")
        (length,) = struct.unpack(">i", src.read(4, "xend config length"))
        if length < 0 or length > MAX_CONFIG:
            raise StreamError("bad xend config length", offset=start + 16,
                              expected=f"0..{MAX_CONFIG}", found=str(length))
        config = src.read(length, "xend SXP config")
        return Wrapper("xend", start, src.pos, config, "sxp")
    if head.startswith(F.XENSERVER_V2_MAGIC):
        raise UnsupportedStream("this is a XenServer v2 stream ('XenSavedDomv2-'), not a "
                                "legacy stream", offset=start)
    if head.startswith(F.XENSERVER_MAGIC):
        src.skip(len(F.XENSERVER_MAGIC), "XenServer header")
        return Wrapper("xenserver", start, src.pos, None, None)
    if head.startswith(F.LIBVIRT_MAGIC):
        return _libvirt(src, start)
    if head.startswith((V2_LIBXC_MARKER, V2_LIBXL_IDENT)):
        raise UnsupportedStream(f"this is {describe_v2(head)}, not a legacy stream: today's "
                                "Xen (4.6 and later) restores it as it is", offset=start)
    return Wrapper("none", start, start)


def describe_v2(head):
    """What a stream starting with a v2 header is, in words: kind, version and
    the options that matter (byte order; "converted from a legacy stream")."""
    from .. import v2       # constants only; needed just to name such a stream
    if head.startswith(V2_LIBXL_IDENT) and len(head) >= v2.LIBXL_HDR.size:
        _, version, options = v2.LIBXL_HDR.unpack_from(head)
        what = f"a libxl migration stream v{version} ('LibxlFmt'"
        if options & v2.LIBXL_OPT_LEGACY:
            what += ", converted from a legacy stream"
    elif head.startswith(V2_LIBXC_MARKER) and len(head) >= v2.IHDR.size:
        _, _, version, options, _, _ = v2.IHDR.unpack_from(head)
        what = f"a libxc migration stream v{version} (marker + 'XENF'"
    else:
        return "the start of a v2 migration stream (its header is cut short)"
    if options & 1:
        what += ", big-endian"
    return what + ")"


class XLHeader:
    """The fixed part and optional data of an xl header, as read."""
    __slots__ = ("offset", "byteorder", "mandatory", "optional", "optional_data")

    def __init__(self, offset, byteorder, mandatory, optional, optional_data):
        self.offset, self.byteorder = offset, byteorder
        self.mandatory, self.optional, self.optional_data = mandatory, optional, optional_data

    @property
    def unknown_mandatory(self):
        return self.mandatory & ~(F.XL_FLAG_JSON | F.XL_FLAG_STREAMV2)

    def pack(self, mandatory=None):
        """The header's bytes (with other mandatory flags if given)."""
        flags = self.mandatory if mandatory is None else mandatory
        return (F.XL_MAGIC + F.XL_HEADER.pack(self.byteorder, flags, self.optional,
                                              len(self.optional_data)) + self.optional_data)


def read_xl_header(src, strict=True):
    """Read an xl header at src (its magic included).  A v2 stream and an
    oversized optional part are refused always; a wrong byte order and
    unknown mandatory flags only when strict (xl refuses them; Xen's
    converter copies them)."""
    at = src.pos
    src.skip(len(F.XL_MAGIC), "xl header")
    hdr_at = src.pos
    byteorder, mandatory, optional, opt_len = F.XL_HEADER.unpack(
        src.read(F.XL_HEADER.size, "xl header"))
    if strict and byteorder != F.XL_BYTEORDER:
        raise StreamError("bad xl header byte order", offset=hdr_at,
                          expected="0x01020304", found=f"0x{byteorder:08x}")
    if mandatory & F.XL_FLAG_STREAMV2:
        raise UnsupportedStream("this xl save file carries a v2 stream (mandatory flag "
                                "STREAMv2), not a legacy stream", offset=hdr_at + 4)
    head = XLHeader(at, byteorder, mandatory, optional, b"")
    if strict and head.unknown_mandatory:
        raise StreamError("unknown mandatory flags in xl header", offset=hdr_at + 4,
                          expected="only bit 0 (JSON) or bit 1 (STREAMv2)",
                          found=f"0x{mandatory:x}")
    if opt_len > MAX_CONFIG:
        raise StreamError("xl optional data too long", offset=hdr_at + 12,
                          expected=f"at most {MAX_CONFIG} bytes", found=str(opt_len))
    head.optional_data = src.read(opt_len, "xl optional data")
    return head


def _xl(src, start):
    head = read_xl_header(src)
    opt_at = src.pos - len(head.optional_data)
    opt_len = len(head.optional_data)
    config = None
    if opt_len >= 4:
        (config_len,) = F.U32.unpack_from(head.optional_data, 0)
        if config_len > opt_len - 4:
            raise StreamError("xl config length exceeds the optional data", offset=opt_at,
                              expected=f"at most {opt_len - 4}", found=str(config_len))
        config = head.optional_data[4:4 + config_len]
    fmt = "json" if head.mandatory & F.XL_FLAG_JSON else "xl-text"
    details = {"mandatory_flags": head.mandatory, "optional_flags": head.optional,
               "optional_data_len": opt_len,
               "config_len": len(config) if config is not None else None}
    return Wrapper("xl", start, src.pos, config, fmt, details)


def _libvirt(src, start):
    src.skip(len(F.LIBVIRT_MAGIC), "libvirt header")
    at = src.pos
    version, xml_len = F.LIBVIRT_HEADER.unpack(src.read(F.LIBVIRT_HEADER.size,
                                                         "libvirt header"))
    if version == 2:
        raise UnsupportedStream("this libvirt save image (version 2) carries a v2 stream, "
                                "not a legacy stream", offset=at)
    if version != 1:
        raise StreamError("unknown libvirt save image version", offset=at,
                          expected="1 (legacy libxl stream)", found=str(version))
    if xml_len > MAX_CONFIG:
        raise StreamError("libvirt domain XML too long", offset=at + 4,
                          expected=f"at most {MAX_CONFIG} bytes", found=str(xml_len))
    xml = src.read(xml_len, "libvirt domain XML")
    return Wrapper("libvirt", start, src.pos, xml, "libvirt-xml",
                   {"version": version, "xml_len": xml_len})
