"""Decoding of metadata payloads that the reader passes through opaquely:
the libxl toolstack record."""
import struct

from ..errors import ToolstackError


LIBXL_TOOLSTACK = struct.Struct("<II")        # version, count
PHYSMAP_HEAD = struct.Struct("<QQQI")         # phys_offset, start_addr, size, namelen


def sha256(data):
    # (imported here: OpenSSL's load costs every command ~3 ms at start-up,
    # and only a report of metadata needs a digest)
    import hashlib
    return hashlib.sha256(data).hexdigest()


def libxl_physmap_entries(data, width):
    """libxl's version-1 toolstack record (libxl__toolstack_save, Xen 4.2-4.5)
    split into its physmap entries.

    A header (version 1, count) and `count` entries: 3 x u64, u32 namelen,
    then namelen bytes of NUL-terminated name.  libxl copied sizeof(struct) +
    namelen bytes from a struct whose name member sits at offset 28, so a
    64-bit toolstack (sizeof = 32) leaks 4 bytes of padding after every name.
    Returns ([(phys_offset, start_addr, size, name bytes, leaked bytes)],
    bytes used); raises ToolstackError where the layout breaks."""
    if len(data) < LIBXL_TOOLSTACK.size:
        raise ToolstackError("overly short libxl toolstack data")
    version, count = LIBXL_TOOLSTACK.unpack_from(data, 0)
    if version != 1:
        raise ToolstackError(f"version {version}")
    leak = 4 if width == 8 else 0
    pos = LIBXL_TOOLSTACK.size
    out = []
    for i in range(count):     # each entry takes >= 28 bytes, so count is bounded
        if len(data) - pos < PHYSMAP_HEAD.size:
            raise ToolstackError(f"toolstack data too short for physmap entry {i}")
        phys, start, size, namelen = PHYSMAP_HEAD.unpack_from(data, pos)
        pos += PHYSMAP_HEAD.size
        if len(data) - pos < namelen + leak:
            raise ToolstackError(f"toolstack data too short for the name of physmap entry {i}")
        name = bytes(data[pos:pos + namelen])
        pos += namelen
        out.append((phys, start, size, name, bytes(data[pos:pos + leak])))
        pos += leak
    return out, pos


def decode_libxl_toolstack(data, width):
    """The physmap entries of libxl's version-1 toolstack record as dicts
    (for metadata), or None if the bytes are not exactly such a record."""
    try:
        entries, used = libxl_physmap_entries(data, width)
    except ToolstackError:
        return None
    if used != len(data):
        return None
    out = []
    for phys, start, size, name, leaked in entries:
        entry = {"phys_offset": phys, "start_addr": start, "size": size,
                 "name": name.split(b"\0", 1)[0].decode("utf-8", "replace"),
                 "namelen": len(name)}
        if width == 8:
            entry["padding_leak_hex"] = leaked.hex()
        out.append(entry)
    return out
