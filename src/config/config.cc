#include "src/config/config.hh"

#include <arpa/inet.h>
#include <sys/resource.h>
#include <unistd.h>

#include <thread>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "spool/record.hh"
#include "tern_build.hh"

namespace tern::config {

const char* const embedded_default = R"(# tern embedded default configuration
shards = 0
[spool]
dir = "var/spool"
[[listen]]
address = "127.0.0.1:2525"
[relay]
networks = ["127.0.0.0/8", "::1"]
domains = []
# Everything goes to a local tern-sink over TLS 1.3, its certificate verified against a
# demo CA: tools/run-relay.sh makes var/tls/ and starts the sink on 127.0.0.1:2526.
[[smarthost]]
host = "127.0.0.1"
port = 2526
tls = "verify"
ca_file = "var/tls/ca.pem"
verify_name = "localhost"
)";

bool valid_dns_name(std::string_view d) noexcept {
  if (d.empty() || d.size() > 253) return false;
  size_t label = 0;
  char prev = '.';
  for (char ch : d) {
    bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
    if (ch == '.') {
      if (label == 0 || prev == '-') return false;  // empty label, or label ends in '-'
      label = 0;
    } else if (alnum || ch == '-') {
      if (label == 0 && ch == '-') return false;  // label starts with '-'
      if (++label > 63) return false;
    } else {
      return false;
    }
    prev = ch;
  }
  return label > 0 && prev != '-';  // no trailing dot, last label does not end in '-'
}

std::optional<uint64_t> parse_duration_ms(std::string_view t) noexcept {
  if (t.empty() || t.size() > 24) return std::nullopt;
  uint64_t n = 0;
  size_t i = 0;
  for (; i < t.size() && t[i] >= '0' && t[i] <= '9'; ++i) {
    n = n * 10 + uint64_t(t[i] - '0');
    if (n > (uint64_t(1) << 40)) return std::nullopt;
  }
  if (i == 0) return std::nullopt;
  std::string_view unit = t.substr(i);
  uint64_t mul;
  if (unit.empty() || unit == "s") mul = 1000;
  else if (unit == "ms") mul = 1;
  else if (unit == "m") mul = 60 * 1000;
  else if (unit == "h") mul = 3600 * 1000;
  else if (unit == "d") mul = 86400 * 1000;
  else return std::nullopt;
  return n * mul;
}

uint32_t outbound_slots(const config& c) noexcept {
  std::set<std::vector<std::string>> lists;
  for (const auto& r : c.routes) lists.insert(r.domains);
  uint64_t dests = lists.size() + (c.smarthosts.empty() ? 0 : 1);
  uint64_t n = std::max<uint64_t>(1, dests) * c.queue.concurrency;
  return static_cast<uint32_t>(std::clamp<uint64_t>(n, 16, std::max<uint64_t>(16, c.limits.connections)));
}

uint64_t fds_per_shard(const config& c) noexcept {
  return uint64_t(c.limits.connections) + outbound_slots(c) + 64;
}

bool domain_matches(std::string_view d, std::string_view r) noexcept {
  if (r.empty()) return false;
  if (r[0] == '.') return d.size() > r.size() && d.substr(d.size() - r.size()) == r;
  return d == r;
}

namespace {

struct cfg_error {
  std::string msg;
};

class ctx {
 public:
  explicit ctx(std::string src) : src_(std::move(src)) {}
  [[noreturn]] void fail(const toml::source_region& where, const std::string& key,
                         const std::string& what) const {
    throw cfg_error{src_ + ":" + std::to_string(where.begin.line ? where.begin.line : 1) + ": " +
                    key + ": " + what};
  }
  const std::string& src() const { return src_; }

