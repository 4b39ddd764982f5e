#!/usr/bin/env bash
# End-to-end accept rate: Debian's postfix (a relay with its default fsync behaviour) and
# ternd, measured in one run on this machine with the same clients, and the ratio.
#
#   bench/e2e.sh [messages]          (as root; builds ternd first if needed)
#   BASE=/path/to/older/ternd bench/e2e.sh   also measures an older ternd build in the same
#                                            rounds (before/after comparisons)
#
# Table 1: postfix's smtp-source, 50 sessions, 2 KiB messages, one message per connection
#          (smtp-source's default), against: smtp-sink (the client's own ceiling, no disk),
#          postfix (relaying to smtp-sink), ternd (defaults), ternd with [tuning]
#          idle_poll_us = 0, ternd with pin_shards = false. ternd's CPU time per message
#          and each round's ratio to the ceiling measured right before and right after
#          it (the mean of the two adjacent smtp-sink runs) are printed beside the rates.
# Table 2: tern-load, 50 sessions, 2 KiB, 100 messages per connection, PIPELINING,
#          against postfix and ternd.
# Both servers acknowledge a message only after fsync (postfix: cleanup fsyncs the queue
# file; ternd: group-commit fdatasync). Spools are on the same disk (/var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
ROOT=$PWD
[ -x build/src/ternd ] || { tools/setup.sh; meson setup build -Dbuildtype=release >/dev/null; ninja -C build; }
W=$(mktemp -d /var/tmp/tern-bench.XXXXXX)
chmod 755 "$W"
cleanup() {
  postfix -c "$W/pf/etc" stop >/dev/null 2>&1 || true
  [ -n "${TERN_PID:-}" ] && kill "$TERN_PID" 2>/dev/null || true
  [ -n "${TERN2_PID:-}" ] && kill "$TERN2_PID" 2>/dev/null || true
  [ -n "${TERN3_PID:-}" ] && kill "$TERN3_PID" 2>/dev/null || true
  [ -n "${BASE_PID:-}" ] && kill "$BASE_PID" 2>/dev/null || true
  [ -n "${SINK_PID:-}" ] && kill "$SINK_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK=$(free_port); PF=$(free_port); TN=$(free_port)

# smtp-sink: where postfix relays to, and the client's own ceiling.
smtp-sink -c -u postfix 127.0.0.1:$SINK 1024 >/dev/null 2>&1 & SINK_PID=$!

# A private postfix instance (its own config, queue and data directories).
mkdir -p "$W/pf/etc" "$W/pf/queue" "$W/pf/data"
chown postfix:postfix "$W/pf/data"
cp /usr/share/postfix/master.cf.dist "$W/pf/etc/master.cf"
cat > "$W/pf/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $W/pf/queue
data_directory = $W/pf/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.test
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
smtp_tls_security_level = none
maillog_file = $W/pf/maillog
CF
postconf -c "$W/pf/etc" -M# smtp/inet >/dev/null
postconf -c "$W/pf/etc" -M "127.0.0.1:$PF/inet=127.0.0.1:$PF inet n - n - - smtpd"
postconf -c "$W/pf/etc" -M "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd"
postconf -c "$W/pf/etc" -F '*/*/chroot = n'
postfix -c "$W/pf/etc" check >/dev/null 2>&1 || true
postfix -c "$W/pf/etc" start >/dev/null 2>&1

# ternd on the same disk.
cat > "$W/tern.toml" <<CF
hostname = "bench.test"
[spool]
dir = "$W/tern-spool"
[[listen]]
address = "127.0.0.1:$TN"
[relay]
networks = ["127.0.0.0/8"]
CF
build/src/ternd --config "$W/tern.toml" 2>"$W/ternd.log" & TERN_PID=$!
# The same with [tuning] pin_shards = false, on its own port and spool.
TN2=$(free_port)
sed -e "s/127.0.0.1:$TN/127.0.0.1:$TN2/" -e "s#tern-spool#tern-spool2#" "$W/tern.toml" > "$W/tern2.toml"
printf '[tuning]\npin_shards = false\n' >> "$W/tern2.toml"
build/src/ternd --config "$W/tern2.toml" 2>"$W/ternd2.log" & TERN2_PID=$!
# The same with [tuning] idle_poll_us = 0 (the shards sleep at once, as before the idle
# poll): what the poll buys, in the same rounds.
TN3=$(free_port)
sed -e "s/127.0.0.1:$TN/127.0.0.1:$TN3/" -e "s#tern-spool#tern-spool3#" "$W/tern.toml" > "$W/tern3.toml"
printf '[tuning]\nidle_poll_us = 0\n' >> "$W/tern3.toml"
build/src/ternd --config "$W/tern3.toml" 2>"$W/ternd3.log" & TERN3_PID=$!
# An older build, when asked for, with the defaults on its own port and spool.
if [ -n "${BASE:-}" ]; then
  TNB=$(free_port)
  sed -e "s/127.0.0.1:$TN/127.0.0.1:$TNB/" -e "s#tern-spool#tern-spool-base#" "$W/tern.toml" > "$W/ternb.toml"
  "$BASE" --config "$W/ternb.toml" 2>"$W/ternd-base.log" & BASE_PID=$!
fi

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; return 1; }
wait_port $SINK; wait_port $PF; wait_port $TN; wait_port $TN2; wait_port $TN3
[ -n "${BASE:-}" ] && wait_port $TNB

