#include "spool/recovery.hh"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "spool/record.hh"
#include "spool/scan.hh"
#include "src/core/crc32c.hh"
#include "tests/unit/common/tmpdir.hh"

using namespace tern::spool;

namespace {

constexpr uint64_t nonce = 0x5EED5EED12345678ull;

std::string msg(const std::string& id, const std::string& body = "body\r\n") {
  std::string b;
  size_t s = begin_record(b, record_type::message);
  envelope_in e;
  e.id = id;
  e.mail_from = "a@b.test";
  put_message_head(b, e, 1);
  put_rcpt(b, "x@y.test", 0, "");
  std::string content = "Subject: " + id + "\r\n\r\n" + body;
  uint32_t n = static_cast<uint32_t>(content.size());
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<char>(n >> (8 * i)));
  b += content;
  finish_record(b, s);
  set_record_nonce(b.data() + s, nonce);
  return b;
}

std::string id(int n) { return format_queue_id(1000, 0, static_cast<uint32_t>(n)); }

struct spool_fixture {
  tmpdir t;
  std::string seg;
  spool_fixture() {
    std::string err;
    EXPECT_TRUE(ensure_spool_dirs(t.path, err)) << err;
    seg = segment_dir(t.path) + "/" + segment_name(5, 0);
  }
  void write(const std::string& bytes) {
    std::ofstream(seg, std::ios::binary) << bytes;
  }
  std::string read() {
    std::ifstream in(seg, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
};

struct recovered {
  std::vector<queued_message> q;
  recovery_report rep;
};
recovered recover(const std::string& dir, bool repair = true) {
  recovered r;
  std::string err;
  EXPECT_TRUE(recover_spool(dir, repair, r.q, r.rep, err)) << err;
  return r;
}

std::string header() {
  std::string h;
  encode_segment_header(h, 0, 5, 1, nonce);
  return h;
}

}  // namespace

TEST(Recovery, RebuildsQueueHonouringDoneRecords) {
  spool_fixture f;
  std::string d;
  encode_done(d, id(2), nonce);
  f.write(header() + msg(id(1)) + msg(id(2)) + msg(id(3)) + d);
  auto [q, rep] = recover(f.t.path, true);
  ASSERT_EQ(q.size(), 2u);
  EXPECT_EQ(q[0].id, id(1));
  EXPECT_EQ(q[1].id, id(3));
  EXPECT_EQ(rep.messages, 3u);
  EXPECT_EQ(rep.done, 1u);
  EXPECT_EQ(rep.max_epoch_ms, 1000u);
  EXPECT_EQ(rep.max_segment_id, 5u);
}

std::vector<std::string> ids_of(const std::vector<queued_message>& q) {
  std::vector<std::string> v;
  for (auto& m : q) v.push_back(m.id);
  return v;
}

size_t files_in(const std::string& d) {
  size_t n = 0;
  for (auto& e : std::filesystem::directory_iterator(d)) n += e.path().extension() == ".bad";
  return n;
}

TEST(Recovery, TruncatesTornTailAtEveryCut) {
  std::string good = header() + msg(id(1));
  std::string last = msg(id(2));
  for (size_t cut = 1; cut < last.size(); cut += 7) {
    spool_fixture f;
    f.write(good + last.substr(0, cut));
    auto first = recover(f.t.path);
    ASSERT_EQ(first.q.size(), 1u) << cut;
    EXPECT_EQ(first.rep.torn_bytes, cut);
    EXPECT_EQ(first.rep.new_damage, 1u);
    EXPECT_EQ(f.read(), good) << "tail not truncated at cut " << cut;
    EXPECT_EQ(files_in(quarantine_dir(f.t.path)), 1u) << "the torn bytes are kept in quarantine/";
    // A second recovery finds nothing to repair.
    auto again = recover(f.t.path);
    EXPECT_EQ(again.rep.torn_bytes, 0u);
    EXPECT_EQ(again.rep.new_damage, 0u);
  }
}

// Bit flips in each field of a middle record and of the last record: every other message
// of the segment survives, the damage is reported once, and after the repair it is known
// (ledger) or gone (truncated), never new again.
TEST(Recovery, DamageMatrixKeepsEveryOtherMessage) {
  struct where {
    const char* name;
    size_t at;  // offset inside the record
    uint8_t mask;
  };
  const where fields[] = {
      {"crc", 1, 0x10},  {"length low", 4, 0x01}, {"length high", 7, 0x40}, {"type", 8, 0x06},
      {"version", 9, 0x08}, {"nonce", 14, 0x20},  {"content", 60, 0x01},
  };
  for (int victim : {3, 5}) {
    for (const auto& w : fields) {
      SCOPED_TRACE(std::string(w.name) + (victim == 5 ? " in the last record" : " in a middle record"));
      spool_fixture f;
      std::string all = header();
      size_t victim_at = 0;
      for (int i = 1; i <= 5; ++i) {
        if (i == victim) victim_at = all.size();
        all += msg(id(i));
      }
      all[victim_at + w.at] = static_cast<char>(all[victim_at + w.at] ^ w.mask);
      f.write(all);
      auto ro = recover(f.t.path, false);
      std::vector<std::string> expect;
      for (int i = 1; i <= 5; ++i)
        if (i != victim) expect.push_back(id(i));
      EXPECT_EQ(ids_of(ro.q), expect);
      EXPECT_GE(ro.rep.new_damage, 1u);
      EXPECT_EQ(f.read(), all) << "read-only recovery changed the segment";
      auto rw = recover(f.t.path, true);
      EXPECT_EQ(ids_of(rw.q), expect);
      EXPECT_GE(files_in(quarantine_dir(f.t.path)), 1u) << "damaged bytes not copied to quarantine/";
      auto after = recover(f.t.path, false);
      EXPECT_EQ(ids_of(after.q), expect);
      EXPECT_EQ(after.rep.new_damage, 0u) << "repaired damage reported again as new";
      auto again = recover(f.t.path, true);
      EXPECT_EQ(again.rep.new_damage, 0u);
      EXPECT_EQ(files_in(quarantine_dir(f.t.path)), files_in(quarantine_dir(f.t.path)));
      EXPECT_TRUE(std::filesystem::exists(f.seg)) << "a damaged segment was removed";
    }
  }
}

TEST(Recovery, CutInTheMiddleKeepsWhatCameBefore) {
  spool_fixture f;
  std::string all = header() + msg(id(1)) + msg(id(2));
  std::string m3 = msg(id(3));
  f.write(all + m3.substr(0, m3.size() / 2));
  auto r = recover(f.t.path);
  EXPECT_EQ(ids_of(r.q), (std::vector<std::string>{id(1), id(2)}));
  EXPECT_EQ(r.rep.torn_bytes, m3.size() / 2);
  EXPECT_EQ(f.read(), all);
}

TEST(Recovery, AppendedGarbageIsTornAndKept) {
  spool_fixture f;
  std::string all = header() + msg(id(1)) + msg(id(2));
  f.write(all + std::string(1000, '\x01') + "garbage");
  auto r = recover(f.t.path);
  EXPECT_EQ(ids_of(r.q), (std::vector<std::string>{id(1), id(2)}));
  EXPECT_EQ(r.rep.torn_bytes, 1007u);
  EXPECT_EQ(f.read(), all);
  EXPECT_EQ(files_in(quarantine_dir(f.t.path)), 1u);
}

TEST(Recovery, DamagedSegmentHeaderFindsTheNonceAgain) {
  spool_fixture f;
  std::string all = header() + msg(id(1)) + msg(id(2));
  all[25] ^= 0x01;  // inside the segment header's payload
  f.write(all);
  auto r = recover(f.t.path);
  EXPECT_EQ(ids_of(r.q), (std::vector<std::string>{id(1), id(2)}));
  EXPECT_EQ(r.rep.new_damage, 1u);
  EXPECT_EQ(recover(f.t.path).rep.new_damage, 0u);
}

// Regression: a bit flip in the segment header's nonce field (not covered by the CRC) made
// every later record look foreign, so the whole segment went to quarantine.
TEST(Recovery, DamagedNonceInSegmentHeaderKeepsTheMessages) {
  spool_fixture f;
  std::string all = header() + msg(id(1)) + msg(id(2));
  all[record_nonce_offset + 3] ^= 0x10;
  f.write(all);
  auto r = recover(f.t.path);
  EXPECT_EQ(ids_of(r.q), (std::vector<std::string>{id(1), id(2)}));
  EXPECT_EQ(r.rep.new_damage, 1u);
  EXPECT_EQ(recover(f.t.path).rep.new_damage, 0u);
}

TEST(Recovery, RefusesVersionOneSegments) {
  spool_fixture f;
  std::string v1(40, '\0');
  v1[8] = 1;  // type segment
  v1[9] = 1;  // version 1
  memcpy(v1.data() + 12, "TERNSEG1", 8);
  f.write(v1);
  std::vector<queued_message> q;
  recovery_report rep;
  std::string err;
  EXPECT_FALSE(recover_spool(f.t.path, true, q, rep, err));
  EXPECT_NE(err.find("version 1"), std::string::npos) << err;
}

// Content forgery: bodies that hold bytes forming valid-looking records (correct CRC, the
// version 2 layout without our nonce, the version 1 layout, the segment magic) never become
// messages, neither on a clean walk nor when a resync has to pass through them.
TEST(Recovery, EmbeddedRecordsNeverBecomeMessages) {
  // A complete version 2 message record as a session builds it (nonce zero), one with a
  // guessed nonce, a version 1 record (12-byte header) and a version 2 segment header.
  std::string forged;
  {
    std::string r = msg("FORGED000000000001");
    set_record_nonce(r.data(), 0);
    forged += r;
    std::string g = msg("FORGED000000000002");
    set_record_nonce(g.data(), 0x4141414141414141ull);
    forged += g;
    std::string v1;
    std::string inner = msg("FORGED000000000003").substr(record_header_size);
    v1.resize(12);
    v1[8] = 2;
    v1[9] = 1;
    uint32_t n = static_cast<uint32_t>(inner.size());
    for (int i = 0; i < 4; ++i) v1[4 + static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
    v1 += inner;
    uint32_t c = tern::crc32c(0, v1.data() + 4, v1.size() - 4);
    for (int i = 0; i < 4; ++i) v1[static_cast<size_t>(i)] = static_cast<char>(c >> (8 * i));
    forged += v1;
    std::string h;
    encode_segment_header(h, 0, 6, 1, 0x4242424242424242ull);
    forged += h;
  }
  for (int damage_at : {-1, 1, 4, 8}) {  // -1: clean; else a byte of the carrier record
    SCOPED_TRACE(damage_at);
    spool_fixture f;
    std::string carrier = msg(id(2), forged + forged);
    std::string all = header() + msg(id(1)) + carrier + msg(id(3), forged);
    if (damage_at >= 0) {
      size_t at = header().size() + msg(id(1)).size() + static_cast<size_t>(damage_at);
      all[at] = static_cast<char>(all[at] ^ 0x04);
    }
    f.write(all);
    auto r = recover(f.t.path);
    std::vector<std::string> expect{id(1), id(2), id(3)};
    if (damage_at >= 0) expect = {id(1), id(3)};
    EXPECT_EQ(ids_of(r.q), expect);
    EXPECT_EQ(r.rep.messages, expect.size());
  }
}

// Resync cost: a big damaged segment is recovered with CRC work linear in its size whatever
// it holds (0x01 filler, or bodies full of embedded records), and in bounded time.
TEST(Recovery, ResyncIsLinear) {
  std::string embedded = msg("FORGED000000000001");
  set_record_nonce(embedded.data(), 0);
  std::string adversarial;
  while (adversarial.size() < (1u << 20)) adversarial += embedded;
  struct shape {
    const char* name;
    std::string body;
  };
  for (const auto& sh : {shape{"0x01 bodies", std::string(5u << 20, '\x01')},
                         shape{"embedded records", adversarial}}) {
    SCOPED_TRACE(sh.name);
    spool_fixture f;
    std::string all = header();
    std::vector<std::string> expect;
    int i = 1;
    while (all.size() < (50u << 20)) {
      std::string m = msg(id(i), sh.body);
      if (i % 2 == 1) {
        m[1] ^= 0x01;  // one flipped byte (the CRC) in every other record
      } else {
        expect.push_back(id(i));
      }
      all += m;
      ++i;
    }
    all += msg(id(i));
    expect.push_back(id(i));
    f.write(all);
    auto t0 = std::chrono::steady_clock::now();
    auto r = recover(f.t.path, false);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(ids_of(r.q), expect);
    // Each byte is CRC'd at most twice: on the walk and once when a resync candidate
    // (always a real record header) is checked.
    EXPECT_LE(r.rep.crc_bytes, 2 * all.size()) << r.rep.crc_bytes;
    EXPECT_LT(secs, 2.0);
    printf("[ figures  ] %s: %zu bytes recovered in %.3f s, %llu CRC bytes\n", sh.name, all.size(), secs,
           static_cast<unsigned long long>(r.rep.crc_bytes));
  }
  // 40 MB of raw 0x01 bytes between two records (no record structure at all).
  spool_fixture f;
  std::string all = header() + msg(id(1)) + std::string(40u << 20, '\x01') + msg(id(2));
  f.write(all);
  auto t0 = std::chrono::steady_clock::now();
  auto r = recover(f.t.path, false);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(ids_of(r.q), (std::vector<std::string>{id(1), id(2)}));
  EXPECT_LE(r.rep.crc_bytes, 2 * all.size());
  EXPECT_LT(secs, 2.0);
  printf("[ figures  ] 40 MB of 0x01 between records: %zu bytes recovered in %.3f s, %llu CRC bytes\n", all.size(),
         secs, static_cast<unsigned long long>(r.rep.crc_bytes));
}

// Found by fuzzing: bytes that repeat the segment nonce at many offsets, each a candidate
// header whose length runs to the end of the file, made the resync quadratic. Clients
// cannot write the nonce, but the work is bounded anyway, and what is left unexamined is
// kept in place (quarantined), never truncated.
TEST(Recovery, RepeatedNonceHitsTheWorkBoundAndKeepsTheRest) {
  spool_fixture f;
  std::string fake(record_header_size, '\0');
  set_record_nonce(fake.data(), nonce);
  fake[8] = 2;
  fake[9] = record_version;
  std::string all = header() + msg(id(1));
  size_t region = all.size();
  size_t count = 20000;
  for (size_t i = 0; i < count; ++i) {
    uint32_t len = static_cast<uint32_t>((count - i - 1) * fake.size());  // to the end of the file
    for (int k = 0; k < 4; ++k) fake[4 + static_cast<size_t>(k)] = static_cast<char>(len >> (8 * k));
    all += fake;
  }
  all[region + 1] ^= 1;
  f.write(all);
  auto r = recover(f.t.path, true);
  EXPECT_EQ(ids_of(r.q), (std::vector<std::string>{id(1)}));
  EXPECT_LE(r.rep.crc_bytes, 5 * all.size() + (64u << 10));
  EXPECT_EQ(f.read(), all) << "the unexamined rest must be kept";
  EXPECT_EQ(recover(f.t.path, false).rep.new_damage, 0u);
}

TEST(Recovery, QuarantinesCorruptMiddleAndKeepsWhatFollows) {
  spool_fixture f;
  std::string m2 = msg(id(2));
  m2[30] ^= 0x5A;  // corrupt the middle record
  std::string all = header() + msg(id(1)) + m2 + msg(id(3));
  f.write(all);
  auto [q, rep] = recover(f.t.path, true);
  ASSERT_EQ(q.size(), 2u);
  EXPECT_EQ(q[0].id, id(1));
  EXPECT_EQ(q[1].id, id(3));
  EXPECT_EQ(rep.quarantined_bytes, m2.size());
  size_t files = 0;
  for (auto& e : std::filesystem::directory_iterator(quarantine_dir(f.t.path))) {
    if (e.path().extension() != ".bad") continue;
    ++files;
    EXPECT_EQ(std::filesystem::file_size(e.path()), m2.size());
  }
  EXPECT_EQ(files, 1u);
  EXPECT_EQ(f.read(), all) << "the corrupt region stays in place";
}

// Zeros after the last record are a pre-zeroed segment's unused space: not damage, no
// note, trimmed at repair (and a torn record in front of zeros is still torn: below).
TEST(Recovery, ZeroFilledTailIsUnusedSpaceNotDamage) {
  spool_fixture f;
  std::string good = header() + msg(id(1));
  f.write(good + std::string(4096, '\0'));
  auto [q, rep] = recover(f.t.path, true);
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(rep.torn_bytes, 0u);
  EXPECT_EQ(rep.unused_bytes, 4096u);
  EXPECT_EQ(rep.new_damage, 0u);
  EXPECT_TRUE(rep.notes.empty());
  EXPECT_EQ(f.read(), good) << "trimmed to the last record";
}

// A spare segment cut short while its zeros were written (the header comes last): only
// zeros, no header. Nothing was written to it: removed without a damage report.
TEST(Recovery, ZeroOnlySpareIsRemovedQuietly) {
  spool_fixture f;
  f.write(std::string(1 << 16, '\0'));
  auto [q, rep] = recover(f.t.path, true);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(rep.new_damage, 0u);
  EXPECT_TRUE(rep.notes.empty());
  EXPECT_EQ(rep.segments_removed, 1u);
}

TEST(Recovery, TornRecordBeforeZerosIsStillTorn) {
  spool_fixture f;
  std::string m2 = msg(id(2));
  f.write(header() + msg(id(1)) + m2.substr(0, m2.size() / 2) + std::string(8192, '\0'));
  auto [q, rep] = recover(f.t.path, true);
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(rep.new_damage, 1u);
  EXPECT_EQ(rep.unused_bytes, 0u);
}

TEST(Recovery, RemovesEmptySegments) {
  spool_fixture f;
  f.write(header());
  auto [q, rep] = recover(f.t.path, true);
  EXPECT_EQ(rep.segments_removed, 1u);
  EXPECT_FALSE(std::filesystem::exists(f.seg));
}

TEST(Recovery, ReadOnlyModeChangesNothing) {
  spool_fixture f;
  std::string all = header() + msg(id(1)) + "garbage-tail";
  f.write(all);
  auto [q, rep] = recover(f.t.path, false);
  EXPECT_EQ(q.size(), 1u);
  EXPECT_GT(rep.torn_bytes, 0u);
  EXPECT_EQ(f.read(), all);
}

// --- delivery status and reclamation -----------------------------------------------------

namespace {

// A message with n recipients r0@y.test ... in a segment with nonce `nn`.
std::string msg_n(const std::string& qid, uint32_t n, uint64_t nn) {
  std::string b;
  size_t s = begin_record(b, record_type::message);
  envelope_in e;
  e.id = qid;
  e.mail_from = "a@b.test";
  put_message_head(b, e, n);
  for (uint32_t i = 0; i < n; ++i) put_rcpt(b, "r" + std::to_string(i) + "@y.test", 0, "");
  std::string content = "Subject: " + qid + "\r\n\r\nbody\r\n";
  uint32_t len = static_cast<uint32_t>(content.size());
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<char>(len >> (8 * i)));
  b += content;
  finish_record(b, s);
  set_record_nonce(b.data() + s, nn);
  return b;
}

std::string status(const std::string& qid, uint32_t attempts, uint64_t next, std::vector<rcpt_status> e,
                   uint64_t nn) {
  std::string b;
  encode_status(b, qid, attempts, next, 0, e, nn);
  return b;
}

std::string done(const std::string& qid, uint64_t nn) {
  std::string b;
  encode_done(b, qid, nn);
  return b;
}

// Segment `sid` of shard 0 with its own nonce (sid + 1) and the given records.
struct multi_spool {
  tmpdir t;
  multi_spool() {
    std::string err;
    EXPECT_TRUE(ensure_spool_dirs(t.path, err)) << err;
  }
  static uint64_t nonce_of(uint64_t sid) { return 0xABCD000000000000ull + sid; }
  std::string path(uint64_t sid) const { return segment_dir(t.path) + "/" + segment_name(sid, 0); }
  void write(uint64_t sid, const std::string& records) {
    std::string h;
    encode_segment_header(h, 0, sid, 1, nonce_of(sid));
    std::ofstream(path(sid), std::ios::binary) << h + records;
  }
  bool exists(uint64_t sid) const { return std::filesystem::exists(path(sid)); }
};

}  // namespace

TEST(SpoolStatus, RoundTripAndBounds) {
  std::vector<rcpt_status> e{{0, rcpt_state::delivered, "2.0.0", "250 ok"},
                             {2, rcpt_state::failed, "5.1.1", std::string_view("x")}};
  std::string long_text(5000, 'z');
  e.push_back({1, rcpt_state::deferred, "4.4.1", long_text});
  std::string b;
  encode_status(b, "ABC", 3, 123456789, status_delay_warned, e, 0);
  record_view rv;
  ASSERT_EQ(read_record({reinterpret_cast<const unsigned char*>(b.data()), b.size()}, 0, rv), read_status::ok);
  EXPECT_EQ(rv.type, record_type::status);
  status_view sv;
  ASSERT_TRUE(decode_status(rv.payload, sv));
  EXPECT_EQ(sv.id, "ABC");
  EXPECT_EQ(sv.attempts, 3u);
  EXPECT_EQ(sv.next_attempt_us, 123456789u);
  EXPECT_EQ(sv.flags, status_delay_warned);
  std::vector<rcpt_status> got;
  ASSERT_TRUE(for_each_status(sv, [&](const rcpt_status& r) { got.push_back(r); }));
  ASSERT_EQ(got.size(), 3u);
  EXPECT_EQ(got[1].index, 2u);
  EXPECT_EQ(got[1].state, rcpt_state::failed);
  EXPECT_EQ(got[1].dsn, "5.1.1");
  EXPECT_EQ(got[2].text.size(), max_status_text) << "a remote server's long text is cut";
  // Truncated or lying payloads are refused, never read past.
  for (size_t cut = 1; cut < rv.payload.size(); ++cut) {
    status_view bad;
    EXPECT_FALSE(decode_status(rv.payload.substr(0, rv.payload.size() - cut), bad)) << cut;
  }
}

TEST(RecoveryStatus, FoldsPerRecipientStateInFileOrder) {
  multi_spool s;
  uint64_t n1 = multi_spool::nonce_of(1), n2 = multi_spool::nonce_of(2);
  s.write(1, msg_n(id(1), 3, n1) +
                 status(id(1), 1, 111, {{0, rcpt_state::delivered, "2.0.0", "250 ok"},
                                        {1, rcpt_state::deferred, "4.2.0", "451 later"},
                                        {2, rcpt_state::deferred, "4.2.0", "451 later"}}, n1));
  s.write(2, status(id(1), 2, 222, {{1, rcpt_state::failed, "5.1.1", "550 no"}, {7, rcpt_state::failed, "5.0.0", "x"}},
                    n2));
  auto [q, rep] = recover(s.t.path, true);
  ASSERT_EQ(q.size(), 1u);
  EXPECT_EQ(rep.status, 2u);
  EXPECT_EQ(q[0].attempts, 2u);
  EXPECT_EQ(q[0].next_attempt_us, 222u);
  ASSERT_EQ(q[0].rcpts.size(), 3u);
  EXPECT_EQ(q[0].rcpts[0].state, rcpt_state::delivered);
  EXPECT_EQ(q[0].rcpts[1].state, rcpt_state::failed);
  EXPECT_EQ(q[0].rcpts[1].text, "550 no");
  EXPECT_EQ(q[0].rcpts[2].state, rcpt_state::deferred);
  EXPECT_TRUE(s.exists(1) && s.exists(2)) << "a live message and its state are kept";
}

TEST(RecoveryReclaim, FullyDoneSegmentsGoOldestFirst) {
  multi_spool s;
  uint64_t n1 = multi_spool::nonce_of(1), n2 = multi_spool::nonce_of(2);
  s.write(1, msg_n(id(1), 1, n1) + msg_n(id(2), 1, n1));
  s.write(2, done(id(1), n2) + done(id(2), n2));
  auto [q, rep] = recover(s.t.path, true);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(rep.segments_removed, 2u);
  EXPECT_FALSE(s.exists(1));
  EXPECT_FALSE(s.exists(2));
}

TEST(RecoveryReclaim, DoneRecordOutlivesTheMessageItCloses) {
  multi_spool s;
  uint64_t n1 = multi_spool::nonce_of(1), n2 = multi_spool::nonce_of(2);
  s.write(1, msg_n(id(1), 1, n1) + msg_n(id(2), 1, n1));
  s.write(2, done(id(1), n2));
  auto [q, rep] = recover(s.t.path, true);
  ASSERT_EQ(ids_of(q), std::vector<std::string>{id(2)});
  EXPECT_TRUE(s.exists(1)) << "holds a live message";
  EXPECT_TRUE(s.exists(2)) << "its done record must stay while message 1's record exists";
  // Restart again: nothing changes, nothing comes back.
  auto [q2, rep2] = recover(s.t.path, true);
  EXPECT_EQ(ids_of(q2), std::vector<std::string>{id(2)});
  EXPECT_EQ(rep2.segments_removed, 0u);
}

TEST(RecoveryReclaim, CopiedForwardMessageFreesItsOldSegment) {
  multi_spool s;
  uint64_t n1 = multi_spool::nonce_of(1), n2 = multi_spool::nonce_of(2);
  s.write(1, msg_n(id(1), 2, n1) + msg_n(id(2), 1, n1) +
                 status(id(1), 4, 999, {{0, rcpt_state::delivered, "2.0.0", "ok"}}, n1));
  s.write(2, done(id(2), n2) + msg_n(id(1), 2, n2) +
                 status(id(1), 4, 999, {{0, rcpt_state::delivered, "2.0.0", "ok"}}, n2));
  auto [q, rep] = recover(s.t.path, true);
  ASSERT_EQ(q.size(), 1u);
  EXPECT_EQ(q[0].segment, s.path(2)) << "the newest copy is the one to read";
  EXPECT_EQ(q[0].copies, 2u);
  EXPECT_EQ(q[0].attempts, 4u);
  ASSERT_EQ(q[0].rcpts.size(), 2u);
  EXPECT_EQ(q[0].rcpts[0].state, rcpt_state::delivered);
  EXPECT_FALSE(s.exists(1)) << "everything in it is done or has a newer copy";
  EXPECT_TRUE(s.exists(2));
  auto [q2, rep2] = recover(s.t.path, true);
  ASSERT_EQ(q2.size(), 1u);
  EXPECT_EQ(q2[0].attempts, 4u) << "the copy's status record carries the state";
  EXPECT_EQ(q2[0].rcpts[0].state, rcpt_state::delivered);
}

TEST(RecoveryReclaim, StatusOfALiveMessageKeepsItsSegment) {
  multi_spool s;
  uint64_t n1 = multi_spool::nonce_of(1), n2 = multi_spool::nonce_of(2);
  s.write(1, msg_n(id(1), 1, n1));
  s.write(2, status(id(1), 1, 5, {{0, rcpt_state::deferred, "4.0.0", "later"}}, n2));
  auto [q, rep] = recover(s.t.path, true);
  ASSERT_EQ(q.size(), 1u);
  EXPECT_EQ(rep.segments_removed, 0u);
  EXPECT_TRUE(s.exists(2)) << "the only record of the attempt";
}

TEST(RecoveryReclaim, DamagedSegmentIsNeverReclaimed) {
  multi_spool s;
  uint64_t n1 = multi_spool::nonce_of(1), n2 = multi_spool::nonce_of(2);
  std::string m1 = msg_n(id(1), 1, n1), m2 = msg_n(id(2), 1, n1);
  m1[record_header_size + 3] ^= 0x40;  // content damage: a corrupt region before m2
  s.write(1, m1 + m2);
  s.write(2, done(id(2), n2) + done(id(1), n2));
  auto [q, rep] = recover(s.t.path, true);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(rep.new_damage, 1u);
  EXPECT_TRUE(s.exists(1)) << "damaged: kept whatever its records say";
  EXPECT_TRUE(s.exists(2)) << "closes message 2, whose record is in a kept segment";
}

TEST(RecoveryReclaim, OrphanDoneRecordsGo) {
  multi_spool s;
  s.write(3, done(id(9), multi_spool::nonce_of(3)) +
                 status(id(9), 1, 1, {{0, rcpt_state::delivered, "2.0.0", "ok"}}, multi_spool::nonce_of(3)));
  auto [q, rep] = recover(s.t.path, true);
  EXPECT_TRUE(q.empty());
  EXPECT_FALSE(s.exists(3)) << "they close messages whose segments were reclaimed earlier";
}

TEST(RecoveryReclaim, CheckModeRemovesNothing) {
  multi_spool s;
  uint64_t n1 = multi_spool::nonce_of(1), n2 = multi_spool::nonce_of(2);
  s.write(1, msg_n(id(1), 1, n1));
  s.write(2, done(id(1), n2));
  auto [q, rep] = recover(s.t.path, false);
  EXPECT_TRUE(q.empty());
  EXPECT_TRUE(s.exists(1) && s.exists(2));
}
