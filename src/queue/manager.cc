#include "src/queue/manager.hh"

#include <algorithm>

namespace tern::queue {

using spool::rcpt_state;

manager::manager(routing& r, const options& o) : routes_(r), opt_(o), rng_(o.seed), dests_(r.size()) {}

msg_handle manager::alloc() {
  if (!free_.empty()) {
    msg_handle h = free_.back();
    free_.pop_back();
    return h;
  }
  msgs_.emplace_back();
  return static_cast<msg_handle>(msgs_.size() - 1);
}

void manager::add(message_info m) {
  msg_handle h = alloc();
  msg& x = msgs_[h];
  x = msg{};
  x.st = mstate::queued;
  x.info = std::move(m);
  ++segs_[x.info.segment];
  due_.push({x.info.next_attempt_us, h});
  ++live_;
}

void manager::set_current_segment(const std::string& path) {
  if (path == current_) return;
  current_ = path;
  segs_.try_emplace(path, 0);
}

void manager::track_segment(const std::string& path) { segs_.try_emplace(path, 0); }

bool manager::next_removal(std::string& path) {
  if (removing_ || segs_.empty()) return false;
  auto it = segs_.begin();
  // Live counts drop only once a done record (or a forward copy) is durable, so a segment
  // at zero holds nothing that is needed any more, once everything older is gone.
  if (it->second != 0 || it->first == current_) return false;
  removing_ = true;
  path = it->first;
  return true;
}

void manager::segment_removed(const std::string& path, bool ok) {
  removing_ = false;
  if (ok) segs_.erase(path);
}

bool manager::next_load(uint64_t now_us, load_request& req) {
  // No destination at all (no smarthost, no route): every recipient would be deferred
  // with "no route"; the messages stay queued untouched (no read, no status record), and
  // the configuration warning at start says why.
  if (routes_.size() == 0) return false;
  while (!due_.empty()) {
    auto [at, h] = due_.top();
    if (at > now_us) return false;
    msg& x = msgs_[h];
    if (x.st != mstate::queued || x.info.next_attempt_us != at) {  // stale heap entry
      due_.pop();
      continue;
    }
    if (active_ >= opt_.active_limit) return false;
    if (active_ > 0 && active_bytes_ + x.info.record_size > opt_.active_bytes) return false;
    due_.pop();
    x.st = mstate::loading;
    ++active_;
    active_bytes_ += x.info.record_size;
    req.msg = h;
    req.segment = x.info.segment;
    req.offset = x.info.offset;
    req.size = x.info.record_size;
    return true;
  }
  return false;
}

void manager::loaded(msg_handle h, bool ok, const std::string& err, uint64_t now_us) {
  msg& x = msgs_[h];
  std::string why;
  if (ok) {
    spool::record_view rv;
    const char* bad = nullptr;
    auto data = std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(x.record.data()), x.record.size());
    if (spool::read_record(data, 0, rv, &bad) != spool::read_status::ok || rv.type != spool::record_type::message)
      why = std::string("spool record unreadable: ") + (bad ? bad : "not a message record");
    else if (!spool::decode_message(rv.payload, x.view) || x.view.id != x.info.id)
      why = "spool record does not decode as message " + x.info.id;
  } else {
    why = "cannot read the spool record: " + err;
  }
  x.st = mstate::active;
  ++rounds_;
  if (!why.empty()) {
    // Nothing was tried: defer the whole message (the record stays; an operator can look).
    x.view = spool::message_view{};
    x.before = x.info.state;
    x.last.clear();
    x.jobs_open = 0;
    end_round(h, now_us);  // with no results: counts as a deferral of everything pending
    results_.back().id = x.info.id;
    return;
  }
  uint32_t n = x.view.nrcpt;
  if (x.info.state.size() != n) x.info.state.assign(n, rcpt_state::pending);
  x.before = x.info.state;
  x.last.assign(n, rcpt_result{});
  x.local.assign(n, false);
  // Route every recipient not final yet; one job per destination.
  std::vector<std::unique_ptr<job>> by_dest(routes_.size());
  uint32_t i = 0;
  bool no_route = false;
  spool::for_each_rcpt(x.view, [&](const spool::rcpt_view& r) {
    uint32_t idx = i++;
    if (spool::rcpt_final(x.info.state[idx])) return;
    uint32_t d = routes_.route_for(r.addr);
    if (d == no_destination) {
      x.info.state[idx] = rcpt_state::deferred;
      x.local[idx] = true;
      x.last[idx] = local_result(rcpt_state::deferred, "4.3.5",
                     "no route to the recipient's domain: no [[smarthost]] is configured and no [[route]] matches");
      no_route = true;
      return;
    }
    if (!by_dest[d]) {
      by_dest[d] = std::make_unique<job>();
      by_dest[d]->msg = h;
      by_dest[d]->dest = d;
    }
    by_dest[d]->rcpts.push_back(idx);
  });
  (void)no_route;
  x.jobs_open = 0;
  for (auto& j : by_dest)
    if (j) {
      ++x.jobs_open;
      dests_[j->dest].waiting.push_back(std::move(j));
    }
  if (x.jobs_open == 0) end_round(h, now_us);
}

