"""The package's public surface: the kernel fault codes against the C
header, the one exception tree."""
import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest

import xlegacy
from xlegacy import errors
from xlegacy.kernels import faults

HEADER = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "xlegacy.h"


def header_codes():
    if not HEADER.is_file():
        pytest.skip("needs the source tree (csrc/xlegacy.h)")
    text = HEADER.read_text().split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]
    return {name: int(value) for name, value in
            re.findall(r"^#define XL_(OK|E_\w+)\s+(-?\d+)", text, re.M)}


def test_fault_codes_match_the_c_header():
    codes = header_codes()
    assert len(codes) >= 12
    python = {name: value for name, value in vars(faults).items()
              if name.isupper() and isinstance(value, int)}
    assert python == {name.removeprefix("E_"): value for name, value in codes.items()}


def test_fault_codes_match_the_compiled_module():
    """The same through cffi: the built extension's XL_E_* constants."""
    light = pytest.importorskip("xlegacy.kernels._light")
    for name, value in header_codes().items():
        assert getattr(light.lib, "XL_" + name) == value
        assert getattr(faults, name.removeprefix("E_")) == value


@pytest.mark.parametrize("name", sorted(n for n in vars(faults)
                                        if n.isupper() and vars(faults)[n] < 0))
def test_every_fault_code_has_a_message(name):
    """raise_fault knows every code (an unknown one is a RuntimeError)."""
    code = getattr(faults, name)
    with pytest.raises(Exception) as info:
        faults.raise_fault(code, 1, 2, 3, 4)
    assert not isinstance(info.value, RuntimeError)
    assert isinstance(info.value, (errors.KernelFault, OSError, ValueError))


def _all_modules():
    names = ["xlegacy"]
    for info in pkgutil.walk_packages(xlegacy.__path__, "xlegacy."):
        if info.name != "xlegacy._ffi" and not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def test_one_exception_tree():
    """Every exception class xlegacy defines derives from XLegacyError (the
    warnings aside), wherever it is defined."""
    found = {}
    for name in _all_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:       # an optional dependency (volatility3)
            if (exc.name or "xlegacy").startswith("xlegacy"):
                raise
            continue
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) \
                    and obj.__module__.startswith("xlegacy"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    assert "xlegacy.errors.KernelFault" in found and "xlegacy.errors.V2Error" in found
    stray = [name for name, cls in found.items()
             if not issubclass(cls, (errors.XLegacyError, Warning))]
    assert stray == []


def test_kernel_and_v2_errors_keep_their_bases():
    from xlegacy import v2
    from xlegacy.kernels.faults import KernelFault
    assert KernelFault is errors.KernelFault and v2.V2Error is errors.V2Error
    assert issubclass(KernelFault, errors.StreamError)
    assert issubclass(errors.V2Error, ValueError)
    with pytest.raises(errors.V2Error, match="no libxc image header .* at offset 0"):
        v2.read_stream(b"\0" * 64)


PUBLIC = {"__version__", "BACKEND", "open", "LegacyStream", "restore", "restore_result",
          "Result", "convert", "verify", "export", "PageMap", "open_pagemap",
          "XLegacyError", "StreamError", "TruncatedStream", "CorruptCheckpoint",
          "AmbiguousStream", "ReadingMismatch", "UnsupportedStream", "KernelFault",
          "OutputError", "NativeBackendWarning"}
DEMO = pathlib.Path(xlegacy.__file__).parent / "data" / "demo.xlsave"


def test_public_names():
    assert set(xlegacy.__all__) == PUBLIC and len(xlegacy.__all__) == len(PUBLIC)
    for name in xlegacy.__all__:
        assert getattr(xlegacy, name) is not None
    assert PUBLIC <= set(dir(xlegacy))
    namespace = {}
    exec("from xlegacy import *", namespace)
    assert PUBLIC <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        xlegacy.nonexistent


def test_import_loads_no_command():
    """`import xlegacy` loads neither numpy nor the commands: they come on
    first use of their names."""
    import subprocess
    import sys
    code = ("import sys, xlegacy; "
            "print(sorted(m for m in sys.modules if m == 'numpy' "
            "or m.startswith(('xlegacy.converter', 'xlegacy.verifier', 'xlegacy.restorer', "
            "'xlegacy.outputs', 'xlegacy.stream', 'xlegacy.kernels'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_convert_verify_export_from_the_top_level(tmp_path):
    stats = xlegacy.convert(DEMO, tmp_path / "demo.v3")
    assert stats is not None and b"XENF" in (tmp_path / "demo.v3").read_bytes()[:4096]
    report = xlegacy.verify(DEMO)
    assert report["valid"] and report["errors"] == 0
    res = xlegacy.restore_result(DEMO)
    assert isinstance(res, xlegacy.Result)
    path = xlegacy.export("elf", res, res.image, tmp_path / "demo.elf")
    assert pathlib.Path(path).read_bytes()[:4] == b"\x7fELF"


def _public_functions():
    from xlegacy.stream import records
    yield from (xlegacy.open, xlegacy.restore, xlegacy.restore_result, xlegacy.convert,
                xlegacy.verify, xlegacy.export)
    for cls in (xlegacy.LegacyStream, xlegacy.Result):
        for name, member in vars(cls).items():
            if callable(member) and (not name.startswith("_") or name == "__init__"):
                yield member
    assert issubclass(records.PageBatch, records.Record)


@pytest.mark.parametrize("func", list(_public_functions()),
                         ids=lambda f: f.__qualname__)
def test_public_api_is_annotated(func):
    """Every parameter and the return value of the public entry points carry
    a type (the package ships py.typed)."""
    params = [p for p in inspect.signature(func).parameters.values()
              if p.name not in ("self", "cls")]
    missing = [p.name for p in params if p.name not in func.__annotations__]
    assert missing == [] and "return" in func.__annotations__, missing


def test_records_are_annotated_and_py_typed_ships():
    from xlegacy.stream import records
    for name in ("Wrapper", "ImageHeader", "PageBatch", "BatchRun", "Chunk", "EndOfBody",
                 "HVMTail", "QemuRecord", "PVTail", "CheckpointEnd"):
        cls = getattr(records, name)
        assert "offset" in cls._fields and set(cls._fields) <= set(
            k for klass in cls.__mro__ for k in vars(klass).get("__annotations__", {})), name
    assert (pathlib.Path(xlegacy.__file__).parent / "py.typed").is_file()
