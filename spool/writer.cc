#include "spool/writer.hh"

#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>

#include "spool/record.hh"
#include "spool/scan.hh"
#include "src/core/log.hh"

namespace tern::spool {
namespace {

uint64_t wall_us() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000 + uint64_t(ts.tv_nsec) / 1000;
}

bool fsync_dir(const std::string& d) {
  int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

bool pwrite_all(int fd, const char* p, size_t n, uint64_t off) {
  while (n > 0) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      if (w == 0) errno = EIO;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return true;
}

constexpr size_t max_iov = 1024;  // IOV_MAX
constexpr size_t iov_per_record = 3;  // header, the segment's nonce, payload

}  // namespace

writer::~writer() {
  if (fd_ >= 0) ::close(fd_);
}

bool writer::open(const options& o, std::string& err) {
  opt_ = o;
  uint64_t now_ms = wall_us() / 1000;
  epoch_ms_ = std::max(now_ms, o.epoch_floor_ms + 1);
  segment_id_ = std::max(now_ms, o.segment_floor_id);
  if (!open_segment(err)) return false;
  if (!o.fsync)
    log::warn("spool: shard {}: [spool] fsync = false: mail is acknowledged before it is on disk "
              "and is lost on power loss", o.shard);
  return true;
}

bool writer::open_segment(std::string& err) {
  std::string sd = segment_dir(opt_.dir);
  ::mkdir(opt_.dir.c_str(), 0700);
  ::mkdir(sd.c_str(), 0700);
  segment_id_ = std::max(segment_id_ + 1, wall_us() / 1000);
  std::string path = sd + "/" + segment_name(segment_id_, opt_.shard);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    err = path + ": " + strerror(errno);
    return false;
  }
  // Reserve the blocks so appends do not allocate; best effort (tmpfs may be small).
  (void)::fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(opt_.segment_size));
  uint64_t nonce = new_nonce();
  std::string hdr;
  encode_segment_header(hdr, opt_.shard, segment_id_, wall_us(), nonce);
  if (!pwrite_all(fd, hdr.data(), hdr.size(), 0) || ::fdatasync(fd) != 0 || !fsync_dir(sd)) {
    err = path + ": " + strerror(errno);
    ::close(fd);
    ::unlink(path.c_str());
    return false;
  }
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
  path_ = path;
  offset_ = hdr.size();
  for (int i = 0; i < 8; ++i) nonce_bytes_[i] = static_cast<char>(nonce >> (8 * i));
  return true;
}

void writer::next_id(char* out) {
  if (seq_ > 0xFFFFF) {  // 2^20 ids per epoch; then a new epoch
    epoch_ms_ = std::max(epoch_ms_ + 1, wall_us() / 1000);
    seq_ = 0;
  }
  format_queue_id_to(out, epoch_ms_, opt_.shard, seq_++);
}

void writer::append(const char* p, size_t n, uint64_t token) { pending_.push_back({p, n, token}); }

