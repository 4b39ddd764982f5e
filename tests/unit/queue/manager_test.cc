#include "src/queue/manager.hh"

#include <gtest/gtest.h>

#include <map>

using namespace tern;
using namespace tern::queue;
using spool::rcpt_state;

namespace {

config::config load(const std::string& extra) {
  std::string err;
  auto c = config::load_string("[[listen]]\naddress = \"127.0.0.1:0\"\n" + extra, "t.toml", err);
  EXPECT_TRUE(c) << err;
  return c ? *c : config::config{};
}

const char* cfg_text = R"(
[[smarthost]]
host = "a.example"
[[smarthost]]
host = "b.example"
[[route]]
domains = ["local.example"]
host = "10.0.0.1"
tls = "none"
)";

constexpr uint64_t S = 1000000;  // one second in µs

// A message record (as the session writes it) with the given recipients.
std::string record(const std::string& id, const std::vector<std::string>& rcpts, uint64_t arrival = 0) {
  std::string b;
  size_t s = spool::begin_record(b, spool::record_type::message);
  spool::envelope_in e;
  e.id = id;
  e.arrival_us = arrival;
  e.mail_from = "sender@origin.example";
  spool::put_message_head(b, e, static_cast<uint32_t>(rcpts.size()));
  for (auto& r : rcpts) spool::put_rcpt(b, r, 0, "");
  std::string content = "Subject: t\r\n\r\nhello\r\n";
  uint32_t n = static_cast<uint32_t>(content.size());
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<char>(n >> (8 * i)));
  b += content;
  spool::finish_record(b, s);
  return b;
}

// Drives a manager the way the shard does, without I/O.
struct harness {
  config::config cfg;
  routing routes;
  manager mgr;
  std::map<std::string, std::string> records;  // id -> record bytes ("the disk")
  std::vector<std::string> written;            // spool records the manager produced
  harness(const std::string& text = cfg_text, manager::options o = opts())
      : cfg(load(text)), routes(cfg), mgr(routes, o) {}
  static manager::options opts() {
    manager::options o;
    o.retry.retry_s = {60, 300};
    o.retry.jitter_percent = 0;
    o.retry.max_lifetime_s = 3600;
    o.concurrency = 2;
    return o;
  }
  void add(const std::string& id, const std::vector<std::string>& rcpts, uint64_t arrival = 0,
           std::vector<rcpt_state> state = {}) {
    records[id] = record(id, rcpts, arrival);
    message_info m;
    m.id = id;
    m.segment = "seg";
    m.record_size = records[id].size();
    m.arrival_us = arrival;
    m.state = std::move(state);
    mgr.add(std::move(m));
  }
  // Load everything due at now.
  int load_due(uint64_t now) {
    int n = 0;
    load_request req;
    while (mgr.next_load(now, req)) {
      mgr.buffer(req.msg) = records[mgr.id_of(req.msg)];
      mgr.loaded(req.msg, true, "", now);
      ++n;
    }
    return n;
  }
  // Write out the produced records and make them durable.
  void commit(uint64_t now, bool ok = true) {
    record_out r;
    std::vector<uint64_t> toks;
    while (mgr.next_record(r)) {
      written.push_back(*r.bytes);
      toks.push_back(r.token);
    }
    for (auto t : toks) mgr.record_durable(t, ok, now);
  }
  // The status entries of written record k (and whether a done record follows it).
  std::vector<spool::rcpt_status> status_of(size_t k, bool* done = nullptr, uint32_t* attempts = nullptr) {
    std::vector<spool::rcpt_status> out;
    const std::string& b = written.at(k);
    auto data = std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(b.data()), b.size());
    spool::record_view rv;
    EXPECT_EQ(spool::read_record(data, 0, rv), spool::read_status::ok);
    EXPECT_EQ(rv.type, spool::record_type::status);
    spool::status_view sv;
    EXPECT_TRUE(spool::decode_status(rv.payload, sv));
    if (attempts) *attempts = sv.attempts;
    spool::for_each_status(sv, [&](const spool::rcpt_status& e) { out.push_back(e); });
    if (done) {
      spool::record_view rv2;
      *done = spool::read_record(data, rv.size, rv2) == spool::read_status::ok && rv2.type == spool::record_type::done;
    }
    return out;
  }
};

