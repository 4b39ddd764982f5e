#include "src/server/delivery.hh"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "spool/scan.hh"
#include "src/core/bytes.hh"
#include "src/core/log.hh"
#include "src/queue/dsn.hh"

namespace tern::server {
namespace {
using core::owner;
using core::ud;
using smtp::client_stage;

// Bytes of content queued for the socket before produce() waits for sends to drain.
constexpr size_t body_window = 256 * 1024;
constexpr uint32_t max_loads = 64;  // reads of spool records in flight at once
// DNS lookups in flight per shard: each answer takes an inbox entry (64), and stats and
// stop requests must still fit.
constexpr uint32_t max_dns = 16;
// Addresses tried within one attempt of one destination host (postfix: smtp_mx_address_limit).
constexpr size_t max_candidates = 5;
// Rounds' records wait at most this long (or this many) for an inbound commit to ride on.
constexpr uint64_t record_hold_ms = 20;
constexpr size_t record_hold_max = 256;

const char* state_word(spool::rcpt_state s) {
  switch (s) {
    case spool::rcpt_state::delivered: return "sent";
    case spool::rcpt_state::failed: return "bounced";
    default: return "deferred";
  }
}

// postfix's delay format: two significant digits below 10 s, whole seconds above, no exponent.
std::string pf_delay(double v) {
  if (v < 0.005) return "0";
  if (v < 10) return fmt::format("{:.2g}", v);
  return fmt::format("{:.0f}", v);
}

std::string tls_key(const config::next_hop& h) {
  bool verify = h.tls == config::tls_policy::verify;
  return std::string(h.tls_min_13 ? "1.3 " : "1.2 ") + (verify || !h.ca_file.empty() ? h.ca_file : "-");
}

std::string base_name(const std::string& p) {
  auto s = p.rfind('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

}  // namespace

delivery::delivery(core::reactor& rx, const config::config& cfg, uint32_t shard, spool::writer& w)
    : rx_(rx),
      cfg_(cfg),
      shard_(shard),
      writer_(w),
      routes_(cfg),
      mgr_(routes_, [&] {
        queue::manager::options o;
        o.retry = queue::retry_policy::from(cfg.queue);
        o.concurrency = cfg.queue.concurrency;
        // A failed host is skipped for as long as a deferred message would wait: from the
        // first retry interval, doubling, up to the last one.
        o.host_backoff_ms = uint64_t(cfg.queue.retry_s.front()) * 1000;
        o.host_backoff_max_ms = uint64_t(*std::max_element(cfg.queue.retry_s.begin(), cfg.queue.retry_s.end())) * 1000;
        o.seed = uint64_t(shard + 1) * 0x9E3779B97F4A7C15ull ^ uint64_t(::time(nullptr));
        return o;
      }()) {}

delivery::~delivery() {
  for (uint32_t i = 0; i < conns_.capacity(); ++i)
    if (conns_[i].fd >= 0) ::close(conns_[i].fd);
  for (auto& [p, fd] : seg_fds_)
    if (fd >= 0) ::close(fd);
  if (dir_fd_ >= 0) ::close(dir_fd_);
}

bool delivery::init(std::vector<spool::queued_message> recovered, const std::vector<std::string>& kept,
                    std::string& err) {
  // One connection slot per destination's concurrency, at least 16, at most the inbound
  // slots: bounded at start, never grown.
  uint32_t n = config::outbound_slots(cfg_);
  conns_.init(n);
  for (uint32_t i = 0; i < n; ++i) conns_[i].idx = i;
  loads_.init(max_loads);
  idle_.reserve(n);
  dir_fd_ = ::open(spool::segment_dir(cfg_.spool.dir).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd_ < 0) {
    err = "delivery: cannot open " + spool::segment_dir(cfg_.spool.dir) + ": " + strerror(errno);
    return false;
  }
  rx_.set_handler(owner::outbound, this);
  // AUTH passwords: the first line of each auth_password_file, read once at start.
  auto read_pw = [&](const config::next_hop& h) -> bool {
    if (h.auth_password_file.empty() || password_cache_.count(h.auth_password_file)) return true;
    std::ifstream in(h.auth_password_file);
    std::string line;
    if (!in || !std::getline(in, line)) {
      err = "delivery: cannot read auth_password_file " + h.auth_password_file;
      return false;
    }
    while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.pop_back();
    password_cache_[h.auth_password_file] = line;
    return true;
  };
  for (const auto& h : cfg_.smarthosts)
    if (!read_pw(h)) return false;
  for (const auto& r : cfg_.routes)
    if (!read_pw(r.hop)) return false;
  // TLS client contexts, one per (minimum version, CA file) that a hop uses.
  auto make_ctx = [&](const config::next_hop& h) -> bool {
    if (h.tls == config::tls_policy::none) return true;
    std::string key = tls_key(h);
    if (tls_ctx_.count(key)) return true;
    tls::context_options o;
    o.side = tls::role::client;
    o.min_version = h.tls_min_13 ? tls::version::v1_3 : tls::version::v1_2;
    if (!h.ca_file.empty()) o.ca_file = h.ca_file;
    if (h.tls != config::tls_policy::verify && h.ca_file.empty()) o.ca_file.clear();  // nothing to verify against
    std::string e;
    auto ctx = tls::context::create(o, e);
    if (!ctx) {
      err = "delivery: TLS for " + h.host + ": " + e;
      return false;
    }
    tls_ctx_.emplace(key, std::move(ctx));
    return true;
  };
  for (const auto& h : cfg_.smarthosts)
    if (!make_ctx(h)) return false;
  for (const auto& r : cfg_.routes)
    if (!make_ctx(r.hop)) return false;
  for (const auto& k : kept) mgr_.track_segment(k);
  for (auto& q : recovered) {
    queue::message_info m;
    m.id = std::move(q.id);
    m.segment = std::move(q.segment);
    m.offset = q.offset;
    m.record_size = q.record_size;
    m.arrival_us = q.arrival_us;
    m.attempts = q.attempts;
    m.next_attempt_us = q.next_attempt_us;
    m.flags = q.flags;
    if (!q.rcpts.empty()) {
      m.state.reserve(q.rcpts.size());
      for (auto& r : q.rcpts) m.state.push_back(r.state);
    }
    mgr_.add(std::move(m));
  }
  mgr_.set_current_segment(writer_.segment_path());
  return true;
}

uint64_t delivery::now_us() const {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000 + uint64_t(ts.tv_nsec) / 1000;
}

void delivery::committed(std::string_view record, const std::string& segment, uint64_t offset) {
  spool::record_view rv;
  spool::message_view m;
  auto data = std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(record.data()), record.size());
  if (spool::read_record(data, 0, rv) != spool::read_status::ok || !spool::decode_message(rv.payload, m)) {
    log::error("delivery: a committed record does not decode; it stays in {} at {} for the next start", segment,
               offset);
    return;
  }
  queue::message_info info;
  info.id = std::string(m.id);
  info.segment = segment;
  info.offset = offset;
  info.record_size = rv.size;
  info.arrival_us = m.arrival_us;
  mgr_.add(std::move(info));
}

void delivery::record_result(uint64_t token, bool ok, const std::string& segment, uint64_t offset) {
  if (token & dsn_piece) {
    // A DSN we queued: once durable it is a message like any other.
    uint64_t t = token & ~(token_bit | dsn_piece);
    auto it = dsn_records_.find(t);
    if (it == dsn_records_.end()) return;
    if (!ok) {
      log::error("delivery: a delivery status notification could not be written to the spool; "
                 "it is lost (the original's log lines stay)");
      dsn_records_.erase(it);
      return;
    }
    committed(it->second, segment, offset);
    dsn_records_.erase(it);
    return;
  }
  uint64_t t = token & ~(token_bit | first_piece | last_piece);
  if (token & first_piece) first_[t] = piece{ok, segment, offset};
  auto it = first_.find(t);
  if (it == first_.end()) return;  // not ours (cannot happen: every round has a first piece)
  it->second.ok = it->second.ok && ok;
  if (!(token & last_piece)) return;
  piece p = std::move(it->second);
  first_.erase(it);
  mgr_.record_durable(t, p.ok, now_us(), p.segment, p.offset);
}

// --- the loop ---------------------------------------------------------------------------

void delivery::pump() {
  uint64_t now = now_us();
  mgr_.set_current_segment(writer_.segment_path());
  if (!stopping_) {
    queue::load_request req;
    while (loads_.free_count() > 0 && mgr_.next_load(now, req)) start_load(req);
    // Established connections waiting for work get it first.
    for (size_t i = 0; i < idle_.size();) {
      oconn& c = conns_[idle_[i]];
      if (c.ph == phase::live && !c.job && c.cl.stage() == client_stage::idle) {
        auto j = mgr_.take_job(c.dest);
        if (j) {
          idle_[i] = idle_.back();
          idle_.pop_back();
          c.job = std::move(j);
          drive(c);
          continue;
        }
      }
      ++i;
    }
    queue::connect_request cr;
    while (conns_.free_count() > 0 && dns_inflight_ < max_dns && mgr_.next_connect(rx_.now_ms(), now, cr))
      open_connection(cr);
  }
  log_results();
  write_records();
  remove_segments();
}

void delivery::tick() {
  uint64_t now = rx_.now_ms();
  // Idle connections past queue.connection_idle say QUIT.
  for (size_t i = 0; i < idle_.size();) {
    oconn& c = conns_[idle_[i]];
    if (c.ph != phase::live || c.job || c.cl.stage() != client_stage::idle) {
      idle_[i] = idle_.back();
      idle_.pop_back();
      continue;
    }
    if (stopping_ || now - c.idle_since_ms >= uint64_t(cfg_.queue.connection_idle_s) * 1000) {
      idle_[i] = idle_.back();
      idle_.pop_back();
      c.cl.quit();
      drive(c);
      continue;
    }
    ++i;
  }
}

void delivery::begin_stop() {
  stopping_ = true;
  for (uint32_t i = 0; i < conns_.capacity(); ++i) {
    if (!conns_.used(i)) continue;
    oconn& c = conns_[i];
    if (c.ph == phase::live && !c.job) {
      c.cl.quit();
      drive(c);
    } else if (c.ph == phase::connecting || c.ph == phase::resolving) {
      fail_connection(c, "4.3.2", "ternd is stopping");
    }
  }
  idle_.clear();
}

bool delivery::idle() const {
  // Connections, reads and the spool records of finished rounds. A connection in the middle
  // of a message is given the shard's shutdown deadline like an inbound session.
  return conns_.in_use() == 0 && loads_.in_use() == 0 && !unlink_inflight_ && dns_inflight_ == 0 &&
         mgr_.records_waiting() == 0;
}

void delivery::write_records() {
  // A round's records need not be durable at once: a done record lost in a crash means the
  // message is delivered once more, never lost. So they ride along with the inbound
  // commits (no fdatasync of their own) and go alone only when they have waited
  // record_hold_ms or piled up. DSN messages are appended when made, so they make the
  // next batch happen anyway.
  if (mgr_.records_waiting() == 0) {
    hold_since_ms_ = 0;
    return;
  }
  uint64_t now = rx_.now_ms();
  if (hold_since_ms_ == 0) hold_since_ms_ = now;
  if (!stopping_ && !writer_.has_pending() && mgr_.records_waiting() < record_hold_max &&
      now - hold_since_ms_ < record_hold_ms) {
    // Wake the loop when the hold ends, even if nothing else happens by then.
    if (!hold_tmr_.armed()) {
      hold_tmr_.data = ud::make(owner::outbound, op_hold, 0, 0);
      rx_.timers().arm(hold_tmr_, hold_since_ms_ + record_hold_ms);
    }
    return;
  }
  hold_since_ms_ = 0;
  if (hold_tmr_.armed()) rx_.timers().cancel(hold_tmr_);
  // A round's records (a forward copy, a status record, a done record) come as one string;
  // the writer takes one record per append (it sets each record's nonce), so they are
  // appended one by one, in order. The first piece's result says where a forward copy
  // landed; the last piece's result ends the round.
  queue::record_out r;
  while (mgr_.next_record(r)) {
    const std::string& b = *r.bytes;
    auto data = std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(b.data()), b.size());
    size_t off = 0;
    while (off < b.size()) {
      spool::record_view rv;
      if (spool::read_record(data, off, rv) != spool::read_status::ok) {
        log::error("delivery: internal error: a round's records do not parse at {}", off);
        break;
      }
      uint64_t t = token_bit | r.token;
      if (off == 0) t |= first_piece;
      if (off + rv.size == b.size()) t |= last_piece;
      writer_.append(b.data() + off, rv.size, t);
      off += rv.size;
    }
  }
}

void delivery::remove_segments() {
  if (unlink_inflight_) return;
  std::string path;
  if (!mgr_.next_removal(path)) return;
  if (auto it = seg_fds_.find(path); it != seg_fds_.end()) {
    auto* s = rx_.get_sqe();
    io_uring_prep_close(s, it->second);
    io_uring_sqe_set_data64(s, ud::ignore);
    seg_fds_.erase(it);
  }
  unlinking_ = base_name(path);
  unlink_inflight_ = true;
  // Unlink, then sync the directory: the next removal starts only after this one is
  // durable, so a power cut keeps a prefix of the oldest-first order.
  auto* u = rx_.get_sqe();
  io_uring_prep_unlinkat(u, dir_fd_, unlinking_.c_str(), 0);
  io_uring_sqe_set_data64(u, ud::make(owner::outbound, op_unlink, 0, 0));
}

void delivery::log_results() {
  auto& rs = mgr_.results();
  uint64_t now = now_us();
  for (auto& r : rs) {
    if (!r.decided_here.empty()) {
      std::vector<std::string_view> addrs;
      spool::for_each_rcpt(mgr_.view(r.msg), [&](const spool::rcpt_view& v) { addrs.push_back(v.addr); });
      uint64_t arr = mgr_.arrival_us(r.msg);
      std::string delay = pf_delay(arr && now > arr ? double(now - arr) / 1e6 : 0.0);
      for (uint32_t i : r.decided_here) {
        const queue::rcpt_result* lr = mgr_.last(r.msg, i);
        if (!lr) continue;
        if (lr->state == spool::rcpt_state::failed)
          ++ctr_.bounced;
        else
          ++ctr_.deferred;
        log::info("{}: to=<{}>, relay=none, delay={}, delays={}/0/0/0, dsn={}, status={} ({})", r.id,
                  i < addrs.size() ? addrs[i] : std::string_view("?"), delay, delay, lr->dsn, state_word(lr->state),
                  lr->text);
      }
    }
    make_dsns(r, now);
    if (r.finished) log::info("{}: removed", r.id);
  }
  // Bounces (DSN) for r.failed_now are generated by the delivery status notification
  // work (docs/architecture.md, "Delivery"); until then the failure is in the log line.
  rs.clear();
}

// Delivery status notifications for a round that ended (src/queue/dsn.hh decides who gets
// one): failures, a delay warning when due, and success reports that a next hop without
// DSN cannot give. Each DSN is a new message in the spool, appended before the round's own
// records, so it is durable no later than the done record of the message it reports on.
void delivery::make_dsns(const queue::round_result& r, uint64_t now) {
  const spool::message_view& m = mgr_.view(r.msg);
  if (m.id.empty() || m.mail_from.empty()) return;  // unreadable, or a null sender: never
  bool any = !r.failed_now.empty() || r.delay_warning;
  if (!r.delivered_now.empty())
    spool::for_each_rcpt(m, [&](const spool::rcpt_view& v) { any = any || (v.notify & spool::notify_success); });
  if (!any) return;
  std::vector<queue::dsn_rcpt> rc;
  uint32_t i = 0;
  spool::for_each_rcpt(m, [&](const spool::rcpt_view& v) {
    queue::dsn_rcpt d;
    d.addr = v.addr;
    d.notify = v.notify;
    d.orcpt = v.orcpt;
    const queue::rcpt_result* lr = mgr_.last(r.msg, i);
    bool now_failed = std::find(r.failed_now.begin(), r.failed_now.end(), i) != r.failed_now.end();
    bool now_delivered = std::find(r.delivered_now.begin(), r.delivered_now.end(), i) != r.delivered_now.end();
    if (now_failed) {
      d.outcome = queue::rcpt_outcome::failed;
    } else if (now_delivered && lr) {
      d.outcome = lr->final_delivery ? queue::rcpt_outcome::delivered
                  : lr->hop_dsn     ? queue::rcpt_outcome::relayed_dsn
                                    : queue::rcpt_outcome::relayed;
    } else if (lr && lr->state == spool::rcpt_state::deferred) {
      d.outcome = queue::rcpt_outcome::deferred;
    } else {
      d.outcome = queue::rcpt_outcome::relayed_dsn;  // settled in an earlier round: not reported again
    }
    if (lr) {
      d.status = lr->dsn;
      d.remote_host = lr->remote_host;
      d.remote_ip = lr->remote_ip;
      d.remote_reply = !lr->reply.empty();
      d.diagnostic = d.remote_reply ? std::string_view(lr->reply) : std::string_view(lr->text);
      d.last_attempt_us = now;
    }
    rc.push_back(d);
    ++i;
  });
  auto plan = queue::plan_dsns(m.mail_from, rc, r.delay_warning);
  queue::dsn_options o;
  o.hostname = cfg_.hostname;
  o.return_size_limit = cfg_.queue.bounce_size_limit;
  struct kind_list {
    queue::dsn_kind k;
    const std::vector<uint32_t>* which;
    const char* what;
  };
  for (auto [k, which, what] : {kind_list{queue::dsn_kind::failure, &plan.failure, "non-delivery"},
                                kind_list{queue::dsn_kind::delay, &plan.delay, "delay"},
                                kind_list{queue::dsn_kind::success, &plan.success, "delivery"}}) {
    if (which->empty()) continue;
    char id[19];
    writer_.next_id(id);
    queue::dsn_request req;
    req.kind = k;
    req.queue_id = std::string_view(id, 18);
    req.now_us = now;
    req.retry_until_us = r.expires_us;
    queue::dsn_message dm;
    if (!queue::build_dsn(o, m, rc, *which, req, dm)) continue;
    spool::envelope_in e;
    e.id = std::string_view(id, 18);
    e.arrival_us = now;
    e.helo = cfg_.hostname;
    e.body = dm.eight_bit ? spool::body_type::eight_bit_mime : spool::body_type::seven_bit;
    e.smtputf8 = dm.smtputf8;
    std::string rec;
    size_t st = spool::begin_record(rec, spool::record_type::message);
    spool::put_message_head(rec, e, 1);
    spool::put_rcpt(rec, dm.recipient, 0, "");
    put_u32(rec, static_cast<uint32_t>(dm.content.size()));
    rec += dm.content;
    spool::finish_record(rec, st);
    uint64_t tok = next_dsn_token_++;
    auto& held = dsn_records_[tok];
    held = std::move(rec);
    writer_.append(held.data(), held.size(), token_bit | dsn_piece | tok);
    // postfix: "<id>: sender non-delivery notification: <new id>"
    log::info("{}: sender {} notification: {}", r.id, what, std::string_view(id, 18));
  }
}

// --- loads: reading a record back from its segment ----------------------------------------

void delivery::start_load(const queue::load_request& req) {
  uint32_t li = 0;
  load* l = loads_.acquire(li);
  if (!l) return;  // checked by the caller
  l->msg = req.msg;
  l->path = req.segment;
  l->offset = req.offset;
  l->size = req.size;
  l->done = 0;
  ++ctr_.loads;
  mgr_.buffer(req.msg).resize(req.size);
  if (auto it = seg_fds_.find(req.segment); it != seg_fds_.end()) {
    l->fd = it->second;
    read_more(li);
    return;
  }
  l->fd = -1;
  auto* s = rx_.get_sqe();
  io_uring_prep_openat(s, AT_FDCWD, l->path.c_str(), O_RDONLY | O_CLOEXEC, 0);
  io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_open, li, l->gen));
}

