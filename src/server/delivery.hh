#pragma once
// Delivery on a shard: the queue manager (src/queue/manager.hh) driven through the shard's
// reactor. It reads queued messages back from the spool, opens outbound SMTP/LMTP
// connections (owner kind `outbound`), runs one smtp::client per connection, writes each
// round's status/done records through the shard's spool writer, and removes segments the
// manager says are dead. The shard calls it from its loop hooks; nothing here blocks.
//
// Ownership (as in the inbound server): every SQE points into memory owned by a slot (an
// outbound connection's send buffer and address, a load's buffer inside the manager) or by
// this object (the segment directory name). A connection slot is freed only after its
// recv, send and connect completions have drained and its close has completed.
//
// Per-stage timers: each connection has one timer in the wheel, armed for the deadline of
// the client's current stage (queue.*_timeout). A connect that does not complete in
// queue.connect_timeout is cancelled and counts as a host failure.
//
// Trust: the next hop's bytes are untrusted and go only through the transport into the
// sans-I/O client, which bounds and validates them. The spool records it reads back are
// ours but are decoded with the same checks as at recovery.
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "net/address.hh"
#include "net/transport.hh"
#include "spool/recovery.hh"
#include "spool/writer.hh"
#include "src/config/config.hh"
#include "src/dns/resolver.hh"
#include "src/core/reactor.hh"
#include "src/queue/manager.hh"
#include "src/smtp/client.hh"
#include "tls/context.hh"
#include "tls/transport.hh"

namespace tern::server {

struct delivery_counters {
  uint64_t connections = 0, connect_failures = 0, messages_sent = 0;
  uint64_t delivered = 0, deferred = 0, bounced = 0;
  uint64_t loads = 0, load_failures = 0, segments_removed = 0;
  uint64_t tls_handshakes = 0, tls_failures = 0, dns_failures = 0;
};

class delivery final : private core::completion_handler {
 public:
  // Writer tokens of delivery records carry this bit (the shard routes their results here).
  static constexpr uint64_t token_bit = uint64_t(1) << 63;
  static constexpr uint64_t last_piece = uint64_t(1) << 62;   // the round's last record
  static constexpr uint64_t first_piece = uint64_t(1) << 61;  // its first (where a copy landed)
  static constexpr uint64_t dsn_piece = uint64_t(1) << 60;    // a DSN message we generated

  // Hands a DNS answer to this shard's thread (its inbox); false when the inbox is full.
  using poster = bool (*)(void* owner, void* arg);

  delivery(core::reactor& rx, const config::config& cfg, uint32_t shard, spool::writer& w);
  ~delivery() override;
  delivery(const delivery&) = delete;
  delivery& operator=(const delivery&) = delete;

  // After the reactor and writer are up: open the segment directory, take the recovered
  // messages and the segments that recovery kept.
  bool init(std::vector<spool::queued_message> recovered, const std::vector<std::string>& kept_segments,
            std::string& err);
  // Name resolution: the process's resolver (may be null: names then fail as deferrals)
  // and how its answers come back to this thread.
  void set_resolver(dns::resolver* r, poster post, void* owner) noexcept {
    resolver_ = r;
    post_ = post;
    post_owner_ = owner;
  }
  // On the shard thread: a DNS answer posted by poster (arg is what the callback got).
  static void dns_arrived(void* arg);

  // A message got its 250: its record is durable at (segment, offset). `record` is the
  // session's record (for its id and arrival time).
  void committed(std::string_view record, const std::string& segment, uint64_t offset);
  // A result of the spool writer for one of our tokens.
  void record_result(uint64_t token, bool ok, const std::string& segment, uint64_t offset);

  // Loop hooks (the shard calls them): start loads, connections and spool appends.
  void pump();
  void tick();
  void begin_stop();
  // Nothing in flight that must finish before the shard stops.
  bool idle() const;

  const delivery_counters& counters() const noexcept { return ctr_; }
  size_t queued() const noexcept { return mgr_.queued(); }
  // TLS 1.3 resumptions over all client contexts (each counts its own).
  uint64_t tls_resumed() const noexcept {
    uint64_t n = 0;
    for (const auto& [k, c] : tls_ctx_) n += c->stats().resumed;
    return n;
  }

 private:
  enum op : unsigned { op_connect = 1, op_recv = 2, op_send = 3, op_close = 4, op_open = 5, op_read = 6,
                       op_unlink = 7, op_dirsync = 8, op_hold = 9 };
  enum class phase : uint8_t { free, resolving, connecting, live, closing };

