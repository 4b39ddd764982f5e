// ternd: parse arguments, load configuration, recover the spool, start the shards, wait
// for a signal. Everything else lives in the libraries (src/server, src/smtp, spool, net).
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <systemd/sd-daemon.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>

#include <CLI/CLI.hpp>
#include <cstring>
#include <chrono>
#include <cstdio>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include "net/socket.hh"
#include "spool/recovery.hh"
#include "spool/scan.hh"
#include "src/config/config.hh"
#include "src/core/log.hh"
#include "src/server/ha.hh"
#include "src/server/shard.hh"
#include "src/dns/resolver.hh"
#include "tls/context.hh"
#include "tern_build.hh"

#if __has_include(<mimalloc.h>) && !defined(__SANITIZE_ADDRESS__)
#include <mimalloc.h>
#define TERN_MIMALLOC 1
#endif

using namespace tern;

namespace {

uint64_t mono_us() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000 + uint64_t(ts.tv_nsec) / 1000;
}

int run(const config::config& cfg) {
  uint64_t t0 = mono_us();
  log::set_level(cfg.log_level == "debug" ? log::level::debug
                 : cfg.log_level == "warning" ? log::level::warning
                 : cfg.log_level == "error" ? log::level::error
                                            : log::level::info);
  for (const auto& w : cfg.warnings) log::warn("config: {}", w);
  // One fd per session slot plus listeners and spool, per shard.
  unsigned ncpu = std::max(1u, std::thread::hardware_concurrency());
  unsigned nshards = cfg.shards ? cfg.shards : ncpu;
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rlim_t want = rlim_t(nshards) * config::fds_per_shard(cfg) + 256;
  if (rl.rlim_cur < want) {
    rl.rlim_cur = std::min(want, rl.rlim_max);
    setrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < want) {
      // Refused at start rather than failing accepts with EMFILE under load.
      log::error("{}: limits.connections: {} shard(s) x {} connections need {} file descriptors, but "
                 "RLIMIT_NOFILE allows {} (raise LimitNOFILE= / ulimit -n, or lower limits.connections)",
                 cfg.source, nshards, cfg.limits.connections, want, rl.rlim_cur);
      return 1;
    }
  }

  {
    std::string terr;
    if (!tls::library_init(terr)) {
      log::error("TLS: {}", terr);
      return 1;
    }
  }
  // Recovery first: nothing is accepted until the queue is rebuilt.
  std::vector<spool::queued_message> queue;
  spool::recovery_report rep;
  std::string err;
  if (!spool::ensure_spool_dirs(cfg.spool.dir, err)) {
    log::error("spool.dir: {}", err);
    return 1;
  }
  // One ternd per spool: the lock is held (fd kept open) for the life of the process.
  if (spool::lock_spool(cfg.spool.dir, err) < 0) {
    log::error("{}", err);
    return 1;
  }
  if (!spool::recover_spool(cfg.spool.dir, true, queue, rep, err)) {
    log::error("spool recovery failed: {}", err);
    return 1;
  }
  for (auto& n : rep.notes) log::warn("spool recovery: {}", n);
  log::info("spool recovery: {} segment(s), {} message record(s), {} done, {} queued, {} torn byte(s) truncated, "
            "{} corrupt byte(s) quarantined, {} empty segment(s) removed, {} pre-zeroed byte(s) trimmed",
            rep.segments, rep.messages, rep.done, queue.size(), rep.torn_bytes, rep.quarantined_bytes,
            rep.segments_removed, rep.unused_bytes);

  // Listening sockets: one per shard per listener; port 0 is resolved once, then shared.
  std::vector<std::vector<int>> fds(nshards);
  std::vector<net::address> bound;
  for (const auto& L : cfg.listen) {
    net::address a = L.address;
    // A listener on a virtual address binds before the address arrives (VRRP backup).
    bool freebind = false;
    if (cfg.ha.enabled && a.family() == AF_INET)
      for (const auto& v : cfg.ha.virtual_addresses)
        freebind = freebind || memcmp(&reinterpret_cast<const sockaddr_in&>(a.ss).sin_addr, v.bytes.data(), 4) == 0;
    for (unsigned s = 0; s < nshards; ++s) {
      int fd = net::open_listener(a, static_cast<int>(cfg.tuning.listen_backlog), err, freebind);
      if (fd < 0) {
        log::error("listen: {}", err);
        return 1;
      }
      if (s == 0) a = net::local_address(fd);
      fds[s].push_back(fd);
    }
    bound.push_back(a);
  }

  // Signals go to this thread only (sigwait below); shard threads inherit the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGHUP);
  sigaddset(&sigs, SIGUSR1);
  sigaddset(&sigs, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);

  // The recovered queue goes to the shards: each segment to the shard that wrote it, or,
  // for a shard index that no longer exists (fewer shards than before), to index mod
  // shards, so nothing is orphaned. A shard owns whole segment chains, so its oldest-first
  // reclamation order stays safe (spool/recovery.hh).
  auto owner_of = [&](const std::string& path) -> unsigned {
    auto dash = path.rfind('-'), dot = path.rfind(".seg");
    unsigned sh = 0;
    if (dash != std::string::npos && dot != std::string::npos && dot > dash + 1)
      sh = static_cast<unsigned>(strtoul(path.substr(dash + 1, dot - dash - 1).c_str(), nullptr, 10));
    return sh % nshards;
  };
  std::vector<std::vector<spool::queued_message>> per_shard(nshards);
  std::vector<std::vector<std::string>> kept(nshards);
  for (auto& q : queue) per_shard[owner_of(q.segment)].push_back(std::move(q));
  for (auto& k : rep.kept_segments) kept[owner_of(k)].push_back(k);
  queue.clear();
  // One resolver thread for the process, only when some next hop is a name.
  std::unique_ptr<dns::resolver> resolver;
  bool names = false;
  for (const auto& h : cfg.smarthosts) names = names || !h.host_is_ip;
  for (const auto& r : cfg.routes) names = names || !r.hop.host_is_ip;
  if (names) {
    dns::options o;
    o.servers = cfg.dns.servers;
    o.use_hosts = cfg.dns.use_hosts;
    o.query_timeout = std::chrono::milliseconds(cfg.dns.timeout_ms);
    o.tries = cfg.dns.tries;
    resolver = std::make_unique<dns::resolver>();
    std::string derr;
    if (!resolver->start(o, derr)) {
      log::error("dns: {}", derr);
      return 1;
    }
  }
  std::vector<std::unique_ptr<server::shard>> shards;
  std::vector<std::thread> threads;
  std::vector<std::promise<std::string>> ready(nshards);
  for (unsigned s = 0; s < nshards; ++s) {
    server::shard_setup su;
    su.index = s;
    su.cpu = cfg.tuning.pin_shards ? static_cast<int>(s % ncpu) : -1;
    su.cfg = &cfg;
    su.listen_fds = fds[s];
    su.epoch_floor_ms = rep.max_epoch_ms;
    su.segment_floor_id = rep.max_segment_id;
    su.recovered = std::move(per_shard[s]);
    su.kept_segments = std::move(kept[s]);
    su.resolver = resolver.get();
    shards.push_back(std::make_unique<server::shard>(std::move(su)));
  }
  for (unsigned s = 0; s < nshards; ++s) {
    threads.emplace_back([&, s] {
      char name[16];
      snprintf(name, sizeof name, "tern-shard%u", s);
      pthread_setname_np(pthread_self(), name);
      std::string e;
      if (!shards[s]->init(e)) {
        ready[s].set_value(e);
        return;
      }
      ready[s].set_value("");
      shards[s]->run();
      tls::thread_cleanup();  // the thread's ECC fixed-point cache
    });
  }
  // Any shard that cannot start ends the daemon with one clear error and a clean exit: the
  // shards that did start are stopped, every thread is joined, nothing crashes.
  bool failed = false;
  unsigned nfailed = 0;
  std::string first_err;
  unsigned first_shard = 0;
  for (unsigned s = 0; s < nshards; ++s) {
    auto e = ready[s].get_future().get();
    if (!e.empty()) {
      if (!failed) {
        first_err = e;
        first_shard = s;
      }
      failed = true;
      ++nfailed;
    }
  }
  if (failed)
    log::error("cannot start: shard {}: {}{}", first_shard, first_err,
               nfailed > 1 ? fmt::format(" (and {} other shard(s))", nfailed - 1) : std::string());
  // HA starts once every shard runs: a node never claims the address before it can serve
  // it. Health: any shard whose spool is unwritable or whose loop has stopped turning.
  server::ha_service ha;
  if (!failed && cfg.ha.enabled) {
    const uint64_t hb_timeout = cfg.ha.heartbeat_timeout_ms;
    auto health = [&shards, hb_timeout](ha::millis) -> std::string {
      uint64_t now = mono_us() / 1000;
      for (size_t s = 0; s < shards.size(); ++s) {
        if (!shards[s]->counters().spool_healthy.load(std::memory_order_relaxed))
          return fmt::format("shard {}: spool writes failing", s);
        const auto* lc = shards[s]->loop_counters();
        uint64_t hb = lc ? lc->heartbeat_ms.load(std::memory_order_relaxed) : 0;
        // Stable text: the runner logs each change of reason, not each check.
        if (hb && now > hb + hb_timeout)
          return fmt::format("shard {}: stuck (no loop iteration for over {} ms)", s, hb_timeout);
      }
      return {};
    };
    std::string herr;
    if (!ha.start(cfg.ha, health, herr)) {
      log::error("cannot start: {}: {}", cfg.source, herr);
      failed = true;
    }
  }
  if (!failed) {
    std::string where;
    for (auto& b : bound) where += (where.empty() ? "" : ", ") + b.to_string();
    log::info("ternd {} started in {} ms: {} shard(s), listening on {}, spool {}, hostname {}{}", TERN_VERSION,
              (mono_us() - t0) / 1000, nshards, where, cfg.spool.dir, cfg.hostname,
#ifdef TERN_MIMALLOC
              fmt::format(", mimalloc {}", mi_version())
#else
              ""
#endif
    );
    sd_notify(0, "READY=1");
    // Watch the shards' heartbeats while waiting for a signal: a loop that has not turned
    // for stuck_ms is reported (HA will use the same signal to give up mastership).
    constexpr uint64_t stuck_ms = 10000;
    std::vector<uint64_t> reported(nshards, 0);
    for (;;) {
      timespec wait{1, 0};
      int sig = sigtimedwait(&sigs, nullptr, &wait);
      if (sig < 0) {
        uint64_t now = mono_us() / 1000;
        for (unsigned s = 0; s < nshards; ++s) {
          const auto* lc = shards[s]->loop_counters();
          uint64_t hb = lc ? lc->heartbeat_ms.load(std::memory_order_relaxed) : 0;
          if (hb && now > hb + stuck_ms && reported[s] != hb) {
            log::error("shard {}: no loop iteration for {} ms: the shard is stuck", s, now - hb);
            reported[s] = hb;
          }
        }
        continue;
      }
      if (sig == SIGHUP) {
        log::warn("SIGHUP: configuration reload is not implemented yet; restart to apply changes");
        continue;
      }
      if (sig == SIGPIPE) continue;
      if (sig == SIGUSR1) {  // each shard logs its counters, asked through its inbox
        if (ha.running()) log::info("{}", ha.summary());
        for (auto& sh : shards)
          if (!sh->post_log_stats_ok()) log::warn("a shard's inbox is full: stats request dropped");
        continue;
      }
      log::info("signal {}: stopping", sig == SIGTERM ? "TERM" : "INT");
      sd_notify(0, "STOPPING=1");
      break;
    }
  }
  for (auto& sh : shards) sh->request_stop();
  if (ha.running()) {
    // Handover order: stop accepting (each shard closes its listeners as it begins to
    // stop), then resign with a priority-0 advert so the backup takes over after its skew
    // alone, then drain. Bounded: a stuck shard must not keep the address here.
    uint64_t until = mono_us() + 200000;
    for (auto& sh : shards)
      while (sh->counters().accepting.load(std::memory_order_acquire) && mono_us() < until) usleep(200);
    ha.stop();
    log::info("{}", ha.summary());
  }
  for (auto& t : threads) t.join();
  uint64_t msgs = 0, conns = 0, sent = 0, left = 0;
  for (auto& sh : shards) {
    msgs += sh->counters().messages.load();
    conns += sh->counters().connections.load();
    if (auto* d = sh->deliveries()) {
      sent += d->counters().delivered;
      left += d->queued();
    }
  }
  if (!failed)
    log::info("ternd stopped: {} connection(s), {} message(s) queued in this run, {} recipient(s) delivered, "
              "{} message(s) left in the queue",
              conns, msgs, sent, left);
  if (resolver) resolver->stop();  // answers still in flight go to inboxes nobody reads
  shards.clear();
  tls::library_cleanup();
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef TERN_MIMALLOC
  // Give freed memory back to the kernel at once rather than after mimalloc's delay: the
  // memory a burst of large messages used must not stay resident (docs/architecture.md,
  // "Memory bounds"). The environment (MIMALLOC_DECOMMIT_DELAY=...) still wins.
  if (!getenv("MIMALLOC_DECOMMIT_DELAY")) mi_option_set(mi_option_decommit_delay, 0);
  if (!getenv("MIMALLOC_SEGMENT_DECOMMIT_DELAY")) mi_option_set(mi_option_segment_decommit_delay, 0);
