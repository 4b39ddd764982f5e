#pragma once
// A shard: one pinned thread that owns one io_uring, its listening sockets (SO_REUSEPORT),
// a fixed pool of session slots, a provided-buffer ring for receives, its spool writer
// and its counters. Nothing on the data path is shared with other shards; other threads
// only read the counters and poke the stop eventfd.
//
// Loop order (one iteration): submit everything queued and wait for at least one
// completion (or the next tick) -> reap all completions in a batch (one cq_advance) ->
// spool results -> start the next group-commit batch -> timers (1 s tick) -> flush the
// log buffer.
//
// Ownership: every SQE's memory belongs to a slot (session buffers, send buffer) or to the
// shard (buffer ring, spool batch). user_data = op | generation | index, never a pointer;
// a slot is freed only after its recv was cancelled and drained, its send completed, its
// message left the spool batch, and its close completed; stale completions are recognised
// by the generation and ignored.
#include <liburing.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "net/address.hh"
#include "net/proxy.hh"
#include "spool/writer.hh"
#include "src/config/config.hh"
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
  std::atomic<bool> spool_healthy{true};     // health signal: false while writes fail
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
};

class shard final : public smtp::session_host {
 public:
  explicit shard(shard_setup s);
  ~shard() override;
  shard(const shard&) = delete;
  shard& operator=(const shard&) = delete;

  // Create the ring (feature-probed), buffer ring and spool segment. Runs on the shard
  // thread (SINGLE_ISSUER). Returns false with err naming everything that is missing.
  bool init(std::string& err);
  void run();
  // From any thread.
  void request_stop();
  const shard_counters& counters() const noexcept { return ctr_; }

  // session_host
  void new_queue_id(char (&out)[smtp::queue_id_len + 1]) override;
  bool spool_healthy() const override { return writer_.healthy(); }
  uint64_t wall_us() const override;

 private:
  enum class op : uint8_t { nop = 0, accept, recv, send, close, cancel, spool_write, spool_fsync, wake };
  enum class phase : uint8_t { free, proxy, smtp, closing };
  struct conn {
    uint32_t gen = 0;
    int fd = -1;
    phase ph = phase::free;
    uint8_t listener = 0;
    bool recv_armed = false, recv_cancel_sent = false, recv_paused = false;
    bool send_inflight = false, in_spool = false, close_sent = false, lost = false;
    bool smtp_started = false;
    uint64_t accepted_ms = 0, last_ms = 0;
    net::address peer;
    std::string proxy_buf;
    std::string tx;
    size_t tx_off = 0;
    smtp::session sess;
  };

  static uint64_t ud(op o, uint32_t gen, uint32_t idx) noexcept {
    return uint64_t(idx) << 32 | uint64_t(gen & 0xFFFFFF) << 8 | uint64_t(o);
  }
  io_uring_sqe* sqe();
  void arm_accept(uint32_t li);
  void arm_recv(conn& c, uint32_t idx);
  void on_cqe(const io_uring_cqe* cqe);
  void on_accept(uint32_t li, const io_uring_cqe* cqe);
  void on_recv(uint32_t idx, const io_uring_cqe* cqe);
  void on_send(uint32_t idx, int res);
  void on_close(uint32_t idx);
  void on_input(conn& c, uint32_t idx, const char* p, size_t n);
  void pump(conn& c, uint32_t idx);
  void begin_close(conn& c, uint32_t idx);
  void maybe_finish_close(conn& c, uint32_t idx);
  void refuse(int fd, const char* text);
  void spool_results();
  void tick();
  uint64_t now_ms() const;

  shard_setup setup_;
  const config::config& cfg_;
  smtp::policy policy_;
  io_uring ring_{};
  bool ring_ok_ = false;
  int wake_fd_ = -1;
  uint64_t wake_buf_ = 0;
  bool stopping_ = false;
  uint64_t stop_deadline_ms_ = 0;

  // provided buffer ring
  io_uring_buf_ring* br_ = nullptr;
  char* bufs_ = nullptr;
  size_t br_bytes_ = 0, bufs_bytes_ = 0;
  uint32_t nbufs_ = 0, buf_size_ = 0;
  static constexpr uint16_t bgid_ = 1;

  std::unique_ptr<conn[]> slots_;
  uint32_t nslots_ = 0;
  std::vector<uint32_t> free_;
  std::vector<bool> accept_armed_;
  bool accept_paused_ = false;
  uint64_t next_busy_log_ms_ = 0;

  spool::writer writer_;
  std::vector<spool::writer::result> results_;
  uint64_t next_tick_ms_ = 0;

  shard_counters ctr_;
};

}  // namespace tern::server
