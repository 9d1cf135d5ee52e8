"""Decoding of metadata payloads that the reader passes through opaquely:
the libxl toolstack record."""
import hashlib
import struct


LIBXL_TOOLSTACK = struct.Struct("<II")        # version, count
PHYSMAP_HEAD = struct.Struct("<QQQI")         # phys_offset, start_addr, size, namelen


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def decode_libxl_toolstack(data, width):
    """libxl's version-1 toolstack record (libxl__toolstack_save, Xen 4.2-4.5).

    A header (version 1, count) and `count` physmap entries: 3 x u64, u32
    namelen, the NUL-terminated name.  libxl copied sizeof(struct) + namelen
    bytes from a struct whose name member sits at offset 28, so a 64-bit
    toolstack (sizeof = 32) leaks 4 bytes of padding after every name.
    Returns a list of entries, or None if the bytes are not such a record.
    """
    if len(data) < LIBXL_TOOLSTACK.size:
        return None
    version, count = LIBXL_TOOLSTACK.unpack_from(data, 0)
    if version != 1 or count > len(data):
        return None
    leak = 4 if width == 8 else 0
    pos = LIBXL_TOOLSTACK.size
    out = []
    for _ in range(count):
        if pos + PHYSMAP_HEAD.size > len(data):
            return None
        phys, start, size, namelen = PHYSMAP_HEAD.unpack_from(data, pos)
        pos += PHYSMAP_HEAD.size
        if pos + namelen + leak > len(data):
            return None
        name = bytes(data[pos:pos + namelen]).split(b"\0", 1)[0].decode("utf-8", "replace")
        entry = {"phys_offset": phys, "start_addr": start, "size": size, "name": name,
                 "namelen": namelen}
        pos += namelen
        if leak:
            entry["padding_leak_hex"] = bytes(data[pos:pos + leak]).hex()
            pos += leak
        out.append(entry)
    if pos != len(data):
        return None
    return out
