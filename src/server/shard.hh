#pragma once
// A shard: one pinned thread that owns one reactor (io_uring, buffer ring, timer wheel),
// its listening sockets (SO_REUSEPORT), a fixed table of inbound connection slots, its
// spool writer and its counters. Nothing on the data path is shared with other shards;
// other threads read the counters and post to the shard's inbox.
//
// The shard is the reactor's first user (owner kinds: listener, inbound, spool, control).
// The loop order is the reactor's (src/core/reactor.hh): inbox -> reap -> run -> timers ->
// flush -> submit. The shard's parts: completions dispatch per owner kind; `run` hands
// finished spool batches back to their sessions; `flush` starts the next group commit and
// writes the log lines.
//
// Ownership: every SQE's memory belongs to a slot (session buffers, send buffer) or to the
// shard (buffer ring, spool batch). A slot is freed only after its recv and send have
// drained, its message left the spool batch, and its close completed (close = cancel +
// drain); stale completions are recognised by the generation and ignored.
//
// Bounds (docs/architecture.md, "Memory bounds"): unsent output per session
// (limits.output_buffer), unprocessed input per session (limits.input_buffer), buffered
// message data per shard (limits.message_memory), a send that makes no progress
// (limits.send_timeout), idle and session timeouts, junk commands (the session).
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "net/address.hh"
#include "net/proxy.hh"
#include "net/transport.hh"
#include "spool/recovery.hh"
#include "spool/writer.hh"
#include "src/config/config.hh"
#include "src/core/inbox.hh"
#include "src/core/reactor.hh"
#include "src/core/timer_wheel.hh"
#include "src/server/delivery.hh"
#include "src/smtp/session.hh"

