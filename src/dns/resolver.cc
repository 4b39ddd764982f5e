#include "src/dns/resolver.hh"

#include <ares.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_map>

#include <fmt/format.h>

namespace tern::dns {

namespace {

using steady = std::chrono::steady_clock;
using time_point = steady::time_point;

// RFC 1035 3.2.2 / 3.2.4, RFC 3596 2.1 (ares_nameser.h's names clash with <arpa/nameser.h>).
constexpr int class_in = 1;
constexpr int type_a = 1;
constexpr int type_mx = 15;
constexpr int type_aaaa = 28;
// The hosts file is re-checked (one stat) at most this often, and read only if it changed.
constexpr auto hosts_recheck = std::chrono::seconds(1);
// A hosts file larger than this is not read (a mistake, not a hosts file).
constexpr std::streamsize hosts_max_bytes = 4 << 20;

status from_ares(int rc) noexcept {
  switch (rc) {
    case ARES_SUCCESS: return status::ok;
    case ARES_ENOTFOUND: return status::nxdomain;
    case ARES_ENODATA: return status::nodata;
    case ARES_ESERVFAIL: return status::servfail;
    case ARES_ETIMEOUT: return status::timeout;
    case ARES_EREFUSED: return status::refused;
    case ARES_ECANCELLED:
    case ARES_EDESTRUCTION: return status::shutdown;
    default: return status::error;
  }
}

// Negative answers: cached for negative_ttl. Transient failures are not cached.
bool cacheable_negative(status s) noexcept {
  return s == status::nxdomain || s == status::nodata || s == status::null_mx;
}

uint32_t seconds_left(time_point until, time_point now) noexcept {
  if (until <= now) return 0;
  auto s = std::chrono::ceil<std::chrono::seconds>(until - now).count();
  return s > UINT32_MAX ? UINT32_MAX : static_cast<uint32_t>(s);
}

std::optional<net::address> parse_literal(std::string_view name) {
  if (name.size() > 2 && name.front() == '[' && name.back() == ']') name = name.substr(1, name.size() - 2);
  if (name.empty() || name.size() > INET6_ADDRSTRLEN) return std::nullopt;
  return net::address::from_ip(name, 0);
}

// Bounds-checked skip over a (possibly compressed) domain name; the new offset or 0.
size_t skip_name(const unsigned char* m, size_t len, size_t pos) noexcept {
  for (;;) {
    if (pos >= len) return 0;
    unsigned c = m[pos];
    if ((c & 0xC0) == 0xC0) return pos + 2 <= len ? pos + 2 : 0;
    if (c & 0xC0) return 0;  // reserved label types
    if (c == 0) return pos + 1;
    pos += 1 + c;
  }
}

// A name that failed normalise_name, made safe for a log line: printable ASCII, capped.
std::string log_safe_name(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 256)) out.push_back(c > 0x20 && c < 0x7F && c != '"' ? c : '?');
  return out;
}

uint16_t get16(const unsigned char* p) noexcept { return uint16_t(p[0] << 8 | p[1]); }
uint32_t get32(const unsigned char* p) noexcept {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}

}  // namespace

const char* status_name(status s) noexcept {
  switch (s) {
    case status::ok: return "ok";
    case status::nxdomain: return "nxdomain";
    case status::nodata: return "nodata";
    case status::null_mx: return "null_mx";
    case status::servfail: return "servfail";
    case status::timeout: return "timeout";
    case status::refused: return "refused";
    case status::error: return "error";
    case status::bad_name: return "bad_name";
    case status::shutdown: return "shutdown";
  }
  return "unknown";
}

bool is_permanent(status s) noexcept { return s == status::null_mx || s == status::bad_name; }

namespace {
const char* status_words(status s) noexcept {
  switch (s) {
    case status::ok: return "ok";
    case status::nxdomain: return "name does not exist (NXDOMAIN)";
    case status::nodata: return "no records of this type (NODATA)";
    case status::null_mx: return "domain accepts no mail (null MX, RFC 7505)";
    case status::servfail: return "server failure (SERVFAIL)";
    case status::timeout: return "no answer (timeout)";
    case status::refused: return "server refused the query (REFUSED)";
    case status::error: return "resolver error";
    case status::bad_name: return "not a valid host name";
    case status::shutdown: return "resolver stopped";
  }
  return "unknown";
}
}  // namespace

bool normalise_name(std::string_view in, std::string& out) {
  if (!in.empty() && in.back() == '.') in.remove_suffix(1);
  if (in.empty() || in.size() > 253) return false;
  out.clear();
  out.reserve(in.size());
  size_t label = 0;
  for (char c : in) {
    if (c == '.') {
      if (label == 0) return false;
      label = 0;
    } else {
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
      if (!ok || ++label > 63) return false;
      if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
    }
    out.push_back(c);
  }
  return label != 0;
}

