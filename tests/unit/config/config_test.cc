#include "src/config/config.hh"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "spool/record.hh"
#include "tern_build.hh"

using namespace tern::config;

namespace {
std::string error_of(const std::string& text) {
  std::string err;
  auto c = load_string(text, "t.toml", err);
  EXPECT_FALSE(c) << "accepted: " << text;
  return err;
}
}  // namespace

TEST(Config, EmbeddedDefault) {
  std::string err;
  // The default relays to tools/run-relay.sh's local sink and needs its CA file, relative to
  // the working directory: without it the error says where it comes from.
  auto missing = load_string(embedded_default, "(embedded default)", err);
  if (access("var/tls/ca.pem", R_OK) != 0) {
    EXPECT_FALSE(missing);
    EXPECT_NE(err.find("smarthost.ca_file: cannot read \"var/tls/ca.pem\" (tools/run-relay.sh makes it"),
              std::string::npos)
        << err;
  }
  char tmpl[] = "/tmp/tern-cfg-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  char old[4096];
  ASSERT_NE(getcwd(old, sizeof old), nullptr);
  ASSERT_EQ(chdir(tmpl), 0);
  mkdir("var", 0700);
  mkdir("var/tls", 0700);
  { std::ofstream("var/tls/ca.pem") << "-----BEGIN CERTIFICATE-----\n"; }
  auto c = load_string(embedded_default, "(embedded default)", err);
  EXPECT_EQ(chdir(old), 0);
  std::filesystem::remove_all(tmpl);
  ASSERT_TRUE(c) << err;
  ASSERT_EQ(c->smarthosts.size(), 1u);
  EXPECT_EQ(c->smarthosts[0].port, 2526);
  EXPECT_EQ(c->smarthosts[0].tls, tls_policy::verify);
  ASSERT_EQ(c->listen.size(), 1u);
  EXPECT_EQ(c->listen[0].address.to_string(), "127.0.0.1:2525");
  EXPECT_EQ(c->relay.networks.size(), 2u);
  EXPECT_EQ(c->spool.dir, "var/spool");
  EXPECT_EQ(c->limits.message_size, 10u * 1024 * 1024);
}

TEST(Config, FullFile) {
  std::string err;
  auto c = load_string(R"(
hostname = "relay.example.net"
shards = 2
[spool]
dir = "/var/spool/tern"
[[listen]]
address = "0.0.0.0:25"
[[listen]]
address = "[::]:2526"
proxy_protocol = true
trusted_proxies = ["198.18.0.0/15", "::1"]
proxy_timeout = 3
[relay]
networks = ["10.0.0.0/8"]
domains = ["Example.COM", ".sub.example.org"]
[limits]
message_size = 1048576
recipients = 50
errors = 5
)", "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_EQ(c->hostname, "relay.example.net");
  EXPECT_EQ(c->shards, 2u);
  ASSERT_EQ(c->listen.size(), 2u);
  EXPECT_TRUE(c->listen[1].proxy_protocol);
  EXPECT_EQ(c->listen[1].proxy_timeout_ms, 3000u);
  EXPECT_EQ(c->relay.domains[0], "example.com");
  EXPECT_EQ(c->limits.recipients, 50u);
}

TEST(Config, ErrorsNameFileLineAndKey) {
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[limits]\nmessage_size = \"big\"\n"),
            "t.toml:4: limits.message_size: expected an integer");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"localhost:25\"\n"),
            "t.toml:2: listen.address: \"localhost:25\" is not IP:PORT or [IPv6]:PORT (names are not resolved)");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\nproxy_protcol = true\n"),
            "t.toml:3: listen.proxy_protcol: unknown key");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[relay]\nnetworks = [\"10.1.2.3/8\"]\n"),
            "t.toml:4: relay.networks: \"10.1.2.3/8\" is not a network (address/prefix with the host bits zero)");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\nproxy_protocol = true\n"),
            "t.toml:3: listen.trusted_proxies: proxy_protocol = true needs trusted_proxies (the addresses of the proxies)");
  EXPECT_EQ(error_of("shards = 1\n"), "t.toml:1: listen: at least one [[listen]] is required");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[limits]\nrecipients = 0\n"),
            "t.toml:4: limits.recipients: must be between 1 and 100000");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[tuning]\nrecv_buffers = 100\n"),
            "t.toml:4: tuning.recv_buffers: must be a power of two");
  std::string syn = error_of("[[listen]\naddress = 1\n");
  EXPECT_EQ(syn.rfind("t.toml:1: (syntax): ", 0), 0u) << syn;
}

