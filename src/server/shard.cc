#include "src/server/shard.hh"

#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>

#include "spool/scan.hh"
#include "src/core/log.hh"

namespace tern::server {
namespace {
using core::owner;
using core::ud;
constexpr uint64_t tick_ms = 1000;
// A privileged session (message_memory) that sends nothing for this long loses the
// privilege to another waiter.
constexpr uint64_t privilege_stall_ms = 5000;
}  // namespace

shard::shard(shard_setup s) : setup_(std::move(s)), cfg_(*setup_.cfg) {
  policy_.hostname = cfg_.hostname;
  policy_.limits = cfg_.limits;
  policy_.relay_networks = cfg_.relay.networks;
  policy_.relay_domains = cfg_.relay.domains;
  policy_.buffer_keep = cfg_.tuning.buffer_keep;
}

shard::~shard() {
  // Safe after a failed init: every member is either empty or owns what it holds.
  for (uint32_t i = 0; i < slots_.capacity(); ++i)
    if (slots_[i].fd >= 0) ::close(slots_[i].fd);
  for (int fd : setup_.listen_fds)
    if (fd >= 0) ::close(fd);
  rx_.reset();  // the ring goes before the buffers its SQEs could point at
}

uint64_t shard::wall_us() const {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000 + uint64_t(ts.tv_nsec) / 1000;
}

void shard::new_queue_id(char (&out)[smtp::queue_id_len + 1]) { writer_.next_id(out); }

bool shard::init(std::string& err) {
  if (const char* d = getenv("TERN_FAULT_STALL_DIR"); d && *d)
    fault_stall_path_ = std::string(d) + "/stall-shard-" + std::to_string(setup_.index);
  if (setup_.cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(setup_.cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
  }
  const uint32_t nslots = cfg_.limits.connections;
  core::reactor_options ro;
  ro.sq_entries = cfg_.tuning.ring_entries;
  // Each connection has at most a recv, a send and a close in flight; with FEAT_NODROP a
  // full CQ is not fatal, but sizing it for the slots keeps the overflow path cold.
  ro.cq_entries = std::max<uint32_t>(4096, nslots * 4);
  ro.recv_buffers = cfg_.tuning.recv_buffers;
  ro.recv_buffer_size = cfg_.tuning.recv_buffer_size;
  ro.need_multishot_recv = true;
  ro.idle_poll_us = cfg_.tuning.idle_poll_us;
  // The loop turns at least this often even when idle, so its heartbeat stays fresh: with
  // [ha], a quarter of the heartbeat timeout, or an idle shard would look stuck.
  ro.tick_ms = cfg_.ha.enabled ? std::clamp<uint64_t>(cfg_.ha.heartbeat_timeout_ms / 4, 10, tick_ms) : tick_ms;
  ro.required_ops = {{IORING_OP_ACCEPT, "ACCEPT"}, {IORING_OP_RECV, "RECV"},   {IORING_OP_SEND, "SEND"},
                     {IORING_OP_CONNECT, "CONNECT"}, {IORING_OP_READ, "READ"}, {IORING_OP_UNLINKAT, "UNLINKAT"},
                     {IORING_OP_WRITEV, "WRITEV"}, {IORING_OP_FSYNC, "FSYNC"}, {IORING_OP_CLOSE, "CLOSE"},
                     {IORING_OP_OPENAT, "OPENAT"}, {IORING_OP_FALLOCATE, "FALLOCATE"},
                     {IORING_OP_WRITE, "WRITE"},
                     // The spool trims and cuts back segments through the ring (spool/writer.cc).
                     {55 /* IORING_OP_FTRUNCATE, not in liburing 2.3's headers */, "FTRUNCATE (kernel >= 6.9)"}};
  // The inbox's eventfd is the loop's wake-up: a post (or request_stop) ends the wait.
  inbox_ = std::make_unique<core::inbox<control_msg, 64>>();
  ro.wake_fd = inbox_->fd();
  rx_ = std::make_unique<core::reactor>();
  if (!rx_->init(ro, err)) return false;
  for (owner k : {owner::listener, owner::inbound, owner::spool, owner::control}) rx_->set_handler(k, this);

  slots_.init(nslots);
  for (uint32_t i = 0; i < nslots; ++i) {
    slots_[i].idx = i;
    slots_[i].tmr.data = ud::make(owner::inbound, 0, i, 0);
  }
  accept_armed_.assign(setup_.listen_fds.size(), false);
  accept_resume_ = cfg_.tuning.accept_resume ? cfg_.tuning.accept_resume : std::max<uint32_t>(1, nslots / 16);
  results_.reserve(1024);
  mem_waiters_.reserve(nslots);
  mem_spare_.reserve(nslots);

  spool::writer::options wo;
  wo.dir = cfg_.spool.dir;
  wo.shard = setup_.index;
  wo.segment_size = cfg_.spool.segment_size;
  wo.fsync = cfg_.spool.fsync;
  wo.max_batch_bytes = cfg_.spool.max_batch_bytes;
  wo.prezero = cfg_.spool.prezero;
  wo.epoch_floor_ms = setup_.epoch_floor_ms;
  wo.segment_floor_id = setup_.segment_floor_id;
  if (!writer_.open(wo, err)) {
    err = "spool: " + err;
    return false;
  }
  delivery_ = std::make_unique<delivery>(*rx_, cfg_, setup_.index, writer_);
  delivery_->set_resolver(setup_.resolver, [](void* self, void* arg) -> bool {
    control_msg m;
    m.fn = [](void* a, shard&) { delivery::dns_arrived(a); };
    m.arg = arg;
    return static_cast<shard*>(self)->post(m);
  }, this);
  if (!delivery_->init(std::move(setup_.recovered), setup_.kept_segments, err)) return false;
  setup_.recovered.clear();
  setup_.kept_segments.clear();
  return true;
}

// Fault injection for the HA tests (a stuck shard): with TERN_FAULT_STALL_DIR set, the loop
// blocks while <dir>/stall-shard-<index> exists. Checked at most every 10 ms (the idle loop
// turns every tick); unset (the default) it costs one empty-string test per iteration.
void shard::fault_stall() {
  struct stat st;
  if (::stat(fault_stall_path_.c_str(), &st) != 0) return;
  log::warn("shard {}: fault injection: stalled while {} exists", setup_.index, fault_stall_path_);
  log::flush();
  while (::stat(fault_stall_path_.c_str(), &st) == 0) usleep(10000);
  log::warn("shard {}: fault injection: running again", setup_.index);
}

void shard::request_stop() {
  stop_requested_.store(true, std::memory_order_release);
  if (rx_) rx_->wake();
}

bool shard::post(const control_msg& m) { return inbox_ && inbox_->try_post(m); }

void shard::run() {
  log::buffer_this_thread(true);
  tick_timer_.data = ud::make(owner::control, op_tick, 0, 0);
  rx_->timers().arm(tick_timer_, rx_->now_ms() + tick_ms);
  for (uint32_t li = 0; li < setup_.listen_fds.size(); ++li) arm_accept(li);
  rx_->run(*this);
  writer_.close();
  log_stats("stopped");
  log::flush();
  log::buffer_this_thread(false);
}

void shard::log_stats(const char* what) {
  const auto& lc = rx_->counters();
  log::info("shard {}: {}: connections={} messages={} spool_batches={} ({:.1f} messages per fdatasync) "
            "spool_failures={} refused_full={} refused_untrusted={} proxy_errors={} enobufs={} input_paused={} "
            "output_paused={} memory_paused={} message_memory={} message_memory_peak={} send_timeouts={} timeouts={} "
            "loop_iterations={} sq_full={} idle_poll_hits={} idle_poll_misses={}",
            setup_.index, what, ctr_.connections.load(), ctr_.messages.load(), writer_.batches(),
            writer_.batches() ? double(writer_.records()) / double(writer_.batches()) : 0.0,
            ctr_.spool_failures.load(), ctr_.refused_full.load(), ctr_.refused_untrusted.load(),
            ctr_.proxy_errors.load(), ctr_.enobufs.load(), ctr_.input_paused.load(), ctr_.output_paused.load(),
            ctr_.memory_paused.load(), ctr_.message_memory.load(), ctr_.message_memory_peak.load(),
            ctr_.send_timeouts.load(), ctr_.timeouts.load(), lc.iterations.load(), lc.sq_full.load(),
            lc.idle_poll_hits.load(), lc.idle_poll_misses.load());
  if (delivery_) {
    const auto& d = delivery_->counters();
    log::info("shard {}: {}: delivery: queued={} connections={} connect_failures={} messages_sent={} "
              "delivered={} deferred={} bounced={} tls_handshakes={} tls_resumed={} tls_failures={} "
              "dns_failures={} loads={} load_failures={} segments_removed={}",
              setup_.index, what, delivery_->queued(), d.connections, d.connect_failures, d.messages_sent,
              d.delivered, d.deferred, d.bounced, d.tls_handshakes, delivery_->tls_resumed(), d.tls_failures,
              d.dns_failures, d.loads, d.load_failures, d.segments_removed);
  }
}

bool shard::post_log_stats_ok() {
  control_msg m;
  m.fn = [](void*, shard& s) { s.log_stats("stats"); };
  return post(m);
}

// --- loop hooks -------------------------------------------------------------------------

void shard::on_inbox() {
  if (!fault_stall_path_.empty() && rx_->now_ms() >= fault_next_check_ms_) {
    fault_next_check_ms_ = rx_->now_ms() + 10;
    fault_stall();
  }
  if (!stopping_ && stop_requested_.load(std::memory_order_acquire)) begin_stop();
  // Drained every iteration (an empty drain is two atomic operations): a post made after
  // this drain finds the inbox's flag clear and writes the eventfd, whose READ on the ring
  // wakes the loop for the next one (src/core/inbox.hh, wake-up protocol).
  inbox_->drain([this](control_msg&& m) {
    if (m.fn) m.fn(m.arg, *this);
  });
}

void shard::run_ready() {
  if (!results_.empty()) spool_results();
}

void shard::flush() {
  // Delivery first: the status/done records of rounds that ended in this iteration join
  // the same group commit.
  if (delivery_) delivery_->pump();
  // Group commit: everything that finished in this iteration goes out as one linked
  // writev + fdatasync, submitted with the loop's one io_uring_enter.
  writer_.flush(rx_->ring(), ud::make(owner::spool, 0, 0, 0), results_);
  if (!results_.empty()) spool_results();  // failed at once (unhealthy spool)
  if (ctr_.spool_healthy.load(std::memory_order_relaxed) != writer_.healthy())
    ctr_.spool_healthy.store(writer_.healthy(), std::memory_order_relaxed);
  if (!stopping_ && !accept_paused_)
    for (uint32_t li = 0; li < accept_armed_.size(); ++li)
      if (!accept_armed_[li]) arm_accept(li);
  log::flush();
}

bool shard::keep_running() {
  if (!stopping_) return true;
  // The spool's own I/O always finishes first: its SQEs point into session buffers and
  // close() truncates the segment. The deadline only gives up on sessions.
  if (writer_.io_pending()) return true;
  if (slots_.free_count() == slots_.capacity() && writer_.idle() && (!delivery_ || delivery_->idle())) return false;
  return rx_->now_ms() < stop_deadline_ms_;
}

void shard::begin_stop() {
  stopping_ = true;
  if (delivery_) delivery_->begin_stop();
  stop_deadline_ms_ = rx_->now_ms() + uint64_t(cfg_.limits.shutdown_timeout) * 1000;
  for (uint32_t li = 0; li < setup_.listen_fds.size(); ++li) {
    if (accept_armed_[li]) rx_->cancel(ud::make(owner::listener, op_accept, li, 0));  // it holds the socket
    ::close(setup_.listen_fds[li]);
    setup_.listen_fds[li] = -1;
  }
  ctr_.accepting.store(false, std::memory_order_release);  // HA resigns only after this
  for (uint32_t i = 0; i < slots_.capacity(); ++i) {
    if (!slots_.used(i)) continue;
    conn& c = slots_[i];
    if (c.ph == phase::smtp && !c.sess.commit_pending()) {
      c.sess.shutdown();  // 421 4.3.2 and close once it is sent
      pump(c);
    } else if (c.ph == phase::proxy) {
      begin_close(c);
    }
  }
}

// --- completions ------------------------------------------------------------------------

void shard::on_completion(const io_uring_cqe& cqe) {
  const uint64_t d = cqe.user_data;
  switch (ud::kind(d)) {
    case owner::listener:
      on_accept(ud::index(d), cqe);
      return;
    case owner::spool:
      writer_.on_cqe(ud::op(d), cqe.res, results_);
      return;
    case owner::inbound:
      break;
    default:
      return;
  }
  conn* c = slots_.find(ud::index(d), ud::gen(d));
  if (!c || c->ph == phase::free) {
    // A completion for an earlier use of this slot; its buffer must still go back.
    if (int bid = core::buffer_ring::id_of(cqe); bid >= 0) rx_->buffers().recycle(static_cast<uint16_t>(bid));
    return;
  }
  switch (ud::op(d)) {
    case op_recv: on_recv(*c, cqe); return;
    case op_send: on_send(*c, cqe.res); return;
    case op_close: on_close(*c); return;
    default: return;
  }
}

void shard::arm_accept(uint32_t li) {
  auto* s = rx_->get_sqe();
  io_uring_prep_multishot_accept(s, setup_.listen_fds[li], nullptr, nullptr, SOCK_CLOEXEC);
  io_uring_sqe_set_data64(s, ud::make(owner::listener, op_accept, li, 0));
  accept_armed_[li] = true;
}

void shard::pause_accept() {
  accept_paused_ = true;
  for (uint32_t l = 0; l < accept_armed_.size(); ++l)
    if (accept_armed_[l]) rx_->cancel(ud::make(owner::listener, op_accept, l, 0));
}

void shard::arm_recv(conn& c) {
  auto* s = rx_->get_sqe();
  io_uring_prep_recv_multishot(s, c.fd, nullptr, 0, 0);
  s->flags |= IOSQE_BUFFER_SELECT;
  s->buf_group = rx_->buffers().group();
  io_uring_sqe_set_data64(s, ud::make(owner::inbound, op_recv, c.idx, c.gen));
  c.recv_armed = true;
  c.recv_cancel_sent = false;
}

void shard::refuse(int fd, const char* text) {
  // Rare path (pool exhausted, untrusted proxy): a best-effort non-blocking send, then close.
  if (text) (void)!::send(fd, text, strlen(text), MSG_DONTWAIT | MSG_NOSIGNAL);
  ::close(fd);
}

void shard::on_accept(uint32_t li, const io_uring_cqe& cqe) {
  if (li >= accept_armed_.size()) return;
  if (!(cqe.flags & IORING_CQE_F_MORE)) accept_armed_[li] = false;
  if (cqe.res < 0) {
    if (cqe.res != -ECANCELED && !stopping_) {
      log::warn("shard {}: accept: {}", setup_.index, strerror(-cqe.res));
      if (cqe.res == -EMFILE || cqe.res == -ENFILE) pause_accept();  // the tick tries again
    }
    return;
  }
  int fd = cqe.res;
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
  uint32_t idx = 0;
  conn* cp = slots_.acquire(idx);
  if (!cp) {
    bump(ctr_.refused_full);
    if (!accept_paused_) {
      uint64_t now = rx_->now_ms();
      if (now >= next_busy_log_ms_) {  // at most one line per 10 s under sustained overload
        log::warn("shard {}: all {} session slots busy: answering 421 4.3.2 and pausing accept until {} are free "
                  "({} connection(s) refused so far)",
                  setup_.index, slots_.capacity(), accept_resume_, ctr_.refused_full.load(std::memory_order_relaxed));
        next_busy_log_ms_ = now + 10000;
      }
      pause_accept();
    }
    refuse(fd, "421 4.3.2 Too many connections, try again later\r\n");
    return;
  }
  conn& c = *cp;
  c.fd = fd;
  c.listener = static_cast<uint8_t>(li);
  c.recv_armed = c.recv_cancel_sent = false;
  c.paused_input = c.paused_output = c.paused_memory = false;
  c.send_inflight = c.in_spool = c.close_sent = c.lost = c.aborted = false;
  c.accepted_ms = c.last_ms = rx_->now_ms();
  c.send_progress_ms = 0;
  c.peer = peer;
  c.proxy_buf.clear();
  c.app_out.clear();
  c.tx.clear();
  c.tx_off = 0;
  c.tp = &net::plain_transport::instance();
  c.tmr.data = ud::make(owner::inbound, 0, idx, c.gen);
  bump(ctr_.connections);
  bump(ctr_.active);
  arm_recv(c);
  if (L.proxy_protocol) {
    c.ph = phase::proxy;  // no banner until the whole header is in
    arm_timer(c, c.accepted_ms + L.proxy_timeout_ms);
    return;
  }
  start_smtp(c, smtp::from_socket(peer, L));
  pump(c);
}

void shard::start_smtp(conn& c, const smtp::conn_info& ci) {
  c.ph = phase::smtp;
  c.smtp_started = true;
  c.sess.reset(&policy_, this, ci);
  c.sess.set_output_limit(cfg_.limits.output_buffer);
  c.sess.start(writer_.healthy() ? nullptr : "421 4.3.0 Spool unavailable, try again later");
  arm_timer(c, std::min(c.accepted_ms + uint64_t(cfg_.limits.session_timeout) * 1000,
                        c.last_ms + uint64_t(cfg_.limits.idle_timeout) * 1000));
}

void shard::on_recv(conn& c, const io_uring_cqe& cqe) {
  bool more = cqe.flags & IORING_CQE_F_MORE;
  if (!more) c.recv_armed = false;
  int res = cqe.res;
  if (res > 0) {
    int bid = core::buffer_ring::id_of(cqe);
    if (bid >= 0) {
      char* b = rx_->buffers().buffer(static_cast<uint16_t>(bid));
      if (c.ph == phase::proxy || c.ph == phase::smtp) on_input(c, b, static_cast<size_t>(res));
      // The bytes were copied into the session: the buffer goes straight back.
      rx_->buffers().recycle(static_cast<uint16_t>(bid));
    }
  } else if (res == -ENOBUFS) {
    bump(ctr_.enobufs);  // flow control: re-arm below
  } else if (res == -ECANCELED) {
    // our cancel (closing or pausing)
  } else {
    // 0 = EOF, or a socket error (ECONNRESET...): the client is gone.
    c.lost = c.ph == phase::smtp && !c.sess.closing();
    if (c.ph != phase::closing) begin_close(c);
    maybe_finish_close(c);
    return;
  }
  if (!c.recv_armed) {
    if (c.ph == phase::closing) {
      maybe_finish_close(c);
    } else if (!c.paused()) {
      arm_recv(c);
    }
  }
}

void shard::on_input(conn& c, const char* p, size_t n) {
  c.last_ms = rx_->now_ms();
  if (c.ph == phase::proxy) {
    const auto& L = cfg_.listen[c.listener];
    if (c.proxy_buf.size() + n > L.proxy_max_header + size_t(cfg_.limits.input_buffer)) {
      bump(ctr_.proxy_errors);
      log::warn("reject: PROXY phase input from {} exceeds its bound", c.peer.ip());
      begin_close(c);
      return;
    }
    c.proxy_buf.append(p, n);
    net::proxy_header h;
    auto r = net::parse_proxy({reinterpret_cast<const unsigned char*>(c.proxy_buf.data()), c.proxy_buf.size()}, h,
                              L.proxy_max_header);
    if (r.status == net::proxy_status::need_more) return;
    if (r.status == net::proxy_status::error) {
      bump(ctr_.proxy_errors);
      log::warn("reject: bad PROXY header from {}: {}", c.peer.ip(), r.error);
      begin_close(c);
      return;
    }
    start_smtp(c, smtp::from_proxy(h, c.peer, L));
    if (r.consumed < c.proxy_buf.size()) {
      c.tp->on_recv(c.proxy_buf.data() + r.consumed, c.proxy_buf.size() - r.consumed, c, c.wire_next);
    }
    c.proxy_buf.clear();
    process(c);
    pump(c);
    return;
  }
  if (c.tp->on_recv(p, n, c, c.wire_next) != net::transport_status::ok) {
    abort(c, "transport error");
    return;
  }
  process(c);
  pump(c);
}

// Run the session on its pending input unless something holds it back.
void shard::process(conn& c) {
  if (c.ph != phase::smtp) return;
  if (c.paused_memory || c.paused_output) return;
  c.sess.process();
}

void shard::pump(conn& c) {
  if (c.ph != phase::smtp && c.ph != phase::closing) return;
  // A message is committed only while the connection is live: a closing one (aborted,
  // client gone) can no longer be told 250, and its slot must not be held by the spool.
  if (c.ph == phase::smtp && c.sess.want_commit()) {
    auto rec = c.sess.record();
    writer_.append(rec.data(), rec.size(), uint64_t(c.idx) << 32 | c.gen);
    c.in_spool = true;
  }
  // The send buffer is touched only while no send is in flight: the SQE points into it.
  if (!c.send_inflight && !c.lost && !c.close_sent) {
    if (c.tx_off >= c.tx.size()) {  // all sent: reuse the buffer from the start
      c.tx.clear();
      c.tx_off = 0;
    } else if (c.tx_off > 65536 && c.tx_off * 2 > c.tx.size()) {
      c.tx.erase(0, c.tx_off);  // the sent head of a big backlog
      c.tx_off = 0;
    }
    if (!c.wire_next.empty()) {
      c.tx.append(c.wire_next);
      c.wire_next.clear();
    }
    if (c.sess.has_output()) {
      c.sess.take_output(c.app_out);
      if (c.tp->on_send(c.app_out, c.tx) != net::transport_status::ok) {
        abort(c, "transport error");
        return;
      }
    }
    if (c.tx_off < c.tx.size()) {
      auto* s = rx_->get_sqe();
      io_uring_prep_send(s, c.fd, c.tx.data() + c.tx_off, c.tx.size() - c.tx_off, MSG_NOSIGNAL);
      io_uring_sqe_set_data64(s, ud::make(owner::inbound, op_send, c.idx, c.gen));
      c.send_inflight = true;
      c.send_progress_ms = rx_->now_ms();
      arm_timer(c, c.send_progress_ms + uint64_t(cfg_.limits.send_timeout) * 1000);
    }
  }
  if (c.ph == phase::smtp) {
    update_pause(c);
    account(c);
    if (c.sess.closing() && !c.send_inflight && !c.in_spool) begin_close(c);
  }
}

// Reading stops while (a) a commit is pending and input piles up, (b) the client does not
// read its replies, (c) the shard's message memory is in use by others. It resumes with
// hysteresis: input below half its bound, output below half of its.
void shard::update_pause(conn& c) {
  const size_t in_bound = cfg_.limits.input_buffer, out_bound = cfg_.limits.output_buffer;
  const size_t unsent =
      c.tx.size() - c.tx_off + c.sess.output_size() + c.wire_next.size() + c.tp->buffered();
  size_t pending = c.sess.pending_input();
  bool was = c.paused();
  if (!c.paused_input && c.sess.commit_pending() && pending > in_bound) {
    c.paused_input = true;
    bump(ctr_.input_paused);
  } else if (c.paused_input && (!c.sess.commit_pending() || pending <= in_bound / 2)) {
    c.paused_input = false;
  }
  if (!c.paused_output && unsent >= out_bound) {
    c.paused_output = true;
    bump(ctr_.output_paused);
  } else if (c.paused_output && unsent <= out_bound / 2) {
    c.paused_output = false;
  }
  // Input that arrives while paused is bounded: stop reading once it reaches the bound.
  bool stop_reading = c.paused() && (pending >= in_bound || c.paused_memory || c.paused_output);
  if (stop_reading && c.recv_armed && !c.recv_cancel_sent) {
    rx_->cancel(ud::make(owner::inbound, op_recv, c.idx, c.gen));
    c.recv_cancel_sent = true;
  } else if (!c.paused() && !c.recv_armed && c.ph == phase::smtp && !c.sess.closing()) {
    arm_recv(c);
  }
  if (was && !c.paused() && c.sess.pending_input() > 0) {
    process(c);  // what waited in the input buffer (only while the session is live)
    if (c.sess.has_output() || c.sess.want_commit()) pump(c);
  }
}

// message_memory: a session in DATA/BDAT whose buffer grows while the shard's total is at
// the budget stops being read, except one (the privileged session), which may always go
// on, so that some message always completes and frees memory: no deadlock when every
// buffer is half full. Worst case per shard: message_memory + message_size (+ record
// overhead), see docs/architecture.md.
void shard::account(conn& c) {
  size_t now = c.sess.message_bytes();
  if (now != c.msg_bytes) {
    msg_mem_ = msg_mem_ + now - c.msg_bytes;
    c.msg_bytes = now;
    ctr_.message_memory.store(msg_mem_, std::memory_order_relaxed);
    if (msg_mem_ > ctr_.message_memory_peak.load(std::memory_order_relaxed))
      ctr_.message_memory_peak.store(msg_mem_, std::memory_order_relaxed);
  }
  bool privileged = mem_privileged_ == c.idx && mem_privileged_gen_ == c.gen;
  if (privileged && !c.sess.receiving_message()) {
    mem_privileged_ = UINT32_MAX;  // its message is complete (or refused)
    privileged = false;
  }
  if (c.ph == phase::smtp && !c.paused_memory && c.sess.receiving_message() &&
      msg_mem_ >= cfg_.limits.message_memory && !privileged) {
    if (mem_privileged_ == UINT32_MAX) {
      mem_privileged_ = c.idx;  // the first to hit the budget finishes its message
      mem_privileged_gen_ = c.gen;
    } else {
      c.paused_memory = true;
      bump(ctr_.memory_paused);
      mem_waiters_.push_back(c.idx);
      update_pause(c);
    }
  }
  if (!mem_waiters_.empty() && !resuming_) resume_memory_paused();
}

void shard::resume_memory_paused() {
  resuming_ = true;
  auto wake_up = [this](conn& c) {
    c.paused_memory = false;
    if (c.ph != phase::smtp) return;  // closing: nothing more is read or processed
    c.last_ms = rx_->now_ms();  // a wait we imposed is not the client's idleness
    update_pause(c);
    process(c);
    pump(c);
  };
  // Nobody may finish a message: the waiter with the most data (nearest its end, most
  // memory to give back) becomes the privileged session and goes on past the budget.
  if (mem_privileged_ == UINT32_MAX && msg_mem_ >= cfg_.limits.message_memory) {
    size_t best = SIZE_MAX, best_bytes = 0;
    for (size_t i = 0; i < mem_waiters_.size(); ++i) {
      uint32_t idx = mem_waiters_[i];
      if (!slots_.used(idx) || !slots_[idx].paused_memory) continue;
      if (idx == mem_skip_ && slots_[idx].gen == mem_skip_gen_ && mem_waiters_.size() > 1) continue;  // just revoked
      if (best == SIZE_MAX || slots_[idx].msg_bytes > best_bytes) {
        best = i;
        best_bytes = slots_[idx].msg_bytes;
      }
    }
    if (best != SIZE_MAX) {
      conn& c = slots_[mem_waiters_[best]];
      mem_waiters_.erase(mem_waiters_.begin() + static_cast<ptrdiff_t>(best));
      mem_privileged_ = c.idx;
      mem_privileged_gen_ = c.gen;
      wake_up(c);
    }
  }
  // Room again: waiters go in arrival order while there is room; each re-checks in account().
  if (msg_mem_ < cfg_.limits.message_memory) {
    mem_spare_.clear();
    mem_spare_.swap(mem_waiters_);
    for (uint32_t idx : mem_spare_) {
      if (!slots_.used(idx)) continue;
      conn& c = slots_[idx];
      if (!c.paused_memory) continue;
      if (msg_mem_ >= cfg_.limits.message_memory) {
        mem_waiters_.push_back(idx);
        continue;
      }
      wake_up(c);
    }
  }
  resuming_ = false;
}

void shard::on_send(conn& c, int res) {
  c.send_inflight = false;
  if (res < 0) {
    c.lost = true;  // EPIPE/ECONNRESET/ECANCELED: nothing more can be said to this client
    c.tx.clear();
    c.tx_off = 0;
    if (c.ph != phase::closing) begin_close(c);
    maybe_finish_close(c);
    return;
  }
  c.tx_off += static_cast<size_t>(res);
  c.send_progress_ms = rx_->now_ms();
  if (c.tx_off >= c.tx.size()) {
    c.tx.clear();
    c.tx_off = 0;
  }
  if (c.ph == phase::closing) {
    if (c.tx_off < c.tx.size() && !c.lost) {
      auto* s = rx_->get_sqe();
      io_uring_prep_send(s, c.fd, c.tx.data() + c.tx_off, c.tx.size() - c.tx_off, MSG_NOSIGNAL);
      io_uring_sqe_set_data64(s, ud::make(owner::inbound, op_send, c.idx, c.gen));
      c.send_inflight = true;
      return;
    }
    maybe_finish_close(c);
    return;
  }
  pump(c);
}

void shard::arm_timer(conn& c, uint64_t at) {
  // Lazy: the timer is moved only when the new deadline is earlier; when it fires, the
  // handler works out which deadline (if any) has really passed and re-arms for the next.
  if (c.tmr.armed() && c.timer_at <= at) return;
  c.timer_at = at;
  rx_->timers().arm(c.tmr, at);
}

void shard::on_timer(core::timer& t) {
  const uint64_t d = t.data;
  if (ud::kind(d) == owner::control) {
    tick();
    rx_->timers().arm(tick_timer_, rx_->now_ms() + tick_ms);
    return;
  }
  conn* cp = slots_.find(ud::index(d), ud::gen(d));
  if (!cp) return;
  conn& c = *cp;
  const uint64_t now = rx_->now_ms();
  const auto& Lm = cfg_.limits;
  c.timer_at = 0;
  if (c.ph == phase::free) return;
  if (c.ph == phase::closing) {
    // Closing, but a send or the commit has not let go: a stuck send is cut off.
    if (c.send_inflight && now - c.send_progress_ms >= uint64_t(Lm.send_timeout) * 1000) {
      bump(ctr_.send_timeouts);
      abort(c, "send timeout");
    } else if (!c.close_sent) {
      arm_timer(c, now + uint64_t(Lm.send_timeout) * 1000);
    }
    return;
  }
  if (c.ph == phase::proxy) {
    const uint64_t limit = cfg_.listen[c.listener].proxy_timeout_ms;
    if (now - c.accepted_ms >= limit) {
      bump(ctr_.proxy_errors);
      log::warn("reject: no complete PROXY header from {} within {} ms", c.peer.ip(), limit);
      begin_close(c);
    } else {
      arm_timer(c, c.accepted_ms + limit);
    }
    return;
  }
  // SMTP. A send that made no progress for send_timeout: the client does not read.
  if (c.send_inflight && now - c.send_progress_ms >= uint64_t(Lm.send_timeout) * 1000) {
    bump(ctr_.send_timeouts);
    abort(c, "send timeout");
    return;
  }
  if (c.paused_memory) c.last_ms = now;  // waiting for memory is our doing, not idleness
  const uint64_t session_end = c.accepted_ms + uint64_t(Lm.session_timeout) * 1000;
  const uint64_t idle_end = c.last_ms + uint64_t(Lm.idle_timeout) * 1000;
  if (!c.sess.commit_pending() && (now >= session_end || now >= idle_end)) {
    bump(ctr_.timeouts);
    if (now >= session_end)
      c.sess.session_timeout();
    else
      c.sess.idle_timeout();
    if (c.send_inflight) {
      // The socket does not take what is already queued: the 421 could never arrive.
      abort(c, now >= session_end ? "session timeout" : "idle timeout");
      return;
    }
    pump(c);
    if (c.ph != phase::free && !c.close_sent) arm_timer(c, now + uint64_t(Lm.send_timeout) * 1000);
    return;
  }
  uint64_t next = std::min(session_end, idle_end);
  if (c.sess.commit_pending()) next = now + tick_ms;  // timeouts wait for the commit
  if (c.send_inflight) next = std::min(next, c.send_progress_ms + uint64_t(Lm.send_timeout) * 1000);
  arm_timer(c, std::max(next, now + 1));
}

void shard::begin_close(conn& c) {
  if (c.ph == phase::closing || c.ph == phase::free) return;
  c.ph = phase::closing;
  c.paused_memory = false;  // no longer a waiter for message memory
  if (c.recv_armed && !c.recv_cancel_sent) {
    rx_->cancel(ud::make(owner::inbound, op_recv, c.idx, c.gen));
    c.recv_cancel_sent = true;
  }
  maybe_finish_close(c);
}

// Close now, whatever is unsent: cancel every request on the socket, then close once they
// have drained (a message in a spool batch still holds the slot until its fsync is done).
void shard::abort(conn& c, const char* why) {
  if (c.ph == phase::free || c.aborted) return;
  c.aborted = true;
  log::info("closing connection from {}: {}", c.smtp_started ? c.sess.client_ip() : c.peer.ip(), why);
  c.lost = true;
  if (c.ph != phase::closing) c.ph = phase::closing;
  c.paused_memory = false;
  if (c.recv_armed || c.send_inflight) {
    rx_->cancel_fd(c.fd);
    c.recv_cancel_sent = true;
  }
  maybe_finish_close(c);
}

void shard::maybe_finish_close(conn& c) {
  if (c.ph != phase::closing || c.recv_armed || c.in_spool || c.close_sent) return;
  if (c.send_inflight) return;
  if (!c.lost && c.tx_off < c.tx.size()) {
    pump(c);  // the last replies (the 421) go out first
    return;
  }
  auto* s = rx_->get_sqe();
  io_uring_prep_close(s, c.fd);
  io_uring_sqe_set_data64(s, ud::make(owner::inbound, op_close, c.idx, c.gen));
  c.close_sent = true;
}

void shard::on_close(conn& c) {
  // maybe_finish_close() closes only after the message left the spool batch.
  assert(!c.in_spool && "a slot is freed while the spool batch points into it");
  // A connection that never got past its PROXY header has its reject line already.
  if (c.smtp_started) c.sess.log_disconnect(c.lost);
  // Nothing in flight points into the session any more: a half-received message goes.
  if (c.smtp_started) c.sess.reset(&policy_, this, smtp::conn_info{});
  c.smtp_started = false;
  c.fd = -1;
  c.ph = phase::free;
  if (c.tmr.armed()) rx_->timers().cancel(c.tmr);
  if (mem_privileged_ == c.idx && mem_privileged_gen_ == c.gen) mem_privileged_ = UINT32_MAX;
  // The memory a burst used goes back: keep at most tuning.buffer_keep per buffer.
  c.sess.trim();
  for (std::string* b : {&c.tx, &c.app_out, &c.proxy_buf, &c.wire_next})
    if (b->capacity() > cfg_.tuning.buffer_keep) std::string().swap(*b);
  c.tx.clear();
  c.tx_off = 0;
  c.paused_memory = c.paused_input = c.paused_output = false;
  account(c);
  slots_.release(c.idx);
  ctr_.active.store(ctr_.active.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
  // Hysteresis: resume only when accept_resume slots are free, so that the backlog is
  // admitted in a batch instead of one accept and one 421 per freed slot.
  if (accept_paused_ && !stopping_ && slots_.free_count() >= accept_resume_) {
    accept_paused_ = false;  // flush() re-arms the accepts
    log::debug("shard {}: {} session slots free: accepting again", setup_.index, slots_.free_count());
  }
}

void shard::spool_results() {
  for (auto& r : results_) {
    if (r.token & delivery::token_bit) {
      if (delivery_)
        delivery_->record_result(r.token, r.ok,
                                 r.ok ? spool::segment_dir(cfg_.spool.dir) + "/" + spool::segment_name(r.segment_id, setup_.index)
                                      : std::string(),
                                 r.offset);
      continue;
    }
    uint32_t idx = static_cast<uint32_t>(r.token >> 32);
    uint32_t gen = static_cast<uint32_t>(r.token);
    conn* cp = slots_.find(idx, gen);
    if (!cp || !cp->in_spool) continue;
    conn& c = *cp;
    c.in_spool = false;
    if (r.ok && delivery_)
      delivery_->committed(c.sess.committed_record(), spool::segment_dir(cfg_.spool.dir) + "/" +
                                                          spool::segment_name(r.segment_id, setup_.index),
                           r.offset);
    if (r.ok)
      bump(ctr_.messages);
    else
      bump(ctr_.spool_failures);
    c.sess.commit_done(r.ok);  // 250 (durable) or 451; logs the queued line
    if (stopping_) c.sess.shutdown();  // stopping: the result, then 421 4.3.2 and close
    if (c.ph == phase::closing) {
      account(c);
      maybe_finish_close(c);
      continue;
    }
    process(c);  // pipelined commands that waited for the commit
    pump(c);
  }
  results_.clear();
  ctr_.spool_batches.store(writer_.batches(), std::memory_order_relaxed);
}

void shard::tick() {
  writer_.tick(rx_->ring(), ud::make(owner::spool, 0, 0, 0));
  if (delivery_) delivery_->tick();
  // The privileged session must make progress: one that has sent nothing for
  // privilege_stall_ms (a slow client holding every other DATA session of the shard)
  // goes back to waiting, and another waiter gets the privilege.
  if (mem_privileged_ != UINT32_MAX && !mem_waiters_.empty()) {
    conn* p = slots_.find(mem_privileged_, mem_privileged_gen_);
    if (!p || p->ph != phase::smtp) {
      mem_privileged_ = UINT32_MAX;
    } else if (rx_->now_ms() - p->last_ms >= privilege_stall_ms && p->sess.receiving_message()) {
      mem_privileged_ = UINT32_MAX;
      mem_skip_ = p->idx;
      mem_skip_gen_ = p->gen;
      p->paused_memory = true;
      bump(ctr_.memory_paused);
      mem_waiters_.push_back(p->idx);
      update_pause(*p);
    }
    if (mem_privileged_ == UINT32_MAX && !resuming_) resume_memory_paused();
  }
  // Accepting paused for lack of file descriptors (EMFILE) with free slots: try again.
  if (accept_paused_ && !stopping_ && slots_.free_count() >= accept_resume_) accept_paused_ = false;
}

}  // namespace tern::server
