#include "src/core/reactor.hh"

#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>

namespace tern::core {
namespace {

constexpr uint32_t max_cq_entries = 65536;  // IORING_MAX_CQ_ENTRIES
constexpr uint32_t max_sq_entries = 32768;  // IORING_MAX_ENTRIES
enum reactor_op : unsigned { op_wake = 1, op_probe = 2 };

void add_missing(std::string& missing, const std::string& what) {
  if (!missing.empty()) missing += ", ";
  missing += what;
}

}  // namespace

uint64_t monotonic_ms() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000 + uint64_t(ts.tv_nsec) / 1000000;
}

// --- buffer ring ------------------------------------------------------------------------

buffer_ring::~buffer_ring() {
  if (br_) munmap(br_, br_bytes_);
  if (bufs_) munmap(bufs_, bufs_bytes_);
}

bool buffer_ring::init(io_uring* ring, uint16_t group, uint32_t count, uint32_t size, std::string& err) {
  if (count == 0 || (count & (count - 1)) != 0 || count > 32768) {
    err = "buffer ring: count must be a power of two up to 32768";
    return false;
  }
  count_ = count;
  size_ = size;
  group_ = group;
  br_bytes_ = (sizeof(io_uring_buf) * count + 4095) & ~size_t(4095);
  bufs_bytes_ = size_t(count) * size;
  void* a = mmap(nullptr, br_bytes_, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
  void* b = mmap(nullptr, bufs_bytes_, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
  if (a == MAP_FAILED || b == MAP_FAILED) {
    if (a != MAP_FAILED) munmap(a, br_bytes_);
    if (b != MAP_FAILED) munmap(b, bufs_bytes_);
    err = std::string("buffer ring: mmap of ") + std::to_string(bufs_bytes_) + " bytes: " + strerror(errno);
    return false;
  }
  br_ = static_cast<io_uring_buf_ring*>(a);
  bufs_ = static_cast<char*>(b);
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<uint64_t>(br_);
  reg.ring_entries = count;
  reg.bgid = group;
  if (int r = io_uring_register_buf_ring(ring, &reg, 0); r < 0) {
    err = std::string("provided buffer rings (kernel >= 5.19): ") + strerror(-r);
    return false;
  }
  io_uring_buf_ring_init(br_);
  int mask = io_uring_buf_ring_mask(count);
  for (uint32_t i = 0; i < count; ++i)
    io_uring_buf_ring_add(br_, buffer(static_cast<uint16_t>(i)), size, static_cast<unsigned short>(i), mask,
                          static_cast<int>(i));
  io_uring_buf_ring_advance(br_, static_cast<int>(count));
  return true;
}

void buffer_ring::recycle(uint16_t bid) noexcept {
  io_uring_buf_ring_add(br_, buffer(bid), size_, bid, io_uring_buf_ring_mask(count_), 0);
  io_uring_buf_ring_advance(br_, 1);
}

// --- reactor ----------------------------------------------------------------------------

reactor::~reactor() {
  if (ok_) io_uring_queue_exit(&ring_);  // before the buffer ring's memory goes
  if (own_wake_fd_ && wake_fd_ >= 0) ::close(wake_fd_);
}

bool reactor::init(const reactor_options& o, std::string& err) {
  opt_ = o;
  uint32_t sq = std::clamp<uint32_t>(o.sq_entries, 8, max_sq_entries);
  uint32_t cq = std::clamp<uint32_t>(o.cq_entries, 2 * sq, max_cq_entries);
  io_uring_params p{};
  p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
  // TASKRUN_FLAG: the kernel raises IORING_SQ_TASKRUN when completions wait to be run, so
  // an idle poll can see work without entering the kernel.
  if (o.defer_taskrun)
    p.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  p.cq_entries = cq;
  int r = io_uring_queue_init_params(sq, &ring_, &p);
  if (r == -EINVAL && o.defer_taskrun) {  // older kernel: no DEFER_TASKRUN
    p = io_uring_params{};
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
    p.cq_entries = cq;
    r = io_uring_queue_init_params(sq, &ring_, &p);
  }
  if (r < 0) {
    err = std::string("io_uring_setup (") + std::to_string(sq) + " SQ / " + std::to_string(cq) +
          " CQ entries): " + strerror(-r) +
          (r == -EPERM ? " (io_uring disabled by kernel.io_uring_disabled or a seccomp policy?)" : "") +
          (r == -ENOMEM ? " (locked memory limit? see RLIMIT_MEMLOCK)" : "");
    return false;
  }
  ok_ = true;
  flags_ = p.flags;
  std::string missing;
  if (io_uring_probe* pr = io_uring_get_probe_ring(&ring_)) {
    std::vector<std::pair<int, const char*>> need = o.required_ops;
    need.emplace_back(IORING_OP_READ, "READ");
    need.emplace_back(IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL");
    for (auto& [opcode, name] : need)
      if (!io_uring_opcode_supported(pr, opcode)) add_missing(missing, std::string("opcode ") + name);
    io_uring_free_probe(pr);
  } else {
    add_missing(missing, "opcode probe (kernel >= 5.6)");
  }
  if (!(p.features & IORING_FEAT_NODROP)) add_missing(missing, "FEAT_NODROP");

  if (o.recv_buffers) {
    std::string e;
    if (!bufs_.init(&ring_, o.buffer_group, o.recv_buffers, o.recv_buffer_size, e)) add_missing(missing, e);
  }
  now_ms_ = monotonic_ms();
  wheel_ = std::make_unique<timer_wheel>(now_ms_);

  // Probe multishot receive by doing one: a RECV with IORING_RECV_MULTISHOT and buffer
  // selection on a socketpair. An old kernel answers -EINVAL; a new one delivers the byte
  // with F_MORE set. Version numbers lie (backports, distribution kernels); this does not.
  if (o.need_multishot_recv && missing.empty() && o.recv_buffers) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      add_missing(missing, std::string("socketpair for the multishot probe: ") + strerror(errno));
    } else {
      io_uring_sqe* s = io_uring_get_sqe(&ring_);
      io_uring_prep_recv_multishot(s, sv[0], nullptr, 0, 0);
      s->flags |= IOSQE_BUFFER_SELECT;
      s->buf_group = bufs_.group();
      io_uring_sqe_set_data64(s, ud::make(owner::reactor, op_probe, 0, 0));
      io_uring_submit(&ring_);
      (void)!::write(sv[1], "x", 1);
      bool supported = false, done = false;
      int res = 0;
      __kernel_timespec ts{1, 0};
      while (!done) {
        io_uring_cqe* cqe = nullptr;
        if (io_uring_wait_cqe_timeout(&ring_, &cqe, &ts) != 0 || !cqe) break;
        if (cqe->user_data == ud::make(owner::reactor, op_probe, 0, 0)) {
          res = cqe->res;
          if (int bid = buffer_ring::id_of(*cqe); bid >= 0) bufs_.recycle(static_cast<uint16_t>(bid));
          if (cqe->res == 1 && (cqe->flags & IORING_CQE_F_MORE)) supported = true;
          done = true;
        }
        io_uring_cqe_seen(&ring_, cqe);
      }
      ::close(sv[1]);
      ::close(sv[0]);  // ends the multishot recv; its last CQE is reaped (and ignored) by the loop
      if (!supported)
        add_missing(missing, std::string("multishot recv (kernel >= 6.0)") + (res < 0 ? std::string(": ") + strerror(-res) : ""));
    }
  }
  if (!missing.empty()) {
    err = "io_uring lacks: " + missing;
    return false;
  }
  if (o.wake_fd >= 0) {
    wake_fd_ = o.wake_fd;
  } else {
    wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) {
      err = std::string("eventfd: ") + strerror(errno);
      return false;
    }
    own_wake_fd_ = true;
  }
  arm_wake();
  return true;
}

