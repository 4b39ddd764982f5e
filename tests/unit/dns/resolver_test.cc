// The resolver against a real DNS server: dnsmasq (Debian's dnsmasq-base) on 127.0.0.1 at
// a port the test picks, serving a local zone "test." with every case delivery meets.
// SERVFAIL and REFUSED come from dnsmasq forwarding two sub-zones to an upstream the test
// runs (a UDP socket answering every query with that RCODE; dnsmasq passes the RCODE on);
// timeouts from a sub-zone forwarded to a bound socket that never answers. No internet,
// no system resolver: the resolver's servers are overridden and the hosts file is a
// temporary one. Cache expiry uses an injected clock: no sleeps, no timed assertions.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "src/dns/resolver.hh"

namespace dns = tern::dns;
using namespace std::chrono_literals;

namespace {

// ---- the injected clock ----------------------------------------------------------------
std::atomic<int64_t> g_clock_offset_s{0};
std::chrono::steady_clock::time_point test_clock() {
  return std::chrono::steady_clock::now() + std::chrono::seconds(g_clock_offset_s.load());
}

// ---- collecting callbacks ----------------------------------------------------------------
struct box {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<dns::result> got;
  std::vector<std::thread::id> threads;

  static void cb(void* ctx, dns::result&& r) {
    auto* b = static_cast<box*>(ctx);
    std::lock_guard lk(b->mu);
    b->got.push_back(std::move(r));
    b->threads.push_back(std::this_thread::get_id());
    b->cv.notify_all();
  }
  // Wait for n results. The bound only keeps a broken resolver from hanging the suite;
  // nothing is asserted about how long it took.
  bool wait(size_t n) {
    std::unique_lock lk(mu);
    return cv.wait_for(lk, 30s, [&] { return got.size() >= n; });
  }
};

std::string addrs(const std::vector<dns::address_ttl>& v) {
  std::string s;
  for (auto& a : v) s += (s.empty() ? "" : " ") + a.addr.ip();
  return s;
}

// ---- a UDP socket on 127.0.0.1 -----------------------------------------------------------
int bind_udp(uint16_t& port) {
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    ::close(fd);
    return -1;
  }
  socklen_t len = sizeof sa;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  port = ntohs(sa.sin_port);
  return fd;
}

