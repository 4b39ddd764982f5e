// Micro benchmarks of the per-connection and per-message parsers.
#include <benchmark/benchmark.h>

#include <cstring>
#include <string>

#include "net/proxy.hh"
#include "src/core/log.hh"
#include "src/smtp/command.hh"
#include "src/smtp/data.hh"
#include "src/smtp/session.hh"

using namespace tern;

static void BM_ProxyV1(benchmark::State& st) {
  std::string h = "PROXY TCP4 198.18.0.1 198.18.0.2 40000 25\r\n";
  net::proxy_header out;
  for (auto _ : st) {
    auto r = net::parse_proxy({reinterpret_cast<const unsigned char*>(h.data()), h.size()}, out);
    benchmark::DoNotOptimize(r);
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_ProxyV1);

static void BM_ProxyV2Crc(benchmark::State& st) {
  std::string h = net::encode_proxy_v2(*net::address::from_ip("198.18.0.1", 40000),
                                       *net::address::from_ip("198.18.0.2", 25), false, true);
  net::proxy_header out;
  for (auto _ : st) {
    auto r = net::parse_proxy({reinterpret_cast<const unsigned char*>(h.data()), h.size()}, out);
    benchmark::DoNotOptimize(r);
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_ProxyV2Crc);

static void BM_MailFrom(benchmark::State& st) {
  std::string_view arg = "FROM:<sender.name@example.org> SIZE=2048 BODY=8BITMIME RET=HDRS ENVID=abc123";
  smtp::mail_args a;
  for (auto _ : st) {
    auto c = smtp::parse_command("MAIL FROM:<x@y>");
    benchmark::DoNotOptimize(c);
    benchmark::DoNotOptimize(smtp::parse_mail(arg, a));
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_MailFrom);

static void BM_DotDecoder(benchmark::State& st) {
  std::string msg = "Subject: bench\r\n\r\n";
  while (msg.size() < static_cast<size_t>(st.range(0))) msg += std::string(76, 'x') + "\r\n";
  msg += ".\r\n";
  std::string out;
  out.reserve(msg.size());
  smtp::dot_decoder d;
  for (auto _ : st) {
    out.clear();
    d.reset(1 << 30);
    benchmark::DoNotOptimize(d.feed(msg.data(), msg.size(), out));
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * int64_t(msg.size()));
}
BENCHMARK(BM_DotDecoder)->Arg(2048)->Arg(65536);

namespace {
struct bench_host : smtp::session_host {
  void new_queue_id(char (&out)[smtp::queue_id_len + 1]) override { memcpy(out, "0000000000000000AA", 19); }
  bool spool_healthy() const override { return true; }
  uint64_t wall_us() const override { return 1'700'000'000'000'000ull; }
};
}  // namespace

// One whole pipelined transaction through the session state machine (no I/O): the
// protocol cost per message, including building the spool record.
static void BM_SessionTransaction(benchmark::State& st) {
  log::set_level(log::level::warning);  // the per-message log line is not what is measured
  smtp::policy pol;
  pol.hostname = "relay.test";
  pol.relay_networks.push_back(*net::cidr::parse("127.0.0.0/8"));
  bench_host host;
  smtp::session s;
  smtp::conn_info ci;
  ci.client = ci.peer = *net::address::from_ip("127.0.0.1", 1);
  s.reset(&pol, &host, ci);
  s.start();
  std::string sink;
  s.take_output(sink);
  std::string ehlo = "EHLO bench\r\n";
  s.feed(ehlo.data(), ehlo.size());
  s.process();
  s.take_output(sink);
  std::string cmds = "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n";
  std::string body = "Subject: x\r\n\r\n";
  while (body.size() < 2048) body += std::string(76, 'x') + "\r\n";
  body += ".\r\n";
  for (auto _ : st) {
    s.feed(cmds.data(), cmds.size());
    s.process();
    s.feed(body.data(), body.size());
    s.process();
    auto rec = s.record();
    benchmark::DoNotOptimize(rec);
    s.commit_done(true);
    s.take_output(sink);
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_SessionTransaction);

BENCHMARK_MAIN();