TEST(Config, SpoolFsync) {
  std::string err;
  auto c = load_string("[[listen]]\naddress = \"127.0.0.1:25\"\n", "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_TRUE(c->spool.fsync);  // the default is durable
  c = load_string("[spool]\nfsync = false\n[[listen]]\naddress = \"127.0.0.1:25\"\n", "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_FALSE(c->spool.fsync);
  EXPECT_EQ(error_of("[spool]\nfsync = \"no\"\n[[listen]]\naddress = \"127.0.0.1:25\"\n"),
            "t.toml:2: spool.fsync: expected true or false");
  EXPECT_EQ(c->spool.max_batch_bytes, 64u << 20);
  EXPECT_EQ(error_of("[spool]\nmax_batch_bytes = 1000\n[[listen]]\naddress = \"127.0.0.1:25\"\n"),
            "t.toml:2: spool.max_batch_bytes: must be between 1048576 and 1073741824");
}

TEST(Config, IdlePoll) {
  std::string err;
  auto c = load_string("[[listen]]\naddress = \"127.0.0.1:25\"\n", "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_EQ(c->tuning.idle_poll_us, 100u);
  c = load_string("[[listen]]\naddress = \"127.0.0.1:25\"\n[tuning]\nidle_poll_us = 0\n", "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_EQ(c->tuning.idle_poll_us, 0u);
  c = load_string("[[listen]]\naddress = \"127.0.0.1:25\"\n[tuning]\nidle_poll_us = 10000\n", "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_EQ(c->tuning.idle_poll_us, 10000u);
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[tuning]\nidle_poll_us = 10001\n"),
            "t.toml:4: tuning.idle_poll_us: must be between 0 and 10000");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[tuning]\nidle_poll_us = -1\n"),
            "t.toml:4: tuning.idle_poll_us: must be between 0 and 10000");
}

// The largest message that can get a 250 must fit the spool reader's record bound: the
// config check refuses a message_size whose record could exceed it, at the exact edge.
TEST(Config, MessageSizeFitsTheSpoolRecordBound) {
  uint64_t top = tern::spool::max_message_size_for(1000, 2048);
  auto cfg = [](uint64_t size) {
    return "[[listen]]\naddress = \"127.0.0.1:25\"\n[limits]\nmessage_size = " + std::to_string(size) +
           "\nrecipients = 1000\nline_length = 2048\n";
  };
  std::string err;
  auto c = load_string(cfg(top), "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_LE(tern::spool::max_record_for(c->limits.message_size, c->limits.recipients, c->limits.line_length) -
                tern::spool::record_header_size,
            uint64_t(tern::spool::max_record_len));
  std::string e = error_of(cfg(top + 1));
  EXPECT_EQ(e.rfind("t.toml:4: limits.message_size: a message of " + std::to_string(top + 1), 0), 0u) << e;
  EXPECT_NE(e.find("the largest message_size for these limits is " + std::to_string(top)), std::string::npos) << e;
  // Many long recipients shrink the room for content.
  e = error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[limits]\nrecipients = 100000\nline_length = 65536\n");
  EXPECT_EQ(e.rfind("t.toml:4: limits.message_size: ", 0), 0u) << e;
}

TEST(Config, MissingFile) {
  std::string err;
  EXPECT_FALSE(load_file("/nonexistent/tern.toml", err));
  EXPECT_EQ(err, "/nonexistent/tern.toml:0: (file): cannot open: No such file or directory");
}

TEST(Config, ListenerPolicyKeysAndJunkLimit) {
  std::string err;
  auto c = load_string(R"(
[[listen]]
address = "127.0.0.1:25"
allow_bare_lf = true
[[listen]]
address = "127.0.0.1:26"
proxy_protocol = true
trusted_proxies = ["127.0.0.1"]
local_relay = true
[limits]
junk_commands = 7
recipient_overshoot = 0
)", "t.toml", err);
  ASSERT_TRUE(c) << err;
  EXPECT_TRUE(c->listen[0].allow_bare_lf);
  EXPECT_FALSE(c->listen[0].local_relay);
  EXPECT_FALSE(c->listen[1].allow_bare_lf);
  EXPECT_TRUE(c->listen[1].local_relay);
  EXPECT_EQ(c->limits.junk_commands, 7u);
  EXPECT_EQ(c->limits.recipient_overshoot, 0u);
  // Defaults.
  auto d = load_string("[[listen]]\naddress = \"127.0.0.1:25\"\n", "t.toml", err);
  ASSERT_TRUE(d) << err;
  EXPECT_FALSE(d->listen[0].allow_bare_lf);
  EXPECT_FALSE(d->listen[0].local_relay);
  EXPECT_EQ(d->limits.junk_commands, 100u);
  EXPECT_EQ(d->limits.recipient_overshoot, 1000u);
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\nlocal_relay = true\n"),
            "t.toml:3: listen.local_relay: only meaningful with proxy_protocol = true");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[limits]\njunk_commands = 0\n"),
            "t.toml:4: limits.junk_commands: must be between 1 and 100000");
}

TEST(Config, OverlappingListenersAreRefused) {
  EXPECT_EQ(error_of("[[listen]]\naddress = \"127.0.0.1:25\"\n[[listen]]\naddress = \"127.0.0.1:25\"\n"),
            "t.toml:4: listen.address: \"127.0.0.1:25\" overlaps the listener \"127.0.0.1:25\" at line 1 "
            "(same port, same or wildcard address)");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"0.0.0.0:25\"\n\n[[listen]]\naddress = \"127.0.0.1:25\"\n"),
            "t.toml:5: listen.address: \"127.0.0.1:25\" overlaps the listener \"0.0.0.0:25\" at line 1 "
            "(same port, same or wildcard address)");
  EXPECT_EQ(error_of("[[listen]]\naddress = \"[2001:db8::1]:25\"\n[[listen]]\naddress = \"[::]:25\"\n"),
            "t.toml:4: listen.address: \"[::]:25\" overlaps the listener \"[2001:db8::1]:25\" at line 1 "
            "(same port, same or wildcard address)");
  // The same address spelled differently is the same listener.
  EXPECT_NE(error_of("[[listen]]\naddress = \"[::1]:25\"\n[[listen]]\naddress = \"[0:0::1]:25\"\n").find("overlaps"),
            std::string::npos);
  // Different ports, different specific addresses, [::] vs 0.0.0.0 (IPv6 sockets are
  // V6ONLY) and port 0 (each listener gets its own free port) do not overlap.
  std::string err;
  EXPECT_TRUE(load_string("[[listen]]\naddress = \"0.0.0.0:25\"\n[[listen]]\naddress = \"0.0.0.0:587\"\n"
                          "[[listen]]\naddress = \"[::]:25\"\n[[listen]]\naddress = \"127.0.0.1:2525\"\n"
                          "[[listen]]\naddress = \"127.0.0.2:2525\"\n"
                          "[[listen]]\naddress = \"127.0.0.1:0\"\n[[listen]]\naddress = \"127.0.0.1:0\"\n",
                          "t.toml", err))
      << err;
}

