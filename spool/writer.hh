#pragma once
// Per-shard spool writer: appends records to the shard's current segment with group commit.
//
// Sessions that finish a message in one loop iteration append their finished record (the
// bytes stay in the session's buffer: no copy) with a token; flush() then queues ONE
// writev linked to ONE fdatasync on the shard's ring for the whole batch. Only when that
// fdatasync completes does each token learn "durable" (-> 250) or "failed" (-> 451). One
// batch is in flight at a time; what arrives meanwhile forms the next batch, so batches
// grow with load and the fsync rate stays near the disk's limit. A batch is bounded by
// records (three iovecs each: header, the segment nonce, payload; IOV_MAX) and by bytes
// (max_batch_bytes). A short writev (Linux caps one at 0x7ffff000 bytes) is continued at
// the new offset, with a new linked fdatasync, never treated as an error.
//
// No blocking syscall on the data path: only open() (at start) and close() (at stop) are
// synchronous. Segment rollover uses a spare segment prepared through the ring once the
// current one passes half of segment_size (OPENAT on a kept-open directory fd, FALLOCATE,
// header WRITE, FSYNC, directory FSYNC); the closed segment is trimmed to its real end
// (FTRUNCATE: KEEP_SIZE preallocation would leak blocks) and closed through the ring. The
// health probe and the cut-back after a failure go through the ring too.
//
// Failure (ENOSPC, EIO, ...): the batch fails, the segment is cut back to where the batch
// began (nothing half-written is ever counted), and the writer turns unhealthy: appends
// fail at once until a probe (tick) proves the disk writable again. The log names the
// real errno.
//
// user_data: the shard gives a base with the op bits (low 4) zero; every SQE the writer
// queues is tagged base | op (op < 16) and the shard hands those completions to on_cqe.
// The writer remembers the ring and base from flush/tick to queue follow-up SQEs from
// on_cqe (e.g. the next step of a spare segment's preparation).
//
// The ring's SQ must have at least 4 entries (the longest chain: the spare's preparation
// and the health probe).
//
// Not thread-safe: owned by one shard. Does not trust the disk: checks every result.
#include <liburing.h>
#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

namespace tern::spool {

class writer {
 public:
  struct options {
    std::string dir;
    uint32_t shard = 0;
    uint64_t segment_size = 64ull << 20;
    uint64_t epoch_floor_ms = 0;     // queue-id epochs start above this (recovery's max)
    uint64_t segment_floor_id = 0;   // segment ids start above this
    // false ([spool] fsync = false): a batch is one writev without the linked fdatasync
    // and its tokens succeed when the write completes. Dangerous: acknowledged mail is lost
    // on power loss. Segment headers and directory entries are still synced.
    bool fsync = true;
    // A batch stops growing at this many bytes (one record larger than this goes alone).
    uint64_t max_batch_bytes = 64ull << 20;
    // true ([spool] preallocate = "zero"): segments are written full of zeros (and synced)
    // before they are used, so an append overwrites initialised blocks of a file whose size
    // does not change, and its fdatasync has no metadata to commit (no journal commit on
    // ext4/xfs). false ("reserve"): fallocate(KEEP_SIZE), the size grows with every batch.
    bool prezero = true;
  };
  struct result {
    uint64_t token;
    bool ok;
    uint64_t offset = 0;      // ok: where the record starts in its segment
    uint64_t segment_id = 0;  // ok: the segment it is in (segment_name(segment_id, shard))
  };
  // The writer's op codes (low 4 bits of user_data).
  enum op : unsigned {
    op_write = 0,         // the batch's writev
    op_fsync = 1,         // the batch's fdatasync
    op_spare_open = 2,    // spare segment: OPENAT
    op_spare_step = 3,    // spare segment: FALLOCATE, header WRITE, FDATASYNC, directory FSYNC
    op_spare_header = 4,  // spare segment: the header WRITE (its length is checked)
    op_retire = 5,        // old segment: FTRUNCATE to its end, CLOSE; failed spare: CLOSE, UNLINKAT
    op_cut = 6,           // FTRUNCATE back to the last durable offset after a failed batch
    op_probe = 7,         // health probe: FDATASYNC, FTRUNCATE, FDATASYNC
    op_probe_write = 8,   // health probe: the pad WRITE
    op_spare_zero = 9,    // spare segment: a WRITE of zeros (prezero)
  };

  writer() = default;
  writer(const writer&) = delete;
  writer& operator=(const writer&) = delete;
  ~writer();

  // Create the shard's first segment (synchronously: header, fdatasync, directory fsync)
  // and open the segment directory (kept open for the ring's OPENAT and FSYNC).
  bool open(const options& o, std::string& err);
  // A new queue id (18 characters and a NUL), unique for the life of the spool.
  void next_id(char* out);

