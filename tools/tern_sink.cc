// tern-sink: a fast SMTP/LMTP sink on tern's reactor (src/core/reactor.hh). The next hop in
// tern's delivery tests and benchmarks, and a tool for operators: it accepts (or, by rule,
// defers and refuses) what it is sent, counts it, and optionally saves each message with
// its envelope so that a test can compare bytes.
//
// One reactor per thread (--threads N, each with its own SO_REUSEPORT listener); the main
// thread only waits for signals and prints the counters. Per connection: a slot from a
// fixed slot_table, multishot receive into the reactor's provided-buffer ring, one send
// in flight, one lazily re-armed idle timer. Every byte passes through a net::transport:
// the plain one, or after STARTTLS (or from the first byte with --tls-wrapper) a new
// tls::transport (tls/transport.hh) from the thread's server tls::context. One ticket key
// for the whole process lets a client resume on any thread.
//
// Trusts: its command line (rules, limits, the save directory, the certificate and key
// files) and the local file system.
// Does not trust: anything a client sends. Command lines are parsed by smtp::parse_command,
// parse_mail and parse_rcpt (bounded, validated); DATA is decoded by smtp::dot_decoder
// (the end only at CRLF.CRLF); lines, messages, recipients, input and unsent output are
// bounded by named options; envelope fields are sanitised before they are logged or saved.
//
// Steady state allocates nothing per command: every per-connection buffer is reused (its
// capacity trimmed only when a connection ends), replies are appended to the connection's
// output buffer, rules are matched in place (one NUL-terminated scratch buffer per thread).
#include <fcntl.h>
#include <fnmatch.h>
#include <liburing.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "net/address.hh"
#include "net/socket.hh"
#include "net/transport.hh"
#include "src/core/reactor.hh"
#include "src/smtp/command.hh"
#include "src/smtp/data.hh"
#include "tls/context.hh"
#include "tls/transport.hh"

// Rule zero, broken on purpose: tls/ keeps wolfSSL behind its own interface and has no
// maximum-version option (tern itself must never cap TLS). The sink needs a TLS 1.2-only
// mode to show a client refusing 1.2, so it alone reaches the native context
// (see cap_at_tls12 below). Nothing else of wolfSSL is used here.
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

namespace core = tern::core;
namespace net = tern::net;
namespace smtp = tern::smtp;
namespace tls = tern::tls;

namespace {

// ---- options and rules ------------------------------------------------------------------

// A reply rule: "PATTERN=CODE TEXT" (glob, fnmatch, case-insensitive) or "P:CODE TEXT"
// (that percentage of the cases, drawn from the thread's seeded generator).
struct rule {
  std::string pattern;  // empty for a percent rule
  double percent = -1;  // < 0 for a pattern rule
  std::string reply;    // "451 4.3.0 try again later\r\n"
  int code = 250;
};

struct options {
  std::vector<std::string> listen{"127.0.0.1:2525"};
  unsigned threads = 1;                  // reactors, one per thread
  bool lmtp = false;
  std::string hostname = "tern-sink.invalid";
  std::string greeting;                  // "CODE TEXT": a non-2xx refuses the session
  uint64_t size = 100u << 20;            // --size: advertised and enforced message size
  uint32_t connections = 1024;           // --connections: slots per thread
  uint32_t line_length = 4096;           // --line-length: longest command line
  uint32_t max_rcpts = 1000;             // --max-rcpts: recipients per message
  uint32_t timeout = 300;                // --timeout: idle seconds (and send progress)
  uint32_t output_buffer = 256 * 1024;   // --output-buffer: unsent replies before reading stops
  // --input-buffer: unprocessed input before a close. Reading stops when output backs up,
  // but a multishot receive can deliver up to a ring's worth (recv_buffers x size) before
  // its cancel lands: the default leaves room for that.
  uint32_t input_buffer = 8u << 20;
  uint32_t recv_buffers = 256;           // --recv-buffers: provided buffers per thread
  uint32_t recv_buffer_size = 16384;     // --recv-buffer-size
  uint32_t buffer_keep = 64 * 1024;      // capacity a freed slot keeps per buffer
  uint32_t max_errors = 20;              // --max-errors: bad commands before 421 and close
  uint64_t max_messages = 0;             // --max-messages: exit after that many (0: never)
  uint64_t seed = 1;
  bool pipelining = true, eightbit = true, smtputf8 = true, dsn = true;
  std::string save_dir;
  bool fsync = false;
  bool log = false;
  std::vector<rule> rcpt_rules, data_rules, lmtp_rules;
  // TLS: a certificate and key (both or neither) make STARTTLS available.
  std::string tls_cert, tls_key;          // --tls-cert, --tls-key (PEM)
  std::string tls_min_version = "1.2";    // --tls-min-version: 1.2 so a test can show a client refusing 1.2
  std::string tls_max_version = "1.3";    // --tls-max-version: 1.2 makes a TLS 1.2-only sink
  bool starttls = true;                   // --no-starttls: not advertised even with a certificate
  bool tls_wrapper = false;               // --tls-wrapper: TLS from the first byte (like port 465)
};

bool parse_reply(std::string_view s, rule& r, std::string& err) {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  if (s.size() < 3 || s[0] < '2' || s[0] > '5' || !isdigit(uint8_t(s[1])) || !isdigit(uint8_t(s[2])) ||
      (s.size() > 3 && s[3] != ' ')) {
    err = fmt::format("reply must be 'CODE TEXT' with a 2xx-5xx code: '{}'", s);
    return false;
  }
  for (char c : s)
    if (uint8_t(c) < 0x20 || c == 0x7F) {
      err = "reply contains a control character";
      return false;
    }
  r.code = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
  r.reply.assign(s);
  if (s.size() == 3) r.reply += ' ';
  r.reply += "\r\n";
  return true;
}

// "PATTERN=CODE TEXT": the first '=' followed by three digits and a space or the end.
bool parse_pattern_rule(std::string_view s, rule& r, std::string& err) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '=') continue;
    auto rest = s.substr(i + 1);
    if (rest.size() >= 3 && isdigit(uint8_t(rest[0])) && isdigit(uint8_t(rest[1])) && isdigit(uint8_t(rest[2])) &&
        (rest.size() == 3 || rest[3] == ' ')) {
      r.pattern.assign(s.substr(0, i));
      return parse_reply(rest, r, err);
    }
  }
  err = fmt::format("rule must be 'PATTERN=CODE TEXT': '{}'", s);
  return false;
}

bool parse_percent_rule(std::string_view s, rule& r, std::string& err) {
  auto colon = s.find(':');
  if (colon == s.npos) {
    err = fmt::format("rule must be 'PERCENT:CODE TEXT': '{}'", s);
    return false;
  }
  std::string p(s.substr(0, colon));
  char* end = nullptr;
  double v = strtod(p.c_str(), &end);
  if (p.empty() || *end != '\0' || !(v >= 0 && v <= 100)) {
    err = fmt::format("percent must be a number from 0 to 100: '{}'", s);
    return false;
  }
  r.percent = v;
  return parse_reply(s.substr(colon + 1), r, err);
}

// ---- TLS --------------------------------------------------------------------------------

// Caps a server context at TLS 1.2 (--tls-max-version 1.2). This wolfSSL build has no
// OPENSSL_EXTRA, so wolfSSL_CTX_set_max_proto_version does not exist; the option mask
// WOLFSSL_OP_NO_TLSv1_3 is what its supported_versions parser honours (the test
// test_tls12_only_sink_negotiates_12_and_refuses_13 shows it does).
bool cap_at_tls12(tls::context& ctx) {
  long m = wolfSSL_CTX_set_options(ctx.native(), WOLFSSL_OP_NO_TLSv1_3);
  return (m & WOLFSSL_OP_NO_TLSv1_3) != 0;
}

