#!/usr/bin/env bash
# Build xlegacy with AddressSanitizer + UndefinedBehaviorSanitizer in a
# throwaway venv (from a copy of this tree, non-editable) and run the test
# suite against that build.  Any sanitizer report fails the run, including
# one from a subprocess a test started.
#
#   bash .ci/sanitize.sh [extra pytest arguments]
#
# Needs gcc with libasan/libubsan (Debian: gcc, libasan8, libubsan1) and
# network access to PyPI for the venv's packages.  Environment:
#   SANITIZE_PYTHON   interpreter for the venv (default: python3)
#   SANITIZE_KEEP=1   keep the temporary directory (venv, build log, reports)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${SANITIZE_PYTHON:-python3}
cc=${CC:-gcc}
work=$(mktemp -d "${TMPDIR:-/tmp}/xlegacy-sanitize.XXXXXX")
cleanup() { [ "${SANITIZE_KEEP:-0}" = 1 ] && echo "sanitize: kept $work" || rm -rf "$work"; }
trap cleanup EXIT

libasan=$("$cc" -print-file-name=libasan.so)
if [ ! -f "$libasan" ]; then
    echo "sanitize: $cc has no libasan.so (apt-get install gcc libasan8 libubsan1)" >&2
    exit 1
fi

# 1. A copy of the working tree (tracked + untracked, not ignored files), so
#    no build output lands in the repository and a stale in-tree extension
#    cannot be picked up.
mkdir -p "$work/src" "$work/reports"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
        | tar --null -T - -cf -) | tar -C "$work/src" -xf -
else
    (cd "$repo" && tar --exclude=.git --exclude='*.so' --exclude=build -cf - .) \
        | tar -C "$work/src" -xf -
fi

# 2. The venv and the sanitized, non-editable build.
"$python" -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install -q --disable-pip-version-check 'setuptools>=77' wheel cffi numpy \
    pytest hypothesis pytest-benchmark
flags="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
echo "sanitize: building xlegacy with $cc $flags"
if ! (cd "$work/src" && CC="$cc" XLEGACY_CFLAGS="$flags" \
        XLEGACY_LDFLAGS="-fsanitize=address,undefined" XLEGACY_REQUIRE_NATIVE=1 \
        "$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps . \
        >"$work/build.log" 2>&1); then
    cat "$work/build.log" >&2
    exit 1
fi
# (find the module without importing the package: that would load libasan late)
so=$("$py" -c "import glob, importlib.util as u, os; \
d = u.find_spec('xlegacy').submodule_search_locations[0]; \
print((glob.glob(os.path.join(d, '_ffi*.so')) + [''])[0])")
if ! ldd "$so" | grep -q libasan; then
    echo "sanitize: $so is not linked against libasan: the flags did not reach the build" >&2
    exit 1
fi

# 3. The suite, against the installed build (run from the repository so the
#    tests find ../shared/samples; src/ is not on sys.path).
export LD_PRELOAD=$libasan
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:exitcode=86:log_path=$work/reports/asan:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/reports/ubsan"
export PYTHONMALLOC=malloc          # Python objects too go through ASan's allocator
export XLEGACY_SANITIZE=1           # tests skip RSS bounds (ASan's shadow and quarantine)
export XLEGACY_BACKEND=native
unset PYTHONPATH
cd "$repo"
"$py" -c "import xlegacy, sys; f = xlegacy.__file__; \
sys.exit(0 if f.startswith('$work/venv') and xlegacy.BACKEND == 'native' else \
'sanitize: tests would import ' + f + ' (' + xlegacy.BACKEND + ')')"
# Canary: a deliberate heap overflow through the C boundary (the kernel is
# told the image has 2 pages, it has 1) must be caught, or ASan is not active.
mkdir -p "$work/canary"
set +e
ASAN_OPTIONS="detect_leaks=0:exitcode=86:log_path=$work/canary/asan" "$py" -c "
from xlegacy.kernels._native import ffi, lib
img = ffi.new('uint8_t[]', 4096)
lib.xl_scatter_pages(bytes(4096), 1, ffi.new('uint64_t[]', [1]), img, 2, ffi.NULL)
" 2>/dev/null
canary=$?
set -e
if [ "$canary" -eq 0 ] || ! grep -qs "ERROR: AddressSanitizer" "$work"/canary/asan.*; then
    echo "sanitize: ASan did not catch the canary overflow (exit $canary): not sanitized" >&2
    exit 1
fi
echo "sanitize: canary overflow caught (ASan is active)"

set +e
"$py" -m pytest -p no:cacheprovider -q -o addopts="" -ra "$@"   # testpaths: tests
rc=$?
set -e

# 4. Reports written by any process (the test run, or a subprocess it started).
#    allocator_may_return_null=1 makes ASan log a WARNING for each refused
#    huge allocation (tests ask for some on purpose, expecting MemoryError);
#    those are shown but only errors fail the run.
reports=$(find "$work/reports" -type f | sort)
bad=0
for r in $reports; do
    if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: " "$r"; then
        bad=1
        echo "=== sanitizer report $r" >&2
        cat "$r" >&2
    else
        echo "sanitize: warnings only in $(basename "$r"): $(sort -u "$r" | head -3 | tr '\n' ' ')"
    fi
done
if [ "$bad" -ne 0 ]; then
    echo "sanitize: FAILED: sanitizer errors reported (see above)" >&2
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    echo "sanitize: pytest failed (exit $rc)" >&2
    exit "$rc"
fi
echo "sanitize: no sanitizer reports"
