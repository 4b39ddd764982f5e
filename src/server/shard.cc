#include "src/server/shard.hh"

#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>

#include "src/core/log.hh"

namespace tern::server {
namespace {
constexpr size_t pause_input = 256 * 1024;  // stop reading while a commit waits and this much is queued
// The spool writer tags its SQEs with this base | its op (0..15): kind 15 in bits 4..7.
constexpr uint64_t spool_ud_base = 0xF0;
}

shard::shard(shard_setup s) : setup_(std::move(s)), cfg_(*setup_.cfg) {
  policy_.hostname = cfg_.hostname;
  policy_.limits = cfg_.limits;
  policy_.relay_networks = cfg_.relay.networks;
  policy_.relay_domains = cfg_.relay.domains;
}

shard::~shard() {
  for (uint32_t i = 0; i < nslots_; ++i)
    if (slots_[i].fd >= 0) ::close(slots_[i].fd);
  for (int fd : setup_.listen_fds)
    if (fd >= 0) ::close(fd);
  if (ring_ok_) io_uring_queue_exit(&ring_);
  if (br_) munmap(br_, br_bytes_);
  if (bufs_) munmap(bufs_, bufs_bytes_);
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

uint64_t shard::now_ms() const {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000 + uint64_t(ts.tv_nsec) / 1000000;
}

uint64_t shard::wall_us() const {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000 + uint64_t(ts.tv_nsec) / 1000;
}

void shard::new_queue_id(char (&out)[smtp::queue_id_len + 1]) { writer_.next_id(out); }

bool shard::init(std::string& err) {
  if (setup_.cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(setup_.cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  }
  // --- ring, with the features we need; name everything missing in one error ---
  nslots_ = cfg_.limits.connections;
  io_uring_params p{};
  p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
            IORING_SETUP_SUBMIT_ALL;
  p.cq_entries = std::max<uint32_t>(4096, nslots_ * 4);
  int r = io_uring_queue_init_params(1024, &ring_, &p);
  if (r == -EINVAL) {  // older kernel: no DEFER_TASKRUN
    p = io_uring_params{};
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL;
    p.cq_entries = std::max<uint32_t>(4096, nslots_ * 4);
    r = io_uring_queue_init_params(1024, &ring_, &p);
  }
  if (r < 0) {
    err = std::string("io_uring_setup: ") + strerror(-r) +
          (r == -EPERM ? " (io_uring disabled by kernel.io_uring_disabled or a seccomp policy?)" : "");
    return false;
  }
  ring_ok_ = true;
  std::string missing;
  if (io_uring_probe* pr = io_uring_get_probe_ring(&ring_)) {
    struct {
      int op;
      const char* name;
    } need[] = {{IORING_OP_ACCEPT, "ACCEPT"}, {IORING_OP_RECV, "RECV"},   {IORING_OP_SEND, "SEND"},
                {IORING_OP_WRITEV, "WRITEV"}, {IORING_OP_FSYNC, "FSYNC"}, {IORING_OP_CLOSE, "CLOSE"},
                {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL"}, {IORING_OP_READ, "READ"}};
    for (auto& n : need)
      if (!io_uring_opcode_supported(pr, n.op)) missing += std::string(missing.empty() ? "" : ", ") + "opcode " + n.name;
    io_uring_free_probe(pr);
  } else {
    missing = "opcode probe (kernel >= 5.6)";
  }
  if (!(p.features & IORING_FEAT_NODROP)) missing += std::string(missing.empty() ? "" : ", ") + "FEAT_NODROP";
  utsname u;
  int major = 0, minor = 0;
  if (uname(&u) == 0) sscanf(u.release, "%d.%d", &major, &minor);
  if (major < 6) missing += std::string(missing.empty() ? "" : ", ") + "multishot recv (kernel >= 6.0)";

  // --- provided buffer ring for multishot recv ---
  nbufs_ = cfg_.tuning.recv_buffers;
  buf_size_ = cfg_.tuning.recv_buffer_size;
  br_bytes_ = (sizeof(io_uring_buf) * nbufs_ + 4095) & ~size_t(4095);
  bufs_bytes_ = size_t(nbufs_) * buf_size_;
  br_ = static_cast<io_uring_buf_ring*>(mmap(nullptr, br_bytes_, PROT_READ | PROT_WRITE,
                                             MAP_ANONYMOUS | MAP_PRIVATE, -1, 0));
  bufs_ = static_cast<char*>(mmap(nullptr, bufs_bytes_, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0));
  if (br_ == MAP_FAILED || bufs_ == MAP_FAILED) {
    br_ = nullptr;
    bufs_ = nullptr;
    err = "mmap of the receive buffers failed";
    return false;
  }
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<uint64_t>(br_);
  reg.ring_entries = nbufs_;
  reg.bgid = bgid_;
  r = io_uring_register_buf_ring(&ring_, &reg, 0);
  if (r < 0) missing += std::string(missing.empty() ? "" : ", ") + "provided buffer rings (kernel >= 5.19): " + strerror(-r);
  if (!missing.empty()) {
    err = "io_uring lacks: " + missing;
    return false;
  }
  io_uring_buf_ring_init(br_);
  int mask = io_uring_buf_ring_mask(nbufs_);
  for (uint32_t i = 0; i < nbufs_; ++i)
    io_uring_buf_ring_add(br_, bufs_ + size_t(i) * buf_size_, buf_size_, static_cast<unsigned short>(i), mask, static_cast<int>(i));
  io_uring_buf_ring_advance(br_, static_cast<int>(nbufs_));

  // --- slots, spool, wake-up eventfd ---
  slots_ = std::make_unique<conn[]>(nslots_);
  free_.reserve(nslots_);
  for (uint32_t i = nslots_; i-- > 0;) free_.push_back(i);
  accept_armed_.assign(setup_.listen_fds.size(), false);
  results_.reserve(1024);

  spool::writer::options wo;
  wo.dir = cfg_.spool.dir;
  wo.shard = setup_.index;
  wo.segment_size = cfg_.spool.segment_size;
  wo.fsync = cfg_.spool.fsync;
  wo.max_batch_bytes = cfg_.spool.max_batch_bytes;
  wo.epoch_floor_ms = setup_.epoch_floor_ms;
  wo.segment_floor_id = setup_.segment_floor_id;
  if (!writer_.open(wo, err)) {
    err = "spool: " + err;
    return false;
  }
  wake_fd_ = eventfd(0, EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    err = std::string("eventfd: ") + strerror(errno);
    return false;
  }
  return true;
}

void shard::request_stop() {
  uint64_t one = 1;
  if (wake_fd_ >= 0) (void)!::write(wake_fd_, &one, sizeof one);
}

io_uring_sqe* shard::sqe() {
  io_uring_sqe* s = io_uring_get_sqe(&ring_);
  if (!s) {
    io_uring_submit(&ring_);
    s = io_uring_get_sqe(&ring_);
  }
  assert(s != nullptr);
  return s;
}

void shard::arm_accept(uint32_t li) {
  auto* s = sqe();
  io_uring_prep_multishot_accept(s, setup_.listen_fds[li], nullptr, nullptr, SOCK_CLOEXEC);
  io_uring_sqe_set_data64(s, ud(op::accept, 0, li));
  accept_armed_[li] = true;
}

void shard::arm_recv(conn& c, uint32_t idx) {
  auto* s = sqe();
  io_uring_prep_recv_multishot(s, c.fd, nullptr, 0, 0);
  s->flags |= IOSQE_BUFFER_SELECT;
  s->buf_group = bgid_;
  io_uring_sqe_set_data64(s, ud(op::recv, c.gen, idx));
  c.recv_armed = true;
  c.recv_cancel_sent = false;
}

void shard::run() {
  log::buffer_this_thread(true);
  {
    auto* s = sqe();
    io_uring_prep_read(s, wake_fd_, &wake_buf_, sizeof wake_buf_, 0);
    io_uring_sqe_set_data64(s, ud(op::wake, 0, 0));
  }
  next_tick_ms_ = now_ms() + 1000;
  for (;;) {
    if (!stopping_ && !accept_paused_)
      for (uint32_t li = 0; li < accept_armed_.size(); ++li)
        if (!accept_armed_[li]) arm_accept(li);

    uint64_t now = now_ms();
    uint64_t wait_ms = next_tick_ms_ > now ? next_tick_ms_ - now : 0;
    __kernel_timespec ts{static_cast<long long>(wait_ms / 1000), static_cast<long long>((wait_ms % 1000) * 1000000)};
    io_uring_cqe* cqe = nullptr;
    int r = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
    if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY) {
      log::error("shard {}: io_uring_submit_and_wait: {}", setup_.index, strerror(-r));
    }
    unsigned head, n = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      on_cqe(cqe);
      ++n;
    }
    io_uring_cq_advance(&ring_, n);

    // Group commit: everything that finished in this iteration goes out as one linked
    // writev + fdatasync, submitted with the next io_uring_enter at the top of the loop.
    writer_.flush(&ring_, spool_ud_base, results_);
    if (!results_.empty()) spool_results();

    if (ctr_.spool_healthy.load(std::memory_order_relaxed) != writer_.healthy())
      ctr_.spool_healthy.store(writer_.healthy(), std::memory_order_relaxed);
    if (now_ms() >= next_tick_ms_) {
      tick();
      next_tick_ms_ = now_ms() + 1000;
    }
    log::flush();
    if (stopping_ && ((free_.size() == nslots_ && writer_.idle()) || now_ms() >= stop_deadline_ms_)) break;
  }
  writer_.close();  // trims the segment's preallocated space
  log::info("shard {}: stopped: connections={} messages={} spool_batches={} ({:.1f} messages per fdatasync) "
            "spool_failures={} refused_full={} refused_untrusted={} proxy_errors={} enobufs={} input_paused={}",
            setup_.index, ctr_.connections.load(), ctr_.messages.load(), writer_.batches(),
            writer_.batches() ? double(writer_.records()) / double(writer_.batches()) : 0.0,
            ctr_.spool_failures.load(), ctr_.refused_full.load(), ctr_.refused_untrusted.load(),
            ctr_.proxy_errors.load(), ctr_.enobufs.load(), ctr_.input_paused.load());
  log::buffer_this_thread(false);
}

void shard::on_cqe(const io_uring_cqe* cqe) {
  uint64_t d = cqe->user_data;
  if ((d & 0xF0) == spool_ud_base) return writer_.on_cqe(static_cast<unsigned>(d & 0xF), cqe->res, results_);
  auto o = static_cast<op>(d & 0xFF);
  uint32_t gen = static_cast<uint32_t>((d >> 8) & 0xFFFFFF);
  uint32_t idx = static_cast<uint32_t>(d >> 32);
  switch (o) {
    case op::nop:
    case op::cancel:
      return;
    case op::wake:
      stopping_ = true;
      stop_deadline_ms_ = now_ms() + 5000;
      for (uint32_t li = 0; li < setup_.listen_fds.size(); ++li) {
        if (accept_armed_[li]) {  // the armed accept holds the socket open: cancel it
          auto* s = sqe();
          io_uring_prep_cancel64(s, ud(op::accept, 0, li), 0);
          io_uring_sqe_set_data64(s, ud(op::cancel, 0, 0));
        }
        ::close(setup_.listen_fds[li]);
        setup_.listen_fds[li] = -1;
      }
      for (uint32_t i = 0; i < nslots_; ++i) {
        conn& c = slots_[i];
        if (c.ph == phase::smtp && !c.sess.commit_pending()) {
          c.sess.shutdown();  // 421 4.3.2 and close once it is sent
          pump(c, i);
        } else if (c.ph == phase::proxy) {
          begin_close(c, i);
        }
      }
      return;
    case op::accept:
      on_accept(idx, cqe);
      return;
    default:
      break;
  }
  if (idx >= nslots_) return;
  conn& c = slots_[idx];
  if ((c.gen & 0xFFFFFF) != gen || c.ph == phase::free) {
    // A completion for an earlier use of this slot; its buffer must still go back.
    if (o == op::recv && (cqe->flags & IORING_CQE_F_BUFFER)) {
      uint16_t bid = static_cast<uint16_t>(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
      io_uring_buf_ring_add(br_, bufs_ + size_t(bid) * buf_size_, buf_size_, bid, io_uring_buf_ring_mask(nbufs_), 0);
      io_uring_buf_ring_advance(br_, 1);
    }
    return;
  }
  switch (o) {
    case op::recv: on_recv(idx, cqe); return;
    case op::send: on_send(idx, cqe->res); return;
    case op::close: on_close(idx); return;
    default: return;
  }
}

void shard::refuse(int fd, const char* text) {
  // Rare path (pool exhausted, untrusted proxy): a best-effort non-blocking send, then close.
  if (text) (void)!::send(fd, text, strlen(text), MSG_DONTWAIT | MSG_NOSIGNAL);
  ::close(fd);
}

void shard::on_accept(uint32_t li, const io_uring_cqe* cqe) {
  if (!(cqe->flags & IORING_CQE_F_MORE) && li < accept_armed_.size()) accept_armed_[li] = false;
  if (cqe->res < 0) {
    if (cqe->res != -ECANCELED && !stopping_) {
      log::warn("shard {}: accept: {}", setup_.index, strerror(-cqe->res));
      if (cqe->res == -EMFILE || cqe->res == -ENFILE) accept_paused_ = true;  // resume when a slot frees
    }
    return;
  }
  int fd = cqe->res;
  if (stopping_) {
    refuse(fd, "421 4.3.2 Service shutting down\r\n");
    return;
  }
  const auto& L = cfg_.listen[li];
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  net::address peer = net::address::from_sockaddr(reinterpret_cast<sockaddr*>(&ss), len);
  if (L.proxy_protocol && !net::any_contains(L.trusted_proxies, peer)) {
    bump(ctr_.refused_untrusted);
    log::warn("reject: connection from {} to PROXY listener {}: not in trusted_proxies", peer.ip(), L.address_text);
    refuse(fd, nullptr);
    return;
  }
  if (free_.empty()) {
    bump(ctr_.refused_full);
    if (!accept_paused_) {
      uint64_t now = now_ms();
      if (now >= next_busy_log_ms_) {  // at most one line per 10 s under sustained overload
        log::warn("shard {}: all {} session slots busy: answering 421 4.3.2 and pausing accept "
                  "({} connection(s) refused so far)",
                  setup_.index, nslots_, ctr_.refused_full.load(std::memory_order_relaxed));
        next_busy_log_ms_ = now + 10000;
      }
      accept_paused_ = true;
      for (uint32_t l = 0; l < accept_armed_.size(); ++l) {
        if (!accept_armed_[l]) continue;
        auto* s = sqe();
        io_uring_prep_cancel64(s, ud(op::accept, 0, l), 0);
        io_uring_sqe_set_data64(s, ud(op::cancel, 0, 0));
      }
    }
    refuse(fd, "421 4.3.2 Too many connections, try again later\r\n");
    return;
  }
  uint32_t idx = free_.back();
  free_.pop_back();
  conn& c = slots_[idx];
  c.gen = (c.gen + 1) & 0xFFFFFF;
  c.fd = fd;
  c.listener = static_cast<uint8_t>(li);
  c.recv_armed = c.recv_cancel_sent = c.recv_paused = false;
  c.send_inflight = c.in_spool = c.close_sent = c.lost = false;
  c.accepted_ms = c.last_ms = now_ms();
  c.peer = peer;
  c.proxy_buf.clear();
  c.tx.clear();
  c.tx_off = 0;
  bump(ctr_.connections);
  bump(ctr_.active);
  arm_recv(c, idx);
  if (L.proxy_protocol) {
    c.ph = phase::proxy;  // no banner until the whole header is in
    return;
  }
  c.ph = phase::smtp;
  c.smtp_started = true;
  smtp::conn_info ci;
  ci.client = peer;
  ci.peer = peer;
  c.sess.reset(&policy_, this, ci);
  c.sess.start(writer_.healthy() ? nullptr : "421 4.3.0 Spool unavailable, try again later");
  pump(c, idx);
}

void shard::on_recv(uint32_t idx, const io_uring_cqe* cqe) {
  conn& c = slots_[idx];
  bool more = cqe->flags & IORING_CQE_F_MORE;
  if (!more) c.recv_armed = false;
  int res = cqe->res;
  if (res > 0) {
    uint16_t bid = static_cast<uint16_t>(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
    char* b = bufs_ + size_t(bid) * buf_size_;
    if (c.ph == phase::proxy || c.ph == phase::smtp) on_input(c, idx, b, static_cast<size_t>(res));
    // The bytes were copied into the session: the buffer goes straight back.
    io_uring_buf_ring_add(br_, b, buf_size_, bid, io_uring_buf_ring_mask(nbufs_), 0);
    io_uring_buf_ring_advance(br_, 1);
  } else if (res == -ENOBUFS) {
    bump(ctr_.enobufs);  // flow control: re-arm below
  } else if (res == -ECANCELED) {
    // our cancel (closing or pausing)
  } else {
    // 0 = EOF, or a socket error (ECONNRESET...): the client is gone.
    c.lost = c.ph == phase::smtp && !c.sess.closing();
    if (c.ph != phase::closing) begin_close(c, idx);
    maybe_finish_close(c, idx);
    return;
  }
  if (!c.recv_armed) {
    if (c.ph == phase::closing) {
      maybe_finish_close(c, idx);
    } else if (!c.recv_paused) {
      arm_recv(c, idx);
    }
  }
}

void shard::on_input(conn& c, uint32_t idx, const char* p, size_t n) {
  c.last_ms = now_ms();
  if (c.ph == phase::proxy) {
    c.proxy_buf.append(p, n);
    net::proxy_header h;
    const auto& L = cfg_.listen[c.listener];
    auto r = net::parse_proxy({reinterpret_cast<const unsigned char*>(c.proxy_buf.data()), c.proxy_buf.size()}, h,
                              L.proxy_max_header);
    if (r.status == net::proxy_status::need_more) return;
    if (r.status == net::proxy_status::error) {
      bump(ctr_.proxy_errors);
      log::warn("reject: bad PROXY header from {}: {}", c.peer.ip(), r.error);
      begin_close(c, idx);
      return;
    }
    smtp::conn_info ci;
    ci.peer = c.peer;
    ci.client = h.local ? c.peer : h.src;
    ci.proxied = !h.local;
    ci.proxy_version = h.version;
    c.ph = phase::smtp;
    c.smtp_started = true;
    c.sess.reset(&policy_, this, ci);
    c.sess.start(writer_.healthy() ? nullptr : "421 4.3.0 Spool unavailable, try again later");
    if (r.consumed < c.proxy_buf.size())
      c.sess.feed(c.proxy_buf.data() + r.consumed, c.proxy_buf.size() - r.consumed);
    c.proxy_buf.clear();
    c.sess.process();
    pump(c, idx);
    return;
  }
  c.sess.feed(p, n);
  c.sess.process();
  pump(c, idx);
}

void shard::pump(conn& c, uint32_t idx) {
  if (c.ph != phase::smtp && c.ph != phase::closing) return;
  if (c.sess.want_commit()) {
    auto rec = c.sess.record();
    writer_.append(rec.data(), rec.size(), uint64_t(idx) << 32 | c.gen);
    c.in_spool = true;
  }
  if (!c.send_inflight && (c.sess.has_output() || c.tx_off < c.tx.size()) && !c.lost) {
    if (c.tx_off >= c.tx.size()) {
      c.tx.clear();
      c.tx_off = 0;
    }
    if (c.sess.has_output()) {
      if (c.tx.empty()) {
        c.sess.take_output(c.tx);
      } else {
        std::string more;
        c.sess.take_output(more);
        c.tx += more;
      }
    }
    auto* s = sqe();
    io_uring_prep_send(s, c.fd, c.tx.data() + c.tx_off, c.tx.size() - c.tx_off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(s, ud(op::send, c.gen, idx));
    c.send_inflight = true;
  }
  // Back-pressure: while a commit is pending, do not let a client pile up input.
  if (c.ph == phase::smtp) {
    if (c.recv_armed && !c.recv_cancel_sent && c.sess.pending_input() > pause_input) {
      auto* s = sqe();
      io_uring_prep_cancel64(s, ud(op::recv, c.gen, idx), 0);
      io_uring_sqe_set_data64(s, ud(op::cancel, 0, 0));
      c.recv_cancel_sent = true;
      c.recv_paused = true;
      bump(ctr_.input_paused);
    } else if (c.recv_paused && !c.recv_armed && c.sess.pending_input() <= pause_input / 2) {
      c.recv_paused = false;
      arm_recv(c, idx);
    }
  }
  if (c.sess.closing() && c.ph == phase::smtp && !c.send_inflight && !c.in_spool) begin_close(c, idx);
}

void shard::on_send(uint32_t idx, int res) {
  conn& c = slots_[idx];
  c.send_inflight = false;
  if (res < 0) {
    c.lost = true;  // EPIPE/ECONNRESET: nothing more can be said to this client
    c.tx.clear();
    c.tx_off = 0;
    if (c.ph != phase::closing) begin_close(c, idx);
    maybe_finish_close(c, idx);
    return;
  }
  c.tx_off += static_cast<size_t>(res);
  if (c.tx_off >= c.tx.size()) {
    c.tx.clear();
    c.tx_off = 0;
  }
  if (c.ph == phase::closing) {
    if (c.tx_off < c.tx.size() && !c.lost) {
      auto* s = sqe();
      io_uring_prep_send(s, c.fd, c.tx.data() + c.tx_off, c.tx.size() - c.tx_off, MSG_NOSIGNAL);
      io_uring_sqe_set_data64(s, ud(op::send, c.gen, idx));
      c.send_inflight = true;
      return;
    }
    maybe_finish_close(c, idx);
    return;
  }
  pump(c, idx);
}

void shard::begin_close(conn& c, uint32_t idx) {
  if (c.ph == phase::closing || c.ph == phase::free) return;
  c.ph = phase::closing;
  if (c.recv_armed && !c.recv_cancel_sent) {
    auto* s = sqe();
    io_uring_prep_cancel64(s, ud(op::recv, c.gen, idx), 0);
    io_uring_sqe_set_data64(s, ud(op::cancel, 0, 0));
    c.recv_cancel_sent = true;
  }
  maybe_finish_close(c, idx);
}

void shard::maybe_finish_close(conn& c, uint32_t idx) {
  if (c.ph != phase::closing || c.recv_armed || c.in_spool || c.close_sent) return;
  if (c.send_inflight) return;
  if (!c.lost && c.tx_off < c.tx.size()) return;
  auto* s = sqe();
  io_uring_prep_close(s, c.fd);
  io_uring_sqe_set_data64(s, ud(op::close, c.gen, idx));
  c.close_sent = true;
}

void shard::on_close(uint32_t idx) {
  conn& c = slots_[idx];
  // A connection that never got past its PROXY header has its reject line already.
  if (c.smtp_started) c.sess.log_disconnect(c.lost);
  c.smtp_started = false;
  c.fd = -1;
  c.ph = phase::free;
  c.gen = (c.gen + 1) & 0xFFFFFF;
  free_.push_back(idx);
  ctr_.active.store(ctr_.active.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
  // Hysteresis: resume only when a sixteenth of the slots is free, so that the backlog is
  // admitted in a batch instead of one accept and one 421 per freed slot.
  if (accept_paused_ && !stopping_ && free_.size() >= std::max<size_t>(1, nslots_ / 16)) {
    accept_paused_ = false;  // the loop re-arms the accepts
    log::debug("shard {}: {} session slots free: accepting again", setup_.index, free_.size());
  }
}

void shard::spool_results() {
  for (auto& r : results_) {
    uint32_t idx = static_cast<uint32_t>(r.token >> 32);
    uint32_t gen = static_cast<uint32_t>(r.token);
    if (idx >= nslots_) continue;
    conn& c = slots_[idx];
    if (c.gen != gen || !c.in_spool) continue;
    c.in_spool = false;
    if (r.ok)
      bump(ctr_.messages);
    else
      bump(ctr_.spool_failures);
    c.sess.commit_done(r.ok);  // 250 (durable) or 451; logs the queued line
    if (stopping_) c.sess.shutdown();  // stopping: the result, then 421 4.3.2 and close
    if (c.ph == phase::closing) {
      maybe_finish_close(c, idx);
      continue;
    }
    c.sess.process();  // pipelined commands that waited for the commit
    pump(c, idx);
  }
  results_.clear();
  ctr_.spool_batches.store(writer_.batches(), std::memory_order_relaxed);
}

void shard::tick() {
  writer_.tick(&ring_, spool_ud_base);
  // Accepting paused for lack of file descriptors (EMFILE) with free slots: try again.
  if (accept_paused_ && !stopping_ && !free_.empty()) accept_paused_ = false;
  uint64_t now = now_ms();
  for (uint32_t i = 0; i < nslots_; ++i) {
    conn& c = slots_[i];
    if (c.ph == phase::proxy) {
      if (now - c.accepted_ms >= cfg_.listen[c.listener].proxy_timeout_ms) {
        bump(ctr_.proxy_errors);
        log::warn("reject: no complete PROXY header from {} within {} ms", c.peer.ip(),
                  cfg_.listen[c.listener].proxy_timeout_ms);
        begin_close(c, i);
      }
    } else if (c.ph == phase::smtp && !c.sess.commit_pending()) {
      if (now - c.accepted_ms >= uint64_t(cfg_.limits.session_timeout) * 1000) {
        c.sess.session_timeout();
        pump(c, i);
      } else if (now - c.last_ms >= uint64_t(cfg_.limits.idle_timeout) * 1000) {
        c.sess.idle_timeout();
        pump(c, i);
      }
    }
  }
}

}  // namespace tern::server