TEST(Config, HostnameAndRelayDomainsMustBeDnsNames) {
  const char* L = "[[listen]]\naddress = \"127.0.0.1:25\"\n";
  EXPECT_EQ(error_of(std::string("hostname = \"mx_1.example.net\"\n") + L),
            "t.toml:1: hostname: \"mx_1.example.net\" is not a valid DNS host name (labels of letters, digits "
            "and '-', 1 to 63 bytes, 253 in all)");
  for (const char* bad : {"-mx.example.net", "mx-.example.net", "mx..example.net", ".example.net",
                          "example.net.", "mx example.net", "exa(mple).net", ""})
    EXPECT_NE(error_of(std::string("hostname = \"") + bad + "\"\n" + L).find("t.toml:1: hostname: "),
              std::string::npos)
        << bad;
  std::string long_label(64, 'a');
  EXPECT_NE(error_of("hostname = \"" + long_label + ".example\"\n" + L).find("hostname:"), std::string::npos);
  EXPECT_EQ(error_of(std::string(L) + "[relay]\ndomains = [\"ok.example\", \"bad_domain.example\"]\n"),
            "t.toml:4: relay.domains: \"bad_domain.example\" is not a valid DNS domain name (\".example.org\" "
            "for subdomains)");
  EXPECT_NE(error_of(std::string(L) + "[relay]\ndomains = [\"..example.org\"]\n").find("relay.domains"),
            std::string::npos);
  EXPECT_NE(error_of(std::string(L) + "[relay]\ndomains = [\"a;b.example\"]\n").find("relay.domains"),
            std::string::npos);
  std::string err;
  EXPECT_TRUE(load_string(std::string("hostname = \"mx-1.Example.NET\"\n") + L +
                              "[relay]\ndomains = [\".sub.example.org\", \"x1.example\"]\n",
                          "t.toml", err))
      << err;
}

