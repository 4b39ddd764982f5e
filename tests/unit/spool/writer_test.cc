// The spool writer on a real io_uring and a temp directory: group commit (one writev +
// one fdatasync for a batch), results only after the fsync, and failure handling with
// fault injection: the batch fails, the segment is cut back, the writer refuses until a
// probe succeeds.
#include "spool/writer.hh"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

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
  explicit ring_fixture(unsigned entries = 64) { EXPECT_EQ(io_uring_queue_init(entries, &ring, 0), 0); }
  ~ring_fixture() { io_uring_queue_exit(&ring); }
  // Submit and reap until the writer has nothing in flight (the batch, and any spare
  // segment, trim or probe it queued). Completions go to on_cqe by their op bits.
  void complete(writer& w, std::vector<writer::result>& out) {
    io_uring_submit(&ring);
    while (w.io_pending()) {
      io_uring_cqe* cqe;
      ASSERT_EQ(io_uring_wait_cqe(&ring, &cqe), 0);
      uint64_t d = cqe->user_data;
      int res = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
      ASSERT_EQ(d & ~uint64_t(0xF), ud_base);
      w.on_cqe(static_cast<unsigned>(d & 0xF), res, out);
      io_uring_submit(&ring);
    }
  }
  static constexpr uint64_t ud_base = uint64_t(7) << 32 | 0xF0;
};

// A message record with a fresh id and the given content.
std::string msg_with(writer& w, std::string_view content) {
  char id[19];
  w.next_id(id);
  std::string b;
  size_t s = begin_record(b, record_type::message);
  envelope_in e;
  e.id = std::string_view(id, 18);
  put_message_head(b, e, 0);
  uint32_t n = static_cast<uint32_t>(content.size());
  b.append(reinterpret_cast<const char*>(&n), 4);
  b.append(content);
  finish_record(b, s);
  return b;
}

std::string make_msg(writer& w) { return msg_with(w, "hello"); }

// A temp spool with an open writer and a ring.
struct writer_fixture {
  tmpdir t;
  ring_fixture r;
  writer w;
  explicit writer_fixture(uint64_t segment_size = 64ull << 20, bool fsync = true, writer::options o = {},
                          unsigned ring_entries = 64)
      : r(ring_entries) {
    std::string err;
    EXPECT_TRUE(ensure_spool_dirs(t.path, err)) << err;
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
  ASSERT_TRUE(w.flush(&r.ring, ring_fixture::ud_base, out));
  EXPECT_TRUE(out.empty());  // nothing is acknowledged before the fsync completes
  r.complete(w, out);
  ASSERT_EQ(out.size(), 10u);
  for (auto& x : out) EXPECT_TRUE(x.ok);
  EXPECT_EQ(w.batches(), 1u);  // one writev + one fdatasync for all ten
  recovery_report rep;
  auto q = f.recovered(rep);
  ASSERT_EQ(q.size(), 10u);
  // Each result says where its record is: what delivery reads back.
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_EQ(out[i].segment_id, w.segment_id());
    EXPECT_EQ(out[i].offset, q[out[i].token].offset) << i;
    EXPECT_EQ(q[out[i].token].segment, w.segment_path());
    EXPECT_EQ(q[out[i].token].record_size, msgs[out[i].token].size());
  }
}

class WriterRing : public ::testing::TestWithParam<unsigned> {};

