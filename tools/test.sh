#!/usr/bin/env bash
# Install, build and run the whole test suite: unit (GoogleTest) and integration (pytest
# driving the real binaries with swaks, smtplib, smtp-source, haproxy), first on a release
# build, then again on a debug build under ASan+UBSan. Ends with "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh || exit 1

# The wolfSSL that setup.sh built with AES-NI/asm (docs/dependencies.md); meson finds it
# through pkg-config, and check_wolfssl below proves the binaries use it.
wolfssl_pc=$(tools/setup.sh --wolfssl-pc-path)
results=$(mktemp -d /tmp/tern-results.XXXXXX)
build_failures=0
py=/usr/bin/python3   # Debian's python, which has python3-pytest

build() {  # dir, meson options...
  local dir=$1; shift
  if [ ! -f "$dir/build.ninja" ]; then
    meson setup "$dir" -Dpkg_config_path="$wolfssl_pc" "$@" >"$results/setup-$(basename "$dir").log" 2>&1 || { cat "$results/setup-$(basename "$dir").log"; return 1; }
  else
    # A build dir made before the local wolfSSL existed: point it there (cheap if unchanged).
    meson configure "$dir" -Dpkg_config_path="$wolfssl_pc" >/dev/null || return 1
  fi
  ninja -C "$dir" >"$results/ninja-$(basename "$dir").log" 2>&1 || { tail -50 "$results/ninja-$(basename "$dir").log"; return 1; }
  check_wolfssl "$dir"
}

# Every built binary that contains wolfSSL must have the static AES-NI build, not Debian's
# shared library (AES-GCM 51 MB/s instead of ~700).
check_wolfssl() {  # dir
  local b
  for b in "$1"/src/ternd "$1"/tests/test_tls "$1"/bench/tls_bench; do
    [ -x "$b" ] || continue
    # Whole outputs into variables: `nm | grep -q` under pipefail fails when grep stops
    # reading early and nm gets SIGPIPE (which made this check fail at random).
    local libs syms
    libs=$(ldd "$b" 2>/dev/null || true)
    syms=$(nm "$b" 2>/dev/null || true)
    if grep -q 'libwolfssl\.so' <<<"$libs"; then
      echo "FAILED: $b uses the shared (slow) libwolfssl, not $wolfssl_pc"; return 1
    fi
    if grep -q ' T wolfSSL_new$' <<<"$syms" && ! grep -q 'AES_GCM_encrypt_avx' <<<"$syms"; then
      echo "FAILED: $b has a wolfSSL without AES-NI/AVX"; return 1
    fi
  done
}

run_suite() {  # dir, label
  local dir=$1 label=$2
  echo "== unit tests ($label)"
  for t in "$dir"/tests/test_*; do
    [ -f "$t" ] && [ -x "$t" ] || continue  # not the meson *.p object dirs
    local xml="$results/$label-$(basename "$t").xml" log="$results/$label-$(basename "$t").log"
    if ! "$t" --gtest_output="xml:$xml" >"$log" 2>&1; then
      echo "FAILED: $label $(basename "$t")"
      grep -E "Failure|FAILED|ERROR|runtime error" "$log" | head -20
      # A crash (sanitizer abort) leaves no XML: count it as a failure of its own.
      [ -f "$xml" ] || echo "$label $(basename "$t") crashed" >"$results/$label-$(basename "$t").crash"
    fi
  done
  echo "== integration tests ($label)"
  TERND="$PWD/$dir/src/ternd" TERN_BUILD="$PWD/$dir" TERN_VARIANT="$label" \
    $py -m pytest -q -p no:cacheprovider --junitxml="$results/$label-integration.xml" tests/integration \
    2>&1 | tail -25
  [ -f "$results/$label-integration.xml" ] || echo "pytest produced no report" >"$results/$label-integration.crash"
}

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if build build -Dbuildtype=release; then run_suite build release; else build_failures=$((build_failures+1)); fi
if build build-asan -Dbuildtype=debug -Db_sanitize=address,undefined -Db_lundef=false -Dbenchmarks=disabled; then
  run_suite build-asan asan
else
  build_failures=$((build_failures+1))
fi

echo "== fuzz smoke (libFuzzer, clang, ASan+UBSan)"
JUNIT_DIR="$results" tests/fuzz/run.sh "${TERN_FUZZ_SECONDS:-15}" \
  || ls "$results"/fuzz-*.xml >/dev/null 2>&1 || echo "fuzz targets did not build" >"$results/fuzz.crash"

$py - "$results" "$build_failures" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for f in glob.glob(sys.argv[1] + "/*.xml"):
    root = ET.parse(f).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
            elif case.find("skipped") is not None or case.get("result") == "skipped":
                skipped += 1
            else:
                passed += 1
failed += len(glob.glob(sys.argv[1] + "/*.crash"))  # crashed before writing a report
failed += int(sys.argv[2])  # a build that failed counts as a failure
print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
sys.exit(1 if failed or passed == 0 else 0)
PY