TEST(Config, ValidDnsName) {
  EXPECT_TRUE(valid_dns_name("a"));
  EXPECT_TRUE(valid_dns_name("localhost"));
  EXPECT_TRUE(valid_dns_name("xn--bcher-kva.example"));
  EXPECT_TRUE(valid_dns_name(std::string(63, 'a') + ".b"));
  EXPECT_FALSE(valid_dns_name(std::string(64, 'a') + ".b"));
  std::string n;
  for (int i = 0; i < 25; ++i) n += "abcdefghi.";
  n += "abc";
  ASSERT_EQ(n.size(), 253u);
  EXPECT_TRUE(valid_dns_name(n)) << n;
  EXPECT_FALSE(valid_dns_name(n + "x"));
  EXPECT_FALSE(valid_dns_name("a.-b"));
  EXPECT_FALSE(valid_dns_name("a.b-"));
  EXPECT_FALSE(valid_dns_name("1.2.3.4]"));
  EXPECT_FALSE(valid_dns_name("caf\xc3\xa9.example"));  // U-labels: write the A-label
}

// --- delivery: [[smarthost]], [[route]], [queue], [dns] -------------------------------------

namespace {
const char* base_cfg = "[[listen]]\naddress = \"127.0.0.1:0\"\n";
std::optional<tern::config::config> load_ok(const std::string& extra) {
  std::string err;
  auto c = load_string(std::string(base_cfg) + extra, "t.toml", err);
  EXPECT_TRUE(c) << err;
  return c;
}
std::string delivery_error(const std::string& extra) { return error_of(std::string(base_cfg) + extra); }
}  // namespace

TEST(ConfigDelivery, Durations) {
  EXPECT_EQ(parse_duration_ms("30s"), 30000u);
  EXPECT_EQ(parse_duration_ms("5m"), 300000u);
  EXPECT_EQ(parse_duration_ms("2h"), 7200000u);
  EXPECT_EQ(parse_duration_ms("5d"), 432000000u);
  EXPECT_EQ(parse_duration_ms("250ms"), 250u);
  EXPECT_EQ(parse_duration_ms("42"), 42000u);
  EXPECT_FALSE(parse_duration_ms(""));
  EXPECT_FALSE(parse_duration_ms("m"));
  EXPECT_FALSE(parse_duration_ms("5w"));
  EXPECT_FALSE(parse_duration_ms("-5s"));
  EXPECT_FALSE(parse_duration_ms("99999999999999999999s"));
}

TEST(ConfigDelivery, DomainMatches) {
  EXPECT_TRUE(domain_matches("example.com", "example.com"));
  EXPECT_FALSE(domain_matches("sub.example.com", "example.com"));
  EXPECT_TRUE(domain_matches("sub.example.com", ".example.com"));
  EXPECT_FALSE(domain_matches("example.com", ".example.com"));
  EXPECT_FALSE(domain_matches("badexample.com", ".example.com"));
}

TEST(ConfigDelivery, DefaultsAndWarnings) {
  auto c = load_ok("");
  ASSERT_TRUE(c);
  EXPECT_TRUE(c->smarthosts.empty());
  EXPECT_EQ(c->queue.retry_s, (std::vector<uint32_t>{60, 300, 900, 3600}));
  EXPECT_EQ(c->queue.max_lifetime_s, 5u * 86400);
  EXPECT_EQ(c->queue.delay_warning_s, 0u);
  ASSERT_EQ(c->warnings.size(), 1u);
  EXPECT_NE(c->warnings[0].find("stays queued"), std::string::npos);
}