bool min_answer_ttl(const unsigned char* m, size_t len, uint16_t type, uint32_t& ttl) noexcept {
  if (len < 12) return false;
  unsigned qd = get16(m + 4), an = get16(m + 6);
  size_t pos = 12;
  for (unsigned i = 0; i < qd; ++i) {
    pos = skip_name(m, len, pos);
    if (pos == 0 || pos + 4 > len) return false;
    pos += 4;
  }
  bool found = false;
  for (unsigned i = 0; i < an; ++i) {
    pos = skip_name(m, len, pos);
    if (pos == 0 || pos + 10 > len) return false;
    uint16_t t = get16(m + pos);
    uint32_t rr_ttl = get32(m + pos + 4);
    size_t rdlen = get16(m + pos + 8);
    pos += 10;
    if (pos + rdlen > len) return false;
    pos += rdlen;
    if (rr_ttl > 0x7FFFFFFF) rr_ttl = 0;  // RFC 2181 8: a TTL with the top bit set is 0
    if (t == type && (!found || rr_ttl < ttl)) {
      ttl = rr_ttl;
      found = true;
    }
  }
  return found;
}

// ---------------------------------------------------------------------------------------
// The implementation. Everything below the hand-off (incoming_) runs on the resolver
// thread only: the cache, the in-flight tables, the jobs, c-ares.

struct resolver::impl {
  struct waiter {
    callback cb;
    void* ctx;
  };
  struct request {
    std::string name;
    kind k;
    waiter w;
  };

  // A cached answer. addresses keep their own clamped TTL, counted from `stored`.
  struct entry {
    status st = status::ok;
    std::string text;
    std::vector<address_ttl> addresses;                  // address entries
    std::vector<std::pair<std::string, uint16_t>> mx;    // mx entries: host, preference
    time_point stored;
    time_point expires;
  };

  // A and AAAA of one name, shared by every waiter for that name.
  struct addr_job {
    impl* owner;
    std::string name;
    int pending = 0;
    status st4 = status::error, st6 = status::error;
    int rc4 = ARES_SUCCESS, rc6 = ARES_SUCCESS;  // for the text of status::error
    std::vector<address_ttl> v4, v6;
    std::vector<waiter> waiters;
  };
  struct addr_query {
    addr_job* job;
    bool v6;
  };

  // MX of one domain, then its hosts' addresses.
  struct mx_job;
  struct mx_slot {  // one host's address lookup, the ctx of an internal waiter
    mx_job* job;
    size_t index;
  };
  struct mx_job {
    impl* owner;
    std::string name;
    int pending = 0;  // host lookups not yet answered, +1 while they are being started
    bool implicit = false;
    status mx_st = status::ok;
    std::string detail;  // c-ares' words for status::error
    std::vector<mx_host> hosts;
    std::vector<mx_slot> slots;
    time_point expires;
    std::vector<waiter> waiters;
  };

  options o_;
  ares_channel ch_ = nullptr;
  int wake_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> running_{false};

  // Hand-off from any thread. outstanding_ bounds both vectors (reserved at start).
  std::mutex mu_;
  std::vector<request> incoming_;
  std::vector<request> work_;  // resolver thread's swap partner
  std::atomic<size_t> outstanding_{0};

  // Counters (written by any thread for lookups/refused_full, else by the resolver thread).
  std::atomic<uint64_t> n_lookups_{0}, n_full_{0}, n_hits_{0}, n_misses_{0}, n_hosts_{0},
      n_coalesced_{0}, n_queries_{0}, n_evictions_{0}, n_cache_size_{0};

  // Resolver thread only.
  std::unordered_map<std::string, entry> cache_;  // key: 'a' or 'm' + name
  std::unordered_map<std::string, addr_job*> addr_inflight_;
  std::unordered_map<std::string, mx_job*> mx_inflight_;
  std::unordered_map<std::string, std::vector<net::address>> hosts_;
  time_point hosts_checked_{};
  struct stat hosts_stat_ {};
  bool hosts_loaded_ = false;
  std::minstd_rand rng_{0x7e4e};

