"""Install and packaging: the optional C extension (an install without a
compiler falls back to the reference kernels, loudly), the build's header
dependencies."""
import os
import pathlib
import re
import runpy
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
needs_tree = pytest.mark.skipif(not (ROOT / "setup.py").is_file(),
                                reason="needs the source tree (setup.py, csrc/)")

# Runs xlegacy as if its extension had not been built: a None entry in
# sys.modules makes both find_spec and the import see no xlegacy._ffi.
NO_EXTENSION = "import sys; sys.modules['xlegacy._ffi'] = None\n"


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "XLEGACY_BACKEND"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=120)


def test_no_extension_falls_back_to_reference_with_a_warning():
    r = _python(NO_EXTENSION + """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import xlegacy
from xlegacy.errors import NativeBackendWarning
assert [w.category for w in caught] == [NativeBackendWarning], caught
print(caught[0].message)
image, meta = xlegacy.restore(xlegacy.__path__[0] + "/data/demo.xlsave")
print("backend", xlegacy.BACKEND, image.size > 0)
""")
    assert r.returncode == 0, r.stderr
    assert "C extension (xlegacy._ffi) was not built" in r.stdout
    assert "reinstall" in r.stdout
    assert "backend reference True" in r.stdout


def test_no_extension_version_says_so():
    r = _python(NO_EXTENSION + "from xlegacy.cli import main\nmain(['--version'])")
    assert r.returncode == 0, r.stderr
    assert "backend: reference, C extension not built" in r.stdout
    assert "NativeBackendWarning" in r.stderr and "C compiler" in r.stderr


def test_no_extension_explicit_choices():
    # Choosing the reference backend silences the warning; asking for the
    # native one where it is missing is an error, not a quiet fallback.
    r = _python(NO_EXTENSION + "import xlegacy.kernels as k; print(k.BACKEND, k.BACKEND_NOTE)",
                XLEGACY_BACKEND="reference")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.split() == ["reference", "reference,", "C", "extension", "not", "built"]
    r = _python(NO_EXTENSION + "import xlegacy.kernels", XLEGACY_BACKEND="native")
    assert r.returncode != 0 and "xlegacy._ffi) is missing" in r.stderr


def test_with_extension_native_is_the_default():
    pytest.importorskip("xlegacy._ffi")
    r = _python("import warnings; warnings.simplefilter('error')\n"
                "import xlegacy; print(xlegacy.BACKEND)")
    assert r.returncode == 0 and r.stdout.strip() == "native", r.stderr


@needs_tree
@pytest.mark.parametrize("required", [False, True])
def test_build_without_compiler(tmp_path, required):
    """`setup.py build_ext` with no usable compiler succeeds without the
    extension and says why (XLEGACY_REQUIRE_NATIVE=1: fails instead)."""
    env = dict(os.environ, CC="/nonexistent-cc", XLEGACY_REQUIRE_NATIVE="1" if required else "")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext",
                        "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    built = list((tmp_path / "lib").rglob("_ffi*"))
    assert built == []
    if required:
        assert r.returncode != 0
    else:
        assert r.returncode == 0, r.stderr
        assert "could not be built" in r.stderr and "reference kernels" in r.stderr


@needs_tree
def test_headers_are_extension_dependencies():
    """Every header a C source includes is in the extension's `depends`, so
    editing it (csrc/common.h) rebuilds the extension."""
    builder = runpy.run_path(str(CSRC / "build_ffi.py"))["ffibuilder"]
    kwds = builder._assigned_source[3]
    depends = {pathlib.Path(ROOT, d).resolve() for d in kwds["depends"]}
    included = set()
    for src in [*CSRC.glob("*.c"), *CSRC.glob("*.h")]:
        for name in re.findall(r'#include\s+"([^"]+)"', src.read_text()):
            included.add((CSRC / name).resolve())
    assert included and included <= depends