TEST(ConfigDelivery, SmarthostsRoutesQueue) {
  auto c = load_ok(R"(
[[smarthost]]
host = "EU-SMTP-O.mimecast.com"
priority = 10
[[smarthost]]
host = "192.0.2.25"
port = 587
tls = "verify"
verify_name = "relay.example.net"
weight = 3
source_address = "198.18.0.5"
[[route]]
domains = ["internal.example", ".corp.example"]
host = "10.1.2.3"
port = 1025
tls = "none"
[[route]]
domains = ["mbox.example"]
host = "lmtp.example"
port = 24
protocol = "lmtp"
tls = "may"
[queue]
retry = ["30s", "2m", 600]
max_lifetime = "2d"
delay_warning = "4h"
concurrency = 5
messages_per_connection = 50
connect_timeout = "10s"
[dns]
servers = ["127.0.0.1:5353", "::1"]
use_hosts = false
timeout = "500ms"
)");
  ASSERT_TRUE(c);
  ASSERT_EQ(c->smarthosts.size(), 2u);
  EXPECT_EQ(c->smarthosts[0].host, "eu-smtp-o.mimecast.com");
  EXPECT_FALSE(c->smarthosts[0].host_is_ip);
  EXPECT_EQ(c->smarthosts[0].port, 25);
  EXPECT_EQ(c->smarthosts[0].tls, tls_policy::verify);
  EXPECT_TRUE(c->smarthosts[0].tls_min_13);
  EXPECT_TRUE(c->smarthosts[1].host_is_ip);
  EXPECT_EQ(c->smarthosts[1].weight, 3u);
  ASSERT_EQ(c->routes.size(), 2u);
  EXPECT_EQ(c->routes[0].domains[1], ".corp.example");
  EXPECT_EQ(c->routes[0].hop.tls, tls_policy::none);
  EXPECT_EQ(c->routes[1].hop.protocol, next_hop_protocol::lmtp);
  EXPECT_EQ(c->queue.retry_s, (std::vector<uint32_t>{30, 120, 600}));
  EXPECT_EQ(c->queue.max_lifetime_s, 2u * 86400);
  EXPECT_EQ(c->queue.delay_warning_s, 4u * 3600);
  EXPECT_EQ(c->queue.connect_timeout_s, 10u);
  EXPECT_EQ(c->dns.servers.size(), 2u);
  EXPECT_FALSE(c->dns.use_hosts);
  EXPECT_EQ(c->dns.timeout_ms, 500u);
  EXPECT_TRUE(c->warnings.empty()) << c->warnings[0];
}

TEST(ConfigDelivery, Refusals) {
  // Every refusal names the file, the line and the key.
  EXPECT_EQ(delivery_error("[[smarthost]]\nport = 25\n").rfind("t.toml:3: smarthost.host: missing", 0), 0u);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"bad_name!\"\n").find("t.toml:4: smarthost.host:"), std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\ntls = \"maybe\"\n").find("smarthost.tls: expected"),
            std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\ntls_min_version = \"1.1\"\n")
                .find("smarthost.tls_min_version"), std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\nport = 0\n").find("smarthost.port: must be between 1"),
            std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\ncolour = 1\n").find("smarthost.colour: unknown key"),
            std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"192.0.2.1\"\n").find("smarthost.verify_name"), std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"192.0.2.1\"\nmx = true\ntls = \"encrypt\"\n").find("smarthost.mx"),
            std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\nauth_user = \"u\"\n").find("auth_password_file"),
            std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\nauth_user = \"u\"\nauth_password_file = \"/etc/hostname\"\n"
                           "tls = \"may\"\n").find("only sent inside TLS"), std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\nca_file = \"/nonexistent/ca.pem\"\n")
                .find("smarthost.ca_file: cannot read"), std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\nprotocol = \"lmtp\"\n").find("[[route]]"),
            std::string::npos);
  EXPECT_NE(delivery_error("[[smarthost]]\nhost = \"a.example\"\nsource_address = \"nope\"\n")
                .find("smarthost.source_address"), std::string::npos);
  EXPECT_NE(delivery_error("[[route]]\nhost = \"a.example\"\n").find("route.domains: a route needs"), std::string::npos);
  EXPECT_NE(delivery_error("[[route]]\ndomains = [\"-x.example\"]\nhost = \"a.example\"\n").find("route.domains"),
            std::string::npos);
  EXPECT_NE(delivery_error("[queue]\nretry = []\n").find("queue.retry"), std::string::npos);
  EXPECT_NE(delivery_error("[queue]\nretry = [\"1m\", \"soon\"]\n").find("t.toml:4: queue.retry: \"soon\" is not a duration"),
            std::string::npos);
  EXPECT_NE(delivery_error("[queue]\nretry = [\"0s\"]\n").find("queue.retry: must be between 1s"), std::string::npos);
  EXPECT_NE(delivery_error("[queue]\nmax_lifetime = \"1h\"\ndelay_warning = \"2h\"\n").find("queue.delay_warning"),
            std::string::npos);
  EXPECT_NE(delivery_error("[queue]\nconnect_timeout = \"1500ms\"\n").find("whole number of seconds"), std::string::npos);
  EXPECT_NE(delivery_error("[dns]\nservers = [\"dns.example\"]\n").find("dns.servers"), std::string::npos);
  EXPECT_NE(error_of(std::string("smarthost = 1\n") + base_cfg).find("smarthost: expected [[smarthost]]"), std::string::npos);
}