rcpt_result ok() { return local_result(rcpt_state::delivered, "2.0.0", "250 2.0.0 Ok"); }
rcpt_result later() { return local_result(rcpt_state::deferred, "4.2.0", "451 4.2.0 try later"); }
rcpt_result nope() { return local_result(rcpt_state::failed, "5.1.1", "550 5.1.1 no such user"); }

}  // namespace

TEST(Manager, AllDeliveredWritesStatusAndDone) {
  harness h;
  h.add("M1", {"a@x.example", "b@x.example"});
  EXPECT_EQ(h.load_due(0), 1);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  EXPECT_EQ(h.routes[c.dest].name, "smarthost");
  h.mgr.connected(c.dest, c.host);
  auto j = h.mgr.take_job(c.dest);
  ASSERT_TRUE(j);
  auto rc = h.mgr.job_rcpts(*j);
  ASSERT_EQ(rc.size(), 2u);
  EXPECT_EQ(rc[1].addr, "b@x.example");
  std::vector<rcpt_result> res{ok(), ok()};
  h.mgr.job_done(std::move(j), res, 5 * S);
  ASSERT_EQ(h.mgr.results().size(), 1u);
  EXPECT_TRUE(h.mgr.results()[0].finished);
  EXPECT_EQ(h.mgr.results()[0].delivered_now.size(), 2u);
  h.commit(5 * S);
  bool done = false;
  uint32_t attempts = 0;
  auto st = h.status_of(0, &done, &attempts);
  EXPECT_TRUE(done);
  EXPECT_EQ(attempts, 1u);
  ASSERT_EQ(st.size(), 2u);
  EXPECT_EQ(st[0].state, rcpt_state::delivered);
  EXPECT_EQ(h.mgr.queued(), 0u);
  EXPECT_EQ(h.mgr.active(), 0u);
  EXPECT_EQ(h.mgr.take_job(c.dest), nullptr);
}

TEST(Manager, PartialDeferralRetriesOnlyThePendingRecipients) {
  harness h;
  h.add("M1", {"a@x.example", "b@x.example", "c@x.example"});
  h.load_due(0);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  h.mgr.connected(c.dest, c.host);
  std::vector<rcpt_result> res{ok(), later(), nope()};
  h.mgr.job_done(h.mgr.take_job(c.dest), res, 10 * S);
  h.mgr.disconnected(c.dest);
  auto& rr = h.mgr.results()[0];
  EXPECT_FALSE(rr.finished);
  EXPECT_EQ(rr.failed_now, std::vector<uint32_t>{2});
  h.mgr.results().clear();
  h.commit(10 * S);
  bool done = true;
  auto st = h.status_of(0, &done);
  EXPECT_FALSE(done);
  ASSERT_EQ(st.size(), 3u);
  EXPECT_EQ(st[1].state, rcpt_state::deferred);
  EXPECT_EQ(st[1].text, "451 4.2.0 try later");
  EXPECT_EQ(h.mgr.queued(), 1u);
  EXPECT_EQ(h.mgr.next_due_us(), 70 * S) << "retry[0] = 60 s after the attempt";
  EXPECT_EQ(h.load_due(69 * S), 0);
  EXPECT_EQ(h.load_due(70 * S), 1);
  ASSERT_TRUE(h.mgr.next_connect(70000, 70 * S, c));
  h.mgr.connected(c.dest, c.host);
  auto j = h.mgr.take_job(c.dest);
  ASSERT_TRUE(j);
  EXPECT_EQ(j->rcpts, std::vector<uint32_t>{1}) << "delivered and failed recipients are not sent again";
  std::vector<rcpt_result> res2{ok()};
  h.mgr.job_done(std::move(j), res2, 71 * S);
  EXPECT_TRUE(h.mgr.results()[0].finished);
  h.commit(71 * S);
  bool done2 = false;
  uint32_t attempts = 0;
  auto st2 = h.status_of(1, &done2, &attempts);
  EXPECT_TRUE(done2);
  EXPECT_EQ(attempts, 2u);
  ASSERT_EQ(st2.size(), 1u) << "only what changed";
  EXPECT_EQ(st2[0].index, 1u);
}