// With a normal ring and with the smallest one (4 entries: the probe's chain must fit).
TEST_P(WriterRing, FailureCutsBackAndRefusesUntilHealthy) {
  writer_fixture f(64ull << 20, true, {}, GetParam());
  auto& w = f.w;
  auto& r = f.r;
  std::string a = make_msg(w), b = make_msg(w);
  std::vector<writer::result> out;
  w.append(a.data(), a.size(), 1);
  w.inject_failure(ENOSPC);
  ASSERT_TRUE(w.flush(&r.ring, ring_fixture::ud_base, out));
  r.complete(w, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_FALSE(out[0].ok);
  EXPECT_FALSE(w.healthy());
  EXPECT_EQ(std::filesystem::file_size(w.segment_path()), segment_header_record_size);  // header record only
  // While unhealthy, appends fail without I/O.
  out.clear();
  w.append(b.data(), b.size(), 2);
  EXPECT_FALSE(w.flush(&r.ring, ring_fixture::ud_base, out));
  ASSERT_EQ(out.size(), 1u);
  EXPECT_FALSE(out[0].ok);
  // The probe (through the ring) finds the disk writable again.
  w.tick(&r.ring, ring_fixture::ud_base);
  r.complete(w, out);
  EXPECT_TRUE(w.healthy());
  out.clear();
  w.append(b.data(), b.size(), 3);
  ASSERT_TRUE(w.flush(&r.ring, ring_fixture::ud_base, out));
  r.complete(w, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_TRUE(out[0].ok);
  recovery_report rep;
  auto q = f.recovered(rep);
  ASSERT_EQ(q.size(), 1u);  // only the message that got its ok
  EXPECT_EQ(rep.torn_bytes, 0u);
}

INSTANTIATE_TEST_SUITE_P(Writer, WriterRing, ::testing::Values(64u, 4u));

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
    ASSERT_TRUE(w.flush(&r.ring, ring_fixture::ud_base, out));
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
  ASSERT_TRUE(w.flush(&r.ring, ring_fixture::ud_base, out));
  // Arrives while the failing batch is in flight: it belongs to the next batch.
  w.append(c.data(), c.size(), 3);
  r.complete(w, out);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_FALSE(out[0].ok);
  EXPECT_FALSE(out[1].ok);
  EXPECT_EQ(w.last_error(), "Input/output error");
  out.clear();
  EXPECT_FALSE(w.flush(&r.ring, ring_fixture::ud_base, out));  // unhealthy: refused without I/O
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
  writer::options o;
  o.prezero = false;  // no spare preparation in the same submission: the SQ holds the writev alone
  writer_fixture f(64ull << 20, false, o);
  auto& w = f.w;
  auto& r = f.r;
  std::string a = make_msg(w), b = make_msg(w);
  std::vector<writer::result> out;
  w.append(a.data(), a.size(), 1);
  w.append(b.data(), b.size(), 2);
  ASSERT_TRUE(w.flush(&r.ring, ring_fixture::ud_base, out));
  EXPECT_EQ(io_uring_sq_ready(&r.ring), 1u);  // the writev only
  r.complete(w, out);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_TRUE(out[0].ok && out[1].ok);
  recovery_report rep;
  EXPECT_EQ(f.recovered(rep).size(), 2u);
}

namespace {
std::string sized_msg(writer& w, size_t content) { return msg_with(w, std::string(content, 'x')); }
uint64_t allocated_bytes(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0);
  return uint64_t(st.st_blocks) * 512;
}
}  // namespace

// Batches stop at max_batch_bytes and at IOV_MAX / 3 records; every token still gets its
// result, in order, after its own batch's fdatasync.
TEST(Writer, BatchesBoundedInBytesAndRecords) {
  writer::options o;
  o.max_batch_bytes = 3 * 1100;
  writer_fixture f(64ull << 20, true, o);
  auto& w = f.w;
  std::vector<std::string> big;
  for (int i = 0; i < 7; ++i) big.push_back(sized_msg(w, 1000));
  std::vector<writer::result> out;
  for (size_t i = 0; i < big.size(); ++i) w.append(big[i].data(), big[i].size(), i);
  while (!w.idle()) {
    if (!w.io_pending()) {
      ASSERT_TRUE(w.flush(&f.r.ring, ring_fixture::ud_base, out));
    }
    f.r.complete(w, out);
  }
  EXPECT_EQ(w.batches(), 3u);  // 3 + 3 + 1
  ASSERT_EQ(out.size(), 7u);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_EQ(out[i].token, i);

  recovery_report rep;
  EXPECT_EQ(f.recovered(rep).size(), 7u);

  writer_fixture g;
  std::vector<std::string> small;
  for (int i = 0; i < 400; ++i) small.push_back(make_msg(g.w));
  out.clear();
  for (size_t i = 0; i < small.size(); ++i) g.w.append(small[i].data(), small[i].size(), i);
  ASSERT_TRUE(g.w.flush(&g.r.ring, ring_fixture::ud_base, out));
  g.r.complete(g.w, out);
  EXPECT_EQ(out.size(), 341u);  // 1024 iovecs / 3 per record
  ASSERT_TRUE(g.w.flush(&g.r.ring, ring_fixture::ud_base, out));
  g.r.complete(g.w, out);
  EXPECT_EQ(out.size(), 400u);
  EXPECT_EQ(g.recovered(rep).size(), 400u);
}