TEST(ConfigDelivery, ClearTextSmarthostWarns) {
  auto c = load_ok("[[smarthost]]\nhost = \"a.example\"\ntls = \"may\"\n");
  ASSERT_TRUE(c);
  ASSERT_EQ(c->warnings.size(), 1u);
  EXPECT_NE(c->warnings[0].find("t.toml:3: smarthost.tls"), std::string::npos);
}

// --- [ha] -------------------------------------------------------------------------------------

namespace {
const char* ha_min = "[ha]\ninterface = \"eth0\"\nvrid = 51\nvirtual_addresses = [\"198.18.0.100/24\"]\n";
}  // namespace

TEST(ConfigHa, DefaultsAndFullTable) {
  auto none = load_ok("");
  ASSERT_TRUE(none);
  EXPECT_FALSE(none->ha.enabled);
  auto c = load_ok(ha_min);
  ASSERT_TRUE(c);
  const auto& h = c->ha;
  EXPECT_TRUE(h.enabled);
  EXPECT_EQ(h.interface, "eth0");
  EXPECT_EQ(h.vrid, 51);
  EXPECT_EQ(h.priority, 100);
  EXPECT_EQ(h.advert_interval_ms, 1000u);
  ASSERT_EQ(h.virtual_addresses.size(), 1u);
  EXPECT_EQ(h.virtual_addresses[0].prefix, 24);
  EXPECT_EQ(h.virtual_addresses[0].bytes[3], 100);  // host bits kept: it is an address, not a network
  EXPECT_TRUE(h.preempt);
  EXPECT_FALSE(h.dpdk);
  EXPECT_EQ(h.garp_burst, 5u);
  EXPECT_EQ(h.garp_refresh_ms, 60000u);
  EXPECT_EQ(h.health_priority_drop, 0u);
  EXPECT_EQ(h.heartbeat_timeout_ms, 1000u);
  EXPECT_EQ(h.address_lifetime_s, 5u);
  // No listener on the address or on 0.0.0.0: warned, not refused.
  bool warned = false;
  for (auto& w : c->warnings) warned = warned || w.find("ha.virtual_addresses: no [[listen]]") != std::string::npos;
  EXPECT_TRUE(warned);

  std::string err;
  auto f = load_string(R"([[listen]]
address = "198.18.0.100:25"
[ha]
interface = "veth-a"
vrid = 7
priority = 255
advert_interval = "10ms"
virtual_addresses = ["198.18.0.100/24", "198.18.0.101"]
preempt = false
preempt_delay = "250ms"
unicast_peers = ["198.18.0.12"]
use_vmac = true
garp_burst = 2
garp_refresh = "0s"
health_priority_drop = 60
heartbeat_timeout = "500ms"
)", "t.toml", err);
  ASSERT_TRUE(f) << err;
  EXPECT_EQ(f->ha.advert_interval_ms, 10u);
  EXPECT_EQ(f->ha.virtual_addresses[1].prefix, 32);
  EXPECT_EQ(f->ha.preempt_delay_ms, 250u);
  EXPECT_EQ(f->ha.unicast_peers.size(), 1u);
  EXPECT_TRUE(f->ha.use_vmac);
  EXPECT_EQ(f->ha.garp_refresh_ms, 0u);
  EXPECT_EQ(f->ha.health_priority_drop, 60u);
  EXPECT_EQ(f->ha.heartbeat_timeout_ms, 500u);
  for (auto& w : f->warnings) EXPECT_EQ(w.find("ha."), std::string::npos) << w;
}