// One raw DNS query for "a.test" A; true when any answer came (readiness probe).
bool probe(uint16_t port) {
  const unsigned char q[] = {0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 1, 'a', 4, 't', 'e', 's', 't', 0, 0, 1, 0, 1};
  int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  timeval tv{0, 100000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::sendto(fd, q, sizeof q, 0, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  unsigned char buf[512];
  ssize_t n = ::recv(fd, buf, sizeof buf, 0);
  ::close(fd);
  return n >= 12;
}

std::string find_dnsmasq() {
  for (const char* p : {"/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"})
    if (::access(p, X_OK) == 0) return p;
  return {};
}

// ---- the shared server: dnsmasq plus the fake upstreams ----------------------------------
struct server {
  std::filesystem::path dir;
  uint16_t port = 0;
  pid_t pid = -1;
  int upstream_fd = -1, dead_fd = -1;
  uint16_t upstream_port = 0, dead_port = 0;
  std::thread upstream;
  std::atomic<bool> quit{false};
  std::string error;  // why it did not start

  // Answers every query with SERVFAIL, or REFUSED when the name has a label "rf".
  void run_upstream() {
    unsigned char buf[1500];
    while (!quit.load()) {
      sockaddr_storage from{};
      socklen_t fl = sizeof from;
      ssize_t n = ::recvfrom(upstream_fd, buf, sizeof buf, 0, reinterpret_cast<sockaddr*>(&from), &fl);
      if (n < 12) continue;
      bool refuse = std::string_view(reinterpret_cast<char*>(buf) + 12, size_t(n) - 12).find("\x02rf\x04test") !=
                    std::string_view::npos;
      buf[2] |= 0x80;  // QR
      buf[3] = uint8_t((buf[3] & 0xF0) | (refuse ? 5 : 2));
      ::sendto(upstream_fd, buf, size_t(n), 0, reinterpret_cast<sockaddr*>(&from), fl);
    }
  }

  bool start() {
    std::string bin = find_dnsmasq();
    if (bin.empty()) {
      error = "dnsmasq is not installed (Debian package dnsmasq-base; tools/setup.sh installs it)";
      return false;
    }
    char tmpl[] = "/tmp/tern-dns-test-XXXXXX";
    if (!::mkdtemp(tmpl)) {
      error = "mkdtemp failed";
      return false;
    }
    dir = tmpl;
    upstream_fd = bind_udp(upstream_port);
    dead_fd = bind_udp(dead_port);
    if (upstream_fd < 0 || dead_fd < 0) {
      error = "cannot bind UDP sockets on 127.0.0.1";
      return false;
    }
    timeval tv{0, 100000};
    ::setsockopt(upstream_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    upstream = std::thread([this] { run_upstream(); });

    // A free port: bind port 0, read it, close, give it to dnsmasq. Another process may
    // take it in between; then dnsmasq exits and we try another.
    for (int attempt = 0; attempt < 5; ++attempt) {
      int fd = bind_udp(port);
      ::close(fd);
      std::string log = (dir / "dnsmasq.log").string();
      std::vector<std::string> args = {
          bin, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
          "--port=" + std::to_string(port), "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=",
          "--cache-size=0", "--log-queries", "--log-facility=-", "--local=/test/", "--local-ttl=300",
          "--host-record=a.test,192.0.2.1", "--host-record=aaaa.test,2001:db8::1",
          "--host-record=both.test,192.0.2.2,2001:db8::2", "--host-record=short.test,192.0.2.7,7",
          // MX with three preferences, given out of order
          "--mx-host=mx.test,mx2.test,20", "--mx-host=mx.test,mx3.test,5", "--mx-host=mx.test,mx1.test,10",
          "--host-record=mx1.test,192.0.2.11", "--host-record=mx2.test,192.0.2.12,2001:db8::12",
          "--host-record=mx3.test,2001:db8::13",
          // MX at a name that does not exist; and one of two hosts without addresses
          "--mx-host=ghostmx.test,ghost.test,10",
          "--mx-host=halfmx.test,ghost.test,10", "--mx-host=halfmx.test,mx1.test,20",
          // null MX (RFC 7505): MX 0 "." as raw RDATA (preference 0, root name)
          "--dns-rr=nullmx.test,15,000000",
          "--server=/sf.test/127.0.0.1#" + std::to_string(upstream_port),
          "--server=/rf.test/127.0.0.1#" + std::to_string(upstream_port),
          "--server=/slow.test/127.0.0.1#" + std::to_string(dead_port),
      };
      pid = ::fork();
      if (pid == 0) {
        int lfd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (lfd >= 0) {
          ::dup2(lfd, 1);
          ::dup2(lfd, 2);
        }
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        ::execv(argv[0], argv.data());
        _exit(127);
      }
      for (int i = 0; i < 100; ++i) {
        if (probe(port)) return true;
        int st;
        if (::waitpid(pid, &st, WNOHANG) == pid) {
          pid = -1;
          break;
        }
        std::this_thread::sleep_for(50ms);
      }
      if (pid > 0) {
        ::kill(pid, SIGTERM);
        ::waitpid(pid, nullptr, 0);
        pid = -1;
      }
    }
    std::ifstream in(dir / "dnsmasq.log");
    std::stringstream ss;
    ss << in.rdbuf();
    error = "dnsmasq did not start; its log:\n" + ss.str();
    return false;
  }

  void stop() {
    if (pid > 0) {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
      pid = -1;
    }
    quit = true;
    if (upstream.joinable()) upstream.join();
    if (upstream_fd >= 0) ::close(upstream_fd);
    if (dead_fd >= 0) ::close(dead_fd);
    if (!dir.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  }
};

server* g_server = nullptr;
bool g_server_missing = false;

class dns_test : public ::testing::Test {
 public:
  static void SetUpTestSuite() {
    g_server = new server;
    if (!g_server->start()) {
      if (find_dnsmasq().empty()) g_server_missing = true;
    }
  }
  static void TearDownTestSuite() {
    g_server->stop();
    delete g_server;
    g_server = nullptr;
  }

 protected:
  void SetUp() override {
    if (g_server_missing) GTEST_SKIP() << g_server->error;
    ASSERT_GT(g_server->pid, 0) << g_server->error;
    g_clock_offset_s = 0;
  }

  dns::options opts() const {
    dns::options o;
    o.servers = {"127.0.0.1:" + std::to_string(g_server->port)};
    o.use_hosts = false;  // hermetic: the machine's /etc/hosts is not part of the test
    o.query_timeout = 2000ms;
    o.tries = 2;
    o.clock = &test_clock;
    return o;
  }

  void start(dns::resolver& r, const dns::options& o) {
    std::string err;
    ASSERT_TRUE(r.start(o, err)) << err;
  }

  static dns::result resolve(dns::resolver& r, std::string_view name, dns::kind k) {
    box b;
    auto s = r.lookup(name, k, &box::cb, &b);
    EXPECT_TRUE(s == dns::submit::queued || s == dns::submit::done) << int(s);
    EXPECT_TRUE(b.wait(1)) << "no answer for " << name;
    std::lock_guard lk(b.mu);
    return b.got.empty() ? dns::result{} : std::move(b.got[0]);
  }
};

// ---- address lookups -----------------------------------------------------------------------

TEST_F(dns_test, a_only) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "a.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::ok) << x.text;
  EXPECT_EQ(addrs(x.addresses), "192.0.2.1");
  ASSERT_EQ(x.addresses.size(), 1u);
  EXPECT_EQ(x.addresses[0].addr.family(), AF_INET);
  EXPECT_EQ(x.addresses[0].ttl, 300u);
  EXPECT_EQ(x.ttl, 300u);
}

TEST_F(dns_test, aaaa_only) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "AAAA.test.", dns::kind::address);  // case and trailing dot normalised
  EXPECT_EQ(x.st, dns::status::ok) << x.text;
  EXPECT_EQ(x.name, "aaaa.test");
  EXPECT_EQ(addrs(x.addresses), "2001:db8::1");
  ASSERT_EQ(x.addresses.size(), 1u);
  EXPECT_EQ(x.addresses[0].addr.family(), AF_INET6);
}

TEST_F(dns_test, both_families) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "both.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::ok) << x.text;
  EXPECT_EQ(addrs(x.addresses), "192.0.2.2 2001:db8::2");
  EXPECT_EQ(r.counters().queries, 2u);  // one A, one AAAA
}