// One server context for the calling thread (contexts and their transports belong to one
// thread). The same options on every thread; the ticket key is the process's.
std::unique_ptr<tls::context> make_server_context(const options& o, std::shared_ptr<const tls::ticket_key> key,
                                                  std::string& err) {
  tls::context_options co;
  co.side = tls::role::server;
  if (!tls::parse_version(o.tls_min_version, co.min_version)) {
    err = "--tls-min-version must be 1.2 or 1.3: " + o.tls_min_version;
    return nullptr;
  }
  co.cert_file = o.tls_cert;
  co.key_file = o.tls_key;
  co.ca_file.clear();  // a server does not verify clients
  co.session_tickets = true;
  co.tickets = std::move(key);
  auto ctx = tls::context::create(co, err);
  if (ctx && o.tls_max_version == "1.2" && !cap_at_tls12(*ctx)) {
    err = "tls: this wolfSSL cannot cap a context at TLS 1.2";
    return nullptr;
  }
  return ctx;
}

// ---- counters ---------------------------------------------------------------------------

// Written by one worker thread with relaxed stores, read by the main thread.
struct alignas(64) counters {
  std::atomic<uint64_t> connections{0}, refused_full{0}, messages{0}, messages_refused{0};
  std::atomic<uint64_t> rcpts_accepted{0}, rcpts_refused{0}, bytes{0}, timeouts{0}, output_paused{0};
  std::atomic<uint64_t> first_ms{0}, last_ms{0};  // first connection, last message (monotonic)
  // TLS: completed handshakes, of those resumed from a ticket, and handshakes that did not
  // complete (a TLS error such as garbage instead of a ClientHello, or the client leaving).
  std::atomic<uint64_t> tls_handshakes{0}, tls_resumed{0}, tls_failed{0};
};
inline void bump(std::atomic<uint64_t>& a, uint64_t n = 1) {
  a.store(a.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

struct global {
  options o;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> messages{0};  // all threads, for --max-messages
  uint64_t start_ms = 0;
  bool tls_available = false;  // a certificate is loaded (STARTTLS or --tls-wrapper)
  std::shared_ptr<const tls::ticket_key> tickets;  // one for all threads' contexts
  rule greeting;  // --greeting, parsed once
  std::string ehlo_reply;      // precomputed capabilities (after the first line), plaintext
  std::string ehlo_reply_tls;  // the same inside TLS: no STARTTLS (RFC 3207 4.2)
};

// Untrusted bytes for a log line or a saved header: printable ASCII and UTF-8 stay, the rest
// becomes '?'.
void append_sanitised(std::string& out, std::string_view s) {
  for (char c : s) out += (uint8_t(c) < 0x20 || c == 0x7F) ? '?' : c;
}

bool iequal_prefix(std::string_view s, std::string_view p) {
  if (s.size() < p.size()) return false;
  for (size_t i = 0; i < p.size(); ++i)
    if (tolower(uint8_t(s[i])) != tolower(uint8_t(p[i]))) return false;
  return true;
}

// What follows the <path> of "FROM:<...> params" (the raw parameters, spaces trimmed).
std::string_view params_after_path(std::string_view arg) {
  size_t i = arg.find('<');
  if (i == arg.npos) return {};
  bool quoted = false;
  for (++i; i < arg.size(); ++i) {
    char c = arg[i];
    if (quoted) {
      if (c == '\\') ++i;
      else if (c == '"') quoted = false;
      continue;
    }
    if (c == '"') quoted = true;
    else if (c == '>') break;
  }
  if (i >= arg.size()) return {};
  auto rest = arg.substr(i + 1);
  while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
  while (!rest.empty() && rest.back() == ' ') rest.remove_suffix(1);
  return rest;
}

// ---- one reactor ------------------------------------------------------------------------

enum op : unsigned { op_accept = 1, op_recv = 2, op_send = 3, op_timer = 4 };

class worker final : core::completion_handler, core::loop_hooks {
 public:
  worker(global& g, unsigned index, std::vector<int> listen_fds)
      : g_(g), o_(g.o), index_(index), listen_fds_(std::move(listen_fds)), rng_(g.o.seed + index) {}
  ~worker() override {
    for (uint32_t i = 0; i < slots_.capacity(); ++i)
      if (slots_[i].fd >= 0) ::close(slots_[i].fd);
    for (int fd : listen_fds_)
      if (fd >= 0) ::close(fd);
  }

  bool init(std::string& err);
  void run();
  void wake() { rx_.wake(); }
  const counters& ctr() const { return ctr_; }

 private:
  struct rcpt_ent {
    uint32_t addr_off, addr_len, params_off, params_len;
    const rule* lmtp = nullptr;  // the LMTP post-DATA reply (nullptr: the message's)
  };
  enum class st : uint8_t { command, data, refusing };
  struct conn final : net::byte_sink {
    uint32_t gen = 0, idx = 0;
    int fd = -1;
    worker* w = nullptr;
    bool recv_armed = false, recv_cancel_sent = false, send_inflight = false;
    bool closing = false, lost = false, paused = false, skipping = false, switched = false;
    bool helo = false, mail = false;
    st state = st::command;
    uint32_t errors = 0;
    uint64_t last_ms = 0, send_progress_ms = 0;
    core::timer tmr;
    net::transport* tp = nullptr;
    std::unique_ptr<tls::transport> tls;  // owns tp after STARTTLS (or --tls-wrapper)
    bool tls_counted = false;  // its handshake has been counted (done or failed)
    bool tls_shutdown = false;  // close_notify queued
    std::string in;         // input not yet processed (a partial line, or held while paused)
    std::string app_out;    // replies on their way into the transport
    std::string wire_next;  // bytes the transport itself must send (handshake, alerts)
    std::string tx;         // wire bytes; tx[tx_off..] is in flight or waiting
    size_t tx_off = 0;
    // The transaction.
    std::string from, mail_params, rcpt_buf, body;
    std::vector<rcpt_ent> rcpts;
    smtp::dot_decoder dec;
    void put(const char* p, size_t n) override { w->on_app_bytes(*this, p, n); }
    size_t unsent() const noexcept { return tx.size() - tx_off + app_out.size() + wire_next.size() + tp->buffered(); }
  };

  static uint64_t ud(unsigned op, uint32_t idx, uint32_t gen) { return core::ud::make(core::owner::user, op, idx, gen); }

  // completion_handler / loop_hooks
  void on_completion(const io_uring_cqe& cqe) override;
  void on_timer(core::timer& t) override;
  void on_inbox() override {
    if (!stopping_ && g_.stop.load(std::memory_order_acquire)) begin_stop();
  }
  void flush() override;
  bool keep_running() override {
    if (!stopping_) return true;
    return slots_.in_use() > 0 && rx_.now_ms() < stop_deadline_ms_;
  }

  void arm_accept(uint32_t li);
  void on_accept(uint32_t li, const io_uring_cqe& cqe);
  void arm_recv(conn& c);
  void on_recv(conn& c, const io_uring_cqe& cqe);
  void on_send(conn& c, int res);
  void on_app_bytes(conn& c, const char* p, size_t n);
  size_t consume(conn& c, const char* p, size_t n);
  void command(conn& c, std::string_view line);
  void end_of_data(conn& c);
  void reset_transaction(conn& c);
  void reply(conn& c, std::string_view s) { c.app_out.append(s); }
  void starttls(conn& c);
  bool start_tls(conn& c);
  void count_tls(conn& c);
  void drop_tls(conn& c);
  void pump(conn& c);
  void update_pause(conn& c);
  void begin_close(conn& c);
  void abort(conn& c);
  void maybe_finish_close(conn& c);
  void begin_stop();
  bool save(conn& c, const std::vector<const rule*>& outcome, std::string& err);

  // Rules: the first pattern that matches, else the first percent rule whose draw hits.
  const char* cstr(std::string_view s) {
    scratch_.assign(s);
    return scratch_.c_str();
  }
  bool draw(double percent) { return std::uniform_real_distribution<double>(0, 100)(rng_) < percent; }
  const rule* match(const std::vector<rule>& rules, std::string_view addr);
  const rule* match_data(conn& c);

  global& g_;
  const options& o_;
  unsigned index_;
  std::vector<int> listen_fds_;
  std::vector<bool> accept_armed_;
  // Declared before the slots: their transports point into it, so it goes last.
  std::unique_ptr<tls::context> tls_ctx_;
  // Transports of closed connections, freed after the loop iteration: a close can happen
  // inside the transport's own on_recv (a command that ends the session).
  std::vector<std::unique_ptr<tls::transport>> tls_dead_;
  // Declared before the reactor so that it goes after it: the ring (whose SQEs may point
  // into the slots' send buffers) is torn down first. Armed timers are unlinked by the
  // wheel's destructor.
  core::slot_table<conn> slots_;
  core::reactor rx_;
  counters ctr_;
  std::mt19937_64 rng_;
  std::string scratch_, logbuf_, hdr_;
  std::vector<const rule*> outcome_;
  bool stopping_ = false;
  uint64_t stop_deadline_ms_ = 0;
  uint64_t seq_ = 0;
};

bool worker::init(std::string& err) {
  core::reactor_options ro;
  ro.sq_entries = 1024;
  ro.cq_entries = std::max<uint32_t>(4096, o_.connections * 4);
  ro.recv_buffers = o_.recv_buffers;
  ro.recv_buffer_size = o_.recv_buffer_size;
  ro.need_multishot_recv = true;
  ro.need_multishot_accept = true;
  ro.required_ops = {{IORING_OP_ACCEPT, "ACCEPT"}, {IORING_OP_RECV, "RECV"}, {IORING_OP_SEND, "SEND"}};
  if (!rx_.init(ro, err)) return false;
  rx_.set_handler(core::owner::user, this);
  if (g_.tls_available) {
    tls_ctx_ = make_server_context(o_, g_.tickets, err);
    if (!tls_ctx_) return false;
    tls_dead_.reserve(64);
  }
  slots_.init(o_.connections);
  for (uint32_t i = 0; i < o_.connections; ++i) {
    conn& c = slots_[i];
    c.idx = i;
    c.w = this;
    c.tp = &net::plain_transport::instance();
  }
  accept_armed_.assign(listen_fds_.size(), false);
  scratch_.reserve(1024);
  logbuf_.reserve(64 * 1024);
  outcome_.reserve(o_.max_rcpts);
  return true;
}

void worker::run() {
  for (uint32_t li = 0; li < listen_fds_.size(); ++li) arm_accept(li);
  rx_.run(*this);
  flush();
}

void worker::flush() {
  tls_dead_.clear();
  if (!stopping_)
    for (uint32_t li = 0; li < listen_fds_.size(); ++li)
      if (!accept_armed_[li]) arm_accept(li);
  if (!logbuf_.empty()) {
    // --log only; a short write to a pipe loses the rest of the batch rather than block.
    (void)!::write(1, logbuf_.data(), logbuf_.size());
    logbuf_.clear();
  }
}

void worker::arm_accept(uint32_t li) {
  auto* s = rx_.get_sqe();
  io_uring_prep_multishot_accept(s, listen_fds_[li], nullptr, nullptr, SOCK_CLOEXEC);
  io_uring_sqe_set_data64(s, ud(op_accept, li, 0));
  accept_armed_[li] = true;
}

void worker::arm_recv(conn& c) {
  auto* s = rx_.get_sqe();
  io_uring_prep_recv_multishot(s, c.fd, nullptr, 0, 0);
  s->flags |= IOSQE_BUFFER_SELECT;
  s->buf_group = rx_.buffers().group();
  io_uring_sqe_set_data64(s, ud(op_recv, c.idx, c.gen));
  c.recv_armed = true;
  c.recv_cancel_sent = false;
}

void worker::on_completion(const io_uring_cqe& cqe) {
  const uint64_t d = cqe.user_data;
  if (core::ud::op(d) == op_accept) {
    on_accept(core::ud::index(d), cqe);
    return;
  }
  conn* c = slots_.find(core::ud::index(d), core::ud::gen(d));
  if (!c) {
    // An earlier use of the slot: its receive buffer must still go back to the ring.
    if (int bid = core::buffer_ring::id_of(cqe); bid >= 0) rx_.buffers().recycle(uint16_t(bid));
    return;
  }
  if (core::ud::op(d) == op_recv)
    on_recv(*c, cqe);
  else if (core::ud::op(d) == op_send)
    on_send(*c, cqe.res);
}

void worker::on_accept(uint32_t li, const io_uring_cqe& cqe) {
  if (li >= accept_armed_.size()) return;
  if (!(cqe.flags & IORING_CQE_F_MORE)) accept_armed_[li] = false;  // flush() re-arms
  if (cqe.res < 0) {
    if (cqe.res != -ECANCELED && !stopping_) fmt::print(stderr, "tern-sink: accept: {}\n", strerror(-cqe.res));
    return;
  }
  const int fd = cqe.res;
  uint32_t idx = 0;
  conn* cp = stopping_ ? nullptr : slots_.acquire(idx);
  if (!cp) {
    // Rare path: a best-effort non-blocking reply, then close. Never an allocation.
    static constexpr std::string_view full = "421 4.3.2 Too many connections, try again later\r\n";
    static constexpr std::string_view down = "421 4.3.2 Service shutting down\r\n";
    auto t = stopping_ ? down : full;
    if (!stopping_) bump(ctr_.refused_full);
    (void)!::send(fd, t.data(), t.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    ::close(fd);
    return;
  }
  conn& c = *cp;
  c.fd = fd;
  c.recv_armed = c.recv_cancel_sent = c.send_inflight = false;
  c.closing = c.lost = c.paused = c.skipping = c.switched = false;
  c.helo = c.mail = false;
  c.errors = 0;
  c.tp = &net::plain_transport::instance();
  c.tls.reset();
  c.tls_counted = false;
  c.tls_shutdown = false;
  c.in.clear();
  c.app_out.clear();
  c.wire_next.clear();
  c.tx.clear();
  c.tx_off = 0;
  reset_transaction(c);
  c.last_ms = rx_.now_ms();
  if (ctr_.first_ms.load(std::memory_order_relaxed) == 0) ctr_.first_ms.store(rx_.now_ms(), std::memory_order_relaxed);
  bump(ctr_.connections);
  c.tmr.data = ud(op_timer, idx, c.gen);
  rx_.timers().arm(c.tmr, c.last_ms + uint64_t(o_.timeout) * 1000);
  // Implicit TLS: the greeting waits inside the transport until the handshake is done.
  if (o_.tls_wrapper && !start_tls(c)) {
    abort(c);
    return;
  }
  // The greeting.
  if (!o_.greeting.empty()) {
    const rule& r = g_.greeting;
    reply(c, r.reply);
    if (r.code >= 400) {
      c.state = st::refusing;  // RFC 5321 3.1: 503 to everything but QUIT
      if (r.code == 421) {
        begin_close(c);
        pump(c);
        return;
      }
    } else {
      c.state = st::command;
    }
  } else {
    c.state = st::command;
    c.app_out.append("220 ").append(o_.hostname).append(o_.lmtp ? " LMTP tern-sink\r\n" : " ESMTP tern-sink\r\n");
  }
  arm_recv(c);
  pump(c);
}

// Counts a TLS handshake once: done (and resumed) or failed.
void worker::count_tls(conn& c) {
  if (c.tls_counted || !c.tls) return;
  if (c.tls->handshake_done()) {
    c.tls_counted = true;
    bump(ctr_.tls_handshakes);
    if (c.tls->resumed()) bump(ctr_.tls_resumed);
    if (o_.log)
      fmt::format_to(std::back_inserter(logbuf_), "tern-sink: tls {} {}{}\n", c.tls->protocol(), c.tls->cipher(),
                     c.tls->resumed() ? " resumed" : "");
  } else if (c.tls->failed()) {
    c.tls_counted = true;
    bump(ctr_.tls_failed);
    if (o_.log) {
      logbuf_.append("tern-sink: tls handshake failed: ");
      append_sanitised(logbuf_, c.tls->error());
      logbuf_.append("\n");
    }
  }
}

// The transport failed (a TLS error) or the peer closed it (close_notify). Nothing more
// goes through it; after an error, the alert it produced (in wire_next) is still sent.
void worker::drop_tls(conn& c) {
  c.app_out.clear();
  if (c.wire_next.empty() && c.tx_off >= c.tx.size()) return abort(c);
  begin_close(c);
  pump(c);
}

void worker::on_recv(conn& c, const io_uring_cqe& cqe) {
  if (!(cqe.flags & IORING_CQE_F_MORE)) c.recv_armed = false;
  const int res = cqe.res;
  if (res > 0) {
    int bid = core::buffer_ring::id_of(cqe);
    if (bid >= 0) {
      if (!c.closing) {
        c.last_ms = rx_.now_ms();
        auto ts = c.tp->on_recv(rx_.buffers().buffer(uint16_t(bid)), size_t(res), c, c.wire_next);
        if (c.tls) count_tls(c);
        if (ts != net::transport_status::ok) {
          rx_.buffers().recycle(uint16_t(bid));
          drop_tls(c);
          return;
        }
      }
      // Everything left was copied into c.in: the buffer goes straight back.
      rx_.buffers().recycle(uint16_t(bid));
    }
  } else if (res == -ENOBUFS || res == -ECANCELED) {
    // ENOBUFS: flow control, re-armed below. ECANCELED: our own pause or close.
  } else {
    c.lost = true;  // EOF or a socket error: nobody reads what is left to say
    begin_close(c);
    maybe_finish_close(c);
    return;
  }
  if (!c.recv_armed) {
    if (c.closing) {
      maybe_finish_close(c);
      return;
    }
    if (!c.paused) arm_recv(c);
  }
  if (!c.closing) {
    update_pause(c);
    pump(c);
  }
}

// Application bytes (after the transport). Processed straight from the receive buffer when
// nothing waits before them; what is left (a partial line, or everything while paused) is
// copied into c.in.
void worker::on_app_bytes(conn& c, const char* p, size_t n) {
  if (c.closing) return;
  if (c.in.empty() && !c.paused) {
    size_t used = consume(c, p, n);
    if (c.switched) {  // STARTTLS: pipelined plaintext after it is discarded
      c.switched = false;
      c.in.clear();
      return;
    }
    if (used < n && !c.closing) c.in.append(p + used, n - used);
  } else {
    c.in.append(p, n);
    if (!c.paused) {
      size_t used = consume(c, c.in.data(), c.in.size());
      if (c.switched) {
        c.switched = false;
        c.in.clear();
        return;
      }
      c.in.erase(0, used);
    }
  }
  if (c.in.size() > o_.input_buffer && !c.closing) abort(c);  // beyond any sane pipelining
}

size_t worker::consume(conn& c, const char* p, size_t n) {
  size_t pos = 0;
  while (pos < n && !c.closing) {
    if (c.state == st::data) {
      pos += c.dec.feed(p + pos, n - pos, c.body);
      if (o_.save_dir.empty()) c.body.clear();  // counted by the decoder, never kept
      if (!c.dec.done()) break;
      c.state = st::command;
      end_of_data(c);
      continue;
    }
    // Back-pressure: no more commands while the replies are not being read.
    if (c.unsent() >= o_.output_buffer) {
      c.paused = true;
      bump(ctr_.output_paused);
      break;
    }
    const char* lf = static_cast<const char*>(memchr(p + pos, '\n', n - pos));
    if (c.skipping) {  // the rest of an over-long line
      if (!lf) return n;
      pos = size_t(lf - p) + 1;
      c.skipping = false;
      continue;
    }
    if (!lf) {
      if (n - pos > o_.line_length) {
        reply(c, "500 5.5.2 Line too long\r\n");
        c.skipping = true;
        return n;
      }
      break;
    }
    std::string_view line(p + pos, size_t(lf - (p + pos)));
    pos = size_t(lf - p) + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.size() > o_.line_length) {
      reply(c, "500 5.5.2 Line too long\r\n");
      continue;
    }
    command(c, line);
    if (c.switched) return n;
  }
  return pos;
}

void worker::reset_transaction(conn& c) {
  c.mail = false;
  c.from.clear();
  c.mail_params.clear();
  c.rcpt_buf.clear();
  c.rcpts.clear();
  c.body.clear();
}

const rule* worker::match(const std::vector<rule>& rules, std::string_view addr) {
  if (rules.empty()) return nullptr;
  const char* a = nullptr;
  for (const rule& r : rules) {
    if (r.percent >= 0) {
      if (draw(r.percent)) return &r;
      continue;
    }
    if (!a) a = cstr(addr);
    if (fnmatch(r.pattern.c_str(), a, FNM_CASEFOLD) == 0) return &r;
  }
  return nullptr;
}

const rule* worker::match_data(conn& c) {
  for (const rule& r : o_.data_rules) {
    if (r.percent >= 0) {
      if (draw(r.percent)) return &r;
      continue;
    }
    if (fnmatch(r.pattern.c_str(), cstr(c.from), FNM_CASEFOLD) == 0) return &r;
    for (const rcpt_ent& e : c.rcpts)
      if (fnmatch(r.pattern.c_str(), cstr(std::string_view(c.rcpt_buf).substr(e.addr_off, e.addr_len)),
                  FNM_CASEFOLD) == 0)
        return &r;
  }
  return nullptr;
}

void worker::command(conn& c, std::string_view line) {
  auto bad = [&](std::string_view text) {
    reply(c, text);
    if (++c.errors >= o_.max_errors) {
      reply(c, "421 4.7.0 Too many errors\r\n");
      begin_close(c);
    }
  };
  // LHLO is not in smtp's table (tern itself speaks only SMTP inbound).
  bool lhlo = iequal_prefix(line, "LHLO") && (line.size() == 4 || line[4] == ' ');
  smtp::command cmd = lhlo ? smtp::command{} : smtp::parse_command(line);
  if (c.state == st::refusing) {
    if (cmd.v == smtp::verb::quit) {
      reply(c, "221 2.0.0 Bye\r\n");
      begin_close(c);
    } else {
      bad("503 5.5.1 No service\r\n");
    }
    return;
  }
  if (lhlo || cmd.v == smtp::verb::ehlo || cmd.v == smtp::verb::helo) {
    if (lhlo != o_.lmtp) {
      bad(o_.lmtp ? "500 5.5.1 This is LMTP: LHLO\r\n" : "500 5.5.1 Command unrecognized\r\n");
      return;
    }
    reset_transaction(c);
    c.helo = true;
    c.app_out.append("250").append(cmd.v == smtp::verb::helo ? " " : "-").append(o_.hostname);
    if (cmd.v == smtp::verb::helo)
      c.app_out.append("\r\n");
    else
      c.app_out.append(c.tls ? g_.ehlo_reply_tls : g_.ehlo_reply);
    return;
  }
  switch (cmd.v) {
    case smtp::verb::mail: {
      if (!c.helo) return bad("503 5.5.1 Send HELO/EHLO first\r\n");
      if (c.mail) return bad("503 5.5.1 Nested MAIL command\r\n");
      smtp::mail_args m;
      auto e = smtp::parse_mail(cmd.arg, m);
      if (e == smtp::parse_error::unknown_param) return bad("555 5.5.4 Unsupported parameter\r\n");
      if (e != smtp::parse_error::none) return bad("501 5.5.4 Syntax error in MAIL\r\n");
      if ((m.body == 1 && !o_.eightbit) || (m.smtputf8 && !o_.smtputf8) ||
          ((m.ret || !m.envid.empty()) && !o_.dsn))
        return bad("555 5.5.4 Unsupported parameter\r\n");
      if (o_.size && m.size > o_.size) return reply(c, "552 5.3.4 Message size exceeds fixed limit\r\n");
      c.mail = true;
      c.from.assign(m.address);
      c.mail_params.assign(params_after_path(cmd.arg));
      reply(c, "250 2.1.0 Ok\r\n");
      return;
    }
    case smtp::verb::rcpt: {
      if (!c.mail) return bad("503 5.5.1 Need MAIL command\r\n");
      smtp::rcpt_args r;
      auto e = smtp::parse_rcpt(cmd.arg, r);
      if (e == smtp::parse_error::unknown_param) return bad("555 5.5.4 Unsupported parameter\r\n");
      if (e != smtp::parse_error::none) return bad("501 5.5.4 Syntax error in RCPT\r\n");
      if ((r.notify || !r.orcpt.empty()) && !o_.dsn) return bad("555 5.5.4 Unsupported parameter\r\n");
      if (c.rcpts.size() >= o_.max_rcpts) {
        bump(ctr_.rcpts_refused);
        return reply(c, "452 4.5.3 Too many recipients\r\n");
      }
      const rule* rr = match(o_.rcpt_rules, r.address);
      if (rr && rr->code >= 300) {
        bump(ctr_.rcpts_refused);
        return reply(c, rr->reply);
      }
      auto params = params_after_path(cmd.arg);
      rcpt_ent ent{uint32_t(c.rcpt_buf.size()), uint32_t(r.address.size()), 0, uint32_t(params.size()), nullptr};
      c.rcpt_buf.append(r.address);
      ent.params_off = uint32_t(c.rcpt_buf.size());
      c.rcpt_buf.append(params);
      if (o_.lmtp) ent.lmtp = match(o_.lmtp_rules, r.address);
      c.rcpts.push_back(ent);
      bump(ctr_.rcpts_accepted);
      return reply(c, rr ? std::string_view(rr->reply) : "250 2.1.5 Ok\r\n");
    }
    case smtp::verb::data:
      if (!c.mail) return bad("503 5.5.1 Need MAIL command\r\n");
      if (c.rcpts.empty()) return bad("554 5.5.1 No valid recipients\r\n");
      c.state = st::data;
      c.dec.reset(o_.size ? o_.size : UINT64_MAX);
      c.body.clear();
      reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
      return;
    case smtp::verb::rset:
      reset_transaction(c);
      return reply(c, "250 2.0.0 Ok\r\n");
    case smtp::verb::noop:
      return reply(c, "250 2.0.0 Ok\r\n");
    case smtp::verb::quit:
      reply(c, "221 2.0.0 Bye\r\n");
      begin_close(c);
      return;
    case smtp::verb::vrfy:
      return reply(c, "252 2.0.0 Cannot VRFY user\r\n");
    case smtp::verb::help:
      return reply(c, "214 2.0.0 tern-sink\r\n");
    case smtp::verb::starttls:
      if (!cmd.arg.empty()) return bad("501 5.5.4 Syntax error (no parameters allowed)\r\n");
      return starttls(c);
    case smtp::verb::bdat:
    case smtp::verb::expn:
    case smtp::verb::auth:
      return bad("502 5.5.1 Command not implemented\r\n");
    default:
      return bad("500 5.5.2 Command unrecognized\r\n");
  }
}

// A new server transport for the connection (STARTTLS or --tls-wrapper); false when
// wolfSSL cannot make one (out of memory).
bool worker::start_tls(conn& c) {
  std::string err;
  c.tls = tls::transport::server(*tls_ctx_, err);
  if (!c.tls) {
    fmt::print(stderr, "tern-sink: {}\n", err);
    return false;
  }
  c.tls_counted = false;
  c.tp = c.tls.get();
  return true;
}

void worker::starttls(conn& c) {
  if (c.tls) return reply(c, "503 5.5.1 TLS already active\r\n");
  if (!g_.tls_available || !o_.starttls) return reply(c, "454 4.7.0 TLS not available\r\n");
  // The 220 leaves in plaintext, through the old transport, before anything of the new one
  // (the handshake bytes the new transport appends to wire_next come after it).
  reply(c, "220 2.0.0 Ready to start TLS\r\n");
  std::string wire;
  if (c.tp->on_send(c.app_out, wire) != net::transport_status::ok) return abort(c);
  c.wire_next.append(wire);
  if (!start_tls(c)) return abort(c);
  // RFC 3207 4.2: the session starts over, and the client's pipelined plaintext after the
  // command is discarded (the STARTTLS command injection defence, CVE-2011-0411).
  c.helo = false;
  reset_transaction(c);
  c.switched = true;
}

bool worker::save(conn& c, const std::vector<const rule*>& outcome, std::string& err) {
  // LMTP: one outcome per recipient; SMTP: one for the message (saved only if accepted).
  auto refused = [&](size_t i) { return o_.lmtp && outcome[i] && outcome[i]->code >= 300; };
  hdr_.clear();
  hdr_.append("X-Sink-Mail-From: <");
  append_sanitised(hdr_, c.from);
  hdr_.append(">\n");
  std::string_view rb = c.rcpt_buf;
  for (size_t i = 0; i < c.rcpts.size(); ++i) {
    if (refused(i)) continue;
    hdr_.append("X-Sink-Rcpt-To: <");
    append_sanitised(hdr_, rb.substr(c.rcpts[i].addr_off, c.rcpts[i].addr_len));
    hdr_.append(">\n");
  }
  hdr_.append("X-Sink-Params: MAIL");
  if (!c.mail_params.empty()) hdr_.append(" "), append_sanitised(hdr_, c.mail_params);
  hdr_.append("\n");
  for (size_t i = 0; i < c.rcpts.size(); ++i) {
    if (refused(i)) continue;
    hdr_.append("X-Sink-Params: RCPT <");
    append_sanitised(hdr_, rb.substr(c.rcpts[i].addr_off, c.rcpts[i].addr_len));
    hdr_.append(">");
    if (c.rcpts[i].params_len) hdr_.append(" "), append_sanitised(hdr_, rb.substr(c.rcpts[i].params_off, c.rcpts[i].params_len));
    hdr_.append("\n");
  }
  hdr_.append("X-Sink-TLS: ");
  if (c.tls && c.tls->handshake_done()) {
    hdr_.append(c.tls->protocol()).append(" ").append(c.tls->cipher());  // "TLSv1.3 TLS13-AES128-GCM-SHA256"
  } else {
    hdr_.append("none");
  }
  hdr_.append("\n\n");

  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  ++seq_;
  char tmp[4096], fin[4096];
  snprintf(tmp, sizeof tmp, "%s/.tmp.%d.%u.%llu", o_.save_dir.c_str(), int(getpid()), index_, (unsigned long long)seq_);
  snprintf(fin, sizeof fin, "%s/%lld.%06ld.%d.%u.%llu.eml", o_.save_dir.c_str(), (long long)ts.tv_sec,
           long(ts.tv_nsec / 1000), int(getpid()), index_, (unsigned long long)seq_);
  // Blocking file I/O on the loop: a saving sink is a test fixture, not the benchmark path.
  int fd = ::open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    err = fmt::format("open {}: {}", tmp, strerror(errno));
    return false;
  }
  iovec iov[2] = {{hdr_.data(), hdr_.size()}, {c.body.data(), c.body.size()}};
  size_t want = hdr_.size() + c.body.size(), done = 0;
  int vi = 0;
  while (done < want) {
    ssize_t w = ::writev(fd, iov + vi, 2 - vi);
    if (w < 0) {
      if (errno == EINTR) continue;
      err = fmt::format("write {}: {}", tmp, strerror(errno));
      ::close(fd);
      ::unlink(tmp);
      return false;
    }
    done += size_t(w);
    while (vi < 2 && size_t(w) >= iov[vi].iov_len) w -= ssize_t(iov[vi].iov_len), ++vi;
    if (vi < 2) iov[vi].iov_base = static_cast<char*>(iov[vi].iov_base) + w, iov[vi].iov_len -= size_t(w);
  }
  if (o_.fsync && ::fsync(fd) != 0) {
    err = fmt::format("fsync {}: {}", tmp, strerror(errno));
    ::close(fd);
    ::unlink(tmp);
    return false;
  }
  ::close(fd);
  if (::rename(tmp, fin) != 0) {
    err = fmt::format("rename {}: {}", fin, strerror(errno));
    ::unlink(tmp);
    return false;
  }
  return true;
}

void worker::end_of_data(conn& c) {
  const uint64_t bytes = c.dec.size();
  if (c.dec.too_big()) {
    bump(ctr_.messages_refused);
    for (size_t i = 0, n = o_.lmtp ? c.rcpts.size() : 1; i < n; ++i)
      reply(c, "552 5.3.4 Message size exceeds fixed limit\r\n");
    reset_transaction(c);
    return;
  }
  const rule* dr = match_data(c);
  // One outcome per recipient (LMTP) or one for the message (SMTP): nullptr is 250.
  outcome_.clear();
  bool any_ok = false;
  for (const rcpt_ent& e : c.rcpts) {
    const rule* r = o_.lmtp && e.lmtp ? e.lmtp : dr;
    outcome_.push_back(r);
    if (!r || r->code < 300) any_ok = true;
    if (!o_.lmtp) break;
  }
  std::string err;
  if (any_ok && !o_.save_dir.empty() && !save(c, outcome_, err)) {
    fmt::print(stderr, "tern-sink: save: {}\n", err);
    static const rule failed{"", -1, "451 4.3.0 Could not save the message\r\n", 451};
    for (auto& r : outcome_) r = &failed;
    any_ok = false;
  }
  for (const rule* r : outcome_) {
    if (r) {
      reply(c, r->reply);
    } else {
      fmt::format_to(std::back_inserter(c.app_out), "250 2.0.0 Ok: queued as S{:X}{:X}\r\n", index_,
                     ctr_.messages.load(std::memory_order_relaxed) + 1);
    }
  }
  if (any_ok) {
    bump(ctr_.messages);
    bump(ctr_.bytes, bytes);
    ctr_.last_ms.store(core::monotonic_ms(), std::memory_order_relaxed);
    if (o_.log) {
      logbuf_.append("tern-sink: msg from=<");
      append_sanitised(logbuf_, c.from);
      fmt::format_to(std::back_inserter(logbuf_), "> rcpts={} bytes={}\n", c.rcpts.size(), bytes);
    }
    uint64_t total = g_.messages.fetch_add(1, std::memory_order_relaxed) + 1;
    if (o_.max_messages && total == o_.max_messages) kill(getpid(), SIGUSR2);  // main thread stops us
  } else {
    bump(ctr_.messages_refused);
  }
  reset_transaction(c);
}

void worker::pump(conn& c) {
  if (c.fd < 0 || c.send_inflight) return;
  if (c.lost) {
    maybe_finish_close(c);
    return;
  }
  // The send buffer is touched only while no send is in flight: the SQE points into it.
  if (c.tx_off >= c.tx.size()) {
    c.tx.clear();
    c.tx_off = 0;
  }
  if (!c.wire_next.empty()) {
    c.tx.append(c.wire_next);
    c.wire_next.clear();
  }
  if (!c.app_out.empty() && c.tp->on_send(c.app_out, c.tx) != net::transport_status::ok) {
    abort(c);
    return;
  }
  if (c.tx_off < c.tx.size()) {
    auto* s = rx_.get_sqe();
    io_uring_prep_send(s, c.fd, c.tx.data() + c.tx_off, c.tx.size() - c.tx_off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, ud(op_send, c.idx, c.gen));
    c.send_inflight = true;
    c.send_progress_ms = rx_.now_ms();
  } else if (c.closing) {
    maybe_finish_close(c);
  }
}

void worker::on_send(conn& c, int res) {
  c.send_inflight = false;
  if (res < 0) {
    c.lost = true;  // EPIPE/ECONNRESET/ECANCELED
    begin_close(c);
    maybe_finish_close(c);
    return;
  }
  c.tx_off += size_t(res);
  c.send_progress_ms = rx_.now_ms();
  if (!c.closing) update_pause(c);
  pump(c);
}

// Reading stops while the client does not read its replies (unsent output at the bound)
// and resumes, with hysteresis, below half of it.
void worker::update_pause(conn& c) {
  const size_t unsent = c.unsent();
  if (!c.paused && unsent >= o_.output_buffer) {
    c.paused = true;
    bump(ctr_.output_paused);
  }
  if (c.paused && c.recv_armed && !c.recv_cancel_sent) {
    rx_.cancel(ud(op_recv, c.idx, c.gen));
    c.recv_cancel_sent = true;
  }
  if (c.paused && unsent <= o_.output_buffer / 2) {
    c.paused = false;
    if (!c.in.empty()) {
      size_t used = consume(c, c.in.data(), c.in.size());
      if (c.switched) {
        c.switched = false;
        c.in.clear();
      } else {
        c.in.erase(0, used);
      }
    }
    if (!c.paused && !c.recv_armed && !c.closing) arm_recv(c);
  }
}

void worker::begin_close(conn& c) {
  if (!c.closing) {
    c.closing = true;
    c.paused = false;
  }
  if (c.recv_armed && !c.recv_cancel_sent) {
    rx_.cancel(ud(op_recv, c.idx, c.gen));
    c.recv_cancel_sent = true;
  }
  // pump() (called after the command) sends what is left and then closes.
}

void worker::abort(conn& c) {
  c.lost = true;
  c.closing = true;
  if (c.recv_armed || c.send_inflight) {
    rx_.cancel_fd(c.fd);
    c.recv_cancel_sent = true;
  }
  maybe_finish_close(c);
}

// Close once nothing in flight points at the socket or the slot's buffers, and the last
// replies (221, 421) have been sent unless the client is gone.
void worker::maybe_finish_close(conn& c) {
  if (!c.closing || c.fd < 0 || c.recv_armed || c.send_inflight) return;
  if (!c.lost && (c.tx_off < c.tx.size() || !c.app_out.empty() || !c.wire_next.empty())) {
    pump(c);
    return;
  }
  if (!c.lost && c.tls && c.tls->handshake_done() && !c.tls->failed() && !c.tls_shutdown) {
    // A clean end inside TLS (221, 421): close_notify after the last reply, so the client
    // can tell it from a truncation.
    c.tls_shutdown = true;
    if (c.tls->shutdown(c.wire_next) == net::transport_status::ok && !c.wire_next.empty()) {
      pump(c);
      return;
    }
  }
  ::close(c.fd);
  c.fd = -1;
  if (c.tmr.armed()) rx_.timers().cancel(c.tmr);
  if (c.tls) {
    count_tls(c);  // a handshake that completed in the packet that also ended the session
    if (!c.tls_counted) bump(ctr_.tls_failed);  // the client left during the handshake
    tls_dead_.push_back(std::move(c.tls));      // possibly inside its on_recv: freed in flush()
  }
  c.tp = &net::plain_transport::instance();
  // The memory a burst used goes back; the usual sizes stay for the next connection.
  for (std::string* b : {&c.in, &c.app_out, &c.wire_next, &c.tx, &c.body, &c.rcpt_buf})
    if (b->capacity() > o_.buffer_keep) std::string().swap(*b);
  if (c.rcpts.capacity() > 1024) std::vector<rcpt_ent>().swap(c.rcpts);
  slots_.release(c.idx);
}

void worker::on_timer(core::timer& t) {
  conn* cp = slots_.find(core::ud::index(t.data), core::ud::gen(t.data));
  if (!cp) return;
  conn& c = *cp;
  const uint64_t now = rx_.now_ms(), limit = uint64_t(o_.timeout) * 1000;
  if (c.send_inflight && now - c.send_progress_ms >= limit) {  // the client reads nothing
    bump(ctr_.timeouts);
    abort(c);
    return;
  }
  if (!c.closing && !c.paused && now - c.last_ms >= limit) {
    bump(ctr_.timeouts);
    reply(c, "421 4.4.2 Idle timeout, closing connection\r\n");
    begin_close(c);
    pump(c);
  }
  if (c.fd >= 0) {
    uint64_t next = c.closing || c.paused ? now + limit : c.last_ms + limit;
    if (c.send_inflight) next = std::min(next, c.send_progress_ms + limit);
    rx_.timers().arm(c.tmr, std::max(next, now + 1));
  }
}

void worker::begin_stop() {
  stopping_ = true;
  stop_deadline_ms_ = rx_.now_ms() + 3000;
  for (uint32_t li = 0; li < listen_fds_.size(); ++li) {
    if (accept_armed_[li]) rx_.cancel(ud(op_accept, li, 0));
    ::close(listen_fds_[li]);
    listen_fds_[li] = -1;
  }
  for (uint32_t i = 0; i < slots_.capacity(); ++i) {
    if (!slots_.used(i)) continue;
    conn& c = slots_[i];
    if (c.closing) continue;
    if (c.state != st::data) reply(c, "421 4.3.2 Service shutting down\r\n");
    begin_close(c);
    pump(c);
  }
}

// ---- main -------------------------------------------------------------------------------

void print_counters(const global& g, const std::vector<std::unique_ptr<worker>>& ws, const char* what) {
  uint64_t conns = 0, full = 0, msgs = 0, mref = 0, racc = 0, rref = 0, bytes = 0, tmo = 0, paused = 0;
  uint64_t first = 0, last = 0, tls_hs = 0, tls_res = 0, tls_fail = 0;
  for (auto& w : ws) {
    const counters& c = w->ctr();
    conns += c.connections.load(std::memory_order_relaxed);
    full += c.refused_full.load(std::memory_order_relaxed);
    msgs += c.messages.load(std::memory_order_relaxed);
    mref += c.messages_refused.load(std::memory_order_relaxed);
    racc += c.rcpts_accepted.load(std::memory_order_relaxed);
    rref += c.rcpts_refused.load(std::memory_order_relaxed);
    bytes += c.bytes.load(std::memory_order_relaxed);
    tmo += c.timeouts.load(std::memory_order_relaxed);
    paused += c.output_paused.load(std::memory_order_relaxed);
    tls_hs += c.tls_handshakes.load(std::memory_order_relaxed);
    tls_res += c.tls_resumed.load(std::memory_order_relaxed);
    tls_fail += c.tls_failed.load(std::memory_order_relaxed);
    uint64_t f = c.first_ms.load(std::memory_order_relaxed), l = c.last_ms.load(std::memory_order_relaxed);
    if (f && (!first || f < first)) first = f;
    if (l > last) last = l;
  }
  // The rate is over the busy span: from the first connection to the last message.
  double span = first && last > first ? double(last - first) / 1000.0 : 0.0;
  double up = double(core::monotonic_ms() - g.start_ms) / 1000.0;
  fmt::print(stderr,
             "tern-sink: {}: connections={} refused_full={} messages={} messages_refused={} rcpts_accepted={} "
             "rcpts_refused={} bytes={} timeouts={} output_paused={} tls_handshakes={} tls_resumed={} tls_failed={} "
             "uptime={:.3f}s busy={:.3f}s rate={:.0f} msg/s\n",
             what, conns, full, msgs, mref, racc, rref, bytes, tmo, paused, tls_hs, tls_res, tls_fail, up, span,
             span > 0 ? double(msgs) / span : 0.0);
  fflush(stderr);
}

}  // namespace