# CPU time (user + system) of a process, in microseconds, from /proc/PID/stat.
cpu_us() { python3 -c "import os,sys; f=open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')',1)[1].split(); print((int(f[11])+int(f[12]))*1000000//os.sysconf('SC_CLK_TCK'))" "$1"; }
# rate_cpu PID command... -> "msg/s cpu_us_per_msg"
rate_cpu() {
  local pid=$1; shift
  local c0 c1 t0 t1
  c0=$(cpu_us "$pid"); t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); c1=$(cpu_us "$pid")
  python3 -c "print(f'{$N/($t1-$t0):.0f} {($c1-$c0)/$N:.0f}')"
}

rate() {  # command... -> msg/s (N / wall time)
  local t0 t1
  t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
  python3 -c "print(f'{$N/($t1-$t0):.0f}')"
}
ss_run() { smtp-source -s 50 -l 2048 -m "$N" -f bench@example.org -t sink@example.net 127.0.0.1:$1; }
tl_run() { build/tools/tern-load --port "$1" -s 50 -m "$N" -l 2048 -n 100 -p; }

pf_queue_empty() { [ -z "$(find "$W/pf/queue/incoming" "$W/pf/queue/active" "$W/pf/queue/deferred" "$W/pf/queue/maildrop" -type f 2>/dev/null | head -1)" ]; }

ROUNDS=${ROUNDS:-3}
median() { python3 -c "import statistics,sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.0f}')" "$@"; }
ratio() { python3 -c "print(f'{$1/$2:.1f}x')"; }
pct() { python3 -c "print(f'{100*$1/$2:.0f}')"; }

echo "tern e2e benchmark: $N messages of 2 KiB, 50 sessions, $(nproc) cores, $(uname -r)"
echo "each figure is the median of $ROUNDS rounds; the servers are measured in turn within each round"
echo
sink=(); pf=(); pf_e2e=(); tn=(); tn_np=(); pf2=(); tn2=(); tn2_np=(); tb=(); tn_cpu=(); tb_cpu=(); tn_pct=()
tn3=(); tn3_cpu=(); tn3_pct=(); adj=()
for r in $(seq "$ROUNDS"); do
  sink+=("$(rate ss_run $SINK)")
  t0=$(date +%s.%N); ss_run $PF >/dev/null 2>&1; t1=$(date +%s.%N)
  while ! pf_queue_empty; do sleep 0.2; done; t2=$(date +%s.%N)
  pf+=("$(python3 -c "print(f'{$N/($t1-$t0):.0f}')")"); pf_e2e+=("$(python3 -c "print(f'{$N/($t2-$t0):.0f}')")")
  # The ceiling drifts on a shared host within a minute (one run saw 2,912-5,417 msg/s), and
  # postfix's measurement takes about that long, so each ternd is compared with the mean of
  # the two smtp-sink runs right before and right after it.
  s_a=$(rate ss_run $SINK)
  read -r x c < <(rate_cpu $TERN_PID ss_run $TN); tn+=("$x"); tn_cpu+=("$c")
  s_b=$(rate ss_run $SINK)
  read -r x c < <(rate_cpu $TERN3_PID ss_run $TN3); tn3+=("$x"); tn3_cpu+=("$c")
  s_c=$(rate ss_run $SINK)
  tn_pct+=("$(pct ${tn[-1]} $(( (s_a + s_b) / 2 )))"); tn3_pct+=("$(pct ${tn3[-1]} $(( (s_b + s_c) / 2 )))")
  adj+=("$s_a/$s_b/$s_c")
  if [ -n "${BASE:-}" ]; then read -r x c < <(rate_cpu $BASE_PID ss_run $TNB); tb+=("$x"); tb_cpu+=("$c"); fi
  tn_np+=("$(rate ss_run $TN2)")
  pf2+=("$(rate tl_run $PF)")
  while ! pf_queue_empty; do sleep 0.2; done
  tn2+=("$(rate tl_run $TN)")
  tn2_np+=("$(rate tl_run $TN2)")
  echo "round $r: smtp-source sink=${sink[-1]} postfix=${pf[-1]} ternd=${tn[-1]} ($(ratio ${tn[-1]} ${pf[-1]}), ${tn_pct[-1]}% of the adjacent sink runs ${adj[-1]}) ternd-nopoll=${tn3[-1]} ($(ratio ${tn3[-1]} ${pf[-1]}), ${tn3_pct[-1]}%) ternd-unpinned=${tn_np[-1]} ($(ratio ${tn_np[-1]} ${pf[-1]}))${BASE:+ ternd-base=${tb[-1]} ($(ratio ${tb[-1]} ${pf[-1]}))} cpu/msg ternd=${tn_cpu[-1]}us nopoll=${tn3_cpu[-1]}us${BASE:+ base=${tb_cpu[-1]}us}; tern-load postfix=${pf2[-1]} ternd=${tn2[-1]} ($(ratio ${tn2[-1]} ${pf2[-1]})) ternd-unpinned=${tn2_np[-1]}"