TEST_F(dns_test, nxdomain) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "nx.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::nxdomain) << x.text;
  EXPECT_TRUE(x.addresses.empty());
  EXPECT_NE(x.text.find("does not exist"), std::string::npos) << x.text;
  EXPECT_FALSE(dns::is_permanent(x.st));  // delivery defers
}

TEST_F(dns_test, nodata) {
  dns::resolver r;
  start(r, opts());
  // ghostmx.test exists (it has an MX) but has neither A nor AAAA.
  auto x = resolve(r, "ghostmx.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::nodata) << x.text;
  EXPECT_TRUE(x.addresses.empty());
}

TEST_F(dns_test, servfail) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "host.sf.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::servfail) << x.text;
  auto m = resolve(r, "sf.test", dns::kind::mx);
  EXPECT_EQ(m.st, dns::status::servfail) << m.text;
  // Transient failures are not cached: asking again queries again.
  uint64_t q = r.counters().queries;
  resolve(r, "host.sf.test", dns::kind::address);
  EXPECT_EQ(r.counters().queries, q + 2);
}

TEST_F(dns_test, refused) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "host.rf.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::refused) << x.text;
}

TEST_F(dns_test, timeout) {
  dns::resolver r;
  auto o = opts();
  o.query_timeout = 100ms;  // short, so the test is quick; nothing asserts on time
  o.tries = 1;
  start(r, o);
  auto x = resolve(r, "host.slow.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::timeout) << x.text;
  auto m = resolve(r, "slow.test", dns::kind::mx);
  EXPECT_EQ(m.st, dns::status::timeout) << m.text;
}

// ---- MX lookups ------------------------------------------------------------------------------

TEST_F(dns_test, mx_sorted_with_addresses) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "mx.test", dns::kind::mx);
  EXPECT_EQ(x.st, dns::status::ok) << x.text;
  EXPECT_FALSE(x.implicit_mx);
  ASSERT_EQ(x.mx.size(), 3u);
  EXPECT_EQ(x.mx[0].name, "mx3.test");
  EXPECT_EQ(x.mx[0].preference, 5);
  EXPECT_EQ(addrs(x.mx[0].addresses), "2001:db8::13");
  EXPECT_EQ(x.mx[1].name, "mx1.test");
  EXPECT_EQ(x.mx[1].preference, 10);
  EXPECT_EQ(addrs(x.mx[1].addresses), "192.0.2.11");
  EXPECT_EQ(x.mx[2].name, "mx2.test");
  EXPECT_EQ(x.mx[2].preference, 20);
  EXPECT_EQ(addrs(x.mx[2].addresses), "192.0.2.12 2001:db8::12");
  for (auto& h : x.mx) EXPECT_EQ(h.st, dns::status::ok) << h.name;
  EXPECT_EQ(r.counters().queries, 1u + 3 * 2);  // MX, then A and AAAA per host
}

