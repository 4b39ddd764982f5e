#!/usr/bin/env bash
# Install, build (release) and run ternd on its embedded default configuration:
# SMTP on 127.0.0.1:2525, relaying for 127.0.0.0/8 and ::1, spool under ./var/spool.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
# The wolfSSL that setup.sh built with AES-NI/asm (docs/dependencies.md).
[ -f build/build.ninja ] || meson setup build -Dbuildtype=release \
  -Dpkg_config_path="$(tools/setup.sh --wolfssl-pc-path)" >/dev/null
ninja -C build
exec build/src/ternd "$@"
