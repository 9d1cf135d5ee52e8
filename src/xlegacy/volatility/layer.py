"""A Volatility 3 physical layer over a legacy Xen save file, read in place.

XenLegacySaveStacker recognises a save file under any toolstack wrapper
(bare libxc image, xl, xend, XenServer, libvirt) and puts an
XenLegacySaveLayer on it.  The layer is a SegmentedLayer, like Volatility's
own LiME and ELF layers: its segments are the runs of the save's page index
(xlegacy.pagemap), each mapping guest-physical pfn*4096.. onto the file
offset where those pages lie.  So opening a save reads only its framing (or
the fresh STREAM.xlidx beside it) -- no restore -- and a page is read from
the file only when a plugin asks for it; holes behave as in every segmented
layer (InvalidAddressException, zeros with pad=True).

Compressed Remus streams hold no page in place: they are restored once into
xlegacy's cache directory and the layer maps that file instead.

What the save knows of the vCPUs goes into the layer's metadata:
`page_map_offset` (vCPU 0's top-level page table, guest-physical),
`architecture` ("Intel64", or "Intel32" with `pae`) -- the keys Volatility's
Windows stacker reads when a layer also declares its os -- and
`xen_vcpus`, one (id, paging mode, top-level table) per vCPU.
"""
import logging
import os
import urllib.parse
import urllib.request

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import physical, segmented

from .. import format as F
from ..errors import XLegacyError

vollog = logging.getLogger(__name__)

# Magic strings of the wrappers (a bare image is recognised by opening it).
WRAPPER_MAGICS = (F.XL_MAGIC, F.XEND_MAGIC, F.XENSERVER_MAGIC, F.LIBVIRT_MAGIC)


def local_path(location):
    """The local file behind a Volatility location (file: URL or path), or None."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme in ("", "file"):
        path = urllib.request.url2pathname(parsed.path) if parsed.scheme else location
        return path if os.path.isfile(path) else None
    return None


def _open(path):
    from ..pagemap import open_pagemap
    return open_pagemap(path)


class XenLegacySaveLayer(segmented.SegmentedLayer):
    """Guest-physical memory of a legacy Xen save file (any wrapper)."""

    def __init__(self, context: interfaces.context.ContextInterface, config_path: str,
                 name: str, metadata=None) -> None:
        self._save_metadata: dict = {}
        super().__init__(context, config_path, name, metadata)
        self._metadata = dict(self._save_metadata, **self._metadata)  # type: ignore[has-type]

    def _load_segments(self) -> None:
        path = local_path(self.config["save_location"])
        if path is None:
            raise exceptions.LayerException(
                self.name, f"{self.config['save_location']} is not a local file")
        try:
            pm = _open(path)
        except (XLegacyError, OSError, ValueError) as exc:
            raise exceptions.LayerException(self.name, f"not a usable Xen save: {exc}") from exc
        try:
            runs = pm.file_runs()
            page = F.PAGE_SIZE
            self._segments = [(int(p) * page, int(o), int(c) * page, int(c) * page)
                              for p, o, c in runs.tolist()]
            self._save_metadata = _metadata(pm)
        finally:
            pm.close()
        if not self._segments:
            raise exceptions.LayerException(self.name, f"{path} holds no guest pages")

    @classmethod
    def get_requirements(cls):
        return super().get_requirements() + [
            requirements.StringRequirement(name="save_location", optional=False,
                                           description="the legacy Xen save file")]


def _metadata(pm):
    vcpus = []
    for v in pm.vcpus:
        if "id" not in v:
            continue
        root = v.get("cr3_paddr") if v.get("source") == "pv" else v.get("page_table_base")
        vcpus.append((v["id"], v.get("paging"), root))
    md = {"xen_wrapper": pm.wrapper, "xen_guest": pm.guest, "xen_checkpoint": pm.checkpoint,
          "xen_in_place": pm.in_place, "xen_vcpus": tuple(vcpus)}
    first = next((v for v in vcpus if v[2] is not None and v[1] not in (None, "none")), None)
    if first is not None:
        md["page_map_offset"] = first[2]
        md["architecture"] = "Intel64" if first[1] in ("4-level", "5-level") else "Intel32"
        md["pae"] = first[1] == "pae"
    return md


class XenLegacySaveStacker(interfaces.automagic.StackerLayerInterface):
    """Puts a XenLegacySaveLayer on a file that is a legacy Xen save."""

    stack_order = 10

    @classmethod
    def stack(cls, context: interfaces.context.ContextInterface, layer_name: str,
              progress_callback: constants.ProgressCallback = None):
        base = context.layers[layer_name]
        if not isinstance(base, physical.FileLayer):
            return None
        path = local_path(base.location)
        if path is None:
            return None
        head = base.read(0, min(64, base.maximum_address + 1), pad=True)
        wrapped = head.startswith(WRAPPER_MAGICS)
        try:
            pm = _open(path)
        except (XLegacyError, OSError, ValueError) as exc:
            if wrapped:
                vollog.warning(f"{path} starts like a Xen save but cannot be read: {exc}")
            else:
                vollog.log(constants.LOGLEVEL_VVV, f"not a legacy Xen save: {exc}")
            return None
        try:
            if pm.in_place:
                data_layer = layer_name
            else:
                # Compressed Remus: the pages live in the restored copy.
                data_layer = context.layers.free_layer_name("XenSaveRestoredCopy")
                cfg = interfaces.configuration.path_join(data_layer, "location")
                context.config[cfg] = "file:" + urllib.request.pathname2url(pm.backing)
                context.layers.add_layer(physical.FileLayer(context, data_layer, data_layer))
            vollog.info(f"legacy Xen save: {pm!r}")
        finally:
            pm.close()
        name = context.layers.free_layer_name("XenLegacySaveLayer")
        context.config[interfaces.configuration.path_join(name, "base_layer")] = data_layer
        context.config[interfaces.configuration.path_join(name, "save_location")] = \
            base.location
        return XenLegacySaveLayer(context, name, name)