void delivery::on_open(uint32_t li, int res) {
  load& l = loads_[li];
  if (res < 0) return end_load(li, false, std::string("open ") + l.path + ": " + strerror(-res));
  // Another load may have opened the same segment meanwhile: keep one fd.
  auto [it, fresh] = seg_fds_.try_emplace(l.path, res);
  if (!fresh) ::close(res);
  l.fd = it->second;
  read_more(li);
}

void delivery::read_more(uint32_t li) {
  load& l = loads_[li];
  std::string& buf = mgr_.buffer(l.msg);
  auto* s = rx_.get_sqe();
  unsigned want = static_cast<unsigned>(std::min<uint64_t>(l.size - l.done, 1u << 30));
  io_uring_prep_read(s, l.fd, buf.data() + l.done, want, l.offset + l.done);
  io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_read, li, l.gen));
}

void delivery::on_read(uint32_t li, int res) {
  load& l = loads_[li];
  if (res < 0) return end_load(li, false, std::string("read ") + l.path + ": " + strerror(-res));
  if (res == 0) return end_load(li, false, "read " + l.path + ": the record ends early (segment shorter than expected)");
  l.done += static_cast<uint64_t>(res);
  if (l.done < l.size) return read_more(li);
  end_load(li, true, "");
}

void delivery::end_load(uint32_t li, bool ok, const std::string& err) {
  load& l = loads_[li];
  if (!ok) {
    ++ctr_.load_failures;
    log::error("{}: cannot read its spool record: {}", mgr_.id_of(l.msg), err);
  }
  mgr_.loaded(l.msg, ok, err, now_us());
  loads_.release(li);
}

