#!/usr/bin/env bash
# Run the atheris harnesses for a time budget.
#
#   bash tests/fuzz/run.sh SECONDS [delta|pfn|stream ...]
#
# SECONDS is the total budget, split evenly between the harnesses (all three
# by default), run one after the other.  The package is installed
# (non-editable) from a copy of this tree into a fuzzing venv.  With clang
# the C kernels are built with libFuzzer coverage and AddressSanitizer +
# UBSan (atheris's asan_with_fuzzer.so is preloaded).  Without clang they are
# built plainly with gcc and only the Python code is coverage-guided: gcc's
# libasan would take over libFuzzer's coverage hooks (atheris warns of
# "broken Python code coverage") and abort on the first uncaught exception;
# memory errors in the kernels are the sanitizer run's job (.ci/sanitize.sh).
# Seed corpora are generated at run time.
#
# Environment:
#   FUZZ_VENV     venv to (re)use (default: $TMPDIR/xlegacy-fuzz-venv)
#   FUZZ_CORPUS   keep the growing corpora here (default: a temporary dir)
#   FUZZ_ARTIFACTS  where crash inputs go (default: a temporary dir, kept
#                   and printed when something was found)
#   FUZZ_CC       compiler: clang-NN / clang / gcc (default: best available)
#   FUZZ_ARGS     extra libFuzzer arguments (e.g. -max_len=32768)
# Exit status: 0 when no harness found anything, 1 otherwise.
set -euo pipefail

budget=${1:?usage: run.sh SECONDS [delta|pfn|stream ...]}
shift
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(delta pfn stream)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/xlegacy-fuzz.XXXXXX")
venv=${FUZZ_VENV:-${TMPDIR:-/tmp}/xlegacy-fuzz-venv}
corpus_root=${FUZZ_CORPUS:-$tmp/corpus}
artifacts=${FUZZ_ARTIFACTS:-$tmp/artifacts}
keep_tmp=0
cleanup() { [ "$keep_tmp" = 1 ] || rm -rf "$tmp"; }
trap cleanup EXIT
mkdir -p "$corpus_root" "$artifacts"

# ------------------------------------------------------------------ venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py=$venv/bin/python
# setuptools >= 77 reads the SPDX `license = "MIT"` of pyproject.toml; a new
# venv comes with an older one, which "import setuptools" would accept.
if ! "$py" -c "import atheris, numpy, cffi, wheel, setuptools, sys; \
sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
    "$py" -m pip install -q --disable-pip-version-check atheris numpy cffi 'setuptools>=77' wheel
fi
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

cc=${FUZZ_CC:-}
if [ -z "$cc" ]; then
    for c in clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14 gcc; do
        if command -v "$c" >/dev/null 2>&1; then cc=$c; break; fi
    done
fi
case "$cc" in
    clang*)
        flags="-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
        ldflags="-fsanitize=fuzzer-no-link,address,undefined"
        preload=$site/asan_with_fuzzer.so ;;
    *)
        flags="-O1 -g -fno-omit-frame-pointer"
        ldflags=""
        preload="" ;;
esac
if [ -n "$preload" ] && [ ! -f "$preload" ]; then
    echo "fuzz: sanitizer runtime $preload not found" >&2
    exit 1
fi

src=$tmp/src
mkdir -p "$src"
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
        | tar --null -T - -cf -) | tar -C "$src" -xf -
else
    (cd "$repo" && tar --exclude=.git --exclude='*.so' --exclude=build -cf - .) | tar -C "$src" -xf -
fi
echo "fuzz: building xlegacy with $cc ($flags)"
(cd "$src" && CC=$cc LDSHARED="$cc -shared" XLEGACY_CFLAGS="$flags" XLEGACY_LDFLAGS="$ldflags" \
    "$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
    --force-reinstall . >"$tmp/build.log" 2>&1) || { cat "$tmp/build.log"; exit 1; }

if [ -n "$preload" ]; then
    export LD_PRELOAD=$preload
else
    echo "fuzz: no clang: C kernels unsanitized, coverage of the Python code only"
fi
export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:handle_abort=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
[ -z "$preload" ] || export PYTHONMALLOC=malloc
"$py" -c "import xlegacy, sys; assert xlegacy.BACKEND == 'native', xlegacy.BACKEND; \
assert '$venv' in xlegacy.__file__, xlegacy.__file__" || { echo "fuzz: wrong xlegacy" >&2; exit 1; }

# ------------------------------------------------------------------ fuzz
per=$(( budget / ${#harnesses[@]} ))
[ "$per" -ge 1 ] || per=1
status=0
total=0
for h in "${harnesses[@]}"; do
    harness=$here/fuzz_$h.py
    [ -f "$harness" ] || { echo "fuzz: no harness $harness" >&2; exit 2; }
    corpus=$corpus_root/$h
    seeds=$tmp/seeds-$h
    mkdir -p "$corpus"
    "$py" "$harness" --make-seeds "$seeds" >/dev/null 2>&1
    log=$tmp/$h.log
    set +e
    # shellcheck disable=SC2086
    "$py" "$harness" -max_total_time="$per" -timeout=30 -rss_limit_mb=4096 \
        -print_final_stats=1 -artifact_prefix="$artifacts/$h-" ${FUZZ_ARGS:-} \
        "$corpus" "$seeds" >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    execs=${execs:-0}
    total=$(( total + execs ))
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
    found=$(ls "$artifacts" 2>/dev/null | grep -c "^$h-" || true)
    echo "fuzz_$h: $execs executions in ${per}s, ${cov:-no coverage line}, exit $rc, $found finding(s)"
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        status=1
        keep_tmp=1
        tail -n 60 "$log"
        for f in "$artifacts/$h-"*; do
            [ -e "$f" ] || continue
            echo "--- $f ($(wc -c <"$f") bytes); replay: $py $harness --replay $f"
            head -c 512 "$f" | od -An -tx1 | head -n 8
        done
    fi
done
echo "fuzz: $total executions in all"
if [ "$status" -ne 0 ]; then
    echo "fuzz: findings kept in $artifacts, logs in $tmp" >&2
fi
exit $status