done
S=$(median "${sink[@]}"); P=$(median "${pf[@]}"); PE=$(median "${pf_e2e[@]}"); T=$(median "${tn[@]}"); TU=$(median "${tn_np[@]}")
P2=$(median "${pf2[@]}"); T2=$(median "${tn2[@]}"); T2U=$(median "${tn2_np[@]}")
echo
printf '%-46s %10s\n' "smtp-source (1 msg/conn) into" "msg/s"
printf '%-46s %10s\n' "smtp-sink (client ceiling, no disk)" "$S"
printf '%-46s %10s   (end to end incl. relay: %s)\n' "postfix 3.7 (fsync, relays to smtp-sink)" "$P" "$PE"
printf '%-46s %10s   %s of postfix, %s%% of the ceiling\n' "ternd (defaults: one pinned shard per core)" "$T" "$(ratio $T $P)" "$((100 * T / S))"
printf '%-46s %10s   %s of postfix, %s%% of the ceiling\n' "ternd ([tuning] pin_shards = false)" "$TU" "$(ratio $TU $P)" "$((100 * TU / S))"
printf '%-46s %10s\n' "ternd CPU per message (user+system, us)" "$(median "${tn_cpu[@]}")"
T3=$(median "${tn3[@]}")
printf '%-46s %10s   %s of postfix, %s%% of the ceiling\n' "ternd ([tuning] idle_poll_us = 0)" "$T3" "$(ratio $T3 $P)" "$((100 * T3 / S))"
printf '%-46s %10s\n' "ternd idle_poll_us = 0 CPU per message (us)" "$(median "${tn3_cpu[@]}")"
echo "median of the per-round ratios to the adjacent sink runs: ternd $(median "${tn_pct[@]}")%, idle_poll_us = 0 $(median "${tn3_pct[@]}")%"
if [ -n "${BASE:-}" ]; then
  TB=$(median "${tb[@]}")
  printf '%-46s %10s   %s of postfix, %s%% of the ceiling\n' "ternd base ($BASE)" "$TB" "$(ratio $TB $P)" "$((100 * TB / S))"
  printf '%-46s %10s\n' "ternd base CPU per message (user+system, us)" "$(median "${tb_cpu[@]}")"
fi
echo
printf '%-46s %10s\n' "tern-load (100 msg/conn, PIPELINING) into" "msg/s"
printf '%-46s %10s\n' "postfix 3.7" "$P2"
printf '%-46s %10s   %s of postfix\n' "ternd (defaults)" "$T2" "$(ratio $T2 $P2)"
printf '%-46s %10s   %s of postfix\n' "ternd (pin_shards = false)" "$T2U" "$(ratio $T2U $P2)"