// --- connections ---------------------------------------------------------------------------

smtp::client_config delivery::client_config_for(const config::next_hop& hop) const {
  smtp::client_config cc;
  cc.helo_name = hop.helo_name.empty() ? cfg_.hostname : hop.helo_name;
  cc.protocol = hop.protocol == config::next_hop_protocol::lmtp ? smtp::client_protocol::lmtp
                                                                : smtp::client_protocol::smtp;
  switch (hop.tls) {
    case config::tls_policy::none: cc.tls = smtp::tls_policy::none; break;
    case config::tls_policy::may: cc.tls = smtp::tls_policy::may; break;
    case config::tls_policy::encrypt: cc.tls = smtp::tls_policy::encrypt; break;
    case config::tls_policy::verify: cc.tls = smtp::tls_policy::verify; break;
  }
  // Without a context (tls = "none") the client never asks for STARTTLS.
  cc.tls_available = tls_context_for(hop) != nullptr;
  if (!hop.auth_user.empty()) {
    cc.auth_user = hop.auth_user;
    auto it = password_cache_.find(hop.auth_password_file);
    if (it != password_cache_.end()) cc.auth_password = it->second;
  }
  return cc;
}

tls::context* delivery::tls_context_for(const config::next_hop& hop) const {
  if (hop.tls == config::tls_policy::none) return nullptr;
  auto it = tls_ctx_.find(tls_key(hop));
  return it == tls_ctx_.end() ? nullptr : it->second.get();
}

