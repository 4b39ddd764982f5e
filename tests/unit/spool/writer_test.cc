// The spool writer on a real io_uring and a temp directory: group commit (one writev +
// one fdatasync for a batch), results only after the fsync, and failure handling with
// fault injection: the batch fails, the segment is cut back, the writer refuses until a
// probe succeeds.
#include "spool/writer.hh"

#include <gtest/gtest.h>

#include <cerrno>
#include <filesystem>

#include "spool/recovery.hh"
#include "spool/record.hh"
#include "spool/scan.hh"
#include "tests/unit/common/tmpdir.hh"

using namespace tern::spool;

namespace {

struct ring_fixture {
  io_uring ring{};
  ring_fixture() { EXPECT_EQ(io_uring_queue_init(64, &ring, 0), 0); }
  ~ring_fixture() { io_uring_queue_exit(&ring); }
  // Submit and reap until the writer reports the batch.
  void complete(writer& w, std::vector<writer::result>& out) {
    io_uring_submit(&ring);
    while (w.in_flight()) {
      io_uring_cqe* cqe;
      ASSERT_EQ(io_uring_wait_cqe(&ring, &cqe), 0);
      uint64_t d = cqe->user_data;
      int res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
      if (d == 1) w.on_write(res, out);
      if (d == 2) w.on_fsync(res, out);
    }
  }
};

std::string make_msg(writer& w) {
  char id[19];
  w.next_id(id);
  std::string b;
  size_t s = begin_record(b, record_type::message);
  envelope_in e;
  e.id = std::string_view(id, 18);
  put_message_head(b, e, 0);
  b.append("\5\0\0\0hello", 9);
  finish_record(b, s);
  return b;
}

// A temp spool with an open writer and a ring.
struct writer_fixture {
  tmpdir t;
  writer w;
  ring_fixture r;
  explicit writer_fixture(uint64_t segment_size = 64ull << 20, bool fsync = true) {
    std::string err;
    EXPECT_TRUE(ensure_spool_dirs(t.path, err)) << err;
    writer::options o;
    o.dir = t.path;
    o.segment_size = segment_size;
    o.fsync = fsync;
    EXPECT_TRUE(w.open(o, err)) << err;
  }
  std::vector<queued_message> recovered(recovery_report& rep) {
    std::vector<queued_message> q;
    std::string err;
    EXPECT_TRUE(recover_spool(t.path, false, q, rep, err)) << err;
    return q;
  }
};

}  // namespace

TEST(Writer, GroupCommitThenRecoverable) {
  writer_fixture f;
  auto& w = f.w;
  auto& r = f.r;
  std::vector<std::string> msgs;
  for (int i = 0; i < 10; ++i) msgs.push_back(make_msg(w));
  std::vector<writer::result> out;
  for (size_t i = 0; i < msgs.size(); ++i) w.append(msgs[i].data(), msgs[i].size(), i);
  ASSERT_TRUE(w.flush(&r.ring, 1, 2, out));
  EXPECT_TRUE(out.empty());  // nothing is acknowledged before the fsync completes
  r.complete(w, out);
  ASSERT_EQ(out.size(), 10u);
  for (auto& x : out) EXPECT_TRUE(x.ok);
  EXPECT_EQ(w.batches(), 1u);  // one writev + one fdatasync for all ten
  recovery_report rep;
  auto q = f.recovered(rep);
  EXPECT_EQ(q.size(), 10u);
}

TEST(Writer, FailureCutsBackAndRefusesUntilHealthy) {
  writer_fixture f;
  auto& w = f.w;
  auto& r = f.r;
  std::string a = make_msg(w), b = make_msg(w);
  std::vector<writer::result> out;
  w.append(a.data(), a.size(), 1);
  w.inject_failure(ENOSPC);
  ASSERT_TRUE(w.flush(&r.ring, 1, 2, out));
  r.complete(w, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_FALSE(out[0].ok);
  EXPECT_FALSE(w.healthy());
  EXPECT_EQ(std::filesystem::file_size(w.segment_path()), segment_header_record_size);  // header record only
  // While unhealthy, appends fail without I/O.
  out.clear();
  w.append(b.data(), b.size(), 2);
  EXPECT_FALSE(w.flush(&r.ring, 1, 2, out));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_FALSE(out[0].ok);
  // The probe finds the disk writable again.
  w.tick();
  EXPECT_TRUE(w.healthy());
  out.clear();
  w.append(b.data(), b.size(), 3);
  ASSERT_TRUE(w.flush(&r.ring, 1, 2, out));
  r.complete(w, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out[0].ok);
  recovery_report rep;
  auto q = f.recovered(rep);
  ASSERT_EQ(q.size(), 1u);  // only the message that got its ok
  EXPECT_EQ(rep.torn_bytes, 0u);
}

TEST(Writer, RotatesSegments) {
  writer_fixture f(1 << 20);
  auto& w = f.w;
  auto& r = f.r;
  std::string big;
  {
    char id[19];
    w.next_id(id);
    size_t s = begin_record(big, record_type::message);
    envelope_in e;
    e.id = std::string_view(id, 18);
    put_message_head(big, e, 0);
    uint32_t n = 700000;
    big.append(reinterpret_cast<const char*>(&n), 4);
    big.append(n, 'x');
    finish_record(big, s);
  }
  std::vector<writer::result> out;
  for (int i = 0; i < 3; ++i) {
    w.append(big.data(), big.size(), static_cast<uint64_t>(i));
    ASSERT_TRUE(w.flush(&r.ring, 1, 2, out));
    r.complete(w, out);
  }
  EXPECT_GE(list_segments(f.t.path).size(), 2u);
}

TEST(Writer, EioOnFsyncFailsTheBatch) {
  writer_fixture f;
  auto& w = f.w;
  auto& r = f.r;
  std::string a = make_msg(w), b = make_msg(w), c = make_msg(w);
  std::vector<writer::result> out;
  w.append(a.data(), a.size(), 1);
  w.append(b.data(), b.size(), 2);
  w.inject_failure(EIO);
  ASSERT_TRUE(w.flush(&r.ring, 1, 2, out));
  // Arrives while the failing batch is in flight: it belongs to the next batch.
  w.append(c.data(), c.size(), 3);
  r.complete(w, out);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_FALSE(out[0].ok);
  EXPECT_FALSE(out[1].ok);
  EXPECT_EQ(w.last_error(), "Input/output error");
  out.clear();
  EXPECT_FALSE(w.flush(&r.ring, 1, 2, out));  // unhealthy: refused without I/O
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].token, 3u);
  EXPECT_FALSE(out[0].ok);
  recovery_report rep;
  auto q = f.recovered(rep);
  EXPECT_TRUE(q.empty());
  EXPECT_EQ(rep.torn_bytes, 0u);
}

// [spool] fsync = false: one writev per batch and no fdatasync; the tokens succeed on the
// write completion and the records are readable.
TEST(Writer, FsyncOffWritesWithoutFdatasync) {
  writer_fixture f(64ull << 20, false);
  auto& w = f.w;
  auto& r = f.r;
  std::string a = make_msg(w), b = make_msg(w);
  std::vector<writer::result> out;
  w.append(a.data(), a.size(), 1);
  w.append(b.data(), b.size(), 2);
  ASSERT_TRUE(w.flush(&r.ring, 1, 2, out));
  EXPECT_EQ(io_uring_sq_ready(&r.ring), 1u);  // the writev only
  r.complete(w, out);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_TRUE(out[0].ok && out[1].ok);
  recovery_report rep;
  EXPECT_EQ(f.recovered(rep).size(), 2u);
}
