#include "spool/record.hh"

#include <gtest/gtest.h>

#include <string>

using namespace tern::spool;

namespace {
std::string message_record(const std::string& id, const std::string& content) {
  std::string b;
  size_t s = begin_record(b, record_type::message);
  envelope_in e;
  e.id = id;
  e.arrival_us = 42;
  e.client_ip = "198.18.0.1";
  e.client_port = 2525;
  e.helo = "client.test";
  e.mail_from = "a@b.test";
  e.envid = "E1";
  e.ret = dsn_ret::full;
  e.body = body_type::eight_bit_mime;
  put_message_head(b, e, 2);
  put_rcpt(b, "x@y.test", notify_success, "rfc822;x@y.test");
  put_rcpt(b, "z@y.test", 0, "");
  b.append("\0\0\0\0", 4);
  size_t at = b.size() - 4;
  b += content;
  uint32_t n = static_cast<uint32_t>(content.size());
  for (int i = 0; i < 4; ++i) b[at + static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  finish_record(b, s);
  return b;
}
std::span<const unsigned char> span(const std::string& s) {
  return {reinterpret_cast<const unsigned char*>(s.data()), s.size()};
}
}  // namespace

TEST(Record, MessageRoundTrip) {
  std::string r = message_record("000000000000000001", "Subject: x\r\n\r\nbody\r\n");
  record_view rv;
  ASSERT_EQ(read_record(span(r), 0, rv), read_status::ok);
  EXPECT_EQ(rv.type, record_type::message);
  EXPECT_EQ(rv.size, r.size());
  message_view m;
  ASSERT_TRUE(decode_message(rv.payload, m));
  EXPECT_EQ(m.id, "000000000000000001");
  EXPECT_EQ(m.arrival_us, 42u);
  EXPECT_EQ(m.client_ip, "198.18.0.1");
  EXPECT_EQ(m.helo, "client.test");
  EXPECT_EQ(m.mail_from, "a@b.test");
  EXPECT_EQ(m.envid, "E1");
  EXPECT_EQ(m.ret, dsn_ret::full);
  EXPECT_EQ(m.body, body_type::eight_bit_mime);
  EXPECT_EQ(m.nrcpt, 2u);
  EXPECT_EQ(m.content, "Subject: x\r\n\r\nbody\r\n");
  int n = 0;
  EXPECT_TRUE(for_each_rcpt(m, [&](const rcpt_view& rc) {
    if (n++ == 0) {
      EXPECT_EQ(rc.addr, "x@y.test");
      EXPECT_EQ(rc.notify, notify_success);
    }
  }));
  EXPECT_EQ(n, 2);
}

TEST(Record, FaultsInCheckOrder) {
  constexpr uint64_t nonce = 0x1122334455667788ull;
  std::string a = message_record("000000000000000001", "one\r\n");
  std::string b = message_record("000000000000000002", "two\r\n");
  set_record_nonce(a.data(), nonce);
  set_record_nonce(b.data(), nonce);
  std::string both = a + b;
  record_view rv;
  record_fault f;
  ASSERT_EQ(read_record(span(both), 0, nonce, rv, &f), read_status::ok);
  ASSERT_EQ(read_record(span(both), a.size(), nonce, rv, &f), read_status::ok);
  // Every cut inside the last record: header short or payload past the end.
  for (size_t cut = a.size() + 1; cut < both.size(); ++cut) {
    auto s = both.substr(0, cut);
    EXPECT_EQ(read_record(span(s), a.size(), nonce, rv, &f), read_status::bad) << cut;
    EXPECT_TRUE(f == record_fault::short_header || f == record_fault::past_eof) << cut;
  }
  std::string bad = both;
  bad[30] ^= 0x40;  // payload
  EXPECT_EQ(read_record(span(bad), 0, nonce, rv, &f), read_status::bad);
  EXPECT_EQ(f, record_fault::bad_crc);
  bad = both;
  bad[8] = 9;  // type
  EXPECT_EQ(read_record(span(bad), 0, nonce, rv, &f), read_status::bad);
  EXPECT_EQ(f, record_fault::bad_type);
  bad = both;
  bad[7] = '\x7F';  // absurd length: never trusted
  EXPECT_EQ(read_record(span(bad), 0, nonce, rv, &f), read_status::bad);
  EXPECT_EQ(f, record_fault::bad_length);
  // Another segment's nonce (or none): refused before any CRC work.
  uint64_t crc_bytes = 0;
  EXPECT_EQ(read_record(span(both), 0, nonce + 1, rv, &f, &crc_bytes), read_status::bad);
  EXPECT_EQ(f, record_fault::bad_nonce);
  EXPECT_EQ(crc_bytes, 0u);
}

TEST(Record, SizeBoundsAgree) {
  // The default limits fit with a wide margin; the bound is monotonic and exact at the edge.
  EXPECT_TRUE(record_fits(10u << 20, 1000, 2048));
  uint64_t top = max_message_size_for(1000, 2048);
  EXPECT_TRUE(record_fits(top, 1000, 2048));
  EXPECT_FALSE(record_fits(top + 1, 1000, 2048));
  EXPECT_EQ(max_record_for(top, 1000, 2048) - record_header_size, uint64_t(max_record_len));
  EXPECT_FALSE(record_fits(1u << 30, 1, 512));  // 1 GiB of content plus any envelope
  EXPECT_EQ(max_message_size_for(100000, 65536), 0u);  // the envelope alone is too big
}

TEST(Record, DecodeRejectsTruncatedPayloads) {
  std::string r = message_record("000000000000000001", "content");
  record_view rv;
  ASSERT_EQ(read_record(span(r), 0, rv), read_status::ok);
  for (size_t n = 0; n < rv.payload.size(); ++n) {
    message_view m;
    EXPECT_FALSE(decode_message(rv.payload.substr(0, n), m)) << n;
  }
}

TEST(Record, QueueIds) {
  std::string id = format_queue_id(0x1A1FE5A0892ull, 3, 0x12345);
  EXPECT_EQ(id, "1A1FE5A0892" "03" "12345");
  uint64_t e;
  uint32_t s, q;
  ASSERT_TRUE(parse_queue_id(id, e, s, q));
  EXPECT_EQ(e, 0x1A1FE5A0892ull);
  EXPECT_EQ(s, 3u);
  EXPECT_EQ(q, 0x12345u);
  EXPECT_FALSE(parse_queue_id("1a1fe5a08920312345", e, s, q));
  EXPECT_FALSE(parse_queue_id("short", e, s, q));
}

TEST(Record, SegmentHeaderAndDone) {
  std::string b;
  encode_segment_header(b, 7, 99, 123, 77);
  encode_done(b, "000000000000000001", 77);
  record_view rv;
  ASSERT_EQ(read_record(span(b), 0, rv), read_status::ok);
  segment_view sv;
  ASSERT_TRUE(decode_segment_header(rv.payload, sv));
  EXPECT_EQ(record_nonce(reinterpret_cast<const unsigned char*>(b.data())), 77u);
  EXPECT_EQ(sv.shard, 7u);
  EXPECT_EQ(sv.segment_id, 99u);
  size_t off = rv.size;
  ASSERT_EQ(read_record(span(b), off, rv), read_status::ok);
  std::string_view id;
  ASSERT_TRUE(decode_done(rv.payload, id));
  EXPECT_EQ(id, "000000000000000001");
  EXPECT_EQ(read_record(span(b), off + rv.size, rv), read_status::end);
}
