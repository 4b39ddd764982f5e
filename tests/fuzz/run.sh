#!/usr/bin/env bash
# Build the libFuzzer targets with clang (ASan+UBSan) and run each for a while on its seed
# corpus. Usage: tests/fuzz/run.sh [seconds per target]   (default 20)
# Exit status non-zero if a target finds a crash (the reproducer is left in the work dir).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-20}
out=${FUZZ_OUT:-build-fuzz}
mkdir -p "$out"
CXX="clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I. -I$out -D_GNU_SOURCE"
printf '#pragma once\n#define TERN_VERSION "fuzz"\n#define TERN_HAVE_DPDK 0\n' > "$out/tern_build.hh"
common="src/core/crc32c.cc src/core/log.cc net/address.cc net/proxy.cc spool/record.cc"
$CXX -o "$out/proxy_fuzz" tests/fuzz/proxy_fuzz.cc $common -lfmt
$CXX -o "$out/record_fuzz" tests/fuzz/record_fuzz.cc $common spool/scan.cc -lfmt
$CXX -o "$out/session_fuzz" tests/fuzz/session_fuzz.cc $common src/smtp/command.cc src/smtp/data.cc src/smtp/session.cc -lfmt
$CXX -o "$out/client_fuzz" tests/fuzz/client_fuzz.cc src/smtp/client.cc src/smtp/command.cc
$CXX -o "$out/dsn_fuzz" tests/fuzz/dsn_fuzz.cc src/queue/dsn.cc
$CXX -o "$out/frame_fuzz" tests/fuzz/frame_fuzz.cc ha/frames.cc ha/packet.cc
rc=0
for t in proxy record session client dsn frame; do
  work="$out/corpus-$t"
  mkdir -p "$work"
  cp -n tests/fuzz/corpus/$t/* "$work"/ 2>/dev/null || true
  echo "== fuzz $t for ${secs}s"
  ok=1
  (cd "$out" && ./${t}_fuzz -max_total_time="$secs" -max_len=4096 -print_final_stats=1 "corpus-$t" >"fuzz-$t.log" 2>&1) || ok=0
  grep -E "stat::(number_of_executed_units|new_units_added)" "$out/fuzz-$t.log" || true
  if [ $ok = 0 ]; then rc=1; grep -E "ERROR|SUMMARY|Test unit written" "$out/fuzz-$t.log" | head; fi
  # JUnit report for tools/test.sh's totals.
  if [ -n "${JUNIT_DIR:-}" ]; then
    fail=""; [ $ok = 1 ] || fail="<failure message=\"crash found; see $out/fuzz-$t.log\"/>"
    echo "<testsuite name=\"fuzz\"><testcase classname=\"fuzz\" name=\"${t}_fuzz_${secs}s\">$fail</testcase></testsuite>" \
      > "$JUNIT_DIR/fuzz-$t.xml"
  fi
done
exit $rc