int main(int argc, char** argv) {
  global g;
  options& o = g.o;
  std::vector<std::string> rcpt, rcpt_pct, data, data_pct, lmtp_rcpt;
  std::vector<std::string> listen;
  CLI::App app{"tern-sink: SMTP/LMTP sink (io_uring)"};
  app.add_option("--listen", listen, "address to listen on, ip:port or [ipv6]:port (repeatable; port 0: any)");
  app.add_option("--threads", o.threads, "reactor threads (SO_REUSEPORT)")->check(CLI::Range(1, 256));
  app.add_flag("--lmtp", o.lmtp, "speak LMTP (LHLO, one reply per recipient after DATA)");
  app.add_option("--hostname", o.hostname, "name in the greeting and EHLO reply");
  app.add_option("--greeting", o.greeting, "greeting 'CODE TEXT' (421: close; other 4xx/5xx: 503 until QUIT)");
  app.add_option("--size", o.size, "message size limit in bytes, advertised (0: none)");
  app.add_option("--connections", o.connections, "connection slots per thread (more get 421)")->check(CLI::Range(1, 1 << 20));
  app.add_option("--line-length", o.line_length, "longest command line")->check(CLI::Range(512, 1 << 20));
  app.add_option("--max-rcpts", o.max_rcpts, "recipients per message")->check(CLI::Range(1, 1 << 20));
  app.add_option("--timeout", o.timeout, "idle timeout in seconds")->check(CLI::Range(1, 1 << 20));
  app.add_option("--output-buffer", o.output_buffer, "unsent reply bytes at which reading stops")->check(CLI::Range(4096, 1 << 30));
  app.add_option("--input-buffer", o.input_buffer, "unprocessed input bytes at which a connection is closed")->check(CLI::Range(65536, 1 << 30));
  app.add_option("--recv-buffers", o.recv_buffers, "provided receive buffers per thread (power of 2)")->check(CLI::Range(2, 32768));
  app.add_option("--recv-buffer-size", o.recv_buffer_size, "receive buffer size")->check(CLI::Range(1024, 1 << 20));
  app.add_option("--max-errors", o.max_errors, "bad commands before 421 and close")->check(CLI::Range(1, 1 << 20));
  app.add_option("--max-messages", o.max_messages, "exit after this many accepted messages (0: never)");
  app.add_option("--seed", o.seed, "seed for the percent rules");
  app.add_option("--rcpt", rcpt, "'PATTERN=CODE TEXT': reply to RCPT for matching recipients (repeatable)");
  app.add_option("--rcpt-percent", rcpt_pct, "'P:CODE TEXT': reply to that share of recipients");
  app.add_option("--data", data, "'PATTERN=CODE TEXT': reply at the end of DATA if the sender or a recipient matches");
  app.add_option("--data-percent", data_pct, "'P:CODE TEXT': reply to that share of messages");
  app.add_option("--lmtp-rcpt", lmtp_rcpt, "'PATTERN=CODE TEXT': LMTP per-recipient reply after DATA");
  bool no_pipe = false, no_8bit = false, no_utf8 = false, no_dsn = false;
  app.add_flag("--no-pipelining", no_pipe, "do not advertise PIPELINING");
  app.add_flag("--no-8bitmime", no_8bit, "do not advertise (or accept) 8BITMIME");
  app.add_flag("--no-smtputf8", no_utf8, "do not advertise (or accept) SMTPUTF8");
  app.add_flag("--no-dsn", no_dsn, "do not advertise (or accept) DSN");
  app.add_option("--save", o.save_dir, "write each accepted message into this directory");
  app.add_flag("--fsync", o.fsync, "fsync each saved message before its reply");
  app.add_flag("--log", o.log, "one line per message on stdout");
  app.add_option("--tls-cert", o.tls_cert, "certificate chain (PEM): offer STARTTLS (with --tls-key)");
  app.add_option("--tls-key", o.tls_key, "private key (PEM) of --tls-cert");
  app.add_option("--tls-min-version", o.tls_min_version, "lowest TLS version accepted: 1.2 or 1.3");
  app.add_option("--tls-max-version", o.tls_max_version, "highest TLS version offered: 1.3, or 1.2 for a TLS 1.2-only sink");
  bool no_starttls = false;
  app.add_flag("--no-starttls", no_starttls, "do not advertise (or accept) STARTTLS even with a certificate");
  app.add_flag("--tls-wrapper", o.tls_wrapper, "TLS from the first byte on every listener (implicit TLS, like port 465)");
  CLI11_PARSE(app, argc, argv);
  o.starttls = !no_starttls;
  if (!listen.empty()) o.listen = listen;
  o.pipelining = !no_pipe;
  o.eightbit = !no_8bit;
  o.smtputf8 = !no_utf8;
  o.dsn = !no_dsn;
  std::string err;
  auto add = [&](const std::vector<std::string>& in, bool pct, std::vector<rule>& out) {
    for (auto& s : in) {
      rule r;
      if (!(pct ? parse_percent_rule(s, r, err) : parse_pattern_rule(s, r, err))) return false;
      out.push_back(std::move(r));
    }
    return true;
  };
  // Pattern rules first (first match wins), then the percent rules.
  if (!add(rcpt, false, o.rcpt_rules) || !add(rcpt_pct, true, o.rcpt_rules) || !add(data, false, o.data_rules) ||
      !add(data_pct, true, o.data_rules) || !add(lmtp_rcpt, false, o.lmtp_rules)) {
    fmt::print(stderr, "tern-sink: {}\n", err);
    return 2;
  }
  if (!o.greeting.empty()) {
    if (!parse_reply(o.greeting, g.greeting, err)) {
      fmt::print(stderr, "tern-sink: --greeting: {}\n", err);
      return 2;
    }
  }
  if (!o.save_dir.empty()) {
    struct stat st;
    if (stat(o.save_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      fmt::print(stderr, "tern-sink: --save {}: not a directory\n", o.save_dir);
      return 2;
    }
  }
  if (o.recv_buffers & (o.recv_buffers - 1)) {
    fmt::print(stderr, "tern-sink: --recv-buffers must be a power of 2\n");
    return 2;
  }
  // TLS: both files or neither; probed here (one context, then dropped) so that a bad file
  // is one clear start-up error naming it, not a failure on every worker thread.
  if (o.tls_cert.empty() != o.tls_key.empty()) {
    fmt::print(stderr, "tern-sink: --tls-cert and --tls-key go together\n");
    return 2;
  }
  {
    tls::version v;
    if (!tls::parse_version(o.tls_min_version, v) || !tls::parse_version(o.tls_max_version, v)) {
      fmt::print(stderr, "tern-sink: --tls-min-version and --tls-max-version must be 1.2 or 1.3\n");
      return 2;
    }
    if (o.tls_min_version > o.tls_max_version) {
      fmt::print(stderr, "tern-sink: --tls-min-version {} is above --tls-max-version {}\n", o.tls_min_version,
                 o.tls_max_version);
      return 2;
    }
  }
  if (o.tls_wrapper && o.tls_cert.empty()) {
    fmt::print(stderr, "tern-sink: --tls-wrapper needs --tls-cert and --tls-key\n");
    return 2;
  }
  if (!o.tls_cert.empty()) {
    for (auto [flag, file] : {std::pair{"--tls-cert", &o.tls_cert}, std::pair{"--tls-key", &o.tls_key}}) {
      if (::access(file->c_str(), R_OK) != 0) {
        fmt::print(stderr, "tern-sink: {} {}: {}\n", flag, *file, strerror(errno));
        return 2;
      }
    }
    if (!tls::library_init(err)) {
      fmt::print(stderr, "tern-sink: {}\n", err);
      return 2;
    }
    g.tickets = tls::ticket_key::create(err);
    if (!g.tickets || !make_server_context(o, g.tickets, err)) {
      fmt::print(stderr, "tern-sink: {}\n", err);
      return 2;
    }
    tls::thread_cleanup();
    g.tls_available = true;
  }
  // Capabilities, after "250-hostname".
  std::string& e = g.ehlo_reply;
  e = "\r\n";
  if (o.pipelining) e += "250-PIPELINING\r\n";
  if (o.size)
    e += fmt::format("250-SIZE {}\r\n", o.size);
  else
    e += "250-SIZE\r\n";
  if (o.eightbit) e += "250-8BITMIME\r\n";
  if (o.smtputf8) e += "250-SMTPUTF8\r\n";
  if (o.dsn) e += "250-DSN\r\n";
  g.ehlo_reply_tls = e + "250 ENHANCEDSTATUSCODES\r\n";
  if (g.tls_available && o.starttls && !o.tls_wrapper) e += "250-STARTTLS\r\n";
  e += "250 ENHANCEDSTATUSCODES\r\n";

  // Listeners: one socket per thread and address (SO_REUSEPORT); port 0 is resolved by the
  // first and reused by the others.
  std::vector<std::vector<int>> fds(o.threads);
  for (auto& l : o.listen) {
    auto a = net::address::parse(l);
    if (!a) {
      fmt::print(stderr, "tern-sink: --listen must be ip:port or [ipv6]:port: {}\n", l);
      return 2;
    }
    for (unsigned t = 0; t < o.threads; ++t) {
      int fd = net::open_listener(*a, 4096, err);
      if (fd < 0) {
        fmt::print(stderr, "tern-sink: {}\n", err);
        return 2;
      }
      if (t == 0) *a = net::local_address(fd);
      fds[t].push_back(fd);
    }
    fmt::print(stdout, "tern-sink: listening on {}\n", a->to_string());
  }
  fflush(stdout);

  // Signals go to the main thread only (sigwait); the workers block them all.
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP}) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);

  g.start_ms = core::monotonic_ms();
  std::vector<std::unique_ptr<worker>> ws;
  std::vector<std::thread> threads;
  std::vector<std::future<std::string>> ready;
  for (unsigned t = 0; t < o.threads; ++t) ws.push_back(std::make_unique<worker>(g, t, fds[t]));
  for (unsigned t = 0; t < o.threads; ++t) {
    auto p = std::make_shared<std::promise<std::string>>();
    ready.push_back(p->get_future());
    threads.emplace_back([&, t, p] {
      std::string e2;
      // The ring is set up on its own thread: SINGLE_ISSUER.
      if (!ws[t]->init(e2)) {
        p->set_value(e2.empty() ? "reactor init failed" : e2);
        return;
      }
      p->set_value("");
      ws[t]->run();
      if (g.tls_available) tls::thread_cleanup();
    });
  }
  int rc = 0;
  for (auto& f : ready) {
    auto e2 = f.get();
    if (!e2.empty()) {
      fmt::print(stderr, "tern-sink: {}\n", e2);
      rc = 2;
    }
  }
  while (rc == 0) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (sig == SIGUSR1) {
      print_counters(g, ws, "stats");
      continue;
    }
    if (sig == SIGHUP) continue;
    break;  // SIGTERM, SIGINT, SIGUSR2 (--max-messages reached)
  }
  g.stop.store(true, std::memory_order_release);
  for (auto& w : ws) w->wake();
  for (auto& th : threads) th.join();
  print_counters(g, ws, "exit");
  ws.clear();  // the threads' TLS contexts and transports, before wolfSSL goes
  if (g.tls_available) tls::library_cleanup();
  return rc;
}