TEST(Manager, RecoveredStateIsHonoured) {
  harness h;
  h.add("M1", {"a@x.example", "b@x.example"}, 0, {rcpt_state::delivered, rcpt_state::deferred});
  h.load_due(0);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  auto j = h.mgr.take_job(c.dest);
  ASSERT_TRUE(j);
  EXPECT_EQ(j->rcpts, std::vector<uint32_t>{1});
}

TEST(Manager, OneJobPerDestinationAndTheRoundWaitsForAll) {
  harness h;
  h.add("M1", {"a@x.example", "u@local.example", "b@x.example"});
  h.load_due(0);
  connect_request c1, c2;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c1));
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c2));
  EXPECT_NE(c1.dest, c2.dest);
  connect_request c3;
  EXPECT_FALSE(h.mgr.next_connect(0, 0, c3)) << "one connection per waiting job";
  auto j1 = h.mgr.take_job(c1.dest);
  auto j2 = h.mgr.take_job(c2.dest);
  ASSERT_TRUE(j1 && j2);
  EXPECT_EQ(j1->rcpts.size() + j2->rcpts.size(), 3u);
  std::vector<rcpt_result> r1(j1->rcpts.size(), ok()), r2(j2->rcpts.size(), ok());
  h.mgr.job_done(std::move(j1), r1, S);
  EXPECT_TRUE(h.mgr.results().empty()) << "the other job is still open";
  h.mgr.job_done(std::move(j2), r2, S);
  ASSERT_EQ(h.mgr.results().size(), 1u);
  EXPECT_TRUE(h.mgr.results()[0].finished);
}

TEST(Manager, NoDestinationAtAllLeavesMailUntouched) {
  harness h("");
  h.add("M1", {"a@elsewhere.example"});
  EXPECT_EQ(h.load_due(0), 0) << "nothing is read or written while there is nowhere to send";
  EXPECT_EQ(h.mgr.queued(), 1u);
}

TEST(Manager, NoRouteDefersWithAClearReason) {
  harness h("[[route]]\ndomains = [\"local.example\"]\nhost = \"10.0.0.1\"\ntls = \"none\"\n");
  h.add("M1", {"a@elsewhere.example"});
  h.load_due(0);
  connect_request c;
  EXPECT_FALSE(h.mgr.next_connect(0, 0, c));
  ASSERT_EQ(h.mgr.results().size(), 1u);
  h.commit(0);
  auto st = h.status_of(0);
  ASSERT_EQ(st.size(), 1u);
  EXPECT_EQ(st[0].state, rcpt_state::deferred);
  EXPECT_EQ(st[0].dsn, "4.3.5");
  EXPECT_NE(std::string(st[0].text).find("no route"), std::string::npos);
  EXPECT_EQ(h.mgr.queued(), 1u) << "stays queued";
}

TEST(Manager, FailedHostMovesToTheNextAtOnceThenDefers) {
  harness h;
  h.add("M1", {"a@x.example"});
  h.load_due(0);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  int first = c.host;
  h.mgr.connect_failed(c.dest, c.host, "4.4.1", "connect to a: Connection refused", 0, 0);
  EXPECT_TRUE(h.mgr.results().empty()) << "not deferred while another host is up";
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  EXPECT_NE(c.host, first);
  h.mgr.connect_failed(c.dest, c.host, "4.4.1", "connect to b: Connection timed out", 0, 0);
  ASSERT_EQ(h.mgr.results().size(), 1u);
  h.commit(0);
  auto st = h.status_of(0);
  ASSERT_EQ(st.size(), 1u);
  EXPECT_EQ(st[0].text, "connect to b: Connection timed out");
  // A new message while both hosts are backed off is deferred at once, not parked.
  h.mgr.results().clear();
  h.add("M2", {"z@x.example"});
  h.load_due(0);
  EXPECT_FALSE(h.mgr.next_connect(1000, S, c));
  ASSERT_EQ(h.mgr.results().size(), 1u);
  EXPECT_EQ(h.mgr.results()[0].id, "M2");
}