TEST(ConfigHa, RefusalsNameFileLineAndKey) {
  auto e = [](const std::string& extra) { return delivery_error(extra); };
  EXPECT_EQ(e("[ha]\nvrid = 1\nvirtual_addresses = [\"198.18.0.100\"]\n").rfind("t.toml:3: ha.interface: is required", 0), 0u);
  EXPECT_NE(e("[ha]\ninterface = \"eth0\"\nvirtual_addresses = [\"198.18.0.100\"]\n").find("ha.vrid: is required"), std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"eth0\"\nvrid = 1\n").find("ha.virtual_addresses: is required"), std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"eth0\"\nvrid = 256\nvirtual_addresses = [\"198.18.0.100\"]\n")
                .find("t.toml:5: ha.vrid: must be between 1 and 255"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "priority = 0\n").find("t.toml:7: ha.priority: must be between 1 and 255"),
            std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "advert_interval = \"5ms\"\n").find("ha.advert_interval: must be between \"10ms\""),
            std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "advert_interval = \"15ms\"\n").find("centiseconds"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "advert_interval = \"41s\"\n").find("ha.advert_interval"), std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"eth0\"\nvrid = 1\nvirtual_addresses = [\"2001:db8::1/64\"]\n")
                .find("ha.virtual_addresses: \"2001:db8::1/64\" is not an IPv4"), std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"eth0\"\nvrid = 1\nvirtual_addresses = [\"198.18.0.1/33\"]\n")
                .find("ha.virtual_addresses"), std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"eth0\"\nvrid = 1\nvirtual_addresses = [\"198.18.0.1\", \"198.18.0.1/24\"]\n")
                .find("listed twice"), std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"eth0\"\nvrid = 1\nvirtual_addresses = []\n").find("ha.virtual_addresses: expected"),
            std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"a/b\"\nvrid = 1\nvirtual_addresses = [\"198.18.0.1\"]\n").find("ha.interface"),
            std::string::npos);
  EXPECT_NE(e("[ha]\ninterface = \"abcdefghijklmnop\"\nvrid = 1\nvirtual_addresses = [\"198.18.0.1\"]\n")
                .find("ha.interface"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "backend = \"xdp\"\n").find("ha.backend: \"xdp\": expected"), std::string::npos);
  {
    auto k = load_ok(std::string(ha_min) + "dpdk_args = \"-l 1\"\n");
    ASSERT_TRUE(k);
    bool warned = false;
    for (auto& w : k->warnings) warned = warned || w.find("t.toml:7: ha.dpdk_args: ignored") != std::string::npos;
    EXPECT_TRUE(warned);
  }
  EXPECT_NE(e(std::string(ha_min) + "unicast_peers = [\"peer\"]\n").find("ha.unicast_peers: \"peer\" is not"),
            std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "garp_burst = 0\n").find("ha.garp_burst"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "garp_refresh = \"100ms\"\n").find("ha.garp_refresh: must be 0"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "health_priority_drop = 255\n").find("ha.health_priority_drop"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "heartbeat_timeout = \"50ms\"\n").find("ha.heartbeat_timeout"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "colour = 1\n").find("ha.colour: unknown key"), std::string::npos);
  EXPECT_NE(e(std::string(ha_min) + "address_lifetime = \"1s\"\n").find("ha.address_lifetime: must be 0"), std::string::npos);
  EXPECT_EQ(load_ok(std::string(ha_min) + "address_lifetime = \"0s\"\n")->ha.address_lifetime_s, 0u);
#if TERN_HAVE_DPDK
  EXPECT_NE(e(std::string(ha_min) + "backend = \"dpdk\"\nunicast_peers = [\"198.18.0.2\"]\n")
                .find("ha.unicast_peers: not supported with backend = \"dpdk\""), std::string::npos);
#endif
}
