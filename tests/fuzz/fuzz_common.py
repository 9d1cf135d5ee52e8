"""Shared pieces of the atheris harnesses (tests/fuzz/fuzz_*.py).

Every harness is differential: it runs the native kernels and their
reference twins (or two kinds of source) on the same input and fails when
they disagree in any way an API user could see: result arrays, exception
class, fault code, index, offset, message, and what was written to the
image.  Any exception outside the documented ones is a crash as well.

The harnesses also run without atheris (`python fuzz_x.py --replay FILE...`)
so a crash file can be reproduced under plain pytest or a debugger.
"""
import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


from support.differential import (ARG_ERRORS, Mismatch, check_same, describe, outcome,  # noqa: E402
                          same)

__all__ = ["ARG_ERRORS", "Mismatch", "check_same", "describe", "outcome", "same", "digest",
           "replay_main", "fuzz_main", "import_core"]


# The package imports its modules lazily; atheris instruments only what is
# imported inside instrument_imports(), so the harnesses import these there.
CORE_MODULES = ("kernels._light", "errors", "kernels.faults", "format", "kernels._args", "kernels",
                "kernels._native", "kernels._reference", "stream.source", "stream.wrappers",
                "stream.infer", "stream.records", "stream.reader", "restorer", "image",
                "stream.metadata")


def import_core():
    """Import xlegacy and its core modules (those that exist in this version)."""
    import importlib
    import importlib.util
    pkg = importlib.import_module("xlegacy")
    for name in CORE_MODULES:
        full = f"xlegacy.{name}"
        try:
            if importlib.util.find_spec(full) is not None:
                importlib.import_module(full)
        except ImportError:
            pass
    return pkg


def digest(arr):
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def replay_main(test_one_input, argv):
    """`--replay FILE...`: run inputs once without atheris; exit 1 on failure."""
    files = argv[argv.index("--replay") + 1:]
    bad = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            test_one_input(data)
        except Exception as exc:  # noqa: BLE001
            bad += 1
            print(f"{path}: {type(exc).__name__}: {exc}")
    print(f"replayed {len(files)} inputs, {bad} failed")
    return 1 if bad else 0


def fuzz_main(test_one_input, make_seeds, instrument=True):
    """Entry point shared by the harnesses.

    --make-seeds DIR   write the seed corpus and exit
    --replay FILE...   run inputs without atheris
    anything else      libFuzzer arguments (corpus dirs, -max_total_time=...)
    """
    argv = list(sys.argv)
    if "--make-seeds" in argv:
        out = argv[argv.index("--make-seeds") + 1]
        os.makedirs(out, exist_ok=True)
        n = 0
        for name, data in make_seeds():
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
            n += 1
        print(f"wrote {n} seeds to {out}")
        return 0
    if "--replay" in argv:
        return replay_main(test_one_input, argv)
    import atheris
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


def load_instrumented(*names):
    """(atheris or None, numpy, the named xlegacy modules...): the package is
    imported under atheris's instrumentation when atheris is installed, and
    plainly otherwise (so --replay works without it)."""
    import importlib
    try:
        import atheris
    except ImportError:
        atheris = None

    def load():
        import_core()
        np = importlib.import_module("numpy")
        return [np] + [importlib.import_module(f"xlegacy.{n}") if n != "xlegacy"
                       else importlib.import_module("xlegacy") for n in names]

    if atheris is not None:
        with atheris.instrument_imports(include=["xlegacy"]):
            mods = load()
    else:
        mods = load()
    return (atheris, *mods)
