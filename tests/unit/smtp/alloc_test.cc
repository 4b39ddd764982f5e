// The steady-state per-message path does not allocate: after a warm-up (buffers reach
// their working size), whole pipelined transactions through the session, the per-message
// log line and the spool writer's group commit make no heap allocation at all.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <string>

#include "spool/scan.hh"
#include "spool/writer.hh"
#include "src/core/log.hh"
#include "src/smtp/session.hh"
#include "tests/unit/common/tmpdir.hh"

#include "tests/unit/common/alloc_counter.hh"

using namespace tern;

namespace {

struct host : smtp::session_host {
  spool::writer* w = nullptr;
  void new_queue_id(char (&out)[smtp::queue_id_len + 1]) override { w->next_id(out); }
  bool spool_healthy() const override { return true; }
  uint64_t wall_us() const override { return 1'700'000'000'000'000ull; }
};

// Keep the log lines (the per-message line is part of the path) but out of the test output.
struct quiet_stderr {
  int saved = dup(2);
  quiet_stderr() {
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    close(devnull);
  }
  ~quiet_stderr() {
    dup2(saved, 2);
    close(saved);
  }
};

}  // namespace

TEST(Allocations, SteadyStateMessagePathAllocatesNothing) {
  tmpdir t;
  std::string err;
  ASSERT_TRUE(spool::ensure_spool_dirs(t.path, err));
  spool::writer w;
  spool::writer::options o;
  o.dir = t.path;
  o.prezero = false;  // a rollover to a zeroed spare is not the steady state
  ASSERT_TRUE(w.open(o, err)) << err;
  io_uring ring;
  ASSERT_EQ(io_uring_queue_init(64, &ring, 0), 0);

  smtp::policy pol;
  pol.hostname = "relay.test";
  pol.relay_networks.push_back(*net::cidr::parse("127.0.0.0/8"));
  host h;
  h.w = &w;
  smtp::session s;
  smtp::conn_info ci;
  ci.client = ci.peer = *net::address::from_ip("127.0.0.1", 40000);
  s.reset(&pol, &h, ci);
  s.start();
  std::string out;
  s.take_output(out);
  std::string ehlo = "EHLO mail-gateway-01.clients.example.org\r\n";  // longer than SSO
  s.feed(ehlo.data(), ehlo.size());
  s.process();
  s.take_output(out);

  std::string cmds = "MAIL FROM:<sender@example.org> SIZE=3000\r\nRCPT TO:<rcpt@example.net> NOTIFY=FAILURE\r\nDATA\r\n";
  std::string body = "Subject: alloc\r\n\r\n";
  while (body.size() < 2048) body += std::string(76, 'x') + "\r\n";
  body += "..dot\r\n.\r\n";
  std::vector<spool::writer::result> results;
  results.reserve(16);

  quiet_stderr q;
  log::buffer_this_thread(true);
  auto one = [&] {
    s.feed(cmds.data(), cmds.size());
    s.process();
    s.feed(body.data(), body.size());
    s.process();
    if (!s.want_commit()) return false;
    auto rec = s.record();
    w.append(rec.data(), rec.size(), 7);
    if (!w.flush(&ring, 0xF0, results)) return false;
    io_uring_submit(&ring);
    while (!w.idle()) {
      io_uring_cqe* cqe;
      // Submit what the writer queued from its completions too (as the reactor's loop does).
      if (io_uring_submit_and_wait(&ring, 1) < 0 || io_uring_peek_cqe(&ring, &cqe) != 0) return false;
      uint64_t d = cqe->user_data;
      int res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
      w.on_cqe(static_cast<unsigned>(d & 0xF), res, results);
    }
    bool ok = results.size() == 1 && results[0].ok;
    results.clear();
    s.commit_done(ok);
    s.take_output(out);
    log::flush();
    return ok && out.find("250 2.0.0 Ok: queued as") != std::string::npos;
  };
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(one());  // warm-up: buffers grow to size
  long before = allocations.load();
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(one());
  long during = allocations.load() - before;
  log::buffer_this_thread(false);
  EXPECT_EQ(during, 0) << "heap allocations in 100 steady-state messages";
  io_uring_queue_exit(&ring);
}