 private:
  std::string src_;
};

void check_keys(const ctx& c, const toml::table& t, const std::string& prefix,
                std::initializer_list<const char*> allowed) {
  std::set<std::string> ok(allowed.begin(), allowed.end());
  for (auto& [k, v] : t) {
    if (!ok.count(std::string(k.str())))
      c.fail(k.source(), prefix + std::string(k.str()), "unknown key");
  }
}

template <typename T>
T get_int(const ctx& c, const toml::table& t, const char* key, const std::string& full, T def,
          int64_t lo, int64_t hi) {
  auto* n = t.get(key);
  if (!n) return def;
  auto v = n->value<int64_t>();
  if (!n->is_integer() || !v) c.fail(n->source(), full, "expected an integer");
  if (*v < lo || *v > hi)
    c.fail(n->source(), full, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  return static_cast<T>(*v);
}

bool get_bool(const ctx& c, const toml::table& t, const char* key, const std::string& full, bool def) {
  auto* n = t.get(key);
  if (!n) return def;
  if (!n->is_boolean()) c.fail(n->source(), full, "expected true or false");
  return *n->value<bool>();
}

std::string get_str(const ctx& c, const toml::table& t, const char* key, const std::string& full,
                    const std::string& def) {
  auto* n = t.get(key);
  if (!n) return def;
  if (!n->is_string()) c.fail(n->source(), full, "expected a string");
  return *n->value<std::string>();
}

const toml::table* get_table(const ctx& c, const toml::table& t, const char* key) {
  auto* n = t.get(key);
  if (!n) return nullptr;
  if (!n->is_table()) c.fail(n->source(), key, "expected a table ([" + std::string(key) + "])");
  return n->as_table();
}

std::vector<net::cidr> get_cidrs(const ctx& c, const toml::table& t, const char* key,
                                 const std::string& full) {
  std::vector<net::cidr> out;
  auto* n = t.get(key);
  if (!n) return out;
  auto* arr = n->as_array();
  if (!arr) c.fail(n->source(), full, "expected an array of networks");
  for (auto& e : *arr) {
    auto s = e.value<std::string>();
    if (!s) c.fail(e.source(), full, "expected a string such as \"192.0.2.0/24\"");
    auto net = net::cidr::parse(*s);
    if (!net)
      c.fail(e.source(), full,
             "\"" + *s + "\" is not a network (address/prefix with the host bits zero)");
    out.push_back(*net);
  }
  return out;
}

// Two listeners that would both take a connection: the same address and port, or a
// wildcard (0.0.0.0 / [::]) and an address of the same family on the same port. Sockets
// are bound with SO_REUSEPORT (one per shard), so the kernel would not refuse the second
// bind: it would split or steal connections between listeners whose settings differ.
// [::] and 0.0.0.0 do not overlap: IPv6 listeners are IPV6_V6ONLY.
bool is_wildcard(const net::address& a) {
  if (a.family() == AF_INET)
    return reinterpret_cast<const sockaddr_in&>(a.ss).sin_addr.s_addr == htonl(INADDR_ANY);
  const auto& s6 = reinterpret_cast<const sockaddr_in6&>(a.ss);
  return IN6_IS_ADDR_UNSPECIFIED(&s6.sin6_addr);
}

bool overlaps(const net::address& a, const net::address& b) {
  // Port 0: the kernel picks a free port for each listener, so they never collide.
  if (a.family() != b.family() || a.port() != b.port() || a.port() == 0) return false;
  return a.ip() == b.ip() || is_wildcard(a) || is_wildcard(b);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
  return s;
}

// A duration: a string such as "30s", "5m", "1h", "5d" or an integer (seconds). Returns
// seconds, within [lo, hi].
uint32_t duration_of(const ctx& c, const toml::node& n, const std::string& full, uint32_t lo, uint32_t hi) {
  uint64_t ms = 0;
  if (n.is_integer()) {
    int64_t v = *n.value<int64_t>();
    if (v < 0) c.fail(n.source(), full, "must not be negative");
    ms = uint64_t(v) * 1000;
  } else if (n.is_string()) {
    auto d = parse_duration_ms(*n.value<std::string>());
    if (!d)
      c.fail(n.source(), full,
             "\"" + *n.value<std::string>() + "\" is not a duration (e.g. \"30s\", \"5m\", \"1h\", \"5d\")");
    ms = *d;
  } else {
    c.fail(n.source(), full, "expected a duration such as \"30s\", \"5m\", \"1h\" or \"5d\"");
  }
  if (ms % 1000) c.fail(n.source(), full, "must be a whole number of seconds");
  uint64_t s = ms / 1000;
  if (s < lo || s > hi)
    c.fail(n.source(), full, "must be between " + std::to_string(lo) + "s and " + std::to_string(hi) + "s");
  return static_cast<uint32_t>(s);
}

uint32_t get_duration_s(const ctx& c, const toml::table& t, const char* key, const std::string& full,
                        uint32_t def, uint32_t lo, uint32_t hi) {
  auto* n = t.get(key);
  return n ? duration_of(c, *n, full, lo, hi) : def;
}

// A duration in milliseconds ("10ms", "1s", or an integer of seconds), within [lo, hi] ms.
uint32_t get_duration_ms(const ctx& c, const toml::table& t, const char* key, const std::string& full, uint32_t def,
                         uint64_t lo, uint64_t hi) {
  auto* n = t.get(key);
  if (!n) return def;
  std::optional<uint64_t> ms;
  if (n->is_string()) ms = parse_duration_ms(*n->value<std::string>());
  else if (n->is_integer() && *n->value<int64_t>() >= 0) ms = uint64_t(*n->value<int64_t>()) * 1000;
  auto show = [](uint64_t v) { return v % 1000 ? std::to_string(v) + "ms" : std::to_string(v / 1000) + "s"; };
  if (!ms) c.fail(n->source(), full, "expected a duration such as \"10ms\", \"1s\" or \"5m\"");
  if (*ms < lo || *ms > hi) c.fail(n->source(), full, "must be between \"" + show(lo) + "\" and \"" + show(hi) + "\"");
  return static_cast<uint32_t>(*ms);
}

// [ha] (docs/configuration.md). Only what can be checked without the network: the interface
// and the backend are opened at start, with errors that name the key.
void parse_ha(const ctx& c, const toml::table& h, config& cfg) {
  check_keys(c, h, "ha.",
             {"interface", "vrid", "priority", "advert_interval", "virtual_addresses", "preempt", "preempt_delay",
              "unicast_peers", "backend", "dpdk_args", "use_vmac", "garp_burst", "garp_refresh",
              "health_priority_drop", "heartbeat_timeout", "address_lifetime"});
  auto& H = cfg.ha;
  H.enabled = true;
  H.line = static_cast<int>(h.source().begin.line);
  auto need = [&](const char* key) -> const toml::node& {
    auto* n = h.get(key);
    if (!n) c.fail(h.source(), std::string("ha.") + key, "is required in [ha]");
    return *n;
  };
  need("interface");
  H.interface = get_str(c, h, "interface", "ha.interface", "");
  if (H.interface.empty() || H.interface.size() >= 16 || H.interface.find_first_of("/ \t") != std::string::npos)
    c.fail(h.get("interface")->source(), "ha.interface", "\"" + H.interface + "\" is not an interface name (1 to 15 bytes, no '/' or space)");
  need("vrid");
  H.vrid = get_int<uint8_t>(c, h, "vrid", "ha.vrid", 0, 1, 255);
  H.priority = get_int<uint8_t>(c, h, "priority", "ha.priority", H.priority, 1, 255);
  H.advert_interval_ms = get_duration_ms(c, h, "advert_interval", "ha.advert_interval", H.advert_interval_ms, 10, 40950);
  if (H.advert_interval_ms % 10)
    c.fail(h.get("advert_interval")->source(), "ha.advert_interval",
           "must be a whole number of centiseconds (10 ms steps): VRRPv3 carries it in centiseconds");
  const auto& vn = need("virtual_addresses");
  auto* va = vn.as_array();
  if (!va || va->empty())
    c.fail(vn.source(), "ha.virtual_addresses", "expected a list of addresses such as [\"198.18.0.100/24\"]");
  for (auto& e : *va) {
    auto sv = e.value<std::string>();
    if (!sv) c.fail(e.source(), "ha.virtual_addresses", "expected a string such as \"198.18.0.100/24\"");
    std::string_view txt = *sv;
    auto slash = txt.find('/');
    auto a = net::address::from_ip(txt.substr(0, slash), 0);
    unsigned prefix = 32;
    bool ok = a && a->family() == AF_INET;
    if (ok && slash != txt.npos) {
      auto ps = txt.substr(slash + 1);
      auto [ptr, ec] = std::from_chars(ps.data(), ps.data() + ps.size(), prefix);
      ok = !ps.empty() && ec == std::errc() && ptr == ps.data() + ps.size() && prefix >= 1 && prefix <= 32;
    }
    if (!ok)
      c.fail(e.source(), "ha.virtual_addresses",
             "\"" + *sv + "\" is not an IPv4 address with an optional prefix (IPv6 is not supported yet)");
    net::cidr v;
    v.family = AF_INET;
    std::memcpy(v.bytes.data(), &reinterpret_cast<const sockaddr_in&>(a->ss).sin_addr, 4);
    v.prefix = static_cast<uint8_t>(prefix);
    for (auto& o : H.virtual_addresses)
      if (o.bytes == v.bytes) c.fail(e.source(), "ha.virtual_addresses", "\"" + *sv + "\" is listed twice");
    H.virtual_addresses.push_back(v);
  }
  if (H.virtual_addresses.size() > 20)
    c.fail(vn.source(), "ha.virtual_addresses", "at most 20 addresses per virtual router (one advert carries them all)");
  H.preempt = get_bool(c, h, "preempt", "ha.preempt", H.preempt);
  H.preempt_delay_ms = get_duration_ms(c, h, "preempt_delay", "ha.preempt_delay", 0, 0, 1000 * 1000);
  if (auto* un = h.get("unicast_peers")) {
    auto* ua = un->as_array();
    if (!ua) c.fail(un->source(), "ha.unicast_peers", "expected a list of IPv4 addresses such as [\"198.18.0.12\"]");
    for (auto& e : *ua) {
      auto sv = e.value<std::string>();
      auto a = sv ? net::address::from_ip(*sv, 0) : std::nullopt;
      if (!a || a->family() != AF_INET)
        c.fail(e.source(), "ha.unicast_peers", (sv ? "\"" + *sv + "\"" : std::string("a value")) + " is not an IPv4 address");
      H.unicast_peers.push_back(*a);
    }
  }
  std::string be = get_str(c, h, "backend", "ha.backend", "kernel");
  if (be != "kernel" && be != "dpdk")
    c.fail(h.get("backend")->source(), "ha.backend", "\"" + be + "\": expected \"kernel\" or \"dpdk\"");
  H.dpdk = be == "dpdk";
#if !TERN_HAVE_DPDK
  if (H.dpdk)
    c.fail(h.get("backend")->source(), "ha.backend", "\"dpdk\": this ternd was built without DPDK (meson -Ddpdk=enabled)");
#endif
  H.dpdk_args = get_str(c, h, "dpdk_args", "ha.dpdk_args", "");
  // Warned, not refused: an operator switching backends keeps the arguments for later.
  if (!H.dpdk_args.empty() && !H.dpdk)
    cfg.warnings.push_back(cfg.source + ":" + std::to_string(h.get("dpdk_args")->source().begin.line) +
                           ": ha.dpdk_args: ignored with backend = \"kernel\"");
  if (H.dpdk && !H.unicast_peers.empty())
    c.fail(h.get("unicast_peers")->source(), "ha.unicast_peers",
           "not supported with backend = \"dpdk\" (it sends adverts to 224.0.0.18 only); use the kernel backend");
  H.use_vmac = get_bool(c, h, "use_vmac", "ha.use_vmac", false);
  H.garp_burst = get_int<uint32_t>(c, h, "garp_burst", "ha.garp_burst", H.garp_burst, 1, 100);
  H.garp_refresh_ms = get_duration_ms(c, h, "garp_refresh", "ha.garp_refresh", H.garp_refresh_ms, 0, 86400ull * 1000);
  if (H.garp_refresh_ms && H.garp_refresh_ms < 1000)
    c.fail(h.get("garp_refresh")->source(), "ha.garp_refresh", "must be 0 (off) or at least \"1s\"");
  H.health_priority_drop = get_int<uint32_t>(c, h, "health_priority_drop", "ha.health_priority_drop", 0, 0, 254);
  H.heartbeat_timeout_ms = get_duration_ms(c, h, "heartbeat_timeout", "ha.heartbeat_timeout", H.heartbeat_timeout_ms, 100, 600 * 1000);
  H.address_lifetime_s = get_duration_s(c, h, "address_lifetime", "ha.address_lifetime", H.address_lifetime_s, 0, 86400);
  if (H.address_lifetime_s == 1)
    c.fail(h.get("address_lifetime")->source(), "ha.address_lifetime",
           "must be 0 (permanent) or at least \"2s\": the kernel expires addresses with about a second of slack");
}

std::vector<std::string> get_domains(const ctx& c, const toml::table& t, const char* key, const std::string& full) {
  std::vector<std::string> out;
  auto* dn = t.get(key);
  if (!dn) return out;
  auto* da = dn->as_array();
  if (!da) c.fail(dn->source(), full, "expected an array of domain names");
  for (auto& e : *da) {
    auto s = e.value<std::string>();
    if (!s) c.fail(e.source(), full, "expected a string");
    std::string d = lower(*s);
    if (d.empty() || !valid_dns_name(std::string_view(d).substr(d[0] == '.' ? 1 : 0)))
      c.fail(e.source(), full, "\"" + *s + "\" is not a valid DNS domain name (\".example.org\" for subdomains)");
    out.push_back(d);
  }
  return out;
}

bool readable(const std::string& f) { return access(f.c_str(), R_OK) == 0; }

// The keys shared by [[smarthost]] and [[route]].
next_hop parse_hop(const ctx& c, const toml::table& t, const std::string& pfx, bool is_route) {
  next_hop h;
  h.line = static_cast<int>(t.source().begin.line);
  auto* hn = t.get("host");
  if (!hn) c.fail(t.source(), pfx + "host", "missing (an IP address or a DNS name)");
  h.host = lower(get_str(c, t, "host", pfx + "host", ""));
  {
    std::string as_ip = h.host.find(':') != std::string::npos ? "[" + h.host + "]:1" : h.host + ":1";
    auto a = net::address::parse(as_ip);
    if (a) {
      h.host_is_ip = true;
    } else if (!valid_dns_name(h.host)) {
      c.fail(hn->source(), pfx + "host", "\"" + h.host + "\" is neither an IP address nor a valid DNS name");
    }
  }
  h.port = get_int<uint16_t>(c, t, "port", pfx + "port", is_route ? 25 : 25, 1, 65535);
  h.priority = get_int<uint32_t>(c, t, "priority", pfx + "priority", 0, 0, 65535);
  h.weight = get_int<uint32_t>(c, t, "weight", pfx + "weight", 1, 1, 1000000);
  std::string tls = get_str(c, t, "tls", pfx + "tls", "verify");
  if (tls == "none") h.tls = tls_policy::none;
  else if (tls == "may") h.tls = tls_policy::may;
  else if (tls == "encrypt") h.tls = tls_policy::encrypt;
  else if (tls == "verify") h.tls = tls_policy::verify;
  else c.fail(t.get("tls")->source(), pfx + "tls", "expected \"none\", \"may\", \"encrypt\" or \"verify\"");
  std::string mv = get_str(c, t, "tls_min_version", pfx + "tls_min_version", "1.3");
  if (mv != "1.2" && mv != "1.3")
    c.fail(t.get("tls_min_version")->source(), pfx + "tls_min_version", "expected \"1.2\" or \"1.3\"");
  h.tls_min_13 = mv == "1.3";
  h.ca_file = get_str(c, t, "ca_file", pfx + "ca_file", "");
  if (!h.ca_file.empty() && !readable(h.ca_file))
    c.fail(t.get("ca_file")->source(), pfx + "ca_file",
           "cannot read \"" + h.ca_file + "\"" +
               (c.src() == "(embedded default)" ? " (tools/run-relay.sh makes it; or give --config FILE)" : ""));
  h.verify_name = lower(get_str(c, t, "verify_name", pfx + "verify_name", ""));
  if (!h.verify_name.empty() && !valid_dns_name(h.verify_name))
    c.fail(t.get("verify_name")->source(), pfx + "verify_name", "\"" + h.verify_name + "\" is not a valid DNS name");
  if (h.tls != tls_policy::verify && t.get("verify_name"))
    c.fail(t.get("verify_name")->source(), pfx + "verify_name", "only meaningful with tls = \"verify\"");
  if (h.tls == tls_policy::verify && h.host_is_ip && h.verify_name.empty())
    c.fail(hn->source(), pfx + "verify_name",
           "tls = \"verify\" to an IP address needs verify_name (the name the certificate must carry)");
  h.auth_user = get_str(c, t, "auth_user", pfx + "auth_user", "");
  h.auth_password_file = get_str(c, t, "auth_password_file", pfx + "auth_password_file", "");
  if (!h.auth_user.empty() && h.auth_password_file.empty())
    c.fail(t.get("auth_user")->source(), pfx + "auth_password_file", "auth_user needs auth_password_file");
  if (h.auth_user.empty() && !h.auth_password_file.empty())
    c.fail(t.get("auth_password_file")->source(), pfx + "auth_user", "auth_password_file needs auth_user");
  if (!h.auth_password_file.empty() && !readable(h.auth_password_file))
    c.fail(t.get("auth_password_file")->source(), pfx + "auth_password_file",
           "cannot read \"" + h.auth_password_file + "\"");
  if (!h.auth_user.empty() && (h.tls == tls_policy::none || h.tls == tls_policy::may))
    c.fail(t.get("auth_user")->source(), pfx + "auth_user",
           "AUTH is only sent inside TLS: needs tls = \"encrypt\" or \"verify\"");
  h.mx = get_bool(c, t, "mx", pfx + "mx", false);
  if (h.mx && h.host_is_ip) c.fail(t.get("mx")->source(), pfx + "mx", "mx = true needs a domain name as host");
  h.source_address = get_str(c, t, "source_address", pfx + "source_address", "");
  if (!h.source_address.empty()) {
    std::string sa = h.source_address.find(':') != std::string::npos ? "[" + h.source_address + "]:0"
                                                                     : h.source_address + ":0";
    if (!net::address::parse(sa))
      c.fail(t.get("source_address")->source(), pfx + "source_address",
             "\"" + h.source_address + "\" is not an IP address");
  }
  h.helo_name = lower(get_str(c, t, "helo_name", pfx + "helo_name", ""));
  if (!h.helo_name.empty() && !valid_dns_name(h.helo_name))
    c.fail(t.get("helo_name")->source(), pfx + "helo_name", "\"" + h.helo_name + "\" is not a valid DNS name");
  std::string proto = get_str(c, t, "protocol", pfx + "protocol", "smtp");
  if (proto == "lmtp") {
    if (!is_route) c.fail(t.get("protocol")->source(), pfx + "protocol", "LMTP is for [[route]] next hops only");
    h.protocol = next_hop_protocol::lmtp;
  } else if (proto != "smtp") {
    c.fail(t.get("protocol")->source(), pfx + "protocol", "expected \"smtp\" or \"lmtp\"");
  }
  return h;
}

const char* const hop_keys[] = {"host", "port", "priority", "weight", "tls", "tls_min_version", "ca_file",
                                 "verify_name", "auth_user", "auth_password_file", "mx", "source_address",
                                 "helo_name", "protocol"};

void check_hop_keys(const ctx& c, const toml::table& t, const std::string& prefix, bool is_route) {
  for (auto& [k, v] : t) {
    std::string key(k.str());
    bool ok = is_route && key == "domains";
    for (const char* h : hop_keys) ok = ok || key == h;
    if (!ok) c.fail(k.source(), prefix + key, "unknown key");
  }
}

const toml::array* get_table_array(const ctx& c, const toml::table& root, const char* key) {
  auto* n = root.get(key);
  if (!n) return nullptr;
  auto* a = n->as_array();
  if (!a || !a->is_array_of_tables())
    c.fail(n->source(), key, std::string("expected [[") + key + "]] tables");
  return a;
}

config parse(const ctx& c, const toml::table& root) {
  config cfg;
  cfg.source = c.src();
  check_keys(c, root, "",
             {"hostname", "shards", "spool", "listen", "relay", "limits", "tls", "tuning", "log_level", "smarthost",
              "route", "queue", "dns", "ha"});
  char hn[256] = "localhost";
  gethostname(hn, sizeof hn - 1);
  cfg.hostname = get_str(c, root, "hostname", "hostname", hn);
  if (!valid_dns_name(cfg.hostname))
    c.fail(root.get("hostname") ? root.get("hostname")->source() : toml::source_region{}, "hostname",
           "\"" + cfg.hostname +
               "\" is not a valid DNS host name (labels of letters, digits and '-', 1 to 63 bytes, "
               "253 in all)");
  cfg.shards = get_int<uint32_t>(c, root, "shards", "shards", 0, 0, 256);
  cfg.log_level = get_str(c, root, "log_level", "log_level", "info");
  if (cfg.log_level != "debug" && cfg.log_level != "info" && cfg.log_level != "warning" &&
      cfg.log_level != "error")
    c.fail(root.get("log_level")->source(), "log_level", "expected debug, info, warning or error");

  if (auto* s = get_table(c, root, "spool")) {
    check_keys(c, *s, "spool.", {"dir", "segment_size", "fsync", "max_batch_bytes", "preallocate"});
    {
      std::string pa = get_str(c, *s, "preallocate", "spool.preallocate", "zero");
      if (pa != "zero" && pa != "reserve")
        c.fail(s->get("preallocate")->source(), "spool.preallocate", "expected \"zero\" or \"reserve\"");
      cfg.spool.prezero = pa == "zero";
    }
    cfg.spool.dir = get_str(c, *s, "dir", "spool.dir", cfg.spool.dir);
    if (cfg.spool.dir.empty()) c.fail(s->get("dir")->source(), "spool.dir", "must not be empty");
    cfg.spool.segment_size = get_int<uint64_t>(c, *s, "segment_size", "spool.segment_size",
                                               cfg.spool.segment_size, 1 << 20, int64_t(1) << 32);
    cfg.spool.fsync = get_bool(c, *s, "fsync", "spool.fsync", cfg.spool.fsync);
    cfg.spool.max_batch_bytes = get_int<uint64_t>(c, *s, "max_batch_bytes", "spool.max_batch_bytes",
                                                  cfg.spool.max_batch_bytes, 1 << 20, int64_t(1) << 30);
  }

  auto* ln = root.get("listen");
  if (!ln) c.fail(root.source(), "listen", "at least one [[listen]] is required");
  auto* arr = ln->as_array();
  if (!arr || arr->empty()) c.fail(ln->source(), "listen", "expected one or more [[listen]] tables");
  for (auto& e : *arr) {
    auto* t = e.as_table();
    if (!t) c.fail(e.source(), "listen", "expected a table");
    check_keys(c, *t, "listen.",
               {"address", "proxy_protocol", "trusted_proxies", "proxy_timeout", "proxy_max_header",
                "tls", "auth", "local_relay", "allow_bare_lf"});
    listener l;
    l.line = static_cast<int>(t->source().begin.line);
    auto* an = t->get("address");
    if (!an) c.fail(t->source(), "listen.address", "missing (e.g. \"0.0.0.0:25\")");
    l.address_text = get_str(c, *t, "address", "listen.address", "");
    auto a = net::address::parse(l.address_text);
    if (!a)
      c.fail(an->source(), "listen.address",
             "\"" + l.address_text + "\" is not IP:PORT or [IPv6]:PORT (names are not resolved)");
    l.address = *a;
    for (const auto& o : cfg.listen)
      if (overlaps(o.address, l.address))
        c.fail(an->source(), "listen.address",
               "\"" + l.address_text + "\" overlaps the listener \"" + o.address_text + "\" at line " +
                   std::to_string(o.line) + " (same port, same or wildcard address)");
    l.proxy_protocol = get_bool(c, *t, "proxy_protocol", "listen.proxy_protocol", false);
    l.trusted_proxies = get_cidrs(c, *t, "trusted_proxies", "listen.trusted_proxies");
    if (l.proxy_protocol && l.trusted_proxies.empty())
      c.fail(t->get("proxy_protocol")->source(), "listen.trusted_proxies",
             "proxy_protocol = true needs trusted_proxies (the addresses of the proxies)");
    if (!l.proxy_protocol && !l.trusted_proxies.empty())
      c.fail(t->get("trusted_proxies")->source(), "listen.trusted_proxies",
             "only meaningful with proxy_protocol = true");
    l.proxy_timeout_ms = 1000 * get_int<uint32_t>(c, *t, "proxy_timeout", "listen.proxy_timeout", 5, 1, 300);
    l.proxy_max_header = get_int<uint32_t>(c, *t, "proxy_max_header", "listen.proxy_max_header",
                                           4096, 232, 65551);
    l.local_relay = get_bool(c, *t, "local_relay", "listen.local_relay", false);
    if (l.local_relay && !l.proxy_protocol)
      c.fail(t->get("local_relay")->source(), "listen.local_relay",
             "only meaningful with proxy_protocol = true");
    l.allow_bare_lf = get_bool(c, *t, "allow_bare_lf", "listen.allow_bare_lf", false);
    l.tls = get_bool(c, *t, "tls", "listen.tls", false);
    l.auth = get_bool(c, *t, "auth", "listen.auth", false);
    if (l.tls)
      c.fail(t->get("tls")->source(), "listen.tls",
             "STARTTLS is not available in this build yet (it comes with the delivery/TLS work)");
    if (l.auth)
      c.fail(t->get("auth")->source(), "listen.auth", "SMTP AUTH is not available in this build yet");
    cfg.listen.push_back(std::move(l));
  }

  if (auto* r = get_table(c, root, "relay")) {
    check_keys(c, *r, "relay.", {"networks", "domains"});
    cfg.relay.networks = get_cidrs(c, *r, "networks", "relay.networks");
    if (auto* dn = r->get("domains")) {
      auto* da = dn->as_array();
      if (!da) c.fail(dn->source(), "relay.domains", "expected an array of domain names");
      for (auto& e : *da) {
        auto s = e.value<std::string>();
        if (!s) c.fail(e.source(), "relay.domains", "expected a string");
        std::string d = *s;
        std::transform(d.begin(), d.end(), d.begin(), [](unsigned char ch) { return std::tolower(ch); });
        if (!valid_dns_name(std::string_view(d).substr(d[0] == '.' ? 1 : 0)))
          c.fail(e.source(), "relay.domains",
                 "\"" + *s + "\" is not a valid DNS domain name (\".example.org\" for subdomains)");
        cfg.relay.domains.push_back(d);
      }
    }
  }

  if (auto* l = get_table(c, root, "limits")) {
    check_keys(c, *l, "limits.",
               {"message_size", "recipients", "recipient_overshoot", "line_length", "errors",
                "junk_commands", "idle_timeout", "session_timeout", "connections", "output_buffer",
                "input_buffer", "send_timeout", "message_memory", "shutdown_timeout"});
    auto& L = cfg.limits;
    L.message_size = get_int<uint64_t>(c, *l, "message_size", "limits.message_size", L.message_size,
                                       1024, int64_t(1) << 30);
    L.recipients = get_int<uint32_t>(c, *l, "recipients", "limits.recipients", L.recipients, 1, 100000);
    L.recipient_overshoot = get_int<uint32_t>(c, *l, "recipient_overshoot", "limits.recipient_overshoot",
                                              L.recipient_overshoot, 0, 100000);
    L.line_length = get_int<uint32_t>(c, *l, "line_length", "limits.line_length", L.line_length, 512, 65536);
    L.errors = get_int<uint32_t>(c, *l, "errors", "limits.errors", L.errors, 1, 1000);
    L.junk_commands = get_int<uint32_t>(c, *l, "junk_commands", "limits.junk_commands", L.junk_commands, 1, 100000);
    L.idle_timeout = get_int<uint32_t>(c, *l, "idle_timeout", "limits.idle_timeout", L.idle_timeout, 1, 86400);
    L.session_timeout = get_int<uint32_t>(c, *l, "session_timeout", "limits.session_timeout",
                                          L.session_timeout, 1, 86400 * 7);
    // 65536 slots per shard: the completion queue (at most 65536 entries) then still holds
    // one completion per connection; beyond that, use more shards.
    L.connections = get_int<uint32_t>(c, *l, "connections", "limits.connections", L.connections, 1, 65536);
    L.output_buffer = get_int<uint32_t>(c, *l, "output_buffer", "limits.output_buffer", L.output_buffer,
                                        1024, 64 << 20);
    L.input_buffer = get_int<uint32_t>(c, *l, "input_buffer", "limits.input_buffer", L.input_buffer,
                                       4096, 64 << 20);
    L.send_timeout = get_int<uint32_t>(c, *l, "send_timeout", "limits.send_timeout", L.send_timeout, 1, 86400);
    L.message_memory = get_int<uint64_t>(c, *l, "message_memory", "limits.message_memory", L.message_memory,
                                         1 << 20, int64_t(1) << 40);
    L.shutdown_timeout = get_int<uint32_t>(c, *l, "shutdown_timeout", "limits.shutdown_timeout",
                                           L.shutdown_timeout, 0, 3600);
    if (L.input_buffer < L.line_length)
      c.fail(l->get("input_buffer")->source(), "limits.input_buffer",
             "must be at least limits.line_length (" + std::to_string(L.line_length) + ")");
    // Every message that can get a 250 must be readable by recovery: its whole record
    // (envelope, recipients, Received: header, content) within the reader's bound.
    if (!spool::record_fits(L.message_size, L.recipients, L.line_length)) {
      auto* n = l->get("message_size");
      if (!n) n = l->get("recipients");
      if (!n) n = l->get("line_length");
      c.fail(n ? n->source() : l->source(), "limits.message_size",
             "a message of " + std::to_string(L.message_size) + " bytes with " + std::to_string(L.recipients) +
                 " recipients and " + std::to_string(L.line_length) + "-byte lines makes a spool record of up to " +
                 std::to_string(spool::max_record_for(L.message_size, L.recipients, L.line_length)) +
                 " bytes, above the spool's bound of " + std::to_string(spool::max_record_len) +
                 "; the largest message_size for these limits is " +
                 std::to_string(spool::max_message_size_for(L.recipients, L.line_length)));
    }
  }

  if (auto* t = get_table(c, root, "tls")) {
    check_keys(c, *t, "tls.", {"cert", "key"});
    cfg.tls.cert = get_str(c, *t, "cert", "tls.cert", "");
    cfg.tls.key = get_str(c, *t, "key", "tls.key", "");
    for (auto [k, v] : {std::pair{"cert", &cfg.tls.cert}, std::pair{"key", &cfg.tls.key}})
      if (!v->empty() && access(v->c_str(), R_OK) != 0)
        c.fail(t->get(k)->source(), std::string("tls.") + k, "cannot read \"" + *v + "\"");
  }

  if (auto* t = get_table(c, root, "tuning")) {
    check_keys(c, *t, "tuning.",
               {"recv_buffers", "recv_buffer_size", "pin_shards", "listen_backlog", "accept_resume",
                "ring_entries", "buffer_keep", "idle_poll_us"});
    cfg.tuning.pin_shards = get_bool(c, *t, "pin_shards", "tuning.pin_shards", true);
    cfg.tuning.recv_buffers = get_int<uint32_t>(c, *t, "recv_buffers", "tuning.recv_buffers",
                                                cfg.tuning.recv_buffers, 1, 32768);
    if (cfg.tuning.recv_buffers & (cfg.tuning.recv_buffers - 1))
      c.fail(t->get("recv_buffers")->source(), "tuning.recv_buffers", "must be a power of two");
    cfg.tuning.recv_buffer_size = get_int<uint32_t>(c, *t, "recv_buffer_size", "tuning.recv_buffer_size",
                                                    cfg.tuning.recv_buffer_size, 512, 1 << 20);
    if (uint64_t(cfg.tuning.recv_buffers) * cfg.tuning.recv_buffer_size > (uint64_t(1) << 30))
      c.fail(t->get(t->get("recv_buffer_size") ? "recv_buffer_size" : "recv_buffers")->source(),
             "tuning.recv_buffers",
             "recv_buffers x recv_buffer_size is " +
                 std::to_string(uint64_t(cfg.tuning.recv_buffers) * cfg.tuning.recv_buffer_size) +
                 " bytes per shard; at most 1 GiB");
    cfg.tuning.listen_backlog = get_int<uint32_t>(c, *t, "listen_backlog", "tuning.listen_backlog",
                                                  cfg.tuning.listen_backlog, 1, 65535);
    cfg.tuning.accept_resume = get_int<uint32_t>(c, *t, "accept_resume", "tuning.accept_resume",
                                                 cfg.tuning.accept_resume, 0, 65536);
    cfg.tuning.ring_entries = get_int<uint32_t>(c, *t, "ring_entries", "tuning.ring_entries",
                                                cfg.tuning.ring_entries, 64, 32768);
    if (cfg.tuning.ring_entries & (cfg.tuning.ring_entries - 1))
      c.fail(t->get("ring_entries")->source(), "tuning.ring_entries", "must be a power of two");
    cfg.tuning.buffer_keep = get_int<uint32_t>(c, *t, "buffer_keep", "tuning.buffer_keep",
                                               cfg.tuning.buffer_keep, 4096, 64 << 20);
    cfg.tuning.idle_poll_us = get_int<uint32_t>(c, *t, "idle_poll_us", "tuning.idle_poll_us",
                                                cfg.tuning.idle_poll_us, 0, 10000);
  }
  // Every slot is a file descriptor: a value the process can never open is refused here,
  // not found out under load as EMFILE (ternd checks the soft limit again at start).
  {
    rlimit rl{};
    unsigned nshards = cfg.shards ? cfg.shards : std::max(1u, std::thread::hardware_concurrency());
    uint64_t need = uint64_t(nshards) * fds_per_shard(cfg) + 256;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_max != RLIM_INFINITY && need > rl.rlim_max) {
      const toml::node* at = nullptr;
      if (auto* l = root.get("limits"); l && l->as_table()) at = l->as_table()->get("connections");
      c.fail(at ? at->source() : root.source(), "limits.connections",
             std::to_string(nshards) + " shard(s) x " + std::to_string(cfg.limits.connections) +
                 " connections need " + std::to_string(need) +
                 " file descriptors; RLIMIT_NOFILE allows at most " + std::to_string(rl.rlim_max));
    }
  }
  if (cfg.tuning.accept_resume > cfg.limits.connections)
    c.fail(root.get("tuning")->as_table()->get("accept_resume")->source(), "tuning.accept_resume",
           "must not exceed limits.connections (" + std::to_string(cfg.limits.connections) + ")");
  // --- delivery: [[smarthost]], [[route]], [queue], [dns] ---------------------------------
  if (auto* a = get_table_array(c, root, "smarthost")) {
    for (auto& e : *a) {
      auto& t = *e.as_table();
      check_hop_keys(c, t, "smarthost.", false);
      cfg.smarthosts.push_back(parse_hop(c, t, "smarthost.", false));
    }
  }
  if (auto* a = get_table_array(c, root, "route")) {
    for (auto& e : *a) {
      auto& t = *e.as_table();
      check_hop_keys(c, t, "route.", true);
      route r;
      r.domains = get_domains(c, t, "domains", "route.domains");
      if (r.domains.empty())
        c.fail(t.get("domains") ? t.get("domains")->source() : t.source(), "route.domains",
               "a route needs at least one domain");
      r.hop = parse_hop(c, t, "route.", true);
      cfg.routes.push_back(std::move(r));
    }
  }
  if (auto* q = get_table(c, root, "queue")) {
    check_keys(c, *q, "queue.",
               {"retry", "max_lifetime", "delay_warning", "concurrency", "messages_per_connection",
                "connection_idle", "jitter", "bounce_size_limit", "connect_timeout", "greeting_timeout", "helo_timeout",
                "starttls_timeout", "mail_timeout", "rcpt_timeout", "data_init_timeout", "data_xfer_timeout",
                "data_done_timeout", "quit_timeout"});
    auto& Q = cfg.queue;
    if (auto* rn = q->get("retry")) {
      auto* ra = rn->as_array();
      if (!ra || ra->empty()) c.fail(rn->source(), "queue.retry", "expected a list of durations such as [\"1m\", \"5m\", \"1h\"]");
      Q.retry_s.clear();
      for (auto& e : *ra) Q.retry_s.push_back(duration_of(c, e, "queue.retry", 1, 7 * 86400));
    }
    Q.max_lifetime_s = get_duration_s(c, *q, "max_lifetime", "queue.max_lifetime", Q.max_lifetime_s, 60, 365 * 86400);
    Q.delay_warning_s = get_duration_s(c, *q, "delay_warning", "queue.delay_warning", 0, 0, 365 * 86400);
    if (Q.delay_warning_s && Q.delay_warning_s >= Q.max_lifetime_s)
      c.fail(q->get("delay_warning")->source(), "queue.delay_warning",
             "must be shorter than queue.max_lifetime (" + std::to_string(Q.max_lifetime_s) + "s)");
    Q.concurrency = get_int<uint32_t>(c, *q, "concurrency", "queue.concurrency", Q.concurrency, 1, 10000);
    Q.messages_per_connection = get_int<uint32_t>(c, *q, "messages_per_connection", "queue.messages_per_connection",
                                                  Q.messages_per_connection, 1, 1000000);
    Q.connection_idle_s = get_duration_s(c, *q, "connection_idle", "queue.connection_idle", Q.connection_idle_s, 0, 3600);
    Q.jitter_percent = get_int<uint32_t>(c, *q, "jitter", "queue.jitter", Q.jitter_percent, 0, 50);
    Q.bounce_size_limit = get_int<uint64_t>(c, *q, "bounce_size_limit", "queue.bounce_size_limit",
                                            Q.bounce_size_limit, 0, int64_t(1) << 30);
    struct tk { const char* key; uint32_t* v; };
    for (auto [key, v] : {tk{"connect_timeout", &Q.connect_timeout_s}, tk{"greeting_timeout", &Q.greeting_timeout_s},
                          tk{"helo_timeout", &Q.helo_timeout_s}, tk{"starttls_timeout", &Q.starttls_timeout_s},
                          tk{"mail_timeout", &Q.mail_timeout_s}, tk{"rcpt_timeout", &Q.rcpt_timeout_s},
                          tk{"data_init_timeout", &Q.data_init_timeout_s}, tk{"data_xfer_timeout", &Q.data_xfer_timeout_s},
                          tk{"data_done_timeout", &Q.data_done_timeout_s}, tk{"quit_timeout", &Q.quit_timeout_s}})
      *v = get_duration_s(c, *q, key, std::string("queue.") + key, *v, 1, 3600);
  }
  if (auto* d = get_table(c, root, "dns")) {
    check_keys(c, *d, "dns.", {"servers", "use_hosts", "timeout", "tries"});
    if (auto* sn = d->get("servers")) {
      auto* sa = sn->as_array();
      if (!sa) c.fail(sn->source(), "dns.servers", "expected an array such as [\"192.0.2.53\", \"127.0.0.1:5353\"]");
      for (auto& e : *sa) {
        auto s = e.value<std::string>();
        if (!s) c.fail(e.source(), "dns.servers", "expected a string");
        bool ok = net::address::parse(*s).has_value() || net::address::parse(*s + ":53").has_value() ||
                  net::address::parse("[" + *s + "]:53").has_value();
        if (!ok) c.fail(e.source(), "dns.servers", "\"" + *s + "\" is not IP, IP:PORT or [IPv6]:PORT");
        cfg.dns.servers.push_back(*s);
      }
    }
    cfg.dns.use_hosts = get_bool(c, *d, "use_hosts", "dns.use_hosts", true);
    auto* tn = d->get("timeout");
    if (tn) {
      std::optional<uint64_t> ms;
      if (tn->is_string()) ms = parse_duration_ms(*tn->value<std::string>());
      else if (tn->is_integer() && *tn->value<int64_t>() > 0) ms = uint64_t(*tn->value<int64_t>()) * 1000;
      if (!ms || *ms < 10 || *ms > 60000) c.fail(tn->source(), "dns.timeout", "expected a duration from \"10ms\" to \"60s\"");
      cfg.dns.timeout_ms = static_cast<uint32_t>(*ms);
    }
    cfg.dns.tries = get_int<uint32_t>(c, *d, "tries", "dns.tries", cfg.dns.tries, 1, 10);
  }
  if (auto* h = get_table(c, root, "ha")) {
    parse_ha(c, *h, cfg);
    // A listener on a virtual address is bound before the address arrives (IP_FREEBIND);
    // a wildcard listener serves it too. Anything else would never see the address's mail.
    bool served = false;
    for (const auto& L : cfg.listen)
      for (const auto& v : cfg.ha.virtual_addresses) {
        if (L.address.family() != AF_INET) continue;
        const auto& sin = reinterpret_cast<const sockaddr_in&>(L.address.ss);
        served = served || is_wildcard(L.address) || std::memcmp(&sin.sin_addr, v.bytes.data(), 4) == 0;
      }
    if (!served)
      cfg.warnings.push_back(cfg.source + ":" + std::to_string(cfg.ha.line) +
                             ": ha.virtual_addresses: no [[listen]] address is a virtual address or 0.0.0.0: "
                             "clients that follow the floating address reach no listener");
  }
  if (cfg.smarthosts.empty()) {
    cfg.warnings.push_back(
        cfg.routes.empty()
            ? "no [[smarthost]] and no [[route]]: accepted mail stays queued (deferred: no route to its destination)"
            : "no [[smarthost]]: mail for domains outside the [[route]] tables stays queued (deferred: no route)");
  }
  for (const auto& h : cfg.smarthosts)
    if (h.tls == tls_policy::none || h.tls == tls_policy::may)
      cfg.warnings.push_back(cfg.source + ":" + std::to_string(h.line) + ": smarthost.tls: \"" + h.host +
                             "\" may receive mail in clear (tls = \"" +
                             (h.tls == tls_policy::none ? "none" : "may") + "\")");
  return cfg;
}

std::optional<config> load(const std::string& text, const std::string& name, std::string& err) {
  ctx c(name);
  try {
    auto tbl = toml::parse(text, name);
    return parse(c, tbl);
  } catch (const toml::parse_error& e) {
    err = name + ":" + std::to_string(e.source().begin.line) + ": (syntax): " + std::string(e.description());
  } catch (const cfg_error& e) {
    err = e.msg;
  }
  return std::nullopt;
}

}  // namespace

std::optional<config> load_string(const std::string& text, const std::string& name, std::string& err) {
  return load(text, name, err);
}

std::optional<config> load_file(const std::string& path, std::string& err) {
  std::ifstream in(path);
  if (!in) {
    err = path + ":0: (file): cannot open: " + std::string(strerror(errno));
    return std::nullopt;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return load(ss.str(), path, err);
}

}  // namespace tern::config