std::vector<spool::rcpt_view> manager::job_rcpts(const job& j) const {
  std::vector<spool::rcpt_view> all, out;
  spool::for_each_rcpt(msgs_[j.msg].view, [&](const spool::rcpt_view& r) { all.push_back(r); });
  for (uint32_t i : j.rcpts)
    if (i < all.size()) out.push_back(all[i]);
  return out;
}

bool manager::next_connect(uint64_t now_ms, uint64_t now_us, connect_request& req) {
  for (uint32_t d = 0; d < dests_.size(); ++d) {
    auto& ds = dests_[d];
    // One connection per waiting job at most, and never more than the concurrency bound.
    uint32_t open = ds.connections + ds.connecting;
    if (ds.waiting.empty() || open >= opt_.concurrency || open >= ds.waiting.size()) continue;
    int host = routes_.pick_host(d, now_ms, rng_);
    if (host < 0) {
      // Every host is backed off: new jobs do not wait in memory for one to come back.
      if (open == 0) defer_waiting(d, ds.last_dsn.empty() ? "4.4.1" : ds.last_dsn,
                                   "all hosts of " + routes_[d].name + " are backed off after failures" +
                                       (ds.last_reason.empty() ? "" : " (last: " + ds.last_reason + ")"),
                                   now_us);
      continue;
    }
    ++ds.connecting;
    req.dest = d;
    req.host = host;
    req.hop = &routes_[d].hops[size_t(host)];
    return true;
  }
  return false;
}

void manager::connected(uint32_t dest, int host) {
  auto& ds = dests_[dest];
  if (ds.connecting) --ds.connecting;
  ++ds.connections;
  routes_.host_ok(dest, host);
}

void manager::connect_failed(uint32_t dest, int host, const std::string& dsn, const std::string& reason,
                             uint64_t now_ms, uint64_t now_us) {
  auto& ds = dests_[dest];
  if (ds.connecting) --ds.connecting;
  routes_.host_failed(dest, host, now_ms, opt_.host_backoff_ms, opt_.host_backoff_max_ms);
  ds.last_dsn = dsn;
  ds.last_reason = reason;
  if (routes_.pick_host(dest, now_ms, rng_) >= 0) return;  // the next host is tried at once
  if (ds.connections + ds.connecting > 0) return;  // a live connection may still take them
  // No host left: every job waiting for this destination is deferred with this reason.
  defer_waiting(dest, dsn, reason, now_us);
}

void manager::defer_waiting(uint32_t dest, const std::string& dsn, const std::string& reason, uint64_t now_us) {
  std::deque<std::unique_ptr<job>> w;
  w.swap(dests_[dest].waiting);
  for (auto& j : w) {
    defer_job(*j, dsn, reason);
    msg_handle h = j->msg;
    j.reset();
    maybe_end_round(h, now_us);
  }
}

void manager::disconnected(uint32_t dest) {
  auto& ds = dests_[dest];
  if (ds.connections) --ds.connections;
}