TEST_F(dns_test, mx_host_without_addresses) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "ghostmx.test", dns::kind::mx);
  EXPECT_EQ(x.st, dns::status::nodata) << x.text;
  ASSERT_EQ(x.mx.size(), 1u);
  EXPECT_EQ(x.mx[0].name, "ghost.test");
  EXPECT_EQ(x.mx[0].st, dns::status::nxdomain);
  EXPECT_TRUE(x.mx[0].addresses.empty());
  EXPECT_NE(x.text.find("ghost.test: nxdomain"), std::string::npos) << x.text;
}

TEST_F(dns_test, mx_one_of_two_hosts_without_addresses) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "halfmx.test", dns::kind::mx);
  EXPECT_EQ(x.st, dns::status::ok) << x.text;
  ASSERT_EQ(x.mx.size(), 2u);
  EXPECT_EQ(x.mx[0].name, "ghost.test");
  EXPECT_EQ(x.mx[0].st, dns::status::nxdomain);
  EXPECT_EQ(x.mx[1].name, "mx1.test");
  EXPECT_EQ(addrs(x.mx[1].addresses), "192.0.2.11");
}

TEST_F(dns_test, no_mx_falls_back_to_address) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "a.test", dns::kind::mx);
  EXPECT_EQ(x.st, dns::status::ok) << x.text;
  EXPECT_TRUE(x.implicit_mx);
  ASSERT_EQ(x.mx.size(), 1u);
  EXPECT_EQ(x.mx[0].name, "a.test");
  EXPECT_EQ(x.mx[0].preference, 0);
  EXPECT_EQ(addrs(x.mx[0].addresses), "192.0.2.1");
  // A domain with neither MX nor addresses: the fallback's own status.
  auto y = resolve(r, "nullmx-free.sub.a.test", dns::kind::mx);
  EXPECT_EQ(y.st, dns::status::nxdomain) << y.text;
}

TEST_F(dns_test, null_mx_is_permanent) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "nullmx.test", dns::kind::mx);
  EXPECT_EQ(x.st, dns::status::null_mx) << x.text;
  EXPECT_TRUE(x.mx.empty());
  EXPECT_TRUE(dns::is_permanent(x.st));
  EXPECT_EQ(r.counters().queries, 1u);  // no fallback to A/AAAA
}

