// tern-load: an io_uring SMTP load generator. N concurrent sessions send M messages of a
// given size, several per connection, optionally PIPELINING (MAIL/RCPT/DATA in one write)
// and with a PROXY v1/v2 header first. Prints sent/accepted/rejected and msg/s.
// Single thread, one reactor (src/core/reactor.hh, the same loop as ternd's shards): the
// client's own cost stays small next to the server's.
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstring>
#include <deque>
#include <fmt/format.h>
#include <string>
#include <vector>

#include "net/address.hh"
#include "net/proxy.hh"
#include "src/core/reactor.hh"

using tern::net::address;
namespace core = tern::core;

namespace {

enum class expect : uint8_t { banner, ehlo, mail, rcpt, data, dot, rset, quit };
enum opk : unsigned { op_connect = 1, op_send, op_recv };

struct options {
  std::string host = "127.0.0.1";
  uint16_t port = 2525;
  unsigned sessions = 50;
  uint64_t messages = 10000;
  unsigned size = 2048;
  unsigned per_conn = 100;
  unsigned rcpts = 1;
  bool pipelining = false;
  std::string proxy;  // "", "v1", "v2"
  std::string from = "load@tern.test";
  std::string to = "sink@example.com";
  unsigned timeout = 120;
};

struct conn {
  int fd = -1;
  uint32_t gen = 0;
  bool send_inflight = false, recv_inflight = false, closing = false, broken = false;
  std::string rx, tx, txq;
  size_t rx_off = 0;
  char rbuf[16384];
  std::deque<expect> want;
  unsigned sent_here = 0;
  bool msg_failed = false;
  uint16_t sport = 0;
};

struct load final : core::completion_handler, core::loop_hooks {
  options o;
  core::reactor rx;
  core::timer deadline;
  bool timed_out = false;
  address dst;
  std::vector<conn> conns;
  std::string body;
  uint64_t budget = 0;  // messages not yet started
  uint64_t started = 0, accepted = 0, rejected = 0, errors = 0, connections = 0;
  unsigned open = 0;

  static uint64_t ud(unsigned op, uint32_t idx, uint32_t gen) { return core::ud::make(core::owner::user, op, idx, gen); }
  io_uring_sqe* sqe() { return rx.get_sqe(); }

  void make_body() {
    body = fmt::format("From: <{}>\r\nTo: <{}>\r\nSubject: tern-load\r\nMessage-ID: <load@tern.test>\r\n\r\n", o.from, o.to);
    while (body.size() + 80 <= o.size) body += std::string(76, 'x') + "\r\n";
    if (body.size() < o.size) body += std::string(o.size - body.size() > 2 ? o.size - body.size() - 2 : 0, 'y') + "\r\n";
    body += ".\r\n";
  }

  void send(uint32_t i, std::string_view s) {
    conn& c = conns[i];
    c.txq.append(s);
    flush(i);
  }
  void flush(uint32_t i) {
    conn& c = conns[i];
    if (c.send_inflight || c.txq.empty() || c.fd < 0) return;
    c.tx.swap(c.txq);
    c.txq.clear();
    auto* s = sqe();
    io_uring_prep_send(s, c.fd, c.tx.data(), c.tx.size(), MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, ud(op_send, i, c.gen));
    c.send_inflight = true;
  }
  void arm_recv(uint32_t i) {
    conn& c = conns[i];
    auto* s = sqe();
    io_uring_prep_recv(s, c.fd, c.rbuf, sizeof c.rbuf, 0);
    io_uring_sqe_set_data64(s, ud(op_recv, i, c.gen));
    c.recv_inflight = true;
  }