uint64_t reactor::refresh_now() noexcept {
  now_ms_ = monotonic_ms();
  return now_ms_;
}

io_uring_sqe* reactor::get_sqe() {
  io_uring_sqe* s = io_uring_get_sqe(&ring_);
  if (!s) {
    ctr_.sq_full.store(ctr_.sq_full.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    io_uring_submit(&ring_);
    s = io_uring_get_sqe(&ring_);
  }
  assert(s != nullptr);  // the SQ was just emptied by the submit
  return s;
}

void reactor::cancel(uint64_t user_data) {
  io_uring_sqe* s = get_sqe();
  io_uring_prep_cancel64(s, user_data, 0);
  io_uring_sqe_set_data64(s, ud::ignore);
}

void reactor::cancel_fd(int fd) {
  io_uring_sqe* s = get_sqe();
  io_uring_prep_cancel_fd(s, fd, IORING_ASYNC_CANCEL_ALL);
  io_uring_sqe_set_data64(s, ud::ignore);
}

void reactor::wake() noexcept {
  uint64_t one = 1;
  if (wake_fd_ >= 0) (void)!::write(wake_fd_, &one, sizeof one);
}

void reactor::arm_wake() {
  io_uring_sqe* s = get_sqe();
  io_uring_prep_read(s, wake_fd_, &wake_buf_, sizeof wake_buf_, 0);
  io_uring_sqe_set_data64(s, ud::make(owner::reactor, op_wake, 0, 0));
}

void reactor::dispatch(const io_uring_cqe& cqe) {
  uint64_t d = cqe.user_data;
  if (d == ud::ignore) return;
  owner k = ud::kind(d);
  if (k == owner::reactor) {
    if (ud::op(d) == op_wake) {
      // The inbox is drained at the top of the next iteration. A READ that failed (not
      // expected on an eventfd: io_uring polls it) is re-armed at the next tick instead of
      // at once, so an error cannot make the loop spin.
      if (cqe.res < 0 && cqe.res != -EINTR) {
        wake_failed_ = true;
        return;
      }
      arm_wake();
    } else if (int bid = buffer_ring::id_of(cqe); bid >= 0) {
      bufs_.recycle(static_cast<uint16_t>(bid));  // the probe's last completion
    }
    return;
  }
  if (completion_handler* h = handlers_[uint8_t(k) & 0xF]) {
    h->on_completion(cqe);
  } else if (int bid = buffer_ring::id_of(cqe); bid >= 0) {
    bufs_.recycle(static_cast<uint16_t>(bid));  // nobody owns it: the buffer still goes back
  }
}

void reactor::reap() {
  unsigned head, n = 0;
  io_uring_cqe* cqe;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    dispatch(*cqe);
    ++n;
  }
  io_uring_cq_advance(&ring_, n);
  if (n) ctr_.completions.store(ctr_.completions.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  if (*ring_.cq.koverflow) ctr_.cq_overflow.store(*ring_.cq.koverflow, std::memory_order_relaxed);
}

void reactor::run_once(loop_hooks& hooks, uint64_t max_wait_ms) {
  if (wake_failed_ && now_ms_ >= wake_retry_ms_) {
    wake_failed_ = false;
    wake_retry_ms_ = now_ms_ + opt_.tick_ms;
    arm_wake();
  }
  // The iteration's clock, read once after the wait: completions, run and timers all see
  // the time at which the loop woke (input stamped with a pre-wait clock would make idle
  // timeouts fire early by as long as the wait lasted).
  refresh_now();
  // 1. inbox
  hooks.on_inbox();
  // 2. reap
  reap();
  // 3. run
  hooks.run_ready();
  // 4. timers
  wheel_->advance(now_ms_, [this](timer& t) noexcept {
    if (completion_handler* h = handlers_[uint8_t(ud::kind(t.data)) & 0xF]) h->on_timer(t);
  });
  // 5. flush
  hooks.flush();
  ctr_.iterations.store(ctr_.iterations.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  ctr_.heartbeat_ms.store(now_ms_, std::memory_order_relaxed);
  if (!hooks.keep_running()) {
    io_uring_submit(&ring_);
    return;
  }
  // 6. submit and wait: for one completion, the next timer, or the tick.
  uint64_t wait = std::min(max_wait_ms, opt_.tick_ms);
  uint64_t next = wheel_->next_deadline();
  if (next != timer_wheel::never) wait = next > now_ms_ ? std::min(wait, next - now_ms_) : 0;
  io_uring_cqe* cqe = nullptr;
  ctr_.submits.store(ctr_.submits.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  if (wait == 0) {
    io_uring_submit(&ring_);
  } else {
    if (opt_.idle_poll_us) idle_poll(std::min<uint64_t>(opt_.idle_poll_us, wait * 1000));
    __kernel_timespec ts{static_cast<long long>(wait / 1000), static_cast<long long>((wait % 1000) * 1000000)};
    io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
  }
}

// Submit, then watch the ring for up to `us` microseconds. Between looks the thread yields,
// so a runnable thread that shares this CPU (a client, the HA thread) runs first: the poll
// only uses time the CPU would otherwise spend idle. Returns true when work arrived; the
// io_uring_enter that follows then runs it without sleeping (or sleeps as before if the
// work was a completion that posts nothing).
bool reactor::idle_poll(uint64_t us) noexcept {
  io_uring_submit(&ring_);
  auto work = [this] {
    return (IO_URING_READ_ONCE(*ring_.sq.kflags) & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) ||
           io_uring_cq_ready(&ring_);
  };
  timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (;;) {
    for (int i = 0; i < 16; ++i) {
      if (work()) {
        ctr_.idle_poll_hits.store(ctr_.idle_poll_hits.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        return true;
      }
      __builtin_ia32_pause();
    }
    timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (uint64_t((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec)) >= us * 1000) break;
    sched_yield();
  }
  ctr_.idle_poll_misses.store(ctr_.idle_poll_misses.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  return false;
}

void reactor::run(loop_hooks& hooks) {
  refresh_now();
  do {
    run_once(hooks, opt_.tick_ms);
  } while (hooks.keep_running());
}

}  // namespace tern::core