TEST_F(dns_test, mx_nxdomain) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "nx.test", dns::kind::mx);
  EXPECT_EQ(x.st, dns::status::nxdomain) << x.text;
  EXPECT_EQ(r.counters().queries, 1u);  // NXDOMAIN: no fallback either
}

// ---- literals, names, hosts file -------------------------------------------------------------

TEST_F(dns_test, ip_literal_answers_at_once) {
  dns::resolver r;
  start(r, opts());
  box b;
  EXPECT_EQ(r.lookup("192.0.2.9", dns::kind::address, &box::cb, &b), dns::submit::done);
  EXPECT_EQ(r.lookup("[2001:db8::9]", dns::kind::mx, &box::cb, &b), dns::submit::done);
  ASSERT_EQ(b.got.size(), 2u);  // both already delivered, before lookup() returned
  EXPECT_EQ(b.threads[0], std::this_thread::get_id());
  EXPECT_EQ(addrs(b.got[0].addresses), "192.0.2.9");
  EXPECT_EQ(b.got[1].st, dns::status::ok);
  ASSERT_EQ(b.got[1].mx.size(), 1u);
  EXPECT_EQ(addrs(b.got[1].mx[0].addresses), "2001:db8::9");
  EXPECT_EQ(r.counters().queries, 0u);
}

TEST_F(dns_test, bad_name_answers_at_once) {
  dns::resolver r;
  start(r, opts());
  box b;
  EXPECT_EQ(r.lookup("bad..name", dns::kind::address, &box::cb, &b), dns::submit::done);
  EXPECT_EQ(r.lookup("a b\n.test", dns::kind::mx, &box::cb, &b), dns::submit::done);
  ASSERT_EQ(b.got.size(), 2u);
  EXPECT_EQ(b.got[0].st, dns::status::bad_name);
  EXPECT_EQ(b.got[1].st, dns::status::bad_name);
  EXPECT_EQ(b.got[1].text.find('\n'), std::string::npos);  // safe for a log line
  EXPECT_TRUE(dns::is_permanent(dns::status::bad_name));
  EXPECT_EQ(r.counters().queries, 0u);
  EXPECT_EQ(r.counters().outstanding, 0u);
}

TEST_F(dns_test, answers_come_on_the_resolver_thread) {
  dns::resolver r;
  start(r, opts());
  box b;
  ASSERT_EQ(r.lookup("a.test", dns::kind::address, &box::cb, &b), dns::submit::queued);
  ASSERT_TRUE(b.wait(1));
  EXPECT_NE(b.threads[0], std::this_thread::get_id());
}

TEST_F(dns_test, hosts_file_honoured_when_enabled) {
  auto path = g_server->dir / "hosts";
  {
    std::ofstream f(path);
    f << "# a comment 192.0.2.99 a.test\n"
         "192.0.2.77\tmyhost.test  MyAlias # trailing comment\n"
         "2001:db8::77 myhost.test\n"
         "not-an-ip broken.test\n"
         "192.0.2.111 mx1.test\n";
  }
  auto o = opts();
  o.use_hosts = true;
  o.hosts_file = path.string();
  {
    dns::resolver r;
    start(r, o);
    auto x = resolve(r, "myhost.test", dns::kind::address);
    EXPECT_EQ(x.st, dns::status::ok) << x.text;
    EXPECT_EQ(addrs(x.addresses), "192.0.2.77 2001:db8::77");
    auto y = resolve(r, "myalias", dns::kind::address);
    EXPECT_EQ(addrs(y.addresses), "192.0.2.77");
    // A name not in the file goes to DNS.
    auto z = resolve(r, "a.test", dns::kind::address);
    EXPECT_EQ(addrs(z.addresses), "192.0.2.1");
    EXPECT_EQ(r.counters().hosts_hits, 2u);
    EXPECT_EQ(r.counters().queries, 2u);  // only a.test's A and AAAA
    // MX hosts' addresses come from the file too (the domain's MX from DNS).
    auto m = resolve(r, "mx.test", dns::kind::mx);
    ASSERT_EQ(m.mx.size(), 3u);
    EXPECT_EQ(m.mx[1].name, "mx1.test");
    EXPECT_EQ(addrs(m.mx[1].addresses), "192.0.2.111");
  }
  {
    o.use_hosts = false;
    dns::resolver r;
    start(r, o);
    auto x = resolve(r, "myhost.test", dns::kind::address);
    EXPECT_EQ(x.st, dns::status::nxdomain) << x.text;  // dnsmasq does not know it
    EXPECT_EQ(r.counters().hosts_hits, 0u);
  }
}