  void start_conn(uint32_t i) {
    conn& c = conns[i];
    if (budget == 0) return;
    c.fd = socket(dst.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c.gen++;
    c.rx.clear();
    c.rx_off = 0;
    c.tx.clear();
    c.txq.clear();
    c.want.clear();
    c.sent_here = 0;
    c.closing = c.broken = false;
    c.want.push_back(expect::banner);
    ++open;
    ++connections;
    auto* s = sqe();
    io_uring_prep_connect(s, c.fd, reinterpret_cast<const sockaddr*>(&dst.ss), dst.len);
    io_uring_sqe_set_data64(s, ud(op_connect, i, c.gen));
  }

  void close_conn(uint32_t i) {
    conn& c = conns[i];
    if (c.closing) return;
    c.closing = true;
    shutdown(c.fd, SHUT_RDWR);  // ends the pending recv
    maybe_reap(i);
  }
  void maybe_reap(uint32_t i) {
    conn& c = conns[i];
    if (!c.closing || c.send_inflight || c.recv_inflight || c.fd < 0) return;
    ::close(c.fd);
    c.fd = -1;
    --open;
    if (c.broken) ++errors;
    start_conn(i);
  }

  void next_message(uint32_t i) {
    conn& c = conns[i];
    if (budget == 0 || c.sent_here >= o.per_conn) {
      send(i, "QUIT\r\n");
      c.want.push_back(expect::quit);
      return;
    }
    --budget;
    ++started;
    ++c.sent_here;
    c.msg_failed = false;
    std::string cmd = fmt::format("MAIL FROM:<{}>\r\n", o.from);
    c.want.push_back(expect::mail);
    if (o.pipelining) {
      for (unsigned r = 0; r < o.rcpts; ++r) {
        cmd += fmt::format("RCPT TO:<{}>\r\n", o.to);
        c.want.push_back(expect::rcpt);
      }
      cmd += "DATA\r\n";
      c.want.push_back(expect::data);
    }
    send(i, cmd);
  }

  void on_reply(uint32_t i, int code) {
    conn& c = conns[i];
    if (c.want.empty()) {
      c.broken = true;
      close_conn(i);
      return;
    }
    expect e = c.want.front();
    c.want.pop_front();
    bool ok = code >= 200 && code < 400;
    switch (e) {
      case expect::banner:
        if (code != 220) {
          c.broken = true;
          close_conn(i);
          return;
        }
        send(i, "EHLO tern-load.test\r\n");
        c.want.push_back(expect::ehlo);
        return;
      case expect::ehlo:
        if (!ok) {
          c.broken = true;
          close_conn(i);
          return;
        }
        next_message(i);
        return;
      case expect::mail:
        if (!ok) c.msg_failed = true;
        if (!o.pipelining) {
          if (c.msg_failed) return end_failed(i);
          for (unsigned r = 0; r < o.rcpts; ++r) c.want.push_back(expect::rcpt);
          std::string cmd;
          for (unsigned r = 0; r < o.rcpts; ++r) cmd += fmt::format("RCPT TO:<{}>\r\n", o.to);
          // Without PIPELINING a client sends one RCPT at a time; with one rcpt this is it.
          send(i, cmd);
        }
        return;
      case expect::rcpt:
        if (!ok) c.msg_failed = true;
        if (!o.pipelining && (c.want.empty() || c.want.front() != expect::rcpt)) {
          if (c.msg_failed) return end_failed(i);
          send(i, "DATA\r\n");
          c.want.push_back(expect::data);
        }
        return;
      case expect::data:
        if (code != 354) {
          if (code == 421 || code == 554) {
            ++rejected;
            c.broken = code == 554;
            close_conn(i);
            return;
          }
          return end_failed(i);
        }
        send(i, body);
        c.want.push_back(expect::dot);
        return;
      case expect::dot:
        if (code == 250)
          ++accepted;
        else
          ++rejected;
        next_message(i);
        return;
      case expect::rset:
        next_message(i);
        return;
      case expect::quit:
        close_conn(i);
        return;
    }
  }

  void end_failed(uint32_t i) {
    conn& c = conns[i];
    ++rejected;
    c.want.clear();
    send(i, "RSET\r\n");
    c.want.push_back(expect::rset);
  }

  void on_data(uint32_t i, const char* p, size_t n) {
    conn& c = conns[i];
    c.rx.append(p, n);
    for (;;) {
      size_t lf = c.rx.find('\n', c.rx_off);
      if (lf == std::string::npos) break;
      std::string_view line(c.rx.data() + c.rx_off, lf - c.rx_off);
      c.rx_off = lf + 1;
      if (line.size() < 4) {
        if (line.size() >= 3) on_reply(i, atoi(std::string(line.substr(0, 3)).c_str()));
        continue;
      }
      if (line[3] == '-') continue;  // continuation of a multi-line reply
      on_reply(i, atoi(std::string(line.substr(0, 3)).c_str()));
      if (c.closing) break;
    }
    if (c.rx_off == c.rx.size()) {
      c.rx.clear();
      c.rx_off = 0;
    }
  }


  // core::completion_handler
  void on_completion(const io_uring_cqe& cqe) override {
    uint64_t d = cqe.user_data;
    uint32_t i = core::ud::index(d);
    if (i >= conns.size() || (conns[i].gen & 0xFFFFFF) != core::ud::gen(d)) return;
    conn& c = conns[i];
    int res = cqe.res;
    switch (core::ud::op(d)) {
      case op_connect:
        if (res < 0) {
          c.broken = true;
          c.closing = true;
          maybe_reap(i);
          break;
        }
        if (!o.proxy.empty()) {
          auto src = address::from_ip("198.18.0." + std::to_string(1 + i % 250), static_cast<uint16_t>(10000 + i));
          send(i, o.proxy == "v1" ? tern::net::encode_proxy_v1(*src, dst) : tern::net::encode_proxy_v2(*src, dst));
        }
        arm_recv(i);
        break;
      case op_send:
        c.send_inflight = false;
        if (res < 0) {
          c.broken = true;
          close_conn(i);
          maybe_reap(i);
          break;
        }
        if (static_cast<size_t>(res) < c.tx.size()) {  // short send: the rest first
          c.txq.insert(0, c.tx.substr(static_cast<size_t>(res)));
        }
        c.tx.clear();
        if (c.closing)
          maybe_reap(i);
        else
          flush(i);
        break;
      case op_recv:
        c.recv_inflight = false;
        if (res <= 0) {
          if (!c.closing && !c.want.empty() && c.want.front() != expect::quit) c.broken = true;
          close_conn(i);
          maybe_reap(i);
          break;
        }
        on_data(i, c.rbuf, static_cast<size_t>(res));
        if (c.closing)
          maybe_reap(i);
        else
          arm_recv(i);
        break;
      default:
        break;
    }
  }
  void on_timer(core::timer&) override { timed_out = true; }
  // core::loop_hooks
  bool keep_running() override { return open > 0 && !timed_out; }

  int run() {
    auto a = address::from_ip(o.host, o.port);
    if (!a) {
      fmt::print(stderr, "tern-load: --host must be an IP address (no DNS): {}\n", o.host);
      return 2;
    }
    dst = *a;
    make_body();
    budget = o.messages;
    conns.resize(o.sessions);
    core::reactor_options ro;
    ro.sq_entries = 4096;
    ro.cq_entries = 8192;
    ro.defer_taskrun = false;  // as before the reactor: a plain ring
    ro.required_ops = {{IORING_OP_CONNECT, "CONNECT"}, {IORING_OP_SEND, "SEND"}, {IORING_OP_RECV, "RECV"}};
    std::string err;
    if (!rx.init(ro, err)) {
      fmt::print(stderr, "tern-load: {}\n", err);
      return 2;
    }
    rx.set_handler(core::owner::user, this);
    timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    deadline.data = core::ud::make(core::owner::user, 0, 0, 0);
    rx.timers().arm(deadline, rx.now_ms() + uint64_t(o.timeout) * 1000);
    for (uint32_t i = 0; i < o.sessions; ++i) start_conn(i);
    rx.run(*this);
    if (timed_out) fmt::print(stderr, "tern-load: timeout after {} s\n", o.timeout);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = double(t1.tv_sec - t0.tv_sec) + double(t1.tv_nsec - t0.tv_nsec) / 1e9;
    fmt::print("sent={} accepted={} rejected={} errors={} connections={} elapsed={:.3f}s rate={:.0f} msg/s\n", started,
               accepted, rejected, errors, connections, secs, secs > 0 ? double(accepted) / secs : 0.0);
    return accepted == o.messages ? 0 : 1;
  }
};

}  // namespace

int main(int argc, char** argv) {
  load l;
  CLI::App app{"tern-load: SMTP load generator (io_uring)"};
  app.add_option("--host", l.o.host, "server IP address");
  app.add_option("--port", l.o.port, "server port");
  app.add_option("-s,--sessions", l.o.sessions, "concurrent sessions")->check(CLI::Range(1, 100000));
  app.add_option("-m,--messages", l.o.messages, "messages in total");
  app.add_option("-l,--size", l.o.size, "message size in bytes")->check(CLI::Range(64, 1 << 30));
  app.add_option("-n,--per-conn", l.o.per_conn, "messages per connection")->check(CLI::Range(1, 1 << 30));
  app.add_option("-r,--rcpts", l.o.rcpts, "recipients per message")->check(CLI::Range(1, 1000));
  app.add_flag("-p,--pipelining", l.o.pipelining, "send MAIL, RCPT and DATA in one write");
  app.add_option("--proxy", l.o.proxy, "send a PROXY header first: v1 or v2")->check(CLI::IsMember({"v1", "v2"}));
  app.add_option("--from", l.o.from, "envelope sender");
  app.add_option("--to", l.o.to, "envelope recipient");
  app.add_option("--timeout", l.o.timeout, "give up after this many seconds");
  CLI11_PARSE(app, argc, argv);
  return l.run();
}