// The client got 220 to STARTTLS: from here every byte goes through TLS. Bytes that came
// after the 220 in the same read were discarded by the client (response injection); the
// transport only sees what arrives from now on.
void delivery::start_tls(oconn& c) {
  const config::next_hop& hop = *c.hop;
  tls::context* ctx = tls_context_for(hop);
  std::string err;
  if (ctx) {
    tls::peer_options po;
    po.policy = hop.tls == config::tls_policy::verify ? tls::verify_policy::verify : tls::verify_policy::encrypt;
    if (!hop.host_is_ip) po.sni = c.peer_name;  // never an IP literal as SNI (RFC 6066 3)
    // The configured name, else the host connected to (for MX: the MX host's name).
    po.verify_name = hop.verify_name.empty() ? c.peer_name : hop.verify_name;
    po.destination = hop.host + ":" + std::to_string(hop.port);
    c.tls = tls::transport::client(*ctx, po, err);
  } else {
    err = "no TLS context";
  }
  if (!c.tls || c.tls->start(c.wire) != net::transport_status::ok) {
    ++ctr_.tls_failures;
    log::warn("delivery: TLS with {} cannot start: {}", c.relay, c.tls ? std::string(c.tls->error()) : err);
    c.cl.tls_done(false);
    return;
  }
  c.tp = c.tls.get();
}

// After bytes went through the TLS transport: has the handshake ended?
void delivery::check_tls(oconn& c) {
  if (!c.tls || c.cl.stage() != client_stage::tls_handshake) return;
  if (c.tls->failed()) {
    ++ctr_.tls_failures;
    log::warn("delivery: TLS handshake with {} failed: {}", c.relay, c.tls->error());
    c.cl.tls_done(false);
    return;
  }
  if (!c.tls->handshake_done()) return;
  ++ctr_.tls_handshakes;
  // postfix: "Verified TLS connection established to host[addr]:port: TLSv1.3 with cipher ..."
  log::info("{} TLS connection established to {}: {} with cipher {}{}",
            c.tls->verified() ? "Verified" : "Untrusted", c.relay, c.tls->protocol(), c.tls->cipher(),
            c.tls->resumed() ? " (resumed)" : "");
  c.cl.tls_done(true);
}