// ---- the cache --------------------------------------------------------------------------------

TEST_F(dns_test, cache_hits_counted) {
  dns::resolver r;
  start(r, opts());
  resolve(r, "a.test", dns::kind::address);
  auto s1 = r.counters();
  EXPECT_EQ(s1.queries, 2u);
  EXPECT_EQ(s1.cache_hits, 0u);
  EXPECT_EQ(s1.cache_misses, 1u);
  auto x = resolve(r, "a.test", dns::kind::address);
  EXPECT_EQ(addrs(x.addresses), "192.0.2.1");
  auto s2 = r.counters();
  EXPECT_EQ(s2.queries, 2u);
  EXPECT_EQ(s2.cache_hits, 1u);
  // MX: the second lookup asks nothing (the MX list and the hosts' addresses are cached).
  resolve(r, "mx.test", dns::kind::mx);
  uint64_t q = r.counters().queries;
  auto m = resolve(r, "mx.test", dns::kind::mx);
  EXPECT_EQ(m.st, dns::status::ok);
  EXPECT_EQ(m.mx.size(), 3u);
  EXPECT_EQ(r.counters().queries, q);
  // Negative answers are cached too.
  resolve(r, "nx.test", dns::kind::address);
  q = r.counters().queries;
  EXPECT_EQ(resolve(r, "nx.test", dns::kind::address).st, dns::status::nxdomain);
  EXPECT_EQ(r.counters().queries, q);
}

TEST_F(dns_test, concurrent_lookups_share_one_query) {
  dns::resolver r;
  start(r, opts());
  box b;
  for (int i = 0; i < 5; ++i) ASSERT_EQ(r.lookup("both.test", dns::kind::address, &box::cb, &b), dns::submit::queued);
  ASSERT_TRUE(b.wait(5));
  for (auto& x : b.got) EXPECT_EQ(addrs(x.addresses), "192.0.2.2 2001:db8::2");
  auto s = r.counters();
  EXPECT_EQ(s.queries, 2u);
  EXPECT_EQ(s.cache_hits + s.coalesced, 4u);  // which of the two depends on timing
}

TEST_F(dns_test, ttl_expiry_with_injected_clock) {
  dns::resolver r;
  start(r, opts());
  auto x = resolve(r, "short.test", dns::kind::address);  // TTL 7 in the zone
  EXPECT_EQ(x.ttl, 7u);
  EXPECT_EQ(r.counters().queries, 2u);
  g_clock_offset_s = 3;
  auto y = resolve(r, "short.test", dns::kind::address);
  EXPECT_EQ(r.counters().queries, 2u);  // still cached
  ASSERT_EQ(y.addresses.size(), 1u);
  EXPECT_LE(y.addresses[0].ttl, 4u);  // aged
  g_clock_offset_s = 8;
  auto z = resolve(r, "short.test", dns::kind::address);
  EXPECT_EQ(r.counters().queries, 4u);  // expired: asked again
  EXPECT_EQ(z.ttl, 7u);
  // Negative entries expire after negative_ttl.
  resolve(r, "nx.test", dns::kind::address);
  uint64_t q = r.counters().queries;
  g_clock_offset_s = 8 + 61;
  resolve(r, "nx.test", dns::kind::address);
  EXPECT_EQ(r.counters().queries, q + 2);
}

