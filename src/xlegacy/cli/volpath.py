"""`xlegacy vol-path`: the Volatility 3 plugin directory shipped with
xlegacy, for `vol -p "$(xlegacy vol-path)" -f guest.save ...`."""

DESCRIPTION = ("Print the directory holding xlegacy's Volatility 3 layer, to pass to vol's "
               "-p option: Volatility then opens legacy Xen save files (bare, xl, xend, "
               "XenServer, libvirt) directly, with no restore step.")
EPILOG = 'example:\n  vol -p "$(xlegacy vol-path)" -f guest.save windows.info'


def configure(p):
    pass


def run(args):
    from ..volatility import plugin_dir
    print(plugin_dir())
    return 0
