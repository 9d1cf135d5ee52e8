"""Build glue: the cffi extension xlegacy._ffi is compiled from csrc/ at install time.

The extension is optional.  Where it cannot be built (no C compiler, no
Python headers) the install still succeeds without it, and xlegacy runs on
its reference kernels (numpy), saying so when imported and in
`xlegacy --version`.  XLEGACY_REQUIRE_NATIVE=1 makes a failed build fatal
(CI and the sanitizer build, where a silent fallback would test the wrong
thing).
"""
import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

# What a missing or broken toolchain raises: the compiler or linker could
# not be run (ExecError, OSError), ran and failed (CCompilerError), or there
# is none for this platform (PlatformError).
BUILD_FAILURES = (CCompilerError, ExecError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed C build into a warning (unless
    XLEGACY_REQUIRE_NATIVE=1) and installs the package without the
    extension."""

    def run(self):
        try:
            super().run()
        except BUILD_FAILURES as exc:
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except BUILD_FAILURES as exc:
            self._skip(exc, ext.name)

    def _skip(self, exc, name="xlegacy._ffi"):
        if os.environ.get("XLEGACY_REQUIRE_NATIVE", "") not in ("", "0"):
            raise exc
        sys.stderr.write(
            f"\nWARNING: xlegacy: the C extension {name} could not be built ({exc}).\n"
            "xlegacy is installed without it and will run on its reference kernels "
            "(numpy, several times slower).\nInstall a C compiler and the Python "
            "headers, then reinstall, for the native backend.\n\n")

    def get_outputs(self):
        # Only what was built: a skipped extension is not an output.
        return [path for path in super().get_outputs() if os.path.exists(path)]


def wheel_options():
    """cffi builds xlegacy._ffi against the stable ABI (an .abi3.so) except on
    debug and free-threaded interpreters; tag the wheel to match, so one
    wheel serves every CPython >= 3.10."""
    if hasattr(sys, "gettotalrefcount") or sysconfig.get_config_var("Py_GIL_DISABLED") \
            or sys.implementation.name != "cpython":
        return {}
    return {"bdist_wheel": {"py_limited_api": "cp310"}}


if __name__ == "__main__":
    setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"],
          cmdclass={"build_ext": OptionalBuildExt},
          options=wheel_options())