TEST_F(dns_test, ttl_clamps) {
  dns::resolver r;
  auto o = opts();
  o.min_ttl = 30;
  o.max_ttl = 100;
  start(r, o);
  EXPECT_EQ(resolve(r, "a.test", dns::kind::address).ttl, 100u);     // 300 clamped down
  EXPECT_EQ(resolve(r, "short.test", dns::kind::address).ttl, 30u);  // 7 clamped up
  auto m = resolve(r, "mx.test", dns::kind::mx);
  EXPECT_LE(m.ttl, 100u);
  EXPECT_GE(m.ttl, 99u);
}

TEST_F(dns_test, cache_bounded_in_entries) {
  dns::resolver r;
  auto o = opts();
  o.cache_entries = 2;
  start(r, o);
  resolve(r, "a.test", dns::kind::address);
  resolve(r, "aaaa.test", dns::kind::address);
  resolve(r, "both.test", dns::kind::address);
  auto s = r.counters();
  EXPECT_EQ(s.cache_size, 2u);
  EXPECT_EQ(s.evictions, 1u);
}

// ---- the outstanding bound, and stop ------------------------------------------------------------

struct latch_box {
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false, release = false;
  dns::status st = dns::status::error;
  static void cb(void* ctx, dns::result&& r) {
    auto* l = static_cast<latch_box*>(ctx);
    std::unique_lock lk(l->mu);
    l->st = r.st;
    l->entered = true;
    l->cv.notify_all();
    l->cv.wait(lk, [&] { return l->release; });
  }
};

TEST_F(dns_test, outstanding_bound_refuses_when_full) {
  dns::resolver r;
  auto o = opts();
  o.max_outstanding = 2;
  o.query_timeout = 10000ms;  // the slow one stays outstanding until stop()
  o.tries = 1;
  start(r, o);
  latch_box held;  // its callback blocks until released: one lookup held outstanding
  box slow;
  ASSERT_EQ(r.lookup("a.test", dns::kind::address, &latch_box::cb, &held), dns::submit::queued);
  ASSERT_EQ(r.lookup("host.slow.test", dns::kind::address, &box::cb, &slow), dns::submit::queued);
  box third;
  EXPECT_EQ(r.lookup("both.test", dns::kind::address, &box::cb, &third), dns::submit::full);
  EXPECT_EQ(r.counters().refused_full, 1u);
  EXPECT_EQ(r.counters().outstanding, 2u);
  // Literals need no slot.
  EXPECT_EQ(r.lookup("192.0.2.1", dns::kind::address, &box::cb, &third), dns::submit::done);
  {
    std::unique_lock lk(held.mu);
    ASSERT_TRUE(held.cv.wait_for(lk, 30s, [&] { return held.entered; }));
    EXPECT_EQ(held.st, dns::status::ok);
    held.release = true;
    held.cv.notify_all();
  }
  // The slot frees once the callback has returned.
  for (int i = 0; i < 3000 && r.counters().outstanding != 1; ++i) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(r.counters().outstanding, 1u);
  ASSERT_EQ(r.lookup("both.test", dns::kind::address, &box::cb, &third), dns::submit::queued);
  ASSERT_TRUE(third.wait(2));
  EXPECT_EQ(third.got[1].st, dns::status::ok);
  // stop() answers what is still in flight with shutdown, before it returns.
  r.stop();
  ASSERT_EQ(slow.got.size(), 1u);
  EXPECT_EQ(slow.got[0].st, dns::status::shutdown);
  EXPECT_EQ(r.lookup("a.test", dns::kind::address, &box::cb, &slow), dns::submit::stopped);
}