std::unique_ptr<job> manager::take_job(uint32_t dest) {
  auto& ds = dests_[dest];
  if (ds.waiting.empty()) return nullptr;
  auto j = std::move(ds.waiting.front());
  ds.waiting.pop_front();
  return j;
}

void manager::defer_job(job& j, const std::string& dsn, const std::string& reason) {
  msg& x = msgs_[j.msg];
  for (uint32_t i : j.rcpts) {
    if (i >= x.last.size()) continue;
    x.info.state[i] = rcpt_state::deferred;
    x.last[i] = local_result(rcpt_state::deferred, dsn, reason);
    if (i < x.local.size()) x.local[i] = true;
  }
  if (x.jobs_open) --x.jobs_open;
}

void manager::job_done(std::unique_ptr<job> j, std::span<const rcpt_result> results, uint64_t now_us) {
  msg& x = msgs_[j->msg];
  for (size_t k = 0; k < j->rcpts.size(); ++k) {
    uint32_t i = j->rcpts[k];
    if (i >= x.last.size()) continue;
    rcpt_result r = k < results.size() ? results[k]
                                       : local_result(rcpt_state::deferred, "4.3.0", "no result for this recipient");
    if (r.state == rcpt_state::pending) r.state = rcpt_state::deferred;
    x.info.state[i] = r.state;
    x.last[i] = std::move(r);
  }
  if (x.jobs_open) --x.jobs_open;
  msg_handle h = j->msg;
  j.reset();
  maybe_end_round(h, now_us);
}

void manager::job_requeue(std::unique_ptr<job> j) {
  dests_[j->dest].waiting.push_front(std::move(j));
}

void manager::maybe_end_round(msg_handle h, uint64_t now_us) {
  if (msgs_[h].st == mstate::active && msgs_[h].jobs_open == 0) end_round(h, now_us);
}

void manager::end_round(msg_handle h, uint64_t now_us) {
  msg& x = msgs_[h];
  round_result rr;
  rr.msg = h;
  rr.id = x.info.id;
  uint32_t n = static_cast<uint32_t>(x.info.state.size());
  bool any_deferred = false;
  for (uint32_t i = 0; i < n; ++i)
    if (!spool::rcpt_final(x.info.state[i])) any_deferred = true;
  // A record that could not be read: nothing is known about its recipients, so it is never
  // expired or finished (that would drop it); it stays deferred and logged every round.
  bool unreadable = x.view.id.empty();
  if (unreadable) any_deferred = true;
  ++x.info.attempts;
  if (any_deferred && !unreadable && expired(opt_.retry, x.info.arrival_us, now_us)) {
    rr.expired = true;
    for (uint32_t i = 0; i < n; ++i)
      if (!spool::rcpt_final(x.info.state[i])) {
        std::string why = i < x.last.size() && !x.last[i].text.empty() ? x.last[i].text : "no attempt succeeded";
        x.info.state[i] = rcpt_state::failed;
        if (x.last.size() < n) x.last.resize(n);
        if (x.local.size() < n) x.local.resize(n);
        x.last[i] = local_result(rcpt_state::failed, "4.4.7", "delivery time expired: " + why);
        x.local[i] = true;
      }
    any_deferred = false;
  }
  std::vector<spool::rcpt_status> changed;
  for (uint32_t i = 0; i < n && i < x.last.size(); ++i) {
    rcpt_state b = i < x.before.size() ? x.before[i] : rcpt_state::pending;
    if (x.info.state[i] == rcpt_state::failed && b != rcpt_state::failed) rr.failed_now.push_back(i);
    if (x.info.state[i] == rcpt_state::delivered && b != rcpt_state::delivered) rr.delivered_now.push_back(i);
    if (i < x.local.size() && x.local[i]) rr.decided_here.push_back(i);
    // Deferred recipients are written every round (their reason changes); finals once.
    if (x.info.state[i] != b || x.info.state[i] == rcpt_state::deferred)
      changed.push_back({i, x.info.state[i], x.last[i].dsn, x.last[i].text});
  }
  if (any_deferred) x.info.next_attempt_us = next_attempt_us(opt_.retry, x.info.attempts, now_us, x.info.arrival_us, rng_);
  rr.expires_us = x.info.arrival_us + opt_.retry.max_lifetime_s * 1000000;
  if (any_deferred && !unreadable && delay_warning_due(opt_.retry, x.info.arrival_us, now_us, x.info.flags)) {
    rr.delay_warning = true;  // the status record below carries the flag: one warning only
    x.info.flags |= spool::status_delay_warned;
  }
  std::string rec;
  // Copy forward a deferred message whose record is in an older segment than the current
  // one: the record (in memory now), then its whole state, so the old segment can go.
  x.moving = any_deferred && !unreadable && !current_.empty() && x.info.segment < current_ &&
             x.record.size() == x.info.record_size;
  if (x.moving) {
    rec = x.record;
    changed.clear();
    for (uint32_t i = 0; i < n; ++i)
      if (x.info.state[i] != rcpt_state::pending)
        changed.push_back({i, x.info.state[i], i < x.last.size() ? std::string_view(x.last[i].dsn) : "",
                           i < x.last.size() ? std::string_view(x.last[i].text) : ""});
  }
  spool::encode_status(rec, x.info.id, x.info.attempts, any_deferred ? x.info.next_attempt_us : 0, x.info.flags, changed);
  if (!any_deferred) {
    spool::encode_done(rec, x.info.id);
    rr.finished = true;
  }
  uint64_t tok = next_token_++;
  records_.emplace(tok, std::move(rec));
  to_hand_.push_back(tok);
  writing_[tok] = h;
  x.st = mstate::writing;
  x.writing_token = tok;
  results_.push_back(std::move(rr));
}

