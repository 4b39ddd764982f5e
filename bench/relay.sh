#!/usr/bin/env bash
# End-to-end relay rate over TLS: accepted, spooled with fsync, and delivered over
# STARTTLS to the same tern-sink, for ternd and Debian's postfix, in one run.
#
#   bench/relay.sh [messages]        (as root; ROUNDS=3 by default)
#
# Servers, each fed by postfix's smtp-source (50 sessions, 2 KiB, one message per
# connection) and relaying to one tern-sink with TLS (counting only):
#   postfix      smtp_tls_security_level = encrypt, otherwise Debian's defaults
#   postfix+reuse  the same with smtp_tls_connection_reuse = yes (tlsproxy): its best tuning
#   ternd        its defaults: tls = "verify" (chain and name checked), TLS 1.3
#   ternd-accept ternd without a smarthost: the accept rate alone, to show that delivering
#                does not slow accepting
# For each: "accept" = messages / time until smtp-source finished; "end to end" =
# messages / time until the sink counted them all. Medians of interleaved rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
ROUNDS=${ROUNDS:-3}
PC=$(tools/setup.sh --wolfssl-pc-path 2>/dev/null || true)
[ -x build/src/ternd ] && [ -x build/tools/tern-sink ] || {
  tools/setup.sh
  [ -f build/build.ninja ] || meson setup build -Dbuildtype=release ${PC:+-Dpkg_config_path="$PC"} >/dev/null
  ninja -C build
}
W=$(mktemp -d /var/tmp/tern-relay.XXXXXX)
chmod 755 "$W"
PIDS=()
cleanup() {
  for p in pf pf2; do postfix -c "$W/$p/etc" stop >/dev/null 2>&1 || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; return 1; }

# PKI: a CA and a certificate for the sink (name sink.test, address 127.0.0.1).
mkdir -p "$W/pki" && cd "$W/pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 \
  -subj "/CN=tern bench CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout sink.key -out sink.csr \
  -subj "/CN=sink.test" 2>/dev/null
printf 'subjectAltName=DNS:sink.test,IP:127.0.0.1\n' > sink.ext
openssl x509 -req -in sink.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out sink.pem -days 2 -extfile sink.ext 2>/dev/null
chmod 644 ./*
cd - >/dev/null

SINK=$(free_port)
build/tools/tern-sink --listen 127.0.0.1:$SINK --tls-cert "$W/pki/sink.pem" --tls-key "$W/pki/sink.key" \
  >"$W/sink.out" 2>"$W/sink.err" & SINK_PID=$!; PIDS+=($SINK_PID)
wait_port $SINK
sink_count() {  # messages the sink has accepted so far
  local before; before=$(grep -c "stats:" "$W/sink.err" || true)
  kill -USR1 $SINK_PID
  for _ in $(seq 200); do [ "$(grep -c "stats:" "$W/sink.err" || true)" -gt "$before" ] && break; sleep 0.01; done
  grep "stats:" "$W/sink.err" | tail -1 | sed -n 's/.* messages=\([0-9]*\).*/\1/p'
}

# Two private postfix instances: TLS encrypt with defaults, and with connection reuse.
make_postfix() {  # name port reuse
  local d="$W/$1"
  mkdir -p "$d/etc" "$d/queue" "$d/data"
  chown postfix:postfix "$d/data"
  cp /usr/share/postfix/master.cf.dist "$d/etc/master.cf"
  cat > "$d/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
myhostname = $1.bench.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relayhost = [127.0.0.1]:$SINK
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtp_tls_security_level = encrypt
smtp_tls_CAfile = $W/pki/ca.pem
smtp_tls_connection_reuse = $3
maillog_file = $d/maillog
CF
  postconf -c "$d/etc" -M# smtp/inet >/dev/null
  postconf -c "$d/etc" -M "127.0.0.1:$2/inet=127.0.0.1:$2 inet n - n - - smtpd"
  postconf -c "$d/etc" -M "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd"
  postconf -c "$d/etc" -M "tlsproxy/unix=tlsproxy unix - - n - 0 tlsproxy"
  postconf -c "$d/etc" -F '*/*/chroot = n'
  postfix -c "$d/etc" check >/dev/null 2>&1 || true
  postfix -c "$d/etc" start >/dev/null 2>&1
}
PF=$(free_port); PF2=$(free_port)
make_postfix pf $PF no
make_postfix pf2 $PF2 yes

