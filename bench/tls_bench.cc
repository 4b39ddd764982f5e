// tls/ micro benchmarks: a tern client transport and a tern server transport in one
// thread, bytes moved between them in memory (no sockets), so the figures are wolfSSL's
// crypto plus tern's transport, not the kernel's.
//
//   bulk_aes128gcm_2k     app bytes through encrypt (client) + decrypt (server), 2 KiB
//                         records (one on_send per record), TLS13-AES128-GCM-SHA256
//   handshake_full        full TLS 1.3 handshakes (ECDSA P-256 certificate, X25519)
//   handshake_resumed     TLS 1.3 resumption from the client's per-destination ticket
//   memory_per_connection heap bytes held by one established connection (client, server)
//
// Certificates are made at start with the openssl CLI into a temp dir.
#include <malloc.h>
#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "tls/context.hh"
#include "tls/transport.hh"

using namespace tern;
using namespace tern::tls;
using net::transport_status;

namespace {

struct discard final : net::byte_sink {
  size_t n = 0;
  void put(const char*, size_t k) override { n += k; }
};

struct env {
  std::string dir;
  std::unique_ptr<context> server, client;
  env() {
    char t[] = "/tmp/tern-tls-bench-XXXXXX";
    dir = mkdtemp(t);
    std::string d = dir;
    std::string cmd =
        "(cd " + d +
        " && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key"
        " -out ca.crt -days 30 -subj '/CN=bench CA'"
        " && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout srv.key"
        " -out srv.csr -subj /CN=smarthost.test"
        " && printf 'subjectAltName=DNS:smarthost.test\\n' > ext"
        " && openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30"
        " -extfile ext -out srv.crt) >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "tls_bench: openssl could not make certificates\n");
      std::exit(1);
    }
    std::string err;
    if (!library_init(err)) {
      std::fprintf(stderr, "tls_bench: %s\n", err.c_str());
      std::exit(1);
    }
    context_options so;
    so.side = role::server;
    so.cert_file = d + "/srv.crt";
    so.key_file = d + "/srv.key";
    server = context::create(so, err);
    context_options co;
    co.ca_file = d + "/ca.crt";
    client = context::create(co, err);
    if (!server || !client) {
      std::fprintf(stderr, "tls_bench: %s\n", err.c_str());
      std::exit(1);
    }
  }
  ~env() { std::filesystem::remove_all(dir); }
};

env& the_env() {
  static env e;
  return e;
}

struct conn {
  std::unique_ptr<transport> c, s;
  discard c_app, s_app;
  std::string c2s, s2c, in;
  bool ok = false;

  explicit conn(const std::string& dest = "") {
    env& e = the_env();
    peer_options p;
    p.sni = "smarthost.test";
    p.destination = dest;
    std::string err;
    c = transport::client(*e.client, p, err);
    s = transport::server(*e.server, err);
    if (!c || !s || c->start(c2s) != transport_status::ok) return;
    for (int round = 0; round < 16 && (!c2s.empty() || !s2c.empty()); ++round) {
      if (!c2s.empty()) {
        in.swap(c2s);
        c2s.clear();
        if (s->on_recv(in.data(), in.size(), s_app, s2c) != transport_status::ok) return;
      }
      if (!s2c.empty()) {
        in.swap(s2c);
        s2c.clear();
        if (c->on_recv(in.data(), in.size(), c_app, c2s) != transport_status::ok) return;
      }
    }
    ok = c->handshake_done() && s->handshake_done();
  }
};

void bulk_aes128gcm_2k(benchmark::State& state) {
  conn k;
  if (!k.ok || k.c->cipher() != "TLS13-AES128-GCM-SHA256") {
    state.SkipWithError("handshake failed or not AES-128-GCM");
    return;
  }
  const std::string record(2048, 'x');
  std::string app, wire;
  for (auto _ : state) {
    app = record;
    wire.clear();
    k.c->on_send(app, wire);
    k.s->on_recv(wire.data(), wire.size(), k.s_app, k.s2c);
  }
  if (k.s_app.n != record.size() * state.iterations()) state.SkipWithError("bytes lost");
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * record.size()));
}
BENCHMARK(bulk_aes128gcm_2k);

void handshake_full(benchmark::State& state) {
  for (auto _ : state) {
    conn k;
    if (!k.ok || k.c->resumed()) {
      state.SkipWithError("handshake failed");
      return;
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(handshake_full)->Unit(benchmark::kMicrosecond);

void handshake_resumed(benchmark::State& state) {
  { conn first("resume.test:25"); }  // leaves a ticket in the client's cache
  for (auto _ : state) {
    conn k("resume.test:25");
    if (!k.ok || !k.c->resumed()) {
      state.SkipWithError("did not resume");
      return;
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(handshake_resumed)->Unit(benchmark::kMicrosecond);

// Heap held by established connections, from glibc's allocator statistics (the bench is
// not linked with mimalloc): N connections are made, then the servers and the clients are
// freed in turn; what each release returns is what that side held.
void memory_per_connection(benchmark::State& state) {
  constexpr int n = 200;
  double client_bytes = 0, server_bytes = 0, in_flight_bytes = 0;
  for (auto _ : state) {
    std::vector<std::unique_ptr<conn>> v;
    v.reserve(n);
    for (int i = 0; i < n; ++i) {
      v.push_back(std::make_unique<conn>());
      // Drop what the handshake pump kept: not part of a connection's state.
      v.back()->in = std::string();
      v.back()->c2s = std::string();
      v.back()->s2c = std::string();
    }
    size_t held = mallinfo2().uordblks;
    for (auto& k : v) k->s.reset();
    size_t after_servers = mallinfo2().uordblks;
    for (auto& k : v) k->c.reset();
    size_t after_clients = mallinfo2().uordblks;
    server_bytes = static_cast<double>(held - after_servers) / n;
    client_bytes = static_cast<double>(after_servers - after_clients) / n;
    // One 16 KiB record in flight each way: wolfSSL grows its buffers for it.
    for (auto& k : v) *k = conn();
    size_t before = mallinfo2().uordblks;
    for (auto& k : v) {
      std::string app(16384, 'y'), wire;
      k->c->on_send(app, wire);
      k->s->on_recv(wire.data(), wire.size() - 100, k->s_app, k->s2c);  // a partial record
    }
    in_flight_bytes = static_cast<double>(mallinfo2().uordblks - before) / n;
  }
  state.counters["client_bytes"] = client_bytes;
  state.counters["server_bytes"] = server_bytes;
  state.counters["partial_16k_record_extra_bytes"] = in_flight_bytes;
}
BENCHMARK(memory_per_connection)->Iterations(1);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  the_env();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  thread_cleanup();
  return 0;
}