TEST(Manager, ExpiryFailsWhatIsLeftWith447) {
  harness h;
  h.add("M1", {"a@x.example", "b@x.example"}, 0);
  h.load_due(3600 * S);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 3600 * S, c));
  h.mgr.connected(c.dest, c.host);
  std::vector<rcpt_result> res{ok(), later()};
  h.mgr.job_done(h.mgr.take_job(c.dest), res, 3600 * S);
  auto& rr = h.mgr.results()[0];
  EXPECT_TRUE(rr.expired);
  EXPECT_TRUE(rr.finished);
  EXPECT_EQ(rr.failed_now, std::vector<uint32_t>{1});
  h.commit(3600 * S);
  bool done = false;
  auto st = h.status_of(0, &done);
  EXPECT_TRUE(done);
  EXPECT_EQ(st[1].dsn, "4.4.7");
  EXPECT_NE(std::string(st[1].text).find("451 4.2.0 try later"), std::string::npos) << "the last reason is kept";
}

TEST(Manager, UnreadableRecordIsNeverDropped) {
  harness h;
  h.add("M1", {"a@x.example"}, 0);
  load_request req;
  ASSERT_TRUE(h.mgr.next_load(10000 * S, req));
  h.mgr.buffer(req.msg) = "garbage";
  h.mgr.loaded(req.msg, true, "", 10000 * S);  // far past the lifetime
  ASSERT_EQ(h.mgr.results().size(), 1u);
  EXPECT_FALSE(h.mgr.results()[0].finished);
  EXPECT_FALSE(h.mgr.results()[0].expired);
  h.commit(10000 * S);
  bool done = true;
  h.status_of(0, &done);
  EXPECT_FALSE(done);
  EXPECT_EQ(h.mgr.queued(), 1u);
}

TEST(Manager, ActiveSetAndConcurrencyAreBounded) {
  auto o = harness::opts();
  o.active_limit = 2;
  o.concurrency = 2;
  harness h(cfg_text, o);
  for (int i = 0; i < 5; ++i) h.add("M" + std::to_string(i), {"a@x.example"});
  EXPECT_EQ(h.load_due(0), 2);
  EXPECT_EQ(h.mgr.active(), 2u);
  connect_request c;
  int conns = 0;
  while (h.mgr.next_connect(0, 0, c)) {
    h.mgr.connected(c.dest, c.host);
    ++conns;
  }
  EXPECT_EQ(conns, 2);
  std::vector<rcpt_result> res{ok()};
  h.mgr.job_done(h.mgr.take_job(c.dest), res, 0);
  EXPECT_EQ(h.load_due(0), 0) << "the finished message is not free until its records are durable";
  h.commit(0);
  EXPECT_EQ(h.load_due(0), 1);
}

TEST(Manager, RecordWriteFailureKeepsTheMessage) {
  harness h;
  h.add("M1", {"a@x.example"});
  h.load_due(0);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  std::vector<rcpt_result> res{ok()};
  h.mgr.job_done(h.mgr.take_job(c.dest), res, 0);
  h.commit(0, false);
  EXPECT_EQ(h.mgr.queued(), 1u) << "the done record is not durable: the message stays";
  EXPECT_EQ(h.load_due(S), 1);
  EXPECT_FALSE(h.mgr.next_connect(0, S, c)) << "nothing left to send: no job";
  h.commit(S);
  bool done = false;
  h.status_of(1, &done);
  EXPECT_TRUE(done);
  EXPECT_EQ(h.mgr.queued(), 0u);
}

TEST(Manager, RequeuedJobGoesFirst) {
  harness h;
  h.add("M1", {"a@x.example"});
  h.add("M2", {"b@x.example"});
  h.load_due(0);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  auto j = h.mgr.take_job(c.dest);
  ASSERT_TRUE(j);
  std::string first = h.mgr.id_of(j->msg);
  h.mgr.job_requeue(std::move(j));
  auto j2 = h.mgr.take_job(c.dest);
  EXPECT_EQ(h.mgr.id_of(j2->msg), first);
}