// A fresh slot for a connection to `hop` of destination `dest`: buffers kept (their
// capacity), everything else reset.
void delivery::prepare_slot(oconn& c, uint32_t idx, uint32_t dest, int host, const config::next_hop& hop) {
  c.fd = -1;
  c.dest = dest;
  c.host = host;
  c.hop = &hop;
  c.cands.clear();
  c.cand_at = 0;
  c.established = c.recv_armed = c.send_inflight = c.close_sent = c.cancel_sent = c.connect_inflight = false;
  c.tp = &net::plain_transport::instance();
  c.tls.reset();
  c.app_out.clear();
  c.tx.clear();
  c.wire.clear();
  c.tx_off = 0;
  c.job.reset();
  c.job_sent = false;
  c.rcpts.clear();
  c.start_ms = c.ready_ms = rx_.now_ms();
  c.jobs = 0;
  c.tmr.data = ud::make(owner::outbound, 0, idx, c.gen);
  ++ctr_.connections;
}

struct delivery::dns_wait {
  delivery* d;
  uint32_t idx, gen;
  dns::result r;
};

void delivery::open_connection(const queue::connect_request& req) {
  const config::next_hop& hop = *req.hop;
  uint32_t idx = 0;
  oconn* cp = conns_.acquire(idx);
  if (!cp) {  // checked by the caller
    mgr_.connect_failed(req.dest, req.host, "4.3.2", "no free outbound connection slot", rx_.now_ms(), now_us());
    return;
  }
  oconn& c = *cp;
  prepare_slot(c, idx, req.dest, req.host, hop);
  c.peer_name = hop.host;
  c.relay = hop.host + "[?]:" + std::to_string(hop.port);
  if (hop.host_is_ip) {
    auto a = net::address::from_ip(hop.host, hop.port);
    if (!a) {
      fail_connection(c, "4.4.1", "bad address " + hop.host);
      return;
    }
    connect_to(c, *a);
    return;
  }
  // A name: ask the resolver (its own thread); the answer comes back through the inbox.
  if (!resolver_ || !post_) {
    fail_connection(c, "4.4.3", "cannot resolve " + hop.host + ": no resolver");
    return;
  }
  c.ph = phase::resolving;
  c.deadline_ms = c.start_ms + uint64_t(cfg_.queue.connect_timeout_s) * 1000 + uint64_t(cfg_.dns.timeout_ms) *
                                                                                   cfg_.dns.tries * 2;
  rx_.timers().arm(c.tmr, c.deadline_ms);
  auto* w = new dns_wait{this, idx, c.gen, {}};
  ++dns_inflight_;
  auto cb = [](void* ctx, dns::result&& r) {
    auto* w = static_cast<dns_wait*>(ctx);
    w->r = std::move(r);
    // On the resolver thread: hand the answer to the shard. Its inbox has room by
    // construction (max_dns); if a burst of control posts filled it, wait a little.
    for (int i = 0; i < 100000; ++i) {
      if (w->d->post_(w->d->post_owner_, w)) return;
      sched_yield();
    }
    // The shard is gone (stopped past its deadline): nobody will read this answer.
  };
  auto sub = resolver_->lookup(hop.host, hop.mx ? dns::kind::mx : dns::kind::address, cb, w);
  if (sub == dns::submit::full || sub == dns::submit::stopped) {
    --dns_inflight_;
    delete w;
    fail_connection(c, "4.4.3",
                    "cannot resolve " + hop.host + ": " + (sub == dns::submit::full ? "resolver busy" : "resolver stopped"));
  }
}

void delivery::dns_arrived(void* arg) {
  auto* w = static_cast<dns_wait*>(arg);
  w->d->on_dns(w);
}

void delivery::on_dns(dns_wait* w) {
  std::unique_ptr<dns_wait> own(w);
  if (dns_inflight_) --dns_inflight_;
  oconn* cp = conns_.find(w->idx, w->gen);
  if (!cp || cp->ph != phase::resolving) return;  // timed out or stopped meanwhile
  oconn& c = *cp;
  const dns::result& r = w->r;
  // The address to use: the first of the name's; with mx = true, the first address of the
  // most preferred MX host that has one (and that host's name is the one TLS verifies).
  c.cands.clear();
  c.cand_at = 0;
  if (r.st == dns::status::ok) {
    auto add = [&](const std::string& name, const net::address& ip) {
      if (c.cands.size() >= max_candidates) return;
      if (auto a = net::address::from_ip(ip.ip(), c.hop->port)) c.cands.emplace_back(name, *a);
    };
    if (r.k == dns::kind::mx) {
      for (const auto& h : r.mx)
        for (const auto& at : h.addresses) add(h.name, at.addr);
    } else {
      for (const auto& at : r.addresses) add(c.hop->host, at.addr);
    }
  }
  if (c.cands.empty()) {
    ++ctr_.dns_failures;
    // postfix: "Host or domain name not found. Name service error for name=... type=A: ..."
    const char* dsn = r.st == dns::status::nxdomain || r.st == dns::status::nodata || r.st == dns::status::null_mx
                          ? "4.4.4"
                          : "4.4.3";
    log::warn("delivery: {} ({}): {}", c.hop->host, routes_[c.dest].name, r.text);
    fail_connection(c, dsn, "Host or domain name not found. Name service error: " + r.text);
    return;
  }
  c.peer_name = c.cands[0].first;
  connect_to(c, c.cands[0].second);
}

bool delivery::try_next_candidate(oconn& c, const std::string& why) {
  if (c.established || stopping_ || c.cand_at + 1 >= c.cands.size()) return false;
  uint32_t idx = 0;
  oconn* np = conns_.acquire(idx);
  if (!np) return false;
  oconn& n = *np;
  prepare_slot(n, idx, c.dest, c.host, *c.hop);
  --ctr_.connections;  // the same attempt, on another address
  n.cands = std::move(c.cands);
  n.cand_at = c.cand_at + 1;
  n.peer_name = n.cands[n.cand_at].first;
  n.start_ms = c.start_ms;
  log::info("delivery: {}; trying the next address of {}: {}", why, c.hop->host, n.peer_name);
  // The old slot closes without a report: the attempt goes on in the new one.
  c.established = true;
  if (c.job) mgr_.job_requeue(std::move(c.job));
  c.ph = phase::closing;
  begin_close(c);
  connect_to(n, n.cands[n.cand_at].second);
  return true;
}

