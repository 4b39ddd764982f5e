#include "src/config/config.hh"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "spool/record.hh"

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
)";

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

bool valid_domain(const std::string& d) {
  if (d.empty() || d.size() > 255) return false;
  for (char ch : d)
    if (!(isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '.')) return false;
  return d.find("..") == std::string::npos && d.back() != '.';
}

config parse(const ctx& c, const toml::table& root) {
  config cfg;
  cfg.source = c.src();
  check_keys(c, root, "",
             {"hostname", "shards", "spool", "listen", "relay", "limits", "tls", "tuning", "log_level"});
  char hn[256] = "localhost";
  gethostname(hn, sizeof hn - 1);
  cfg.hostname = get_str(c, root, "hostname", "hostname", hn);
  if (cfg.hostname.empty() || !valid_domain(cfg.hostname))
    c.fail(root.get("hostname") ? root.get("hostname")->source() : toml::source_region{}, "hostname",
           "\"" + cfg.hostname + "\" is not a valid host name");
  cfg.shards = get_int<uint32_t>(c, root, "shards", "shards", 0, 0, 256);
  cfg.log_level = get_str(c, root, "log_level", "log_level", "info");
  if (cfg.log_level != "debug" && cfg.log_level != "info" && cfg.log_level != "warning" &&
      cfg.log_level != "error")
    c.fail(root.get("log_level")->source(), "log_level", "expected debug, info, warning or error");

  if (auto* s = get_table(c, root, "spool")) {
    check_keys(c, *s, "spool.", {"dir", "segment_size", "fsync", "max_batch_bytes"});
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
                "tls", "auth"});
    listener l;
    auto* an = t->get("address");
    if (!an) c.fail(t->source(), "listen.address", "missing (e.g. \"0.0.0.0:25\")");
    l.address_text = get_str(c, *t, "address", "listen.address", "");
    auto a = net::address::parse(l.address_text);
    if (!a)
      c.fail(an->source(), "listen.address",
             "\"" + l.address_text + "\" is not IP:PORT or [IPv6]:PORT (names are not resolved)");
    l.address = *a;
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
        if (!valid_domain(d[0] == '.' ? d.substr(1) : d))
          c.fail(e.source(), "relay.domains", "\"" + *s + "\" is not a domain name");
        cfg.relay.domains.push_back(d);
      }
    }
  }

  if (auto* l = get_table(c, root, "limits")) {
    check_keys(c, *l, "limits.",
               {"message_size", "recipients", "line_length", "errors", "idle_timeout",
                "session_timeout", "connections"});
    auto& L = cfg.limits;
    L.message_size = get_int<uint64_t>(c, *l, "message_size", "limits.message_size", L.message_size,
                                       1024, int64_t(1) << 30);
    L.recipients = get_int<uint32_t>(c, *l, "recipients", "limits.recipients", L.recipients, 1, 100000);
    L.line_length = get_int<uint32_t>(c, *l, "line_length", "limits.line_length", L.line_length, 512, 65536);
    L.errors = get_int<uint32_t>(c, *l, "errors", "limits.errors", L.errors, 1, 1000);
    L.idle_timeout = get_int<uint32_t>(c, *l, "idle_timeout", "limits.idle_timeout", L.idle_timeout, 1, 86400);
    L.session_timeout = get_int<uint32_t>(c, *l, "session_timeout", "limits.session_timeout",
                                          L.session_timeout, 1, 86400 * 7);
    L.connections = get_int<uint32_t>(c, *l, "connections", "limits.connections", L.connections, 1, 1 << 20);
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
    check_keys(c, *t, "tuning.", {"recv_buffers", "recv_buffer_size", "pin_shards"});
    cfg.tuning.pin_shards = get_bool(c, *t, "pin_shards", "tuning.pin_shards", true);
    cfg.tuning.recv_buffers = get_int<uint32_t>(c, *t, "recv_buffers", "tuning.recv_buffers",
                                                cfg.tuning.recv_buffers, 1, 32768);
    if (cfg.tuning.recv_buffers & (cfg.tuning.recv_buffers - 1))
      c.fail(t->get("recv_buffers")->source(), "tuning.recv_buffers", "must be a power of two");
    cfg.tuning.recv_buffer_size = get_int<uint32_t>(c, *t, "recv_buffer_size", "tuning.recv_buffer_size",
                                                    cfg.tuning.recv_buffer_size, 512, 1 << 20);
  }
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
