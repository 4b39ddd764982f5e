#!/usr/bin/env bash
# Install, build (release) and run ternd on its embedded default configuration: SMTP on
# 127.0.0.1:2525, relaying for 127.0.0.0/8 and ::1, spool under ./var/spool, delivering to
# a local tern-sink on 127.0.0.1:2526 over TLS 1.3 (certificate verified). This script
# makes the sink's certificate and a CA at first start (var/tls/), starts the sink (it
# saves what it receives in var/sink/ and logs one line per message), then ternd in the
# foreground; Ctrl-C stops both.
#
#   swaks --server 127.0.0.1:2525 --to someone@example.com    # then: ls var/sink/
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
# The wolfSSL that setup.sh built with AES-NI/asm (docs/dependencies.md).
[ -f build/build.ninja ] || meson setup build -Dbuildtype=release \
  -Dpkg_config_path="$(tools/setup.sh --wolfssl-pc-path)" >/dev/null
ninja -C build
mkdir -p var/tls var/sink
if [ ! -f var/tls/sink.pem ]; then
  echo "run-relay: making a demo CA and a certificate for localhost in var/tls/"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout var/tls/ca.key \
    -out var/tls/ca.pem -days 3650 -subj "/CN=tern demo CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout var/tls/sink.key \
    -out var/tls/sink.csr -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > var/tls/sink.ext
  openssl x509 -req -in var/tls/sink.csr -CA var/tls/ca.pem -CAkey var/tls/ca.key -CAcreateserial \
    -out var/tls/sink.pem -days 3650 -extfile var/tls/sink.ext 2>/dev/null
  chmod 600 var/tls/*.key
fi
build/tools/tern-sink --listen 127.0.0.1:2526 --tls-cert var/tls/sink.pem --tls-key var/tls/sink.key \
  --save var/sink --log &
SINK_PID=$!
trap 'kill $SINK_PID 2>/dev/null; wait $SINK_PID 2>/dev/null' EXIT
build/src/ternd "$@"