void delivery::connect_to(oconn& c, const net::address& a) {
  const config::next_hop& hop = *c.hop;
  c.addr = a;
  c.relay = c.peer_name + "[" + a.ip() + "]:" + std::to_string(hop.port);
  int fd = ::socket(a.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    fail_connection(c, "4.3.0", std::string("socket: ") + strerror(errno));
    return;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (!hop.source_address.empty()) {
    auto src = net::address::from_ip(hop.source_address, 0);
    if (!src || src->family() != a.family() ||
        ::bind(fd, reinterpret_cast<const sockaddr*>(&src->ss), src->len) != 0) {
      std::string e = src && src->family() != a.family() ? "address family differs" : strerror(errno);
      ::close(fd);
      fail_connection(c, "4.3.0", "bind to source_address " + hop.source_address + ": " + e);
      return;
    }
  }
  c.fd = fd;
  c.ph = phase::connecting;
  c.connect_inflight = true;
  c.cl.reset(client_config_for(hop));
  c.deadline_ms = rx_.now_ms() + uint64_t(cfg_.queue.connect_timeout_s) * 1000;
  rx_.timers().arm(c.tmr, c.deadline_ms);
  auto* s = rx_.get_sqe();
  io_uring_prep_connect(s, fd, reinterpret_cast<const sockaddr*>(&c.addr.ss), c.addr.len);
  io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_connect, c.idx, c.gen));
}

void delivery::on_completion(const io_uring_cqe& cqe) {
  const uint64_t d = cqe.user_data;
  const unsigned o = ud::op(d);
  if (o == op_open || o == op_read) {
    if (!loads_.find(ud::index(d), ud::gen(d))) return;
    if (o == op_open)
      on_open(ud::index(d), cqe.res);
    else
      on_read(ud::index(d), cqe.res);
    return;
  }
  if (o == op_unlink) {
    if (cqe.res < 0 && cqe.res != -ENOENT) {
      log::error("spool: cannot remove segment {}: {}", unlinking_, strerror(-cqe.res));
      unlink_inflight_ = false;
      mgr_.segment_removed(spool::segment_dir(cfg_.spool.dir) + "/" + unlinking_, false);
      return;
    }
    auto* s = rx_.get_sqe();
    io_uring_prep_fsync(s, dir_fd_, 0);
    io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_dirsync, 0, 0));
    return;
  }
  if (o == op_dirsync) {
    unlink_inflight_ = false;
    bool ok = cqe.res >= 0;
    if (ok) {
      ++ctr_.segments_removed;
      log::info("spool: segment {} removed: every message in it is done", unlinking_);
    } else {
      log::error("spool: fsync of the segment directory after removing {}: {}", unlinking_, strerror(-cqe.res));
    }
    mgr_.segment_removed(spool::segment_dir(cfg_.spool.dir) + "/" + unlinking_, ok);
    return;
  }
  oconn* c = conns_.find(ud::index(d), ud::gen(d));
  if (!c || c->ph == phase::free) {
    if (int bid = core::buffer_ring::id_of(cqe); bid >= 0) rx_.buffers().recycle(static_cast<uint16_t>(bid));
    return;
  }
  switch (o) {
    case op_connect: on_connect(*c, cqe.res); return;
    case op_recv: on_recv(*c, cqe); return;
    case op_send: on_send(*c, cqe.res); return;
    case op_close:
      c->fd = -1;
      maybe_release(*c);
      return;
    default: return;
  }
}

void delivery::on_connect(oconn& c, int res) {
  c.connect_inflight = false;
  if (c.ph == phase::closing) return maybe_release(c);
  if (res < 0) {
    fail_connection(c, "4.4.1", "connect to " + c.relay + ": " + strerror(-res));
    return;
  }
  c.ph = phase::live;
  auto* s = rx_.get_sqe();
  io_uring_prep_recv_multishot(s, c.fd, nullptr, 0, 0);
  s->flags |= IOSQE_BUFFER_SELECT;
  s->buf_group = rx_.buffers().group();
  io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_recv, c.idx, c.gen));
  c.recv_armed = true;
  c.cl.connected();
  drive(c);
}

void delivery::on_recv(oconn& c, const io_uring_cqe& cqe) {
  if (!(cqe.flags & IORING_CQE_F_MORE)) c.recv_armed = false;
  int res = cqe.res;
  if (res > 0) {
    int bid = core::buffer_ring::id_of(cqe);
    if (bid >= 0) {
      char* b = rx_.buffers().buffer(static_cast<uint16_t>(bid));
      if (c.ph == phase::live) {
        auto st = c.tp->on_recv(b, static_cast<size_t>(res), c, c.wire);
        if (st != net::transport_status::ok) {
          if (c.tls && c.cl.stage() == client_stage::tls_handshake) {
            check_tls(c);  // a failed handshake: the client defers with the reason logged
          } else {
            c.cl.lost();
          }
        } else {
          check_tls(c);
        }
      }
      rx_.buffers().recycle(static_cast<uint16_t>(bid));
    }
    if (c.ph == phase::live) drive(c);
  } else if (res == -ENOBUFS) {
    // flow control: re-armed below
  } else if (res != -ECANCELED) {
    if (c.ph == phase::live) {
      c.cl.lost();  // EOF or a socket error
      drive(c);
    }
  }
  if (!c.recv_armed) {
    if (c.ph == phase::live) {
      auto* s = rx_.get_sqe();
      io_uring_prep_recv_multishot(s, c.fd, nullptr, 0, 0);
      s->flags |= IOSQE_BUFFER_SELECT;
      s->buf_group = rx_.buffers().group();
      io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_recv, c.idx, c.gen));
      c.recv_armed = true;
    } else {
      maybe_release(c);
    }
  }
}

