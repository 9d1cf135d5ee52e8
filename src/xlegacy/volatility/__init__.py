"""Volatility 3 support: a layer that reads a legacy Xen save in place.

`plugins/` is a Volatility plugin directory (vol -p "$(xlegacy vol-path)");
its one module imports the layer and stacker from layer.py, which Volatility
then finds among its own.  Nothing here imports volatility3 until that
module is loaded by Volatility itself.
"""
import os


def plugin_dir():
    """The directory to give vol's -p option."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")
