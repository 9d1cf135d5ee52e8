"""Install and packaging: the optional C extension (an install without a
compiler falls back to the reference kernels, loudly), the build's header
dependencies, the project metadata, the wheel tag and the sdist's contents."""
import ast
import os
import pathlib
import re
import runpy
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
needs_tree = pytest.mark.skipif(not (ROOT / "setup.py").is_file(),
                                reason="needs the source tree (setup.py, csrc/)")


def _setuptools_major():
    try:
        import setuptools
    except ImportError:
        return 0
    return int(setuptools.__version__.split(".")[0])


# pyproject.toml's build requirement (SPDX license expressions); older
# setuptools cannot read the project table, so tests that run setup.py
# need it.
needs_build_setuptools = pytest.mark.skipif(
    _setuptools_major() < 77, reason="building needs setuptools >= 77 (pyproject.toml)")

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
@needs_build_setuptools
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


def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("needs the source tree (pyproject.toml)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_and_classifiers():
    project = _pyproject()["project"]
    assert project["license"] == "MIT"                       # SPDX expression
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the xlegacy authors" in text
    classifiers = project["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")]   # the expression says it
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Programming Language :: C" in classifiers
    oldest = project["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {oldest}" in classifiers
    for url in project.get("urls", {}).values():
        assert not re.search(r"example\.(com|org)|TODO|XXX|your-?name", url, re.I), url


def _imported_top_modules(folder):
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_test_extras_are_what_the_tests_import():
    extras = _pyproject()["project"]["optional-dependencies"]["test"]
    wanted = {re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower() for req in extras}
    imported = _imported_top_modules(ROOT / "tests")
    assert wanted <= {m.lower() for m in imported}, wanted - imported
    assert {"pytest", "hypothesis"} <= wanted


@needs_tree
def test_wheel_tag_matches_the_abi3_extension():
    options = runpy.run_path(str(ROOT / "setup.py"))["wheel_options"]()
    if hasattr(sys, "gettotalrefcount") or sys.implementation.name != "cpython":
        assert options == {}
        return
    assert options == {"bdist_wheel": {"py_limited_api": "cp310"}}
    assert _pyproject()["project"]["requires-python"] == ">=3.10"
    ffi = pytest.importorskip("xlegacy._ffi")
    assert ffi.__file__.endswith(".abi3.so")


@needs_tree
@needs_build_setuptools
def test_sdist_carries_what_its_tests_need(tmp_path):
    """The sdist holds the C sources, every test, helper and fuzz harness,
    the benchmarks, and declares every package and data file under src/."""
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    (sdist,) = tmp_path.glob("xlegacy-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        members = {n.split("/", 1)[1] for n in names if "/" in n}
        sources = tar.extractfile(f"{top}/src/xlegacy.egg-info/SOURCES.txt").read().decode()
    wanted = {"LICENSE", "README.md", "CHANGELOG.md", "setup.py", "pyproject.toml"}
    for folder, patterns in (("csrc", ("*.c", "*.h", "*.py")), ("tests", ("*.py", "*.sh")),
                             ("bench", ("*.py", "*.md")), ("src", ("*.py", "*.xlsave"))):
        for pattern in patterns:
            wanted |= {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob(pattern)
                       if "__pycache__" not in p.parts}
    assert wanted - members == set()
    declared = set(sources.split())
    package_files = {w for w in wanted if w.startswith("src/")}
    assert package_files - declared == set()
