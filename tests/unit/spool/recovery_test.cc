#include "spool/recovery.hh"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "spool/record.hh"
#include "spool/scan.hh"
#include "tests/unit/common/tmpdir.hh"

using namespace tern::spool;

namespace {

std::string msg(const std::string& id) {
  std::string b;
  size_t s = begin_record(b, record_type::message);
  envelope_in e;
  e.id = id;
  e.mail_from = "a@b.test";
  put_message_head(b, e, 1);
  put_rcpt(b, "x@y.test", 0, "");
  std::string content = "Subject: " + id + "\r\n\r\nbody\r\n";
  uint32_t n = static_cast<uint32_t>(content.size());
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<char>(n >> (8 * i)));
  b += content;
  finish_record(b, s);
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
  encode_segment_header(h, 0, 5, 1);
  return h;
}

}  // namespace

TEST(Recovery, RebuildsQueueHonouringDoneRecords) {
  spool_fixture f;
  std::string d;
  encode_done(d, id(2));
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

TEST(Recovery, TruncatesTornTailAtEveryCut) {
  std::string good = header() + msg(id(1));
  std::string last = msg(id(2));
  for (size_t cut = 1; cut < last.size(); cut += 7) {
    spool_fixture f;
    f.write(good + last.substr(0, cut));
    auto first = recover(f.t.path);
    ASSERT_EQ(first.q.size(), 1u) << cut;
    EXPECT_EQ(first.rep.torn_bytes, cut);
    EXPECT_EQ(f.read(), good) << "tail not truncated at cut " << cut;
    // A second recovery finds nothing to repair.
    EXPECT_EQ(recover(f.t.path).rep.torn_bytes, 0u);
  }
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
    ++files;
    EXPECT_EQ(std::filesystem::file_size(e.path()), m2.size());
  }
  EXPECT_EQ(files, 1u);
}

TEST(Recovery, ZeroFilledTailIsTorn) {
  spool_fixture f;
  f.write(header() + msg(id(1)) + std::string(4096, '\0'));
  auto [q, rep] = recover(f.t.path, true);
  EXPECT_EQ(q.size(), 1u);
  EXPECT_EQ(rep.torn_bytes, 4096u);
  EXPECT_EQ(rep.quarantined_bytes, 0u);
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
