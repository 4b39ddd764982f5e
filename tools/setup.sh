#!/usr/bin/env bash
# Install everything tern needs to build, run and test, from Debian 12 packages only.
# Idempotent; run as root (CI and the README's commands do).
set -euo pipefail

pkgs=(
  # build
  g++ meson ninja-build pkg-config clang libclang-rt-14-dev
  liburing-dev libwolfssl-dev libmimalloc-dev libdpdk-dev libtomlplusplus-dev
  libcli11-dev libfmt-dev libsystemd-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  # DNS for delivery (src/dns): c-ares, and dnsmasq as the real DNS server of its tests
  libc-ares-dev dnsmasq-base
  # real clients and peers for the integration tests and benchmarks
  python3 python3-pytest swaks postfix haproxy keepalived iproute2 util-linux procps
  # the power-loss test's FUSE file system (tests/fuse): library to build, fusermount3 to run
  fuse3 libfuse3-dev
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tools/setup.sh: missing packages (${missing[*]}); run as root to install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# postfix: installed for its tools (smtp-source, smtp-sink) and as the benchmark peer;
# "No configuration" keeps the package from starting a system mailer on port 25.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