make_ternd() {  # name port with-smarthost
  cat > "$W/$1.toml" <<CF
hostname = "$1.bench.test"
[spool]
dir = "$W/$1-spool"
[[listen]]
address = "127.0.0.1:$2"
[relay]
networks = ["127.0.0.0/8"]
CF
  if [ "$3" = yes ]; then
    cat >> "$W/$1.toml" <<CF
[[smarthost]]
host = "127.0.0.1"
port = $SINK
tls = "verify"
ca_file = "$W/pki/ca.pem"
verify_name = "sink.test"
CF
  fi
  build/src/ternd --config "$W/$1.toml" 2>"$W/$1.log" & PIDS+=($!)
}
TN=$(free_port); TA=$(free_port)
make_ternd ternd $TN yes
make_ternd accept $TA no
for p in $PF $PF2 $TN $TA; do wait_port $p; done

pf_queue_empty() {
  [ -z "$(find "$W/$1/queue/incoming" "$W/$1/queue/active" "$W/$1/queue/deferred" "$W/$1/queue/maildrop" -type f 2>/dev/null | head -1)" ]
}
ss_run() { smtp-source -s 50 -l 2048 -m "$N" -f bench@example.org -t sink@example.net 127.0.0.1:$1 >/dev/null 2>&1; }
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$N/($2-$1):.0f}')"; }

# measure NAME PORT KIND -> "accept e2e"
measure() {
  local name=$1 port=$2 kind=$3 c0 t0 t1 t2
  c0=$(sink_count)
  t0=$(now); ss_run "$port"; t1=$(now)
  if [ "$kind" = accept ]; then echo "$(rate $t0 $t1) -"; return; fi
  for _ in $(seq 6000); do
    [ "$(( $(sink_count) - c0 ))" -ge "$N" ] && break
    sleep 0.05
  done
  if [ "$kind" = postfix ]; then while ! pf_queue_empty "$name"; do sleep 0.1; done; fi
  t2=$(now)
  echo "$(rate $t0 $t1) $(rate $t0 $t2)"
}

median() { python3 -c "import statistics,sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.0f}')" "$@"; }
ratio() { python3 -c "print(f'{$1/$2:.1f}x')"; }
echo "tern relay benchmark: $N messages of 2 KiB, smtp-source -s 50 (one message per connection), $(nproc) cores, $(uname -r)"
echo "relaying over STARTTLS to one tern-sink; medians of $ROUNDS interleaved rounds"
pa=(); pe=(); p2a=(); p2e=(); ta=(); te=(); aa=()
for r in $(seq "$ROUNDS"); do
  read -r a e < <(measure pf $PF postfix); pa+=("$a"); pe+=("$e")
  read -r a e < <(measure pf2 $PF2 postfix); p2a+=("$a"); p2e+=("$e")
  read -r a e < <(measure ternd $TN ternd); ta+=("$a"); te+=("$e")
  read -r a e < <(measure accept $TA accept); aa+=("$a")
  echo "round $r: postfix ${pa[-1]}/${pe[-1]}  postfix+reuse ${p2a[-1]}/${p2e[-1]}  ternd ${ta[-1]}/${te[-1]}  ternd accept-only ${aa[-1]}  (accept/end-to-end msg/s)"
done
PA=$(median "${pa[@]}"); PE=$(median "${pe[@]}"); P2A=$(median "${p2a[@]}"); P2E=$(median "${p2e[@]}")
TA_=$(median "${ta[@]}"); TE=$(median "${te[@]}"); AA=$(median "${aa[@]}")
echo
printf '%-42s %10s %12s\n' "" "accept" "end to end"
printf '%-42s %10s %12s\n' "postfix 3.7, TLS encrypt" "$PA" "$PE"
printf '%-42s %10s %12s\n' "postfix 3.7, TLS encrypt + connection reuse" "$P2A" "$P2E"
printf '%-42s %10s %12s   %s of postfix+reuse end to end\n' "ternd, TLS verify" "$TA_" "$TE" "$(ratio "$TE" "$P2E")"
printf '%-42s %10s %12s   (delivering changes the accept rate by %s)\n' "ternd, accept only (no smarthost)" "$AA" "-" \
  "$(python3 -c "print(f'{100*($TA_-$AA)/$AA:+.0f}%')")"
grep -h "TLS connection established" "$W/ternd.log" | head -1 | sed 's/^/ternd: /' || true
grep -c "(resumed)" "$W/ternd.log" | sed 's/^/ternd TLS resumptions logged: /' || true