#endif
  CLI::App app{"ternd: SMTP relay (thread-per-core, io_uring, durable spool)"};
  std::string config_path, check_path;
  bool version = false;
  app.add_option("-c,--config", config_path, "configuration file (TOML); without it the embedded default");
  app.add_option("--check-config", check_path, "validate a configuration file and exit");
  app.add_flag("-V,--version", version, "print the version and exit");
  bool print_default = false;
  app.add_flag("--print-default-config", print_default, "print the embedded default configuration");
  CLI11_PARSE(app, argc, argv);
  if (version) {
    printf("ternd %s\n", TERN_VERSION);
    return 0;
  }
  if (print_default) {
    fputs(config::embedded_default, stdout);
    return 0;
  }
  std::string err;
  if (!check_path.empty()) {
    auto c = config::load_file(check_path, err);
    if (!c) {
      fprintf(stderr, "%s\n", err.c_str());
      return 1;
    }
    for (const auto& w : c->warnings) fprintf(stderr, "%s: warning: %s\n", check_path.c_str(), w.c_str());
    printf("%s: configuration OK\n", check_path.c_str());
    return 0;
  }
  auto cfg = config_path.empty() ? config::load_string(config::embedded_default, "(embedded default)", err)
                                 : config::load_file(config_path, err);
  if (!cfg) {
    fprintf(stderr, "ternd: %s\n", err.c_str());
    return 1;
  }
  return run(*cfg);
}