TEST(ManagerSegments, RemovedOldestFirstNeverTheCurrentOne) {
  harness h;
  h.mgr.set_current_segment("seg-0003");
  h.mgr.track_segment("seg-0001");
  message_info m;
  m.id = "M1";
  m.segment = "seg-0002";
  h.records["M1"] = record("M1", {"a@x.example"});
  m.record_size = h.records["M1"].size();
  h.mgr.add(m);
  std::string p;
  ASSERT_TRUE(h.mgr.next_removal(p));
  EXPECT_EQ(p, "seg-0001");
  std::string p2;
  EXPECT_FALSE(h.mgr.next_removal(p2)) << "one removal at a time";
  h.mgr.segment_removed(p, true);
  EXPECT_FALSE(h.mgr.next_removal(p)) << "seg-0002 holds a live message";
  h.load_due(0);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  std::vector<rcpt_result> res{ok()};
  h.mgr.job_done(h.mgr.take_job(c.dest), res, 0);
  EXPECT_FALSE(h.mgr.next_removal(p)) << "not before the done record is durable";
  record_out r;
  ASSERT_TRUE(h.mgr.next_record(r));
  h.mgr.record_durable(r.token, true, 0, "seg-0003", 100);
  ASSERT_TRUE(h.mgr.next_removal(p));
  EXPECT_EQ(p, "seg-0002");
  h.mgr.segment_removed(p, true);
  EXPECT_FALSE(h.mgr.next_removal(p)) << "the current segment stays";
  EXPECT_EQ(h.mgr.segments(), 1u);
}

TEST(ManagerSegments, DeferredMessageIsCopiedForwardAndFreesItsSegment) {
  harness h;
  h.mgr.set_current_segment("seg-0001");
  message_info m;
  m.id = "M1";
  m.segment = "seg-0001";
  h.records["M1"] = record("M1", {"a@x.example", "b@x.example"});
  m.record_size = h.records["M1"].size();
  h.mgr.add(m);
  // First round in the same segment: deferred, no copy.
  h.load_due(0);
  connect_request c;
  ASSERT_TRUE(h.mgr.next_connect(0, 0, c));
  h.mgr.connected(c.dest, c.host);
  std::vector<rcpt_result> res{ok(), later()};
  h.mgr.job_done(h.mgr.take_job(c.dest), res, 0);
  h.mgr.disconnected(c.dest);
  record_out r;
  ASSERT_TRUE(h.mgr.next_record(r));
  EXPECT_EQ(spool::record_type(static_cast<uint8_t>((*r.bytes)[8])), spool::record_type::status);
  h.mgr.record_durable(r.token, true, 0, "seg-0001", 500);
  EXPECT_EQ(h.mgr.moved(), 0u);
  // The writer rolled over; the retry is deferred again: the record moves forward.
  h.mgr.set_current_segment("seg-0002");
  h.mgr.results().clear();
  h.load_due(60 * S);
  ASSERT_TRUE(h.mgr.next_connect(0, 60 * S, c));
  std::vector<rcpt_result> res2{later()};
  h.mgr.job_done(h.mgr.take_job(c.dest), res2, 60 * S);
  ASSERT_TRUE(h.mgr.next_record(r));
  const std::string& bytes = *r.bytes;
  auto data = std::span<const unsigned char>(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  spool::record_view rv;
  ASSERT_EQ(spool::read_record(data, 0, rv), spool::read_status::ok);
  EXPECT_EQ(rv.type, spool::record_type::message) << "the copy first";
  EXPECT_EQ(std::string(bytes.data(), rv.size), h.records["M1"]) << "byte for byte";
  spool::record_view rv2;
  ASSERT_EQ(spool::read_record(data, rv.size, rv2), spool::read_status::ok);
  spool::status_view sv;
  ASSERT_TRUE(spool::decode_status(rv2.payload, sv));
  EXPECT_EQ(sv.count, 2u) << "then the whole state, not only what changed";
  std::string p;
  EXPECT_FALSE(h.mgr.next_removal(p)) << "not before the copy is durable";
  h.mgr.record_durable(r.token, true, 60 * S, "seg-0002", 0);
  EXPECT_EQ(h.mgr.moved(), 1u);
  ASSERT_TRUE(h.mgr.next_removal(p));
  EXPECT_EQ(p, "seg-0001");
  h.mgr.segment_removed(p, true);
  // The next round reads the copy.
  load_request req;
  ASSERT_TRUE(h.mgr.next_load(10000 * S, req));
  EXPECT_EQ(req.segment, "seg-0002");
  EXPECT_EQ(req.offset, 0u);
}