// Rollover goes through a spare segment prepared on the ring (a tiny ring forces the
// SQ-full path); the closed segment and, at close(), the current one are trimmed to their
// end: no KEEP_SIZE preallocation left behind.
TEST(Writer, RollsOverThroughTheRingAndTrims) {
  writer_fixture f(1 << 20, true, {}, 4);
  auto& w = f.w;
  std::vector<std::string> msgs;
  for (int i = 0; i < 30; ++i) msgs.push_back(sized_msg(w, 100000));
  std::vector<writer::result> out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    w.append(msgs[i].data(), msgs[i].size(), i);
    ASSERT_TRUE(w.flush(&f.r.ring, ring_fixture::ud_base, out));
    f.r.complete(w, out);
  }
  ASSERT_EQ(out.size(), msgs.size());
  for (auto& x : out) EXPECT_TRUE(x.ok);
  EXPECT_GE(w.rollovers(), 2u);
  auto segs = list_segments(f.t.path);
  ASSERT_GE(segs.size(), 3u);
  std::string current = w.segment_path();
  for (auto& s : segs) {
    if (s == current) continue;
    uint64_t size = std::filesystem::file_size(s);
    if (size <= segment_header_record_size) continue;  // the spare prepared next
    EXPECT_LE(allocated_bytes(s), (size + 4095) / 4096 * 4096 + 4096) << s << " keeps its preallocation";
  }
  w.close();
  uint64_t size = std::filesystem::file_size(current);
  EXPECT_LE(allocated_bytes(current), (size + 4095) / 4096 * 4096 + 4096) << "close() did not trim";
  recovery_report rep;
  auto q = f.recovered(rep);
  EXPECT_EQ(q.size(), msgs.size());
  EXPECT_EQ(rep.new_damage, 0u);
}

// Regression: a batch over 2 GiB failed with a false ENOSPC (Linux writev stops at
// 0x7ffff000 bytes) and marked the spool unhealthy. The short write is now continued.
TEST(Writer, BatchOverTwoGiBIsContinued) {
  struct statvfs vf;
  if (statvfs("/var/tmp", &vf) != 0 || uint64_t(vf.f_bavail) * vf.f_frsize < (6ull << 30))
    GTEST_SKIP() << "needs 6 GiB free in /var/tmp";
  char tmpl[] = "/var/tmp/tern-writer-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string dir = tmpl;
  struct cleanup {
    std::string d;
    ~cleanup() { std::filesystem::remove_all(d); }
  } c{dir};
  std::string err;
  ASSERT_TRUE(ensure_spool_dirs(dir, err)) << err;
  ring_fixture r;
  writer w;
  writer::options o;
  o.dir = dir;
  o.segment_size = 8ull << 30;
  o.max_batch_bytes = 4ull << 30;
  o.prezero = false;  // no 8 GiB of zeros for the spare
  ASSERT_TRUE(w.open(o, err)) << err;
  std::string rec = sized_msg(w, (64u << 20) - 100);
  std::vector<writer::result> out;
  for (int i = 0; i < 40; ++i) w.append(rec.data(), rec.size(), static_cast<uint64_t>(i));
  ASSERT_TRUE(w.flush(&r.ring, ring_fixture::ud_base, out));
  r.complete(w, out);
  ASSERT_EQ(out.size(), 40u);
  for (auto& x : out) EXPECT_TRUE(x.ok);
  EXPECT_TRUE(w.healthy()) << w.last_error();
  EXPECT_EQ(w.batches(), 1u);
  EXPECT_GE(w.continued_writes(), 1u);
  EXPECT_EQ(std::filesystem::file_size(w.segment_path()), segment_header_record_size + 40 * rec.size());
  segment_scan sc;
  size_t n = 0;
  ASSERT_TRUE(scan_segment(w.segment_path(), sc, [&](const record_view& rv, uint64_t) {
    n += rv.type == record_type::message;
  }));
  EXPECT_EQ(n, 40u);
  EXPECT_TRUE(sc.clean());
  w.close();
}