  bool healthy() const noexcept { return healthy_; }
  const std::string& last_error() const noexcept { return last_error_; }
  // Nothing pending and no SQE of ours in flight (the shard may stop and call close()).
  bool idle() const noexcept { return !in_flight_ && pending_.empty() && aux_inflight_ == 0; }
  // Records appended since the last flush (they go out with the next batch).
  bool has_pending() const noexcept { return !pending_.empty(); }
  bool in_flight() const noexcept { return in_flight_; }
  // Any SQE of ours not completed yet (the batch's or another).
  bool io_pending() const noexcept { return in_flight_ || aux_inflight_ > 0; }

  // Queue a finished record (record.hh; its nonce field is ignored: the writer supplies
  // the segment's). The memory must stay valid and unchanged until the token's result is
  // delivered. When unhealthy the token fails at the next flush.
  void append(const char* p, size_t n, uint64_t token);

  // Start the pending batch if none is in flight (rolling over to the spare segment first
  // when the current one is full). Returns true when SQEs were queued. Results of tokens
  // that fail without I/O (unhealthy) are added to `out`. When the SQ is full it submits
  // and retries; a linked chain always sits in one submission.
  bool flush(io_uring* ring, uint64_t ud_base, std::vector<result>& out);

  // A completion tagged ud_base | op. When a batch is complete its results are appended to
  // `out` (after the fdatasync completion; after the write with fsync = false).
  void on_cqe(unsigned op, int res, std::vector<result>& out);

  // Once a second: while unhealthy, probe the disk through the ring (write a pad record,
  // fdatasync, truncate back, fdatasync); retry a failed spare preparation.
  void tick(io_uring* ring, uint64_t ud_base);

  // At stop, after idle(): trim the current segment to its end (ftruncate: frees the
  // KEEP_SIZE preallocation), fsync, close; remove an unused spare. Synchronous.
  void close();

  // Statistics (this shard only).
  uint64_t batches() const noexcept { return batches_; }
  uint64_t records() const noexcept { return records_; }
  uint64_t bytes() const noexcept { return bytes_; }
  uint64_t failures() const noexcept { return failures_; }
  uint64_t rollovers() const noexcept { return rollovers_; }
  uint64_t continued_writes() const noexcept { return continued_; }
  const std::string& segment_path() const noexcept { return path_; }
  uint64_t segment_id() const noexcept { return segment_id_; }
  uint64_t offset() const noexcept { return offset_; }

  // Test hook: make the next batch fail as if the disk returned `err` (fault injection).
  void inject_failure(int err) noexcept { inject_ = err; }

 private:
  enum class spare_state : uint8_t { none, opening, preparing, ready, failed };
  io_uring_sqe* sqe(unsigned need_in_one_submission = 1);
  void tag(io_uring_sqe* s, unsigned op) noexcept;
  void submit_batch_rest();
  void maybe_finish_batch(std::vector<result>& out);
  void fail_batch(int err, const char* what, std::vector<result>& out);
  void maybe_prepare_spare();
  void spare_step_done(bool ok);
  void roll_to_spare();
  void spare_write_zeros();
  void spare_header_chain(bool reserve);
  void set_nonce(uint64_t n) noexcept;

  options opt_;
  io_uring* ring_ = nullptr;
  uint64_t ud_base_ = 0;
  int dir_fd_ = -1;
  int fd_ = -1;
  std::string path_;
  uint64_t offset_ = 0;
  uint64_t segment_id_ = 0;
  char nonce_bytes_[8] = {};  // the current segment's nonce, little-endian (an iovec source)
  uint64_t epoch_ms_ = 0;
  uint32_t seq_ = 0;
  bool healthy_ = true;
  std::string last_error_;

  struct item {
    const char* p;
    size_t n;
    uint64_t token;
  };
  std::vector<item> pending_;
  std::vector<item> batch_;
  std::vector<iovec> iov_;
  size_t iov_at_ = 0;        // first iovec not fully written
  bool in_flight_ = false;
  bool write_seen_ = false, fsync_seen_ = false, fsync_expected_ = false;
  int write_res_ = 0, fsync_res_ = 0;
  uint64_t batch_bytes_ = 0, written_ = 0;
  int inject_ = 0;

  struct spare {
    spare_state state = spare_state::none;
    int fd = -1;
    std::string name, hdr;
    uint64_t id = 0, nonce = 0;
    unsigned steps_left = 0;
    bool ok = true;
    uint64_t zeroed = 0;  // prezero: bytes of zeros written so far
  } spare_;
  bool cur_zeroed_ = false;       // the current segment was pre-zeroed (prezero)
  // prezero: min(segment_size, zero_chunk) bytes of a read-only anonymous map, the source
  // of every zero WRITE
  static constexpr uint64_t zero_chunk = 1 << 20;
  const char* zeros_ = nullptr;
  size_t zeros_len_ = 0;
  unsigned aux_inflight_ = 0;  // SQEs other than the batch's (spare, retire, cut, probe)
  bool probing_ = false;
  unsigned probe_left_ = 0;
  bool probe_ok_ = true;
  std::string probe_buf_;
  bool warned_trim_ = false;

  uint64_t batches_ = 0, records_ = 0, bytes_ = 0, failures_ = 0, rollovers_ = 0, continued_ = 0;
};

}  // namespace tern::spool