bool writer::flush(io_uring* ring, uint64_t ud_write, uint64_t ud_fsync, std::vector<result>& out) {
  if (in_flight_ || pending_.empty()) return false;
  if (!healthy_) {
    for (auto& it : pending_) out.push_back({it.token, false});
    failures_ += pending_.size();
    pending_.clear();
    return false;
  }
  if (offset_ >= opt_.segment_size) {
    std::string err;
    if (!open_segment(err)) {
      log::error("spool: shard {}: cannot start a new segment: {}", opt_.shard, err);
      healthy_ = false;
      last_error_ = err;
      for (auto& it : pending_) out.push_back({it.token, false});
      failures_ += pending_.size();
      pending_.clear();
      return false;
    }
  }
  size_t n = std::min(pending_.size(), max_iov / iov_per_record);
  batch_.assign(pending_.begin(), pending_.begin() + static_cast<ptrdiff_t>(n));
  pending_.erase(pending_.begin(), pending_.begin() + static_cast<ptrdiff_t>(n));
  iov_.clear();
  batch_bytes_ = 0;
  // Each record goes out as its first 12 bytes, the segment nonce (from our memory: the
  // session's record carries zeros there and is not written to), and the payload.
  for (auto& it : batch_) {
    assert(it.n >= record_header_size);
    iov_.push_back({const_cast<char*>(it.p), record_nonce_offset});
    iov_.push_back({nonce_bytes_, 8});
    iov_.push_back({const_cast<char*>(it.p) + record_header_size, it.n - record_header_size});
    batch_bytes_ += it.n;
  }
  // The linked pair must sit in the same submission: make room for both first.
  unsigned need = opt_.fsync ? 2 : 1;
  if (io_uring_sq_space_left(ring) < need) io_uring_submit(ring);
  io_uring_sqe* w = io_uring_get_sqe(ring);
  assert(w);
  io_uring_prep_writev(w, fd_, iov_.data(), static_cast<unsigned>(iov_.size()), offset_);
  io_uring_sqe_set_data64(w, ud_write);
  write_seen_ = fsync_seen_ = false;
  if (opt_.fsync) {
    io_uring_sqe* f = io_uring_get_sqe(ring);
    assert(f);
    w->flags |= IOSQE_IO_LINK;
    io_uring_prep_fsync(f, fd_, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(f, ud_fsync);
  } else {
    fsync_seen_ = true;  // [spool] fsync = false: the write completion is the commit
    fsync_res_ = 0;
  }
  in_flight_ = true;
  return true;
}

void writer::on_write(int res, std::vector<result>& out) {
  write_seen_ = true;
  write_res_ = res;
  if (fsync_seen_) finish_batch(out);
}

void writer::on_fsync(int res, std::vector<result>& out) {
  fsync_seen_ = true;
  fsync_res_ = res;
  if (write_seen_) finish_batch(out);
}

void writer::finish_batch(std::vector<result>& out) {
  in_flight_ = false;
  int err = 0;
  if (inject_) {
    err = inject_;
    inject_ = 0;
  } else if (write_res_ < 0) {
    err = -write_res_;
  } else if (static_cast<uint64_t>(write_res_) != batch_bytes_) {
    err = ENOSPC;  // a short write to a regular file: out of space in practice
  } else if (fsync_res_ < 0) {
    err = -fsync_res_;
  }
  if (err) {
    fail_batch(err, out);
    return;
  }
  offset_ += batch_bytes_;
  ++batches_;
  records_ += batch_.size();
  bytes_ += batch_bytes_;
  for (auto& it : batch_) out.push_back({it.token, true});
  batch_.clear();
}

void writer::fail_batch(int err, std::vector<result>& out) {
  failures_ += batch_.size();
  last_error_ = strerror(err);
  log::error("spool: shard {}: write/fdatasync of {} message(s) to {} failed: {}", opt_.shard,
             batch_.size(), path_, last_error_);
  // Nothing half-written may count: cut the segment back to where this batch began.
  if (::ftruncate(fd_, static_cast<off_t>(offset_)) != 0)
    log::error("spool: shard {}: truncating {} after the failure: {}", opt_.shard, path_, strerror(errno));
  healthy_ = false;
  for (auto& it : batch_) out.push_back({it.token, false});
  batch_.clear();
}

void writer::tick() {
  if (healthy_ || in_flight_) return;
  // Probe: the tail is cut back, a pad record is written and made durable, then removed.
  if (offset_ >= opt_.segment_size || fd_ < 0) {
    std::string err;
    if (!open_segment(err)) return;
  }
  std::string pad;
  size_t s = begin_record(pad, record_type::pad);
  pad.append(4096, '\0');
  finish_record(pad, s);
  memcpy(pad.data() + s + record_nonce_offset, nonce_bytes_, 8);
  bool ok = ::ftruncate(fd_, static_cast<off_t>(offset_)) == 0 &&
            pwrite_all(fd_, pad.data(), pad.size(), offset_) && ::fdatasync(fd_) == 0 &&
            ::ftruncate(fd_, static_cast<off_t>(offset_)) == 0 && ::fdatasync(fd_) == 0;
  if (ok) {
    healthy_ = true;
    log::info("spool: shard {}: {} is writable again; accepting mail", opt_.shard, path_);
  } else {
    (void)::ftruncate(fd_, static_cast<off_t>(offset_));
  }
}

}  // namespace tern::spool