TEST_F(dns_test, servers_from_resolv_conf) {
  // No servers override: the servers come from the resolv.conf (a temporary one here;
  // /etc/resolv.conf in production). resolv.conf has no port: default_port gives it.
  auto path = g_server->dir / "resolv.conf";
  {
    std::ofstream f(path);
    f << "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n";
  }
  dns::resolver r;
  auto o = opts();
  o.servers.clear();
  o.resolv_conf = path.string();
  o.default_port = g_server->port;
  start(r, o);
  auto x = resolve(r, "a.test", dns::kind::address);
  EXPECT_EQ(x.st, dns::status::ok) << x.text;
  EXPECT_EQ(addrs(x.addresses), "192.0.2.1");
}

TEST_F(dns_test, start_rejects_bad_server) {
  dns::resolver r;
  auto o = opts();
  o.servers = {"not an address"};
  std::string err;
  EXPECT_FALSE(r.start(o, err));
  EXPECT_NE(err.find("servers"), std::string::npos) << err;
}

// ---- pure helpers (no server needed) -------------------------------------------------------------

TEST(dns_name, normalise) {
  std::string out;
  EXPECT_TRUE(dns::normalise_name("Mail.Example.COM.", out));
  EXPECT_EQ(out, "mail.example.com");
  EXPECT_TRUE(dns::normalise_name("_srv.x-y.example", out));
  EXPECT_FALSE(dns::normalise_name("", out));
  EXPECT_FALSE(dns::normalise_name(".", out));
  EXPECT_FALSE(dns::normalise_name("a..b", out));
  EXPECT_FALSE(dns::normalise_name(".a", out));
  EXPECT_FALSE(dns::normalise_name("a b", out));
  EXPECT_FALSE(dns::normalise_name(std::string_view("a\0b", 3), out));
  EXPECT_FALSE(dns::normalise_name(std::string(64, 'a') + ".example", out));
  EXPECT_TRUE(dns::normalise_name(std::string(63, 'a') + ".example", out));
  std::string long_name;
  for (int i = 0; i < 64; ++i) long_name += "abc.";
  long_name += "x";  // 257 characters
  EXPECT_FALSE(dns::normalise_name(long_name, out));
}

TEST(dns_ttl, min_answer_ttl_bounds_checked) {
  // Header (1 question, 2 answers), question mx.test MX, two MX answers with compressed
  // owner names: TTL 300 and TTL 120.
  std::vector<unsigned char> m = {0x12, 0x34, 0x85, 0x80, 0, 1, 0, 2, 0, 0, 0, 0,
                                  2, 'm', 'x', 4, 't', 'e', 's', 't', 0, 0, 15, 0, 1};
  auto rr = [&](uint32_t ttl) {
    unsigned char r[] = {0xC0, 12, 0, 15, 0, 1, uint8_t(ttl >> 24), uint8_t(ttl >> 16), uint8_t(ttl >> 8),
                         uint8_t(ttl), 0, 4, 0, 10, 0xC0, 12};
    m.insert(m.end(), r, r + sizeof r);
  };
  rr(300);
  rr(120);
  uint32_t ttl = 0;
  ASSERT_TRUE(dns::min_answer_ttl(m.data(), m.size(), 15, ttl));
  EXPECT_EQ(ttl, 120u);
  EXPECT_FALSE(dns::min_answer_ttl(m.data(), m.size(), 1, ttl));  // no A records
  // Every truncation is refused without reading past the end (ASan checks the reads).
  for (size_t n = 0; n < m.size(); ++n) {
    std::vector<unsigned char> t(m.begin(), m.begin() + n);
    uint32_t v = 0;
    bool ok = dns::min_answer_ttl(t.data(), t.size(), 15, v);
    if (ok) {
      EXPECT_EQ(v, 300u) << n;  // only the first record complete
    }
  }
  // A label length running past the end.
  std::vector<unsigned char> bad = {0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 60, 'a'};
  EXPECT_FALSE(dns::min_answer_ttl(bad.data(), bad.size(), 15, ttl));
}

}  // namespace
