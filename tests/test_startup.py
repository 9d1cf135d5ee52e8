"""Start-up cost: a command imports only its own module, and numpy only
where an image lives in memory (issue 13.1).  Nothing here is timed: each
case runs in a fresh interpreter and looks at sys.modules afterwards."""
import os
import subprocess
import sys

import pytest

# The reference backend is numpy through and through.
NATIVE = os.environ.get("XLEGACY_BACKEND", "native").strip().lower() in ("", "native")
native_only = pytest.mark.skipif(not NATIVE, reason="the reference backend is numpy")

PROBE = """
import sys
from xlegacy.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
sys.stdout.flush()
assert rc in (0, None), rc
print(" ".join(m for m in sys.modules if m == "numpy" or m.startswith("xlegacy.")))
"""


def cli_modules(*args):
    """The numpy and xlegacy modules loaded by running `xlegacy ARGS`."""
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.splitlines()[-1].split())


def test_import_cli_does_not_import_numpy():
    mods = cli_modules("--help")
    assert "numpy" not in mods
    r = subprocess.run([sys.executable, "-c", "import sys, xlegacy.cli; "
                        "print('numpy' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


@native_only
def test_version_does_not_import_numpy():
    assert "numpy" not in cli_modules("--version")


@pytest.mark.parametrize("command", ["info", "restore", "demo", "convert", "verify",
                                     "translate"])
def test_help_imports_only_its_own_command(command):
    mods = cli_modules(command, "--help")
    assert "numpy" not in mods
    others = {"xlegacy.cli.convert", "xlegacy.cli.verify", "xlegacy.cli.translate",
              "xlegacy.bench", "xlegacy.verifier", "xlegacy.converter", "xlegacy.restorer"}
    assert not mods & (others - {f"xlegacy.cli.{command}"})


@native_only
def test_info_of_a_stream_does_not_import_numpy(samples):
    from conftest import load_sample
    path, _ = load_sample("hvm64_save")
    assert "numpy" not in cli_modules("info", str(path))


@native_only
def test_convert_of_page_tables_and_holes_does_not_import_numpy(samples, tmp_path):
    """Batches with page-table types (PV) and XTAB holes (Xen's own saver)
    are converted by a numpy-free kernel (kernels.v2_entries), not only
    batches of ordinary pages."""
    from conftest import load_sample
    for name in ("pv64_xl_xsave", "xensaver_hvm64_live", "xensaver_pv64_on32_live"):
        path, _ = load_sample(name)
        mods = cli_modules("convert", "-i", str(path), "-o", str(tmp_path / f"{name}.v2"))
        assert "numpy" not in mods, name