void delivery::on_send(oconn& c, int res) {
  c.send_inflight = false;
  if (res < 0) {
    c.tx.clear();
    c.wire.clear();
    c.tx_off = 0;
    if (c.ph == phase::live) {
      c.cl.lost();
      drive(c);
    } else {
      maybe_release(c);
    }
    return;
  }
  c.tx_off += static_cast<size_t>(res);
  if (c.tx_off >= c.tx.size()) {
    c.tx.clear();
    c.tx_off = 0;
  }
  if (c.ph == phase::live) {
    drive(c);
  } else {
    send_tx(c);  // closing: the QUIT or the last bytes, if any
    if (!c.send_inflight) maybe_release(c);
  }
}

void delivery::send_tx(oconn& c) {
  if (c.send_inflight || c.fd < 0) return;
  if (c.tx_off >= c.tx.size()) {
    c.tx.clear();
    c.tx_off = 0;
    c.tx.swap(c.wire);  // no send in flight: the produced bytes become the send buffer
  }
  if (c.tx_off >= c.tx.size()) return;
  auto* s = rx_.get_sqe();
  io_uring_prep_send(s, c.fd, c.tx.data() + c.tx_off, c.tx.size() - c.tx_off, MSG_NOSIGNAL);
  io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_send, c.idx, c.gen));
  c.send_inflight = true;
}

// Run the client as far as it goes: output to the socket, content pulled under the send
// window, jobs in and results out, timers for the stage it waits in.
void delivery::drive(oconn& c) {
  for (int guard = 0; guard < 64; ++guard) {
    if (c.cl.has_output()) {
      c.cl.take_output(c.app_out);
      if (c.tp->on_send(c.app_out, c.wire) != net::transport_status::ok) {
        c.cl.lost();
        continue;
      }
    }
    client_stage st = c.cl.stage();
    if (st == client_stage::tls_handshake) {
      if (!c.tls) {
        start_tls(c);
        continue;
      }
      break;  // waiting for the server's handshake bytes
    }
    if (st == client_stage::body) {
      size_t pending = c.tx.size() - c.tx_off + c.wire.size();
      if (pending < body_window && c.cl.produce(body_window - pending) > 0) continue;
      break;
    }
    if (st == client_stage::idle) {
      // has_results() stays true until the next send(): only a job that was sent owns them.
      if (c.job && c.job_sent && c.cl.has_results()) finish_job(c);
      if (!c.established) {
        c.established = true;
        c.ready_ms = rx_.now_ms();
        mgr_.connected(c.dest, c.host);
      }
      if (!c.job && !stopping_ && c.cl.messages() < cfg_.queue.messages_per_connection)
        c.job = mgr_.take_job(c.dest);
      if (c.job) {
        c.rcpts = mgr_.job_rcpts(*c.job);
        c.job_ms = rx_.now_ms();
        if (!c.cl.send(smtp::message_of(mgr_.view(c.job->msg), c.rcpts))) {
          // Nothing to send (no recipients): the job ends as it is.
          std::vector<queue::rcpt_result> none;
          mgr_.job_done(std::move(c.job), none, now_us());
          continue;
        }
        c.job_sent = true;
        continue;
      }
      if (stopping_ || c.cl.messages() >= cfg_.queue.messages_per_connection || cfg_.queue.connection_idle_s == 0) {
        c.cl.quit();
        continue;
      }
      // Kept for the next job to this destination (pump() hands it out); tick() closes it.
      c.idle_since_ms = rx_.now_ms();
      if (std::find(idle_.begin(), idle_.end(), c.idx) == idle_.end()) idle_.push_back(c.idx);
      break;
    }
    if (st == client_stage::done) {
      if (c.job && c.job_sent && c.cl.has_results()) {
        finish_job(c);
      } else if (c.job) {
        c.job_sent = false;
        mgr_.job_requeue(std::move(c.job));  // never given to the server: another connection takes it
      }
      if (!c.established) {
        const auto& f = c.cl.failure();
        std::string why = f.code ? "host " + c.relay + " said: " + std::to_string(f.code) + " " + f.text +
                                       " (in reply to " + smtp::command_name(f.cmd) + " command)"
                                 : "host " + c.relay + ": " + f.text;
        if (c.tls && c.tls->failed()) why += " (" + std::string(c.tls->error()) + ")";
        if (try_next_candidate(c, why)) return;
        const char* dsn = f.status[0] ? f.status : "4.4.2";
        ++ctr_.connect_failures;
        mgr_.connect_failed(c.dest, c.host, dsn, why, rx_.now_ms(), now_us());
        c.established = true;  // reported: begin_close must not report it again
        c.ph = phase::closing;
        send_tx(c);
        begin_close(c);
        return;
      }
      mgr_.disconnected(c.dest);
      c.ph = phase::closing;
      send_tx(c);
      begin_close(c);
      return;
    }
    break;
  }
  send_tx(c);
  arm_stage_timer(c);
}

void delivery::finish_job(oconn& c) {
  auto res = c.cl.results();
  std::vector<queue::rcpt_result> out(c.job->rcpts.size());
  uint64_t now = rx_.now_ms();
  const spool::message_view& m = mgr_.view(c.job->msg);
  double delay = m.arrival_us ? double(now_us() - std::min(now_us(), m.arrival_us)) / 1e6 : 0.0;
  // Connection set-up counts for the first message of a connection only (postfix's c).
  double conn_s = c.jobs == 0 ? double(c.ready_ms - c.start_ms) / 1000.0 : 0.0;
  ++c.jobs;
  double xfer_s = double(now - std::max(c.job_ms, c.ready_ms)) / 1000.0;
  for (size_t k = 0; k < out.size(); ++k) {
    auto& o = out[k];
    if (k >= res.size()) {
      o = queue::local_result(spool::rcpt_state::deferred, "4.3.0", "no result for this recipient");
      continue;
    }
    const auto& r = res[k];
    switch (r.status) {
      case smtp::rcpt_status::delivered: o.state = spool::rcpt_state::delivered; break;
      case smtp::rcpt_status::failed: o.state = spool::rcpt_state::failed; break;
      default: o.state = spool::rcpt_state::deferred; break;
    }
    o.dsn = r.reply.status[0] ? r.reply.status : (o.state == spool::rcpt_state::delivered ? "2.0.0" : "4.0.0");
    o.remote_host = c.peer_name;
    o.remote_ip = c.addr.ip();
    o.reply = r.reply.code ? std::to_string(r.reply.code) + " " + r.reply.text : std::string();
    o.hop_dsn = c.cl.caps().dsn;
    o.final_delivery = c.hop->protocol == config::next_hop_protocol::lmtp;
    if (r.reply.code)
      o.text = (o.state == spool::rcpt_state::delivered ? "" : "host " + c.relay + " said: ") +
               std::to_string(r.reply.code) + " " + r.reply.text +
               (o.state == spool::rcpt_state::delivered ? ""
                                                        : std::string(" (in reply to ") +
                                                              smtp::command_name(r.reply.cmd) + " command)");
    else
      o.text = r.reply.text;
    switch (o.state) {
      case spool::rcpt_state::delivered: ++ctr_.delivered; break;
      case spool::rcpt_state::failed: ++ctr_.bounced; break;
      default: ++ctr_.deferred; break;
    }
    // postfix: "ID: to=<a@b>, relay=host[ip]:port, delay=1.2, delays=a/b/c/d, dsn=2.0.0, status=sent (250 ...)"
    double queued_s = std::max(0.0, delay - conn_s - xfer_s);
    log::info("{}: to=<{}>, relay={}, delay={}, delays={}/0/{}/{}, dsn={}, status={} ({})", mgr_.id_of(c.job->msg),
              k < c.rcpts.size() ? c.rcpts[k].addr : std::string_view("?"), c.relay, pf_delay(delay),
              pf_delay(queued_s), pf_delay(conn_s), pf_delay(xfer_s), o.dsn, state_word(o.state), o.text);
  }
  ++ctr_.messages_sent;
  c.job_sent = false;
  mgr_.job_done(std::move(c.job), out, now_us());
  c.rcpts.clear();
}