namespace tern::server {

// Written only by the owning shard (relaxed stores, no locked instructions), read by any
// thread: the stop summary now, ternctl/metrics and the HA health check later.
struct alignas(64) shard_counters {
  std::atomic<uint64_t> connections{0};      // accepted
  std::atomic<uint64_t> active{0};           // open now
  std::atomic<uint64_t> refused_full{0};     // 421: no free slot
  std::atomic<uint64_t> refused_untrusted{0};// PROXY from an untrusted source
  std::atomic<uint64_t> proxy_errors{0};     // bad or late PROXY header
  std::atomic<uint64_t> messages{0};         // queued (250 sent)
  std::atomic<uint64_t> spool_failures{0};   // 451 after a failed write/fsync
  std::atomic<uint64_t> spool_batches{0};
  std::atomic<uint64_t> enobufs{0};          // recv re-armed for lack of buffers
  std::atomic<uint64_t> input_paused{0};     // recv paused: input piled up during a commit
  std::atomic<uint64_t> output_paused{0};    // input paused: the client does not read its replies
  std::atomic<uint64_t> memory_paused{0};    // DATA paused: the shard's message_memory was in use
  std::atomic<uint64_t> send_timeouts{0};    // closed: a send made no progress for send_timeout
  std::atomic<uint64_t> timeouts{0};         // closed: idle or session timeout
  std::atomic<uint64_t> message_memory{0};   // bytes held by message buffers now
  std::atomic<uint64_t> message_memory_peak{0};
  std::atomic<bool> spool_healthy{true};     // health signal: false while writes fail
  std::atomic<bool> accepting{true};         // false once stop has closed the listeners
};

// Single-writer increment: a plain load and store, not a locked read-modify-write.
inline void bump(std::atomic<uint64_t>& c, uint64_t n = 1) noexcept {
  c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

struct shard_setup {
  uint32_t index = 0;
  int cpu = -1;
  const config::config* cfg = nullptr;
  std::vector<int> listen_fds;  // one per cfg->listen entry
  uint64_t epoch_floor_ms = 0;
  uint64_t segment_floor_id = 0;
  // The recovered queue this shard delivers, and the segments it tracks for reclamation.
  std::vector<spool::queued_message> recovered;
  std::vector<std::string> kept_segments;
  dns::resolver* resolver = nullptr;  // the process's (outlives the shard's loop)
};

// A cross-thread request to a shard: run `fn(arg, shard)` on the shard's thread. The
// sender owns `arg` and learns completion from whatever `fn` signals (an atomic, a future).
class shard;
struct control_msg {
  void (*fn)(void* arg, shard& s) = nullptr;
  void* arg = nullptr;
};

class shard final : public smtp::session_host, private core::completion_handler, private core::loop_hooks {
 public:
  explicit shard(shard_setup s);
  ~shard() override;
  shard(const shard&) = delete;
  shard& operator=(const shard&) = delete;

  // Create the reactor (feature-probed), buffer ring and spool segment. Runs on the shard
  // thread (SINGLE_ISSUER). Returns false with err naming everything that is missing.
  bool init(std::string& err);
  void run();
  // From any thread.
  void request_stop();
  // From any thread: run msg.fn on the shard thread soon. False when the inbox is full.
  bool post(const control_msg& m);
  // From any thread: the shard logs its counters (SIGUSR1), through its inbox.
  bool post_log_stats_ok();
  const shard_counters& counters() const noexcept { return ctr_; }
  // Heartbeat and loop counters (any thread); all zero before init.
  const core::reactor_counters* loop_counters() const noexcept { return rx_ ? &rx_->counters() : nullptr; }
  // Delivery counters (shard thread only: the stop summary reads them after join).
  const delivery* deliveries() const noexcept { return delivery_.get(); }

  // session_host
  void new_queue_id(char (&out)[smtp::queue_id_len + 1]) override;
  bool spool_healthy() const override { return writer_.healthy(); }
  uint64_t wall_us() const override;

 private:
  enum inbound_op : unsigned { op_recv = 1, op_send = 2, op_close = 3 };
  enum listener_op : unsigned { op_accept = 1 };
  enum control_op : unsigned { op_tick = 1 };
  enum class phase : uint8_t { free, proxy, smtp, closing };
  struct conn final : net::byte_sink {
    uint32_t gen = 0;
    uint32_t idx = 0;
    int fd = -1;
    phase ph = phase::free;
    uint8_t listener = 0;
    bool recv_armed = false, recv_cancel_sent = false;
    bool paused_input = false, paused_output = false, paused_memory = false;
    bool send_inflight = false, in_spool = false, close_sent = false, lost = false;
    bool smtp_started = false, aborted = false;
    uint64_t accepted_ms = 0, last_ms = 0, send_progress_ms = 0, timer_at = 0;
    size_t msg_bytes = 0;  // accounted against message_memory
    core::timer tmr;
    net::transport* tp = nullptr;
    net::address peer;
    std::string proxy_buf;
    std::string app_out;  // session output on its way into the transport
    std::string wire_next;  // the transport's own bytes (handshake), waiting for tx
    std::string tx;       // wire bytes; tx[tx_off..] is on the wire or waiting to be
    size_t tx_off = 0;
    smtp::session sess;
    void put(const char* p, size_t n) override { sess.feed(p, n); }
    bool paused() const noexcept { return paused_input || paused_output || paused_memory; }
  };

  // completion_handler / loop_hooks
  void on_completion(const io_uring_cqe& cqe) override;
  void on_timer(core::timer& t) override;
  void on_inbox() override;
  void run_ready() override;
  void flush() override;
  bool keep_running() override;

  void arm_accept(uint32_t li);
  void pause_accept();
  void arm_recv(conn& c);
  void on_accept(uint32_t li, const io_uring_cqe& cqe);
  void on_recv(conn& c, const io_uring_cqe& cqe);
  void on_send(conn& c, int res);
  void on_close(conn& c);
  void on_input(conn& c, const char* p, size_t n);
  void start_smtp(conn& c, const smtp::conn_info& ci);
  void process(conn& c);
  void pump(conn& c);
  void update_pause(conn& c);
  void account(conn& c);
  void resume_memory_paused();
  void arm_timer(conn& c, uint64_t at);
  void begin_close(conn& c);
  void abort(conn& c, const char* why);
  void maybe_finish_close(conn& c);
  void refuse(int fd, const char* text);
  void spool_results();
  void tick();
  void fault_stall();
  void begin_stop();
  void log_stats(const char* what);

  shard_setup setup_;
  const config::config& cfg_;
  smtp::policy policy_;
  std::unique_ptr<core::reactor> rx_;
  std::unique_ptr<core::inbox<control_msg, 64>> inbox_;
  std::atomic<bool> stop_requested_{false};
  bool stopping_ = false;
  std::string fault_stall_path_;  // TERN_FAULT_STALL_DIR/stall-shard-<index>, or empty
  uint64_t fault_next_check_ms_ = 0;
  uint64_t stop_deadline_ms_ = 0;

  core::slot_table<conn> slots_;
  std::vector<bool> accept_armed_;
  bool accept_paused_ = false;
  uint32_t accept_resume_ = 1;
  uint64_t next_busy_log_ms_ = 0;

  // message_memory: who waits for it, and the one session allowed past it so that a
  // message can always finish (no deadlock when every buffer is half full).
  uint64_t msg_mem_ = 0;
  std::vector<uint32_t> mem_waiters_, mem_spare_;
  uint32_t mem_privileged_ = UINT32_MAX;
  uint32_t mem_privileged_gen_ = 0;
  uint32_t mem_skip_ = UINT32_MAX, mem_skip_gen_ = 0;  // the session whose privilege was revoked
  bool resuming_ = false;

  core::timer tick_timer_;
  spool::writer writer_;
  std::vector<spool::writer::result> results_;
  std::unique_ptr<delivery> delivery_;

  shard_counters ctr_;
};

}  // namespace tern::server
