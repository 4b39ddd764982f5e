#include "spool/writer.hh"

#include <fcntl.h>
#include <sys/mman.h>
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

constexpr size_t max_iov = 1024;      // IOV_MAX
constexpr size_t iov_per_record = 3;  // header, the segment's nonce, payload
// IORING_OP_FTRUNCATE (Linux 6.9); older liburing headers do not name it.
constexpr int op_ftruncate = 55;

void prep_ftruncate(io_uring_sqe* s, int fd, uint64_t len) {
  io_uring_prep_rw(op_ftruncate, s, fd, nullptr, 0, len);
}

}  // namespace

writer::~writer() {
  if (fd_ >= 0) ::close(fd_);
  if (spare_.fd >= 0) ::close(spare_.fd);
  if (zeros_) munmap(const_cast<char*>(zeros_), zeros_len_);
  if (dir_fd_ >= 0) ::close(dir_fd_);
}

void writer::set_nonce(uint64_t n) noexcept {
  for (int i = 0; i < 8; ++i) nonce_bytes_[i] = static_cast<char>(n >> (8 * i));
}

bool writer::open(const options& o, std::string& err) {
  opt_ = o;
  uint64_t now_ms = wall_us() / 1000;
  epoch_ms_ = std::max(now_ms, o.epoch_floor_ms + 1);
  segment_id_ = std::max(now_ms, o.segment_floor_id);
  std::string sd = segment_dir(opt_.dir);
  ::mkdir(opt_.dir.c_str(), 0700);
  ::mkdir(sd.c_str(), 0700);
  dir_fd_ = ::open(sd.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd_ < 0) {
    err = sd + ": " + strerror(errno);
    return false;
  }
  // The first segment synchronously (start-up, before the shard serves anyone).
  segment_id_ = std::max(segment_id_ + 1, now_ms);
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
  if (!pwrite_all(fd, hdr.data(), hdr.size(), 0) || ::fdatasync(fd) != 0 || ::fsync(dir_fd_) != 0) {
    err = path + ": " + strerror(errno);
    ::close(fd);
    ::unlink(path.c_str());
    return false;
  }
  fd_ = fd;
  path_ = path;
  offset_ = hdr.size();
  set_nonce(nonce);
  // prezero: the first segment is only reserved (start-up stays fast); the spare prepared
  // at half of it is zeroed, and taken as soon as it is ready. The zeros come from a 1 MiB
  // anonymous read-only map, written again and again: a map as large as the segment read
  // as the kernel's zero page on older kernels, but 6.18 counts every page that a write
  // read from it (a 64 MiB segment added 64 MiB of RSS during the first rollover).
  cur_zeroed_ = false;
  if (o.prezero) {
    size_t zlen = static_cast<size_t>(std::min<uint64_t>(o.segment_size, zero_chunk));
    void* z = mmap(nullptr, zlen, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (z == MAP_FAILED) {
      log::warn("spool: shard {}: cannot map {} bytes of zeros: segments are reserved, not pre-zeroed", o.shard,
                o.segment_size);
      opt_.prezero = false;
    } else {
      zeros_ = static_cast<const char*>(z);
      zeros_len_ = zlen;
    }
  }
  if (!o.fsync)
    log::warn("spool: shard {}: [spool] fsync = false: mail is acknowledged before it is on disk "
              "and is lost on power loss", o.shard);
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

io_uring_sqe* writer::sqe(unsigned need) {
  // A linked chain must sit in one submission: make room for all of it first.
  if (io_uring_sq_space_left(ring_) < need) io_uring_submit(ring_);
  io_uring_sqe* s = io_uring_get_sqe(ring_);
  if (!s) {
    io_uring_submit(ring_);
    s = io_uring_get_sqe(ring_);
  }
  assert(s != nullptr);  // the SQ was just drained by the submit
  return s;
}

void writer::tag(io_uring_sqe* s, unsigned op) noexcept { io_uring_sqe_set_data64(s, ud_base_ | (op & 0xF)); }

bool writer::flush(io_uring* ring, uint64_t ud_base, std::vector<result>& out) {
  ring_ = ring;
  ud_base_ = ud_base;
  if (in_flight_ || pending_.empty()) return false;
  if (!healthy_) {
    for (auto& it : pending_) out.push_back({it.token, false});
    failures_ += pending_.size();
    pending_.clear();
    return false;
  }
  // segment_size is a soft bound: without a ready spare the current segment grows on
  // (the spare's preparation is retried at the next tick) rather than block the shard.
  // With prezero, a segment that is not pre-zeroed (the first one, or one cut back after
  // a failure) is left as soon as a zeroed spare is ready (prepared at half of it).
  if ((offset_ >= opt_.segment_size || (opt_.prezero && !cur_zeroed_)) && spare_.state == spare_state::ready)
    roll_to_spare();
  size_t n = 0;
  batch_bytes_ = 0;
  while (n < pending_.size() && n < max_iov / iov_per_record &&
         (n == 0 || batch_bytes_ + pending_[n].n <= opt_.max_batch_bytes))
    batch_bytes_ += pending_[n++].n;
  batch_.assign(pending_.begin(), pending_.begin() + static_cast<ptrdiff_t>(n));
  pending_.erase(pending_.begin(), pending_.begin() + static_cast<ptrdiff_t>(n));
  // Each record goes out as its first 12 bytes, the segment nonce (from our memory: the
  // session's record carries zeros there and is not written to), and the payload.
  iov_.clear();
  for (auto& it : batch_) {
    assert(it.n >= record_header_size);
    iov_.push_back({const_cast<char*>(it.p), record_nonce_offset});
    iov_.push_back({nonce_bytes_, 8});
    iov_.push_back({const_cast<char*>(it.p) + record_header_size, it.n - record_header_size});
  }
  iov_at_ = 0;
  written_ = 0;
  in_flight_ = true;
  submit_batch_rest();
  maybe_prepare_spare();
  return true;
}

// Queue the writev of what is left of the batch (all of it at first) at the matching
// offset, linked to an fdatasync unless fsync = false.
void writer::submit_batch_rest() {
  fsync_expected_ = opt_.fsync;
  write_seen_ = fsync_seen_ = false;
  io_uring_sqe* w = sqe(fsync_expected_ ? 2 : 1);
  io_uring_prep_writev(w, fd_, iov_.data() + iov_at_, static_cast<unsigned>(iov_.size() - iov_at_),
                       offset_ + written_);
  tag(w, op_write);
  if (fsync_expected_) {
    w->flags |= IOSQE_IO_LINK;
    io_uring_sqe* f = io_uring_get_sqe(ring_);
    assert(f);
    io_uring_prep_fsync(f, fd_, IORING_FSYNC_DATASYNC);
    tag(f, op_fsync);
  }
}

void writer::on_cqe(unsigned op, int res, std::vector<result>& out) {
  switch (op) {
    case op_write:
      write_seen_ = true;
      write_res_ = res;
      maybe_finish_batch(out);
      return;
    case op_fsync:
      fsync_seen_ = true;
      fsync_res_ = res;
      maybe_finish_batch(out);
      return;
    case op_spare_open:
      --aux_inflight_;
      if (res < 0) {
        log::error("spool: shard {}: cannot create the next segment {}: {}", opt_.shard, spare_.name, strerror(-res));
        spare_.state = spare_state::failed;
        return;
      }
      spare_.fd = res;
      spare_.state = spare_state::preparing;
      if (opt_.prezero) {
        spare_.zeroed = 0;
        spare_.ok = true;
        spare_write_zeros();
        return;
      }
      spare_.ok = true;
      spare_header_chain(true);
      return;
    case op_spare_zero:
      --aux_inflight_;
      if (res <= 0) {  // an error, or no progress: the preparation fails and is retried
        if (res < 0)
          log::error("spool: shard {}: writing zeros into the next segment {}: {}", opt_.shard, spare_.name,
                     strerror(-res));
        spare_.steps_left = 1;
        ++aux_inflight_;  // spare_step_done() counts one down
        spare_step_done(false);
        return;
      }
      spare_.zeroed += static_cast<uint64_t>(res);
      if (spare_.zeroed < opt_.segment_size)
        spare_write_zeros();  // the next chunk, or the rest of a short write
      else
        spare_header_chain(false);
      return;
    case op_spare_header:
      spare_step_done(res == static_cast<int>(spare_.hdr.size()));
      return;
    case op_spare_step:
      // The fallocate is best effort (EOPNOTSUPP on some file systems); the syncs are not.
      spare_step_done(res >= 0 || spare_.steps_left == 4);
      return;
    case op_retire:
      --aux_inflight_;
      if (res < 0 && (res == -EINVAL || res == -EOPNOTSUPP) && !warned_trim_) {
        warned_trim_ = true;
        log::warn("spool: shard {}: trimming a closed segment through the ring failed ({}): this kernel may "
                  "lack IORING_OP_FTRUNCATE (Linux 6.9); its preallocated blocks stay allocated",
                  opt_.shard, strerror(-res));
      }
      return;
    case op_cut:
      --aux_inflight_;
      if (res < 0)
        log::error("spool: shard {}: truncating {} after the failure: {}", opt_.shard, path_, strerror(-res));
      return;
    case op_probe:
    case op_probe_write:
      --aux_inflight_;
      if (op == op_probe_write ? res != static_cast<int>(probe_buf_.size()) : res < 0) probe_ok_ = false;
      if (--probe_left_ == 0) {
        probing_ = false;
        if (probe_ok_) {
          healthy_ = true;
          log::info("spool: shard {}: {} is writable again; accepting mail", opt_.shard, path_);
        }
      }
      return;
    default:
      return;
  }
}

void writer::spare_step_done(bool ok) {
  --aux_inflight_;
  spare_.ok = spare_.ok && ok;
  if (--spare_.steps_left > 0) return;
  if (spare_.ok) {
    spare_.state = spare_state::ready;
    return;
  }
  log::error("spool: shard {}: preparing the next segment {} failed; retrying in a second", opt_.shard, spare_.name);
  // Close and remove the half-made file through the ring.
  io_uring_sqe* c = sqe(2);
  io_uring_prep_close(c, spare_.fd);
  c->flags |= IOSQE_IO_HARDLINK;
  tag(c, op_retire);
  io_uring_sqe* u = io_uring_get_sqe(ring_);
  io_uring_prep_unlinkat(u, dir_fd_, spare_.name.c_str(), 0);
  tag(u, op_retire);
  aux_inflight_ += 2;
  spare_.fd = -1;
  spare_.state = spare_state::failed;
}

// prezero: fill the spare with zeros, one WRITE of up to zero_chunk at a time (the next
// when it completes, or the rest of a short one), not linked: it is long, and nothing
// waits for it. Then the header chain.
void writer::spare_write_zeros() {
  io_uring_sqe* z = sqe();
  uint64_t left = opt_.segment_size - spare_.zeroed;
  io_uring_prep_write(z, spare_.fd, zeros_, static_cast<unsigned>(std::min<uint64_t>(left, zeros_len_)),
                      spare_.zeroed);
  tag(z, op_spare_zero);
  ++aux_inflight_;
}

// One linked chain: [preallocate (reserve; best effort: a hard link, so its failure does
// not cancel the rest)], header, fdatasync (with prezero: the zeros too, and the file's
// size and extents), directory fsync (the new name is durable).
void writer::spare_header_chain(bool reserve) {
  io_uring_sqe* w;
  if (reserve) {
    io_uring_sqe* a = sqe(4);
    io_uring_prep_fallocate(a, spare_.fd, FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(opt_.segment_size));
    a->flags |= IOSQE_IO_HARDLINK;
    tag(a, op_spare_step);
    w = io_uring_get_sqe(ring_);
  } else {
    w = sqe(3);
  }
  io_uring_prep_write(w, spare_.fd, spare_.hdr.data(), static_cast<unsigned>(spare_.hdr.size()), 0);
  w->flags |= IOSQE_IO_LINK;
  tag(w, op_spare_header);
  io_uring_sqe* f = io_uring_get_sqe(ring_);
  io_uring_prep_fsync(f, spare_.fd, IORING_FSYNC_DATASYNC);
  f->flags |= IOSQE_IO_LINK;
  tag(f, op_spare_step);
  io_uring_sqe* d = io_uring_get_sqe(ring_);
  io_uring_prep_fsync(d, dir_fd_, 0);
  tag(d, op_spare_step);
  spare_.steps_left = reserve ? 4 : 3;
  aux_inflight_ += spare_.steps_left;
}

// Past half of segment_size: create the next segment through the ring, so the rollover
// itself is only a switch of file descriptors. (Not earlier: a spool that takes little
// mail never writes a segment of zeros; a busy one has zeroed segments from its second.)
void writer::maybe_prepare_spare() {
  if (spare_.state != spare_state::none || !ring_ || offset_ < opt_.segment_size / 2) return;
  spare_.id = std::max(segment_id_ + 1, wall_us() / 1000);
  spare_.name = segment_name(spare_.id, opt_.shard);
  spare_.nonce = new_nonce();
  spare_.hdr.clear();
  encode_segment_header(spare_.hdr, opt_.shard, spare_.id, wall_us(), spare_.nonce);
  io_uring_sqe* s = sqe();
  io_uring_prep_openat(s, dir_fd_, spare_.name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  tag(s, op_spare_open);
  ++aux_inflight_;
  spare_.state = spare_state::opening;
}

// Switch to the prepared spare; trim the old segment to its end and close it, both
// through the ring (hard-linked: the close happens even if the trim fails).
void writer::roll_to_spare() {
  io_uring_sqe* t = sqe(2);
  prep_ftruncate(t, fd_, offset_);
  t->flags |= IOSQE_IO_HARDLINK;
  tag(t, op_retire);
  io_uring_sqe* c = io_uring_get_sqe(ring_);
  io_uring_prep_close(c, fd_);
  tag(c, op_retire);
  aux_inflight_ += 2;
  fd_ = spare_.fd;
  path_ = segment_dir(opt_.dir) + "/" + spare_.name;
  segment_id_ = spare_.id;
  offset_ = spare_.hdr.size();
  set_nonce(spare_.nonce);
  cur_zeroed_ = opt_.prezero;
  spare_.fd = -1;
  spare_.state = spare_state::none;
  ++rollovers_;
}

void writer::maybe_finish_batch(std::vector<result>& out) {
  if (!write_seen_ || (fsync_expected_ && !fsync_seen_)) return;
  if (inject_) {
    int e = inject_;
    inject_ = 0;
    return fail_batch(e, "write/fdatasync", out);
  }
  if (write_res_ < 0) return fail_batch(-write_res_, "writev", out);
  written_ += static_cast<uint64_t>(write_res_);
  if (written_ < batch_bytes_) {
    // A short write (a regular file: the 0x7ffff000-byte cap of one writev, a signal, or
    // a full disk that the next write will name). The linked fdatasync was cancelled;
    // continue with the rest at the new offset. No progress at all is an error.
    if (write_res_ == 0) return fail_batch(EIO, "writev (no progress)", out);
    ++continued_;
    uint64_t skip = static_cast<uint64_t>(write_res_);
    while (skip > 0) {
      iovec& v = iov_[iov_at_];
      if (skip >= v.iov_len) {
        skip -= v.iov_len;
        ++iov_at_;
      } else {
        v.iov_base = static_cast<char*>(v.iov_base) + skip;
        v.iov_len -= skip;
        skip = 0;
      }
    }
    submit_batch_rest();
    return;
  }
  if (fsync_expected_ && fsync_res_ < 0) return fail_batch(-fsync_res_, "fdatasync", out);
  in_flight_ = false;
  uint64_t at = offset_;
  offset_ += batch_bytes_;
  ++batches_;
  records_ += batch_.size();
  bytes_ += batch_bytes_;
  for (auto& it : batch_) {
    out.push_back({it.token, true, at, segment_id_});
    at += it.n;
  }
  batch_.clear();
  maybe_prepare_spare();
}

void writer::fail_batch(int err, const char* what, std::vector<result>& out) {
  in_flight_ = false;
  failures_ += batch_.size();
  last_error_ = strerror(err);
  log::error("spool: shard {}: {} of {} message(s) ({} bytes) to {} at offset {} failed: {} (errno {})", opt_.shard,
             what, batch_.size(), batch_bytes_, path_, offset_, last_error_, err);
  // Nothing half-written may count: cut the segment back to where this batch began.
  // (That also drops a pre-zeroed segment's zeros: the next zeroed spare replaces it.)
  cur_zeroed_ = false;
  io_uring_sqe* t = sqe();
  prep_ftruncate(t, fd_, offset_);
  tag(t, op_cut);
  ++aux_inflight_;
  healthy_ = false;
  for (auto& it : batch_) out.push_back({it.token, false});
  batch_.clear();
}

void writer::tick(io_uring* ring, uint64_t ud_base) {
  ring_ = ring;
  ud_base_ = ud_base;
  if (spare_.state == spare_state::failed && aux_inflight_ == 0) spare_.state = spare_state::none;
  maybe_prepare_spare();
  if (healthy_ || in_flight_ || probing_) return;
  probe_buf_.clear();
  size_t s = begin_record(probe_buf_, record_type::pad);
  probe_buf_.append(4096, '\0');
  finish_record(probe_buf_, s);
  memcpy(probe_buf_.data() + s + record_nonce_offset, nonce_bytes_, 8);
  // Write a pad record at the last durable offset (over whatever a failed batch left),
  // fdatasync, cut back to that offset (which also drops anything beyond the pad),
  // fdatasync. Hard links throughout: the cut back and its sync run even when the write
  // failed. Four SQEs: the smallest ring a writer needs (the spare's chain is four too).
  io_uring_sqe* w = sqe(4);
  io_uring_prep_write(w, fd_, probe_buf_.data(), static_cast<unsigned>(probe_buf_.size()), offset_);
  w->flags |= IOSQE_IO_HARDLINK;
  tag(w, op_probe_write);
  io_uring_sqe* f = io_uring_get_sqe(ring_);
  io_uring_prep_fsync(f, fd_, IORING_FSYNC_DATASYNC);
  f->flags |= IOSQE_IO_HARDLINK;
  tag(f, op_probe);
  io_uring_sqe* t = io_uring_get_sqe(ring_);
  prep_ftruncate(t, fd_, offset_);
  t->flags |= IOSQE_IO_HARDLINK;
  tag(t, op_probe);
  io_uring_sqe* g = io_uring_get_sqe(ring_);
  io_uring_prep_fsync(g, fd_, IORING_FSYNC_DATASYNC);
  tag(g, op_probe);
  aux_inflight_ += 4;
  probe_left_ = 4;
  probe_ok_ = true;
  probing_ = true;
}

void writer::close() {
  if (fd_ >= 0) {
    // Trim the KEEP_SIZE preallocation beyond the real end, and make the size durable.
    if (::ftruncate(fd_, static_cast<off_t>(offset_)) != 0 || ::fsync(fd_) != 0)
      log::warn("spool: shard {}: trimming {} at stop: {}", opt_.shard, path_, strerror(errno));
    ::close(fd_);
    fd_ = -1;
  }
  if (spare_.fd >= 0) {
    // An unused spare holds only its header: remove it rather than leave an empty segment.
    ::close(spare_.fd);
    spare_.fd = -1;
    if (dir_fd_ >= 0) {
      ::unlinkat(dir_fd_, spare_.name.c_str(), 0);
      ::fsync(dir_fd_);
    }
    spare_.state = spare_state::none;
  }
  if (dir_fd_ >= 0) {
    ::close(dir_fd_);
    dir_fd_ = -1;
  }
}

}  // namespace tern::spool
