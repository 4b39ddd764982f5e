#!/usr/bin/env bash
# Install everything tern needs to build, run and test, from Debian 12 packages only.
# Idempotent; run as root (CI and the README's commands do).
set -euo pipefail
cd "$(dirname "$0")/.."

# The version names the local wolfSSL build (below). On a fresh machine libwolfssl-dev is not
# installed yet: wolfssl_paths runs again after the install, or the source fetched would be
# "wolfssl=unknown".
wolfssl_paths() {
  wolfssl_version=$(dpkg-query -W -f='${Version}' libwolfssl-dev 2>/dev/null || echo unknown)
  wolfssl_hash=$(printf '%s %s' "$wolfssl_version" "$wolfssl_flags" | sha256sum | cut -c1-12)
  wolfssl_prefix=/opt/tern/wolfssl-${wolfssl_version//[^A-Za-z0-9.]/_}-$wolfssl_hash
}
# The features tern uses (TLS 1.3, tickets, SNI, groups, X25519/P-256, AEADs, name check,
# peer certificate kept, IP subjectAltNames matched for an IP-literal smarthost) plus the
# asm. --enable-nullcipher only so that the unit test can build a TLS13-SHA256-SHA256
# server and prove tern's client refuses it (Debian's build has it too); tern's cipher
# lists are always set explicitly (tls/context.cc).
wolfssl_flags="--enable-static --disable-shared --enable-tls13 --enable-session-ticket \
--enable-sni --enable-supportedcurves --enable-curve25519 --enable-ecc --enable-aesgcm \
--enable-chacha --enable-poly1305 --enable-aesni --enable-intelasm --enable-sp \
--enable-sp-asm --enable-harden --enable-nullcipher --enable-fpecc --disable-examples \
--disable-crypttests --disable-benchmark \
C_EXTRA_FLAGS='-DKEEP_PEER_CERT -DWOLFSSL_IP_ALT_NAME'"
wolfssl_paths
if [ "${1:-}" = "--wolfssl-pc-path" ]; then
  echo "$wolfssl_prefix/lib/pkgconfig"
  exit 0
fi

pkgs=(
  # build
  g++ meson ninja-build pkg-config clang libclang-rt-14-dev
  liburing-dev libwolfssl-dev libmimalloc-dev libdpdk-dev libtomlplusplus-dev
  libcli11-dev libfmt-dev libsystemd-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  # DNS for delivery (src/dns): c-ares, and dnsmasq as the real DNS server of its tests
  libc-ares-dev dnsmasq-base
  # real clients and peers for the integration tests and benchmarks
  python3 python3-pytest swaks libnet-ssleay-perl postfix haproxy keepalived iproute2 util-linux procps
  # the HA namespace lab (tests/integration/netns_lab.py): nft for VRRP blocking at the
  # lab switch, ping for its checks, stress-ng for the CPU hog of bench/failover.sh
  nftables iputils-ping stress-ng
  # dovecot's LMTP server: the mailbox next hop of tests/integration/test_delivery_peers.py,
  # which runs its own instance; the system's dovecot is never started (below)
  dovecot-core dovecot-lmtpd
  # the power-loss test's FUSE file system (tests/fuse): library to build, fusermount3 to run
  fuse3 libfuse3-dev
  # the local wolfSSL rebuild (below): Debian's own source package, built with its tools
  dpkg-dev autoconf automake libtool make openssl
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -ne 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tools/setup.sh: missing packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # postfix: installed for its tools (smtp-source, smtp-sink) and as the benchmark peer;
  # "No configuration" keeps the package from starting a system mailer on port 25.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  # No service starts during the install: a policy-rc.d that refuses every action (the
  # tests run private postfix and dovecot instances on free loopback ports; a system
  # dovecot would bind 110/143/993/995 and LMTP on every address). invoke-rc.d and
  # deb-systemd-invoke both ask it. A policy-rc.d already there (Docker's) is kept.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# tools/setup.sh: no service starts while tern installs packages\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  # ...nor at the next boot: dovecot's units are enabled by the package (dovecot.socket
  # listens on 143 and 993). Only when this run installed it, and only under systemd.
  if [[ " ${missing[*]} " == *" dovecot-core "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now dovecot.socket dovecot.service >/dev/null 2>&1 || true
  fi
fi

# wolfSSL, rebuilt from Debian's own source package. Debian's libwolfssl 5.5.4 is built
# without AES-NI, Intel asm and SP asm: AES-128-GCM runs at ~51 MB/s instead of ~700 MB/s
# (docs/benchmarks.md, "TLS"). We build the same source ONCE, static (the binaries need no
# rpath), into a prefix named by the version and a hash of the flags; meson finds it through
# pkg-config (`tools/setup.sh --wolfssl-pc-path` prints the directory for PKG_CONFIG_PATH).
# A failed rebuild fails this script loudly: CI must not silently use the slow library. A
# tree without the local build (plain `meson setup`) still builds against libwolfssl-dev.
wolfssl_paths
[ "$wolfssl_version" != unknown ] || { echo "tools/setup.sh: libwolfssl-dev is not installed" >&2; exit 1; }
if [ ! -f "$wolfssl_prefix/lib/pkgconfig/wolfssl.pc" ]; then
  fail() { echo "tools/setup.sh: FAILED to build wolfSSL with AES-NI into $wolfssl_prefix: $*" >&2; exit 1; }
  [ "$(id -u)" -eq 0 ] || fail "run as root"
  if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    # Source entries from the same mirrors as the binary ones (bookworm, -updates, -security).
    sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/tern-debian-src.sources || fail "no deb-src entry"
    apt-get update -qq || fail "apt-get update"
  fi
  src=$(mktemp -d /var/tmp/tern-wolfssl.XXXXXX)
  (cd "$src" && apt-get source -qq "wolfssl=$wolfssl_version") || fail "apt-get source wolfssl=$wolfssl_version"
  dir=$(find "$src" -maxdepth 1 -mindepth 1 -type d -name 'wolfssl-*' | head -1)
  [ -n "$dir" ] || fail "no source directory"
  # && throughout: set -e does not apply inside a subshell whose status is tested.
  (
    cd "$dir" &&
    { [ -x configure ] || ./autogen.sh; } &&
    eval "nice -n 10 ./configure --prefix=$wolfssl_prefix $wolfssl_flags" &&
    nice -n 10 make -j2 &&
    make install
  ) >"$src/build.log" 2>&1 || { tail -30 "$src/build.log" >&2; fail "see $src/build.log"; }
  # Refuse a build that lost the asm: the whole point of it.
  grep -q 'define WOLFSSL_AESNI' "$wolfssl_prefix/include/wolfssl/options.h" || fail "AES-NI missing"
  grep -q 'define WOLFSSL_SP_X86_64_ASM' "$wolfssl_prefix/include/wolfssl/options.h" || fail "SP asm missing"
  rm -rf "$src"
fi