  ~impl() {
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  time_point now() const { return o_.clock ? o_.clock() : steady::now(); }
  uint32_t clamp_ttl(uint32_t t) const { return std::clamp(t, o_.min_ttl, std::max(o_.min_ttl, o_.max_ttl)); }

  // -------------------------------------------------------------------------------
  // Delivering answers to external waiters.
  void deliver(const waiter& w, result&& r) {
    w.cb(w.ctx, std::move(r));
  }
  void finish_external(std::vector<waiter>& ws, result& r) {
    for (size_t i = 0; i < ws.size(); ++i) {
      result copy = (i + 1 == ws.size()) ? std::move(r) : r;
      deliver(ws[i], std::move(copy));
    }
  }

  // -------------------------------------------------------------------------------
  // The cache.
  entry* cache_find(const std::string& key) {
    auto it = cache_.find(key);
    if (it == cache_.end()) {
      n_misses_.fetch_add(1, std::memory_order_relaxed);
      return nullptr;
    }
    if (it->second.expires <= now()) {
      cache_.erase(it);
      n_cache_size_.store(cache_.size(), std::memory_order_relaxed);
      n_misses_.fetch_add(1, std::memory_order_relaxed);
      return nullptr;
    }
    n_hits_.fetch_add(1, std::memory_order_relaxed);
    return &it->second;
  }

  void cache_put(std::string key, entry&& e) {
    if (o_.cache_entries == 0) return;
    if (cache_.size() >= o_.cache_entries && !cache_.contains(key)) {
      auto t = now();
      std::erase_if(cache_, [t](const auto& kv) { return kv.second.expires <= t; });
      // Still full: drop the entry that would expire first. O(n), but only when the
      // cache is full of live entries, and n is bounded by cache_entries.
      while (cache_.size() >= o_.cache_entries) {
        auto victim = std::min_element(cache_.begin(), cache_.end(), [](const auto& a, const auto& b) {
          return a.second.expires < b.second.expires;
        });
        cache_.erase(victim);
        n_evictions_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    cache_.insert_or_assign(std::move(key), std::move(e));
    n_cache_size_.store(cache_.size(), std::memory_order_relaxed);
  }

  // -------------------------------------------------------------------------------
  // The hosts file: parsed once, re-read when its stat changes (checked at most every
  // hosts_recheck). A missing file is an empty one.
  void hosts_refresh() {
    auto t = now();
    if (hosts_loaded_ && t - hosts_checked_ < hosts_recheck) return;
    hosts_checked_ = t;
    struct stat st {};
    if (::stat(o_.hosts_file.c_str(), &st) != 0) {
      hosts_.clear();
      hosts_loaded_ = true;
      hosts_stat_ = {};
      return;
    }
    if (hosts_loaded_ && st.st_ino == hosts_stat_.st_ino && st.st_size == hosts_stat_.st_size &&
        st.st_mtim.tv_sec == hosts_stat_.st_mtim.tv_sec && st.st_mtim.tv_nsec == hosts_stat_.st_mtim.tv_nsec)
      return;
    hosts_stat_ = st;
    hosts_loaded_ = true;
    hosts_.clear();
    if (st.st_size > hosts_max_bytes) return;
    std::ifstream in(o_.hosts_file);
    std::string line, norm;
    while (std::getline(in, line)) {
      if (auto h = line.find('#'); h != std::string::npos) line.resize(h);
      std::vector<std::string_view> tok;
      std::string_view rest(line);
      while (!rest.empty()) {
        size_t b = rest.find_first_not_of(" \t\r");
        if (b == std::string_view::npos) break;
        rest.remove_prefix(b);
        size_t e = rest.find_first_of(" \t\r");
        tok.push_back(rest.substr(0, e));
        rest.remove_prefix(e == std::string_view::npos ? rest.size() : e);
      }
      if (tok.size() < 2) continue;
      auto a = net::address::from_ip(tok[0], 0);
      if (!a) continue;
      for (size_t i = 1; i < tok.size(); ++i) {
        if (!normalise_name(tok[i], norm)) continue;
        auto& v = hosts_[norm];
        if (v.size() < o_.max_addresses) v.push_back(*a);
      }
    }
  }

  // -------------------------------------------------------------------------------
  // Address lookups (A + AAAA), for external waiters and for MX hosts.
  result address_result_from_entry(const std::string& name, const entry& e) {
    result r;
    r.k = kind::address;
    r.name = name;
    r.st = e.st;
    r.text = e.text;
    auto t = now();
    uint32_t age = static_cast<uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(t - e.stored).count());
    r.addresses = e.addresses;
    for (auto& a : r.addresses) a.ttl = a.ttl > age ? a.ttl - age : 0;
    r.ttl = seconds_left(e.expires, t);
    return r;
  }

  void resolve_address(const std::string& name, waiter w) {
    if (o_.use_hosts) {
      hosts_refresh();
      if (auto it = hosts_.find(name); it != hosts_.end()) {
        n_hosts_.fetch_add(1, std::memory_order_relaxed);
        result r;
        r.k = kind::address;
        r.name = name;
        r.st = status::ok;
        r.text = fmt::format("{}: {} address{} from {}", name, it->second.size(),
                             it->second.size() == 1 ? "" : "es", o_.hosts_file);
        // Hosts-file answers have no TTL; they are re-read from the file each time, so
        // the caller may keep them as long as it would keep the shortest DNS answer.
        for (auto& a : it->second) r.addresses.push_back({a, o_.min_ttl});
        r.ttl = o_.min_ttl;
        deliver(w, std::move(r));
        return;
      }
    }
    std::string key = "a" + name;
    if (entry* e = cache_find(key)) {
      deliver(w, address_result_from_entry(name, *e));
      return;
    }
    if (auto it = addr_inflight_.find(name); it != addr_inflight_.end()) {
      n_coalesced_.fetch_add(1, std::memory_order_relaxed);
      it->second->waiters.push_back(w);
      return;
    }
    auto* job = new addr_job{};
    job->owner = this;
    job->name = name;
    job->pending = 2;
    job->waiters.push_back(w);
    addr_inflight_.emplace(name, job);
    n_queries_.fetch_add(2, std::memory_order_relaxed);
    // Either query may complete inside ares_query (an immediate failure); pending is 2
    // before the first call, and job is not touched after the second.
    ares_query(ch_, name.c_str(), class_in, type_a, &impl::on_addr_answer, new addr_query{job, false});
    ares_query(ch_, name.c_str(), class_in, type_aaaa, &impl::on_addr_answer, new addr_query{job, true});
  }

  static void on_addr_answer(void* arg, int rc, int, unsigned char* abuf, int alen) {
    auto* q = static_cast<addr_query*>(arg);
    addr_job* job = q->job;
    bool v6 = q->v6;
    delete q;
    job->owner->addr_answer(job, v6, rc, abuf, alen);
  }

  void addr_answer(addr_job* job, bool v6, int rc, const unsigned char* abuf, int alen) {
    status st = from_ares(rc);
    std::vector<address_ttl>& out = v6 ? job->v6 : job->v4;
    if (st == status::ok) {
      // Parse into a bounded array: a zone with thousands of A records costs no more.
      constexpr int cap = 64;
      int n = cap;
      if (!v6) {
        ares_addrttl ttls[cap];
        int prc = ares_parse_a_reply(abuf, alen, nullptr, ttls, &n);
        if (prc != ARES_SUCCESS) {
          st = prc == ARES_ENODATA ? status::nodata : status::error;
          n = 0;
        }
        for (int i = 0; i < n && out.size() < o_.max_addresses; ++i) {
          char ip[INET_ADDRSTRLEN];
          inet_ntop(AF_INET, &ttls[i].ipaddr, ip, sizeof ip);
          if (auto a = net::address::from_ip(ip, 0))
            out.push_back({*a, clamp_ttl(ttls[i].ttl < 0 ? 0 : uint32_t(ttls[i].ttl))});
        }
      } else {
        ares_addr6ttl ttls[cap];
        int prc = ares_parse_aaaa_reply(abuf, alen, nullptr, ttls, &n);
        if (prc != ARES_SUCCESS) {
          st = prc == ARES_ENODATA ? status::nodata : status::error;
          n = 0;
        }
        for (int i = 0; i < n && out.size() < o_.max_addresses; ++i) {
          char ip[INET6_ADDRSTRLEN];
          inet_ntop(AF_INET6, &ttls[i].ip6addr, ip, sizeof ip);
          if (auto a = net::address::from_ip(ip, 0))
            out.push_back({*a, clamp_ttl(ttls[i].ttl < 0 ? 0 : uint32_t(ttls[i].ttl))});
        }
      }
      if (st == status::ok && out.empty()) st = status::nodata;  // only CNAMEs, say
    }
    (v6 ? job->st6 : job->st4) = st;
    (v6 ? job->rc6 : job->rc4) = rc;
    if (--job->pending > 0) return;
    addr_done(job);
  }

  // Combine A and AAAA: any address makes it ok; both nodata is nodata; NXDOMAIN from
  // either is NXDOMAIN (they agree on a sane server); else the transient error.
  void addr_done(addr_job* job) {
    addr_inflight_.erase(job->name);
    auto t = now();
    entry e;
    e.stored = t;
    e.addresses = std::move(job->v4);
    e.addresses.insert(e.addresses.end(), job->v6.begin(), job->v6.end());
    status s4 = job->st4, s6 = job->st6;
    if (!e.addresses.empty()) {
      e.st = status::ok;
      uint32_t ttl = UINT32_MAX;
      for (auto& a : e.addresses) ttl = std::min(ttl, a.ttl);
      bool partial = s4 != s6 && !(s4 == status::nodata || s6 == status::nodata);
      // One family failed transiently: keep what we have, but not for long.
      if (partial) ttl = std::min(ttl, o_.negative_ttl);
      e.expires = t + std::chrono::seconds(ttl);
      e.text = fmt::format("{}: A/AAAA: {} address{}", job->name, e.addresses.size(),
                           e.addresses.size() == 1 ? "" : "es");
      if (partial)
        e.text += fmt::format(" ({} failed: {})", s4 == status::ok ? "AAAA" : "A",
                              status_words(s4 == status::ok ? s6 : s4));
    } else {
      if (s4 == status::nxdomain || s6 == status::nxdomain)
        e.st = status::nxdomain;
      else if (s4 == status::nodata && s6 == status::nodata)
        e.st = status::nodata;
      else
        e.st = s4 != status::nodata ? s4 : s6;
      e.expires = t + std::chrono::seconds(o_.negative_ttl);
      e.text = fmt::format("{}: A/AAAA: {}", job->name, status_words(e.st));
      if (e.st == status::error)
        e.text += fmt::format(" ({})", ares_strerror(s4 == status::error ? job->rc4 : job->rc6));
    }
    std::vector<waiter> ws = std::move(job->waiters);
    std::string name = std::move(job->name);
    delete job;
    result r = address_result_from_entry(name, e);
    if (e.st == status::ok || cacheable_negative(e.st)) cache_put("a" + name, std::move(e));
    finish_external(ws, r);
  }

  // -------------------------------------------------------------------------------
  // MX lookups.
  void resolve_mx(const std::string& name, waiter w) {
    if (entry* e = cache_find("m" + name)) {
      start_mx_hosts(name, *e, {w});
      return;
    }
    if (auto it = mx_inflight_.find(name); it != mx_inflight_.end()) {
      n_coalesced_.fetch_add(1, std::memory_order_relaxed);
      it->second->waiters.push_back(w);
      return;
    }
    // The job only holds the name and the waiters until the MX answer comes.
    auto* job = new mx_job{};
    job->owner = this;
    job->name = name;
    job->waiters.push_back(w);
    mx_inflight_.emplace(name, job);
    n_queries_.fetch_add(1, std::memory_order_relaxed);
    ares_query(ch_, name.c_str(), class_in, type_mx, &impl::on_mx_answer, job);
  }

  static void on_mx_answer(void* arg, int rc, int, unsigned char* abuf, int alen) {
    auto* job = static_cast<mx_job*>(arg);
    job->owner->mx_answer(job, rc, abuf, alen);
  }

  void mx_answer(mx_job* job, int rc, const unsigned char* abuf, int alen) {
    mx_inflight_.erase(job->name);
    auto t = now();
    entry e;
    e.stored = t;
    e.st = from_ares(rc);
    if (e.st == status::error) e.text = ares_strerror(rc);
    if (e.st == status::ok) {
      ares_mx_reply* mx = nullptr;
      int prc = ares_parse_mx_reply(abuf, alen, &mx);
      if (prc != ARES_SUCCESS) {
        e.st = prc == ARES_ENODATA ? status::nodata : status::error;
      } else {
        size_t n = 0, roots = 0;
        for (auto* p = mx; p; p = p->next) {
          ++n;
          bool root = p->host == nullptr || p->host[0] == '\0' || std::strcmp(p->host, ".") == 0;
          if (root) {
            ++roots;
            continue;
          }
          std::string host;
          // A target that is not a host name cannot be connected to: skip it.
          if (normalise_name(p->host, host)) e.mx.emplace_back(std::move(host), p->priority);
        }
        ares_free_data(mx);
        if (n == 1 && roots == 1) {
          e.st = status::null_mx;
        } else if (e.mx.empty()) {
          e.st = status::nodata;
        } else {
          // Most preferred first; keep max_mx_hosts of them.
          std::stable_sort(e.mx.begin(), e.mx.end(), [](auto& a, auto& b) { return a.second < b.second; });
          if (e.mx.size() > o_.max_mx_hosts) e.mx.resize(o_.max_mx_hosts);
        }
      }
      uint32_t ttl = 0;
      if (e.st == status::ok && min_answer_ttl(abuf, size_t(alen), type_mx, ttl))
        e.expires = t + std::chrono::seconds(clamp_ttl(ttl));
      else if (e.st == status::ok)
        e.expires = t + std::chrono::seconds(o_.min_ttl);
    }
    if (e.st != status::ok) e.expires = t + std::chrono::seconds(o_.negative_ttl);
    std::vector<waiter> ws = std::move(job->waiters);
    std::string name = std::move(job->name);
    delete job;
    // Start the hosts first (it copies what it needs from e), then keep e in the cache.
    start_mx_hosts(name, e, std::move(ws));
    if (e.st == status::ok || cacheable_negative(e.st)) cache_put("m" + name, std::move(e));
  }

  // From an MX answer (fresh or cached): finish at once (null MX, errors), or look up
  // every host's addresses (the domain's own for NODATA, RFC 5321 5.1).
  void start_mx_hosts(const std::string& name, const entry& e, std::vector<waiter> ws) {
    auto* job = new mx_job{};
    job->owner = this;
    job->name = name;
    job->waiters = std::move(ws);
    job->expires = e.expires;
    job->mx_st = e.st;
    job->detail = e.text;
    if (e.st == status::ok) {
      for (auto& [host, pref] : e.mx) job->hosts.push_back({host, pref, status::error, {}});
      // Equal preferences in random order (RFC 5321 5.1), so load spreads over them.
      for (size_t i = 0; i < job->hosts.size();) {
        size_t j = i;
        while (j < job->hosts.size() && job->hosts[j].preference == job->hosts[i].preference) ++j;
        std::shuffle(job->hosts.begin() + i, job->hosts.begin() + j, rng_);
        i = j;
      }
    } else if (e.st == status::nodata) {
      job->implicit = true;
      job->hosts.push_back({name, 0, status::error, {}});
    } else {
      mx_finish(job);
      return;
    }
    job->slots.reserve(job->hosts.size());
    for (size_t i = 0; i < job->hosts.size(); ++i) job->slots.push_back({job, i});
    job->pending = int(job->hosts.size()) + 1;
    for (size_t i = 0; i < job->hosts.size(); ++i)
      resolve_address(job->hosts[i].name, waiter{&impl::on_mx_host, &job->slots[i]});
    if (--job->pending == 0) mx_finish(job);
  }

  static void on_mx_host(void* ctx, result&& r) {
    auto* slot = static_cast<mx_slot*>(ctx);
    mx_job* job = slot->job;
    mx_host& h = job->hosts[slot->index];
    h.st = r.st;
    h.addresses = std::move(r.addresses);
    if (--job->pending == 0) job->owner->mx_finish(job);
  }

  void mx_finish(mx_job* job) {
    result r;
    r.k = kind::mx;
    r.name = job->name;
    r.implicit_mx = job->implicit;
    auto t = now();
    r.ttl = seconds_left(job->expires, t);
    if (job->mx_st != status::ok && !job->implicit) {
      r.st = job->mx_st;
      r.text = fmt::format("{}: MX: {}", job->name, status_words(r.st));
      if (!job->detail.empty()) r.text += fmt::format(" ({})", job->detail);
    } else {
      size_t with = 0, addrs = 0;
      status transient = status::ok;
      for (auto& h : job->hosts) {
        if (!h.addresses.empty()) ++with;
        addrs += h.addresses.size();
        for (auto& a : h.addresses) r.ttl = std::min(r.ttl, a.ttl);
        if (h.addresses.empty() && transient == status::ok && !cacheable_negative(h.st)) transient = h.st;
      }
      if (job->implicit) {
        // No MX: the answer is the domain's own address lookup.
        auto& h = job->hosts[0];
        r.st = h.st;
        r.text = h.st == status::ok
                     ? fmt::format("{}: no MX, implicit MX: {} address{}", job->name, addrs, addrs == 1 ? "" : "es")
                     : fmt::format("{}: no MX, A/AAAA: {}", job->name, status_words(h.st));
      } else if (with > 0) {
        r.st = status::ok;
        r.text = fmt::format("{}: MX: {} host{}, {} with addresses, {} address{}", job->name, job->hosts.size(),
                             job->hosts.size() == 1 ? "" : "s", with, addrs, addrs == 1 ? "" : "es");
      } else {
        // No MX host has an address. A transient failure of any of them is worth a
        // retry, and says so; otherwise they all do not exist or have no address.
        r.st = transient != status::ok ? transient : status::nodata;
        r.text = fmt::format("{}: MX: no MX host has an address", job->name);
        for (auto& h : job->hosts) r.text += fmt::format("; {}: {}", h.name, status_name(h.st));
      }
      r.mx = std::move(job->hosts);
    }
    std::vector<waiter> ws = std::move(job->waiters);
    delete job;
    finish_external(ws, r);
  }

  // -------------------------------------------------------------------------------
  // The thread.
  void start_request(request& q) {
    // The external waiter is wrapped so the outstanding count drops after its callback.
    if (stop_.load(std::memory_order_relaxed)) {
      result r;
      r.k = q.k;
      r.name = q.name;
      r.st = status::shutdown;
      r.text = fmt::format("{}: {}", q.name, status_words(r.st));
      deliver(q.w, std::move(r));
      return;
    }
    if (q.k == kind::address)
      resolve_address(q.name, q.w);
    else
      resolve_mx(q.name, q.w);
  }

  void run() {
    while (!stop_.load(std::memory_order_acquire)) {
      {
        std::lock_guard lk(mu_);
        work_.swap(incoming_);
      }
      for (auto& q : work_) start_request(q);
      work_.clear();

      ares_socket_t socks[ARES_GETSOCK_MAXNUM];
      int bits = ares_getsock(ch_, socks, ARES_GETSOCK_MAXNUM);
      pollfd pfd[ARES_GETSOCK_MAXNUM + 1];
      nfds_t n = 0;
      pfd[n++] = {wake_fd_, POLLIN, 0};
      for (int i = 0; i < ARES_GETSOCK_MAXNUM; ++i) {
        short ev = 0;
        if (ARES_GETSOCK_READABLE(bits, i)) ev |= POLLIN;
        if (ARES_GETSOCK_WRITABLE(bits, i)) ev |= POLLOUT;
        if (ev) pfd[n++] = {socks[i], ev, 0};
      }
      timeval tv{};
      timeval* tvp = ares_timeout(ch_, nullptr, &tv);
      int timeout_ms = tvp ? int(tvp->tv_sec * 1000 + (tvp->tv_usec + 999) / 1000) : -1;
      int rc = ::poll(pfd, n, timeout_ms);
      if (rc < 0 && errno != EINTR) {
        // Cannot happen with valid fds; do not spin if it does.
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (rc > 0 && (pfd[0].revents & POLLIN)) {
        uint64_t v;
        [[maybe_unused]] auto r = ::read(wake_fd_, &v, sizeof v);
      }
      for (nfds_t i = 1; rc > 0 && i < n; ++i) {
        if (!pfd[i].revents) continue;
        bool rd = pfd[i].revents & (POLLIN | POLLERR | POLLHUP);
        bool wr = pfd[i].revents & (POLLOUT | POLLERR | POLLHUP);
        ares_process_fd(ch_, rd ? pfd[i].fd : ARES_SOCKET_BAD, wr ? pfd[i].fd : ARES_SOCKET_BAD);
      }
      // Timeouts (and nothing else) when no socket was ready.
      ares_process_fd(ch_, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    }
    // Stopping: queries in flight end with ARES_ECANCELLED -> status::shutdown, which
    // completes their jobs and so every waiter; then whatever was still queued.
    ares_cancel(ch_);
    for (;;) {
      {
        std::lock_guard lk(mu_);
        work_.swap(incoming_);
      }
      if (work_.empty()) break;
      for (auto& q : work_) start_request(q);
      work_.clear();
    }
    assert(addr_inflight_.empty() && mx_inflight_.empty());
  }

  // An accepted external lookup: its callback, then the outstanding count drops.
  struct external {
    impl* owner;
    callback cb;
    void* ctx;
  };
  static void on_external(void* ctx, result&& r) {
    auto* x = static_cast<external*>(ctx);
    impl* owner = x->owner;
    callback cb = x->cb;
    void* user = x->ctx;
    delete x;
    cb(user, std::move(r));
    owner->outstanding_.fetch_sub(1, std::memory_order_acq_rel);
  }
};

resolver::resolver() = default;
resolver::~resolver() { stop(); }

bool resolver::start(const options& o, std::string& err) {
  if (impl_ && impl_->running_.load(std::memory_order_acquire)) {
    err = "dns: resolver already started";
    return false;
  }
  if (o.max_outstanding == 0) {
    err = "dns: max_outstanding must be at least 1";
    return false;
  }
  int lrc = ares_library_init(ARES_LIB_INIT_ALL);
  if (lrc != ARES_SUCCESS) {
    err = fmt::format("dns: ares_library_init: {}", ares_strerror(lrc));
    return false;
  }
  auto p = std::make_unique<impl>();
  p->o_ = o;
  ares_options ao{};
  int mask = 0;
  // Names are asked as given (fully qualified mail domains and host names): no search
  // list, which would turn a failed "example.com" into "example.com.corp.local".
  // NOCHECKRESP: c-ares 1.18.1 treats a SERVFAIL, REFUSED or NOTIMP answer as "try the
  // next server" and, when none is left, reports ARES_ECONNREFUSED, losing the reason
  // (fixed in later c-ares). With the flag the answer reaches ares_query, which maps
  // it to ARES_ESERVFAIL / ARES_EREFUSED. The cost: such an answer from the first
  // server is final for that query (no failover on SERVFAIL; timeouts still fail over).
  // docs/dns.md, "Known limits".
  ao.flags = ARES_FLAG_NOSEARCH | ARES_FLAG_NOCHECKRESP;
  mask |= ARES_OPT_FLAGS;
  if (o.query_timeout.count() > 0) {
    ao.timeout = int(o.query_timeout.count());
    mask |= ARES_OPT_TIMEOUTMS;
  }
  if (o.tries > 0) {
    ao.tries = int(o.tries);
    mask |= ARES_OPT_TRIES;
  }
  // Only DNS through c-ares: the hosts file is ours (its path is an option).
  char lookups[] = "b";
  ao.lookups = lookups;
  mask |= ARES_OPT_LOOKUPS;
  // The resolv.conf to read servers and options from (c-ares reads /etc/resolv.conf by
  // default; the option lets tests and chroots point elsewhere).
  std::string resolv_conf = o.resolv_conf;
  if (!resolv_conf.empty()) {
    ao.resolvconf_path = resolv_conf.data();
    mask |= ARES_OPT_RESOLVCONF;
  }
  if (o.default_port != 53) {
    ao.udp_port = o.default_port;
    ao.tcp_port = o.default_port;
    mask |= ARES_OPT_UDP_PORT | ARES_OPT_TCP_PORT;
  }
  int rc = ares_init_options(&p->ch_, &ao, mask);
  if (rc != ARES_SUCCESS) {
    ares_library_cleanup();
    err = fmt::format("dns: ares_init_options (reading /etc/resolv.conf): {}", ares_strerror(rc));
    return false;
  }
  if (!o.servers.empty()) {
    std::string csv;
    for (auto& s : o.servers) {
      if (!csv.empty()) csv += ',';
      csv += s;
    }
    rc = ares_set_servers_ports_csv(p->ch_, csv.c_str());
    if (rc != ARES_SUCCESS) {
      ares_destroy(p->ch_);
      ares_library_cleanup();
      err = fmt::format("dns: servers \"{}\": {}", csv, ares_strerror(rc));
      return false;
    }
  }
  p->wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (p->wake_fd_ < 0) {
    ares_destroy(p->ch_);
    ares_library_cleanup();
    err = fmt::format("dns: eventfd: {}", std::strerror(errno));
    return false;
  }
  p->incoming_.reserve(o.max_outstanding);
  p->work_.reserve(o.max_outstanding);
  p->running_.store(true, std::memory_order_release);
  impl* raw = p.get();
  p->thread_ = std::thread([raw] { raw->run(); });
  impl_ = std::move(p);
  return true;
}

void resolver::stop() {
  impl* p = impl_.get();
  if (!p || !p->thread_.joinable()) return;
  {
    // Under the hand-off mutex: a lookup() either queued before this (and the thread
    // answers it with shutdown) or sees running_ false and returns submit::stopped.
    std::lock_guard lk(p->mu_);
    p->running_.store(false, std::memory_order_release);
    p->stop_.store(true, std::memory_order_release);
    uint64_t one = 1;
    [[maybe_unused]] auto w = ::write(p->wake_fd_, &one, sizeof one);
  }
  p->thread_.join();
  ares_destroy(p->ch_);
  p->ch_ = nullptr;
  ares_library_cleanup();
  // The impl stays (its counters too): a lookup() racing with stop() still reads it.
  // The eventfd closes with it only after no lookup() can write it (running_ is false,
  // and lookup() writes it under the mutex).
}

submit resolver::lookup(std::string_view name, kind k, callback cb, void* ctx) {
  impl* p = impl_.get();
  if (!p || !p->running_.load(std::memory_order_acquire)) return submit::stopped;
  // An IP literal needs no DNS: answer now, on this thread.
  if (auto lit = parse_literal(name)) {
    p->n_lookups_.fetch_add(1, std::memory_order_relaxed);
    result r;
    r.k = k;
    r.name = lit->ip();
    r.st = status::ok;
    r.ttl = UINT32_MAX;
    r.text = fmt::format("{}: IP literal", r.name);
    if (k == kind::address) {
      r.addresses.push_back({*lit, UINT32_MAX});
    } else {
      r.implicit_mx = true;
      r.mx.push_back({r.name, 0, status::ok, {{*lit, UINT32_MAX}}});
    }
    cb(ctx, std::move(r));
    return submit::done;
  }
  // Claim an outstanding slot first: the bound holds however many threads race here.
  size_t cur = p->outstanding_.load(std::memory_order_relaxed);
  do {
    if (cur >= p->o_.max_outstanding) {
      p->n_full_.fetch_add(1, std::memory_order_relaxed);
      return submit::full;
    }
  } while (!p->outstanding_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel));

  impl::request q;
  q.k = k;
  q.w = {&impl::on_external, new impl::external{p, cb, ctx}};
  std::string norm;
  bool valid = normalise_name(name, norm);
  q.name = valid ? std::move(norm) : log_safe_name(name);
  {
    std::unique_lock lk(p->mu_);
    if (!p->running_.load(std::memory_order_relaxed)) {
      lk.unlock();
      delete static_cast<impl::external*>(q.w.ctx);
      p->outstanding_.fetch_sub(1, std::memory_order_acq_rel);
      return submit::stopped;
    }
    if (valid) {
      // Never reallocates: at most max_outstanding requests are queued (reserved).
      p->incoming_.push_back(std::move(q));
      // Under the mutex, so stop() cannot have closed the eventfd in between.
      uint64_t one = 1;
      [[maybe_unused]] auto w = ::write(p->wake_fd_, &one, sizeof one);
    }
  }
  p->n_lookups_.fetch_add(1, std::memory_order_relaxed);
  if (!valid) {
    // Answered here: nothing to ask DNS. The caller's thread, like a literal.
    result r;
    r.k = k;
    r.name = std::move(q.name);
    r.st = status::bad_name;
    r.text = fmt::format("\"{}\": {}", r.name, status_words(r.st));
    impl::on_external(q.w.ctx, std::move(r));
    return submit::done;
  }
  return submit::queued;
}

stats resolver::counters() const noexcept {
  stats s;
  impl* p = impl_.get();
  if (!p) return s;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.lookups = ld(p->n_lookups_);
  s.refused_full = ld(p->n_full_);
  s.cache_hits = ld(p->n_hits_);
  s.cache_misses = ld(p->n_misses_);
  s.hosts_hits = ld(p->n_hosts_);
  s.coalesced = ld(p->n_coalesced_);
  s.queries = ld(p->n_queries_);
  s.evictions = ld(p->n_evictions_);
  s.cache_size = ld(p->n_cache_size_);
  s.outstanding = p->outstanding_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace tern::dns
