#pragma once
// Per-shard spool writer: appends records to the shard's current segment with group commit.
//
// Sessions that finish a message in one loop iteration append their finished record (the
// bytes stay in the session's buffer: no copy) with a token; flush() then queues ONE
// writev linked to ONE fdatasync on the shard's ring for the whole batch. Only when that
// fdatasync completes does each token learn "durable" (-> 250) or "failed" (-> 451). One
// batch is in flight at a time; what arrives meanwhile forms the next batch, so batches
// grow with load and the fsync rate stays near the disk's limit.
//
// Failure (ENOSPC, EIO, short write): the batch fails, the segment is truncated back to
// where the batch began (nothing half-written is ever counted), and the writer turns
// unhealthy: appends fail at once until a probe (tick) proves the disk writable again.
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
  };
  struct result {
    uint64_t token;
    bool ok;
  };

  writer() = default;
  writer(const writer&) = delete;
  writer& operator=(const writer&) = delete;
  ~writer();

  // Create the shard's first segment (synchronously: header, fdatasync, directory fsync).
  bool open(const options& o, std::string& err);
  // A new queue id (18 characters and a NUL), unique for the life of the spool.
  void next_id(char* out);

  bool healthy() const noexcept { return healthy_; }
  const std::string& last_error() const noexcept { return last_error_; }
  bool idle() const noexcept { return !in_flight_ && pending_.empty(); }
  bool in_flight() const noexcept { return in_flight_; }

  // Queue a finished record. The memory must stay valid and unchanged until the token's
  // result is delivered. When unhealthy the token fails at the next flush.
  void append(const char* p, size_t n, uint64_t token);

  // Start the pending batch if none is in flight. Returns true when SQEs were queued.
  // Results of tokens that fail without I/O (unhealthy) are added to `out`.
  bool flush(io_uring* ring, uint64_t ud_write, uint64_t ud_fsync, std::vector<result>& out);

  // Completions of the two linked SQEs; when both are in, the batch's results are
  // appended to `out`.
  void on_write(int res, std::vector<result>& out);
  void on_fsync(int res, std::vector<result>& out);

  // Once a second: while unhealthy, probe the disk (truncate, write, fdatasync).
  void tick();

  // Statistics (this shard only).
  uint64_t batches() const noexcept { return batches_; }
  uint64_t records() const noexcept { return records_; }
  uint64_t bytes() const noexcept { return bytes_; }
  uint64_t failures() const noexcept { return failures_; }
  const std::string& segment_path() const noexcept { return path_; }

  // Test hook: make the next batch fail as if the disk returned `err` (fault injection).
  void inject_failure(int err) noexcept { inject_ = err; }

 private:
  bool open_segment(std::string& err);
  void finish_batch(std::vector<result>& out);
  void fail_batch(int err, std::vector<result>& out);

  options opt_;
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
  bool in_flight_ = false;
  bool write_seen_ = false, fsync_seen_ = false;
  int write_res_ = 0, fsync_res_ = 0;
  uint64_t batch_bytes_ = 0;
  int inject_ = 0;

  uint64_t batches_ = 0, records_ = 0, bytes_ = 0, failures_ = 0;
};

}  // namespace tern::spool
