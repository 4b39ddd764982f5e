// Micro benchmarks of the spool record encoder and reader.
#include <benchmark/benchmark.h>

#include <string>

#include "spool/record.hh"
#include "src/core/crc32c.hh"

using namespace tern::spool;

static std::string content(size_t n) {
  std::string c = "Subject: bench\r\n\r\n";
  while (c.size() < n) c += std::string(76, 'x') + "\r\n";
  return c;
}

static void BM_EncodeMessage(benchmark::State& st) {
  std::string body = content(static_cast<size_t>(st.range(0)));
  std::string buf;
  buf.reserve(body.size() + 512);
  for (auto _ : st) {
    buf.clear();
    size_t s = begin_record(buf, record_type::message);
    envelope_in e;
    e.id = "1A1FE5A0892000000A";
    e.client_ip = "198.18.0.1";
    e.helo = "client.example.org";
    e.mail_from = "sender@example.org";
    put_message_head(buf, e, 1);
    put_rcpt(buf, "rcpt@example.net", 0, "");
    uint32_t n = static_cast<uint32_t>(body.size());
    buf.append(reinterpret_cast<const char*>(&n), 4);
    buf += body;
    finish_record(buf, s);
    benchmark::DoNotOptimize(buf.data());
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * st.range(0));
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_EncodeMessage)->Arg(2048)->Arg(65536);

static void BM_ReadAndDecode(benchmark::State& st) {
  std::string buf;
  size_t s = begin_record(buf, record_type::message);
  envelope_in e;
  e.id = "1A1FE5A0892000000A";
  put_message_head(buf, e, 1);
  put_rcpt(buf, "rcpt@example.net", 0, "");
  std::string body = content(2048);
  uint32_t n = static_cast<uint32_t>(body.size());
  buf.append(reinterpret_cast<const char*>(&n), 4);
  buf += body;
  finish_record(buf, s);
  for (auto _ : st) {
    record_view rv;
    auto r = read_record({reinterpret_cast<const unsigned char*>(buf.data()), buf.size()}, 0, rv);
    message_view m;
    benchmark::DoNotOptimize(r);
    benchmark::DoNotOptimize(decode_message(rv.payload, m));
  }
  st.SetItemsProcessed(st.iterations());
}
BENCHMARK(BM_ReadAndDecode);

static void BM_Crc32c(benchmark::State& st) {
  std::string b(static_cast<size_t>(st.range(0)), 'x');
  for (auto _ : st) benchmark::DoNotOptimize(tern::crc32c(0, b.data(), b.size()));
  st.SetBytesProcessed(int64_t(st.iterations()) * st.range(0));
}
BENCHMARK(BM_Crc32c)->Arg(2048)->Arg(1 << 20);

BENCHMARK_MAIN();