// spool.preallocate = "zero": the first segment is only reserved; the spare prepared at
// half of it is zeroed and taken as soon as it is ready. A zeroed segment keeps its full
// size while it is written (appends overwrite zeros), recovery reads its records and
// counts the zeros after them as unused space, not damage, and close() trims.
TEST(Writer, PrezeroedSegmentsRecoverClean) {
  writer_fixture f(1 << 20, true, {}, 8);
  auto& w = f.w;
  std::vector<std::string> msgs;
  for (int i = 0; i < 8; ++i) msgs.push_back(sized_msg(w, 100000));
  std::vector<writer::result> out;
  std::string first = w.segment_path();
  for (size_t i = 0; i < msgs.size(); ++i) {
    w.append(msgs[i].data(), msgs[i].size(), i);
    ASSERT_TRUE(w.flush(&f.r.ring, ring_fixture::ud_base, out));
    f.r.complete(w, out);  // the batch, and the zeroed spare's preparation once past half
  }
  ASSERT_EQ(out.size(), msgs.size());
  for (auto& x : out) EXPECT_TRUE(x.ok);
  EXPECT_EQ(w.rollovers(), 1u) << "the zeroed spare replaces the reserved first segment";
  EXPECT_NE(w.segment_path(), first);
  EXPECT_EQ(std::filesystem::file_size(w.segment_path()), uint64_t(1) << 20) << "zeros to the segment size";
  recovery_report rep;
  EXPECT_EQ(f.recovered(rep).size(), msgs.size());
  EXPECT_EQ(rep.new_damage, 0u);
  EXPECT_EQ(rep.torn_bytes, 0u);
  EXPECT_GT(rep.unused_bytes, 0u);
  std::string cur = w.segment_path();
  uint64_t end = w.offset();
  w.close();
  EXPECT_EQ(std::filesystem::file_size(cur), end) << "close() trims the zeros";
}

// A segment larger than the writer's zero source (1 MiB, written again and again) and not a
// multiple of it: the spare is zeroed in several WRITEs, to exactly its size, and reads as
// zeros after the records.
TEST(Writer, PrezeroedSegmentLargerThanTheZeroSource) {
  const uint64_t seg = (uint64_t(5) << 19) + 4096;  // 2.5 MiB + 4 KiB: three zero WRITEs
  writer_fixture f(seg, true, {}, 8);
  auto& w = f.w;
  std::vector<std::string> msgs;
  for (int i = 0; i < 16; ++i) msgs.push_back(sized_msg(w, 100000));
  std::vector<writer::result> out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    w.append(msgs[i].data(), msgs[i].size(), i);
    ASSERT_TRUE(w.flush(&f.r.ring, ring_fixture::ud_base, out));
    f.r.complete(w, out);
  }
  ASSERT_EQ(out.size(), msgs.size());
  for (auto& x : out) EXPECT_TRUE(x.ok);
  ASSERT_EQ(w.rollovers(), 1u);
  std::string cur = w.segment_path();
  ASSERT_EQ(std::filesystem::file_size(cur), seg) << "zeros to the segment size, not a multiple of 1 MiB";
  std::string bytes(seg, '\1');
  int fd = ::open(cur.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pread(fd, bytes.data(), seg, 0), static_cast<ssize_t>(seg));
  ::close(fd);
  EXPECT_EQ(bytes.find_first_not_of('\0', w.offset()), std::string::npos) << "zeros after the records";
  recovery_report rep;
  EXPECT_EQ(f.recovered(rep).size(), msgs.size());
  EXPECT_EQ(rep.new_damage, 0u);
}