bool manager::next_record(record_out& out) {
  if (to_hand_.empty()) return false;
  out.token = to_hand_.front();
  to_hand_.pop_front();
  out.bytes = &records_.at(out.token);
  return true;
}

void manager::record_durable(uint64_t token, bool ok, uint64_t now_us, const std::string& segment,
                             uint64_t offset) {
  records_.erase(token);
  if (ok && !segment.empty()) segs_.try_emplace(segment, 0);
  auto it = writing_.find(token);
  if (it == writing_.end()) return;
  msg_handle h = it->second;
  writing_.erase(it);
  msg& x = msgs_[h];
  if (ok && x.moving && !segment.empty()) {
    // The copy is durable: the message lives in the new segment from now on.
    auto old = segs_.find(x.info.segment);
    if (old != segs_.end() && old->second) --old->second;
    x.info.segment = segment;
    x.info.offset = offset;
    ++segs_[segment];
    ++moved_;
  }
  x.moving = false;
  --active_;
  active_bytes_ -= std::min(active_bytes_, x.info.record_size);
  x.record.clear();
  x.record.shrink_to_fit();
  x.view = spool::message_view{};
  x.last.clear();
  x.local.clear();
  x.before.clear();
  bool finished = true;
  for (auto s : x.info.state)
    if (!spool::rcpt_final(s)) finished = false;
  if (x.info.state.empty()) finished = false;
  if (!ok) {
    // The outcome is not durable: the recipients' state in memory is right, but the spool
    // does not know it. Keep the message and try again soon; a delivered recipient may be
    // delivered twice after a crash (at least once, never lost).
    finished = false;
    x.info.next_attempt_us = now_us + 1000000;
  }
  if (finished) {
    auto sg = segs_.find(x.info.segment);
    if (sg != segs_.end() && sg->second) --sg->second;
    x.st = mstate::free;
    x.info = message_info{};
    free_.push_back(h);
    --live_;
    return;
  }
  x.st = mstate::queued;
  due_.push({x.info.next_attempt_us, h});
}

uint64_t manager::next_due_us() const {
  return due_.empty() ? UINT64_MAX : due_.top().at;
}

uint64_t manager::next_host_up_ms() const {
  uint64_t t = UINT64_MAX;
  for (uint32_t d = 0; d < dests_.size(); ++d)
    if (!dests_[d].waiting.empty()) t = std::min(t, routes_.next_up_ms(d));
  return t;
}

}  // namespace tern::queue
