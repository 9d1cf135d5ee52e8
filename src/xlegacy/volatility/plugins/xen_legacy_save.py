"""Loaded by Volatility 3 from the plugin directory `xlegacy vol-path`
prints: makes the legacy Xen save layer and its stacker known to it."""
from xlegacy.volatility.layer import XenLegacySaveLayer, XenLegacySaveStacker  # noqa: F401