uint64_t delivery::stage_timeout_ms(client_stage s) const {
  const auto& q = cfg_.queue;
  uint32_t sec = 300;
  switch (s) {
    case client_stage::connect: sec = q.connect_timeout_s; break;
    case client_stage::greeting: sec = q.greeting_timeout_s; break;
    case client_stage::ehlo:
    case client_stage::helo:
    case client_stage::auth: sec = q.helo_timeout_s; break;
    case client_stage::starttls:
    case client_stage::tls_handshake: sec = q.starttls_timeout_s; break;
    case client_stage::mail:
    case client_stage::rset: sec = q.mail_timeout_s; break;
    case client_stage::rcpt: sec = q.rcpt_timeout_s; break;
    case client_stage::data_init: sec = q.data_init_timeout_s; break;
    case client_stage::body: sec = q.data_xfer_timeout_s; break;
    case client_stage::data_done: sec = q.data_done_timeout_s; break;
    case client_stage::quit: sec = q.quit_timeout_s; break;
    case client_stage::idle:
    case client_stage::done: return 0;
  }
  return uint64_t(sec) * 1000;
}

void delivery::arm_stage_timer(oconn& c) {
  uint64_t t = stage_timeout_ms(c.cl.stage());
  if (t == 0) {
    if (c.tmr.armed()) rx_.timers().cancel(c.tmr);
    return;
  }
  // Re-armed at every event: the timeout is for progress in the stage, as postfix's
  // smtp_*_timeout are per read/write.
  c.deadline_ms = rx_.now_ms() + t;
  rx_.timers().arm(c.tmr, c.deadline_ms);
}

void delivery::on_timer(core::timer& t) {
  if (ud::op(t.data) == op_hold) return;  // the iteration it woke runs pump()
  oconn* cp = conns_.find(ud::index(t.data), ud::gen(t.data));
  if (!cp) return;
  oconn& c = *cp;
  if (c.ph == phase::resolving) {
    fail_connection(c, "4.4.3", "cannot resolve " + c.hop->host + ": no answer in time");
    return;
  }
  if (c.ph == phase::connecting) {
    fail_connection(c, "4.4.1", "connect to " + c.relay + ": Connection timed out");
    return;
  }
  if (c.ph == phase::closing) {
    // A close that does not drain (a send stuck on a dead peer): cancel everything.
    if (!c.cancel_sent && c.fd >= 0) {
      rx_.cancel_fd(c.fd);
      c.cancel_sent = true;
    }
    return;
  }
  if (c.ph == phase::live) {
    c.cl.timeout();
    drive(c);
  }
}

void delivery::fail_connection(oconn& c, const char* dsn, const std::string& why) {
  ++ctr_.connect_failures;
  if (try_next_candidate(c, why)) return;
  if (c.job) {
    c.job_sent = false;
    mgr_.job_requeue(std::move(c.job));
    c.rcpts.clear();
  }
  if (!c.established) {
    c.established = true;
    mgr_.connect_failed(c.dest, c.host, dsn, why, rx_.now_ms(), now_us());
  } else {
    mgr_.disconnected(c.dest);
  }
  c.ph = phase::closing;
  begin_close(c);
}

void delivery::begin_close(oconn& c) {
  c.ph = phase::closing;
  if (c.fd >= 0 && (c.recv_armed || c.connect_inflight)) {
    rx_.cancel_fd(c.fd);
    c.cancel_sent = true;
  }
  // A last send (QUIT) may still be in flight; the timer bounds how long we wait for it.
  if (c.send_inflight) {
    c.deadline_ms = rx_.now_ms() + uint64_t(cfg_.queue.quit_timeout_s) * 1000;
    rx_.timers().arm(c.tmr, c.deadline_ms);
  }
  maybe_release(c);
}

void delivery::maybe_release(oconn& c) {
  if (c.ph != phase::closing) return;
  if (c.recv_armed || c.send_inflight || c.connect_inflight) return;
  if (c.fd >= 0) {
    if (c.close_sent) return;
    c.close_sent = true;
    auto* s = rx_.get_sqe();
    io_uring_prep_close(s, c.fd);
    io_uring_sqe_set_data64(s, ud::make(owner::outbound, op_close, c.idx, c.gen));
    return;
  }
  if (c.tmr.armed()) rx_.timers().cancel(c.tmr);
  if (c.job) mgr_.job_requeue(std::move(c.job));
  c.job_sent = false;
  c.tls.reset();
  c.tp = nullptr;
  c.ph = phase::free;
  c.tx.clear();
  c.wire.clear();
  c.app_out.clear();
  c.rcpts.clear();
  for (std::string* b : {&c.tx, &c.wire, &c.app_out})
    if (b->capacity() > cfg_.tuning.buffer_keep) std::string().swap(*b);
  conns_.release(c.idx);
}

}  // namespace tern::server