  struct oconn final : net::byte_sink {
    uint32_t gen = 0;
    uint32_t idx = 0;
    int fd = -1;
    phase ph = phase::free;
    uint32_t dest = 0;
    int host = 0;
    const config::next_hop* hop = nullptr;
    net::address addr;
    std::string relay;  // "host[ip]:port" for logs
    std::string peer_name;  // the host name connected to (the MX host with mx = true)
    // Where to connect, in order: the addresses of the name, or of the MX hosts by
    // preference (at most max_candidates); a failure before the session is established
    // moves on to the next one within the same attempt (postfix's smtp_mx_address_limit).
    std::vector<std::pair<std::string, net::address>> cands;
    size_t cand_at = 0;
    bool established = false;  // reached idle once (greeting, EHLO, TLS, AUTH done)
    bool connect_inflight = false, recv_armed = false, send_inflight = false, close_sent = false;
    bool cancel_sent = false;
    smtp::client cl;
    net::transport* tp = nullptr;
    std::unique_ptr<tls::transport> tls;  // after STARTTLS
    tls::context* tls_ctx = nullptr;       // this hop's client context (nullptr: no TLS)
    // Wire bytes: `tx` is what the send in flight points into and is never touched while
    // that send runs; everything produced meanwhile (client output through the transport,
    // TLS handshake bytes) goes to `wire`, which send_tx() moves over when tx is done.
    std::string app_out, tx, wire;
    size_t tx_off = 0;
    std::unique_ptr<queue::job> job;
    bool job_sent = false;  // job given to the client: its results are the job's
    std::vector<spool::rcpt_view> rcpts;
    uint64_t start_ms = 0, ready_ms = 0, job_ms = 0, deadline_ms = 0, idle_since_ms = 0;
    uint32_t jobs = 0;  // messages finished on this connection
    core::timer tmr;
    void put(const char* p, size_t n) override { cl.feed(p, n); }
  };
  struct load {
    uint32_t gen = 0;
    queue::msg_handle msg = 0;
    std::string path;
    int fd = -1;
    uint64_t offset = 0, size = 0, done = 0;
  };

  void on_completion(const io_uring_cqe& cqe) override;
  void on_timer(core::timer& t) override;

  // Loads.
  void start_load(const queue::load_request& req);
  void read_more(uint32_t li);
  void on_open(uint32_t li, int res);
  void on_read(uint32_t li, int res);
  void end_load(uint32_t li, bool ok, const std::string& err);
  // Connections.
  void open_connection(const queue::connect_request& req);
  void prepare_slot(oconn& c, uint32_t idx, uint32_t dest, int host, const config::next_hop& hop);
  void connect_to(oconn& c, const net::address& a);
  struct dns_wait;
  void on_dns(dns_wait* w);
  void on_connect(oconn& c, int res);
  void on_recv(oconn& c, const io_uring_cqe& cqe);
  void on_send(oconn& c, int res);
  void drive(oconn& c);
  void send_tx(oconn& c);
  void finish_job(oconn& c);
  void arm_stage_timer(oconn& c);
  void fail_connection(oconn& c, const char* dsn, const std::string& why);
  // Before the session is established: try the next candidate address on a fresh slot;
  // false when there is none left (the caller reports the failure).
  bool try_next_candidate(oconn& c, const std::string& why);
  void begin_close(oconn& c);
  void maybe_release(oconn& c);
  // Spool.
  void write_records();
  void remove_segments();
  void log_results();
  void make_dsns(const queue::round_result& r, uint64_t now);
  uint64_t now_us() const;
  uint64_t stage_timeout_ms(smtp::client_stage s) const;
  smtp::client_config client_config_for(const config::next_hop& hop) const;
  tls::context* tls_context_for(const config::next_hop& hop) const;
  void start_tls(oconn& c);
  void check_tls(oconn& c);

  core::reactor& rx_;
  const config::config& cfg_;
  uint32_t shard_;
  spool::writer& writer_;
  queue::routing routes_;
  queue::manager mgr_;
  core::slot_table<oconn> conns_;
  core::slot_table<load> loads_;
  std::unordered_map<std::string, int> seg_fds_;  // read-only fds of segments with queued mail
  int dir_fd_ = -1;
  dns::resolver* resolver_ = nullptr;
  poster post_ = nullptr;
  void* post_owner_ = nullptr;
  uint32_t dns_inflight_ = 0;  // bounded: answers must fit the shard's inbox
  uint64_t hold_since_ms_ = 0;  // rounds' records waiting for a batch to join (write_records)
  core::timer hold_tmr_;
  std::string unlinking_;  // the segment being removed (its name outlives the SQE)
  bool unlink_inflight_ = false;
  bool stopping_ = false;
  std::vector<uint32_t> idle_;  // established connections without a job
  std::unordered_map<std::string, std::string> password_cache_;
  // One client TLS context per (minimum version, CA file) in use: the hops' policies.
  std::unordered_map<std::string, std::unique_ptr<tls::context>> tls_ctx_;
  struct piece {
    bool ok = true;
    std::string segment;
    uint64_t offset = 0;
  };
  std::unordered_map<uint64_t, piece> first_;  // rounds whose records are being written
  std::unordered_map<uint64_t, std::string> dsn_records_;  // DSN messages until durable
  uint64_t next_dsn_token_ = 1;
  delivery_counters ctr_;
};

}  // namespace tern::server
