#include "net/proxy.hh"

#include <gtest/gtest.h>

#include <string>

#include "src/core/crc32c.hh"

using namespace tern::net;

namespace {

proxy_result parse(const std::string& s, proxy_header& h, size_t cap = proxy_v2_default_max) {
  return parse_proxy({reinterpret_cast<const unsigned char*>(s.data()), s.size()}, h, cap);
}

// Feed the header one byte more at a time: every strict prefix must say need_more, the
// whole header must say done with exactly its length (what follows is SMTP).
void expect_split(const std::string& hdr, const std::string& after = "EHLO x\r\n") {
  std::string all = hdr + after;
  proxy_header h;
  for (size_t n = 0; n < hdr.size(); ++n) {
    auto r = parse(all.substr(0, n), h);
    ASSERT_EQ(r.status, proxy_status::need_more) << "prefix " << n << ": " << (r.error ? r.error : "");
  }
  for (size_t n = hdr.size(); n <= all.size(); ++n) {
    auto r = parse(all.substr(0, n), h);
    ASSERT_EQ(r.status, proxy_status::done) << n;
    ASSERT_EQ(r.consumed, hdr.size());
  }
}

std::string v2(uint8_t ver_cmd, uint8_t fam, const std::string& body) {
  std::string h("\r\n\r\n\0\r\nQUIT\n", 12);
  h.push_back(static_cast<char>(ver_cmd));
  h.push_back(static_cast<char>(fam));
  h.push_back(static_cast<char>(body.size() >> 8));
  h.push_back(static_cast<char>(body.size() & 0xFF));
  return h + body;
}

std::string v4_block() { return std::string("\xC6\x12\x00\x01\xC6\x12\x00\x02\x30\x39\x00\x19", 12); }

}  // namespace

TEST(ProxyV1, Tcp4) {
  std::string hdr = "PROXY TCP4 198.18.0.1 198.18.0.2 12345 25\r\n";
  proxy_header h;
  auto r = parse(hdr + "EHLO", h);
  ASSERT_EQ(r.status, proxy_status::done);
  EXPECT_EQ(r.consumed, hdr.size());
  EXPECT_EQ(h.version, 1);
  EXPECT_FALSE(h.local);
  EXPECT_EQ(h.src.to_string(), "198.18.0.1:12345");
  EXPECT_EQ(h.dst.to_string(), "198.18.0.2:25");
  expect_split(hdr);
}

TEST(ProxyV1, Tcp6AndUnknown) {
  proxy_header h;
  auto r = parse("PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", h);
  ASSERT_EQ(r.status, proxy_status::done);
  EXPECT_EQ(h.src.to_string(), "[2001:db8::1]:1");
  r = parse("PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 x y\r\n", h);
  ASSERT_EQ(r.status, proxy_status::done);
  EXPECT_TRUE(h.local);
  expect_split("PROXY UNKNOWN\r\n");
}

TEST(ProxyV1, Rejects) {
  proxy_header h;
  const char* bad[] = {
      "PROXY TCP4 198.18.0.1 198.18.0.2 12345 25\n",      // bare LF
      "PROXY TCP4 198.18.0.1 198.18.0.2 12345 25\rX",     // CR not followed by LF
      "PROXY TCP4 198.18.0.1  198.18.0.2 12345 25\r\n",   // double space
      "PROXY TCP4 198.18.0.1 198.18.0.2 12345\r\n",       // missing field
      "PROXY TCP4 198.18.0.1 198.18.0.2 12345 25 9\r\n",  // extra field
      "PROXY TCP4 2001:db8::1 198.18.0.2 1 2\r\n",        // family mismatch
      "PROXY TCP6 198.18.0.1 198.18.0.2 1 2\r\n",         // family mismatch
      "PROXY TCP4 198.18.0.1 198.18.0.2 65536 25\r\n",    // port range
      "PROXY TCP4 198.18.0.1 198.18.0.2 0123 25\r\n",     // leading zero
      "PROXY TCP4 198.18.0.256 198.18.0.2 1 25\r\n",      // bad address
      "PROXY UDP4 198.18.0.1 198.18.0.2 1 25\r\n",        // protocol
      "PROXX TCP4",                                       // signature
      "EHLO example.com\r\n",                             // SMTP where PROXY expected
  };
  for (const char* b : bad) EXPECT_EQ(parse(b, h).status, proxy_status::error) << b;
}

TEST(ProxyV1, LongerThan107BytesIsAnError) {
  std::string s = "PROXY UNKNOWN " + std::string(200, 'a');
  proxy_header h;
  // 105 bytes without a CR: the CR may still come at index 105 (a 107-byte line).
  EXPECT_EQ(parse(s.substr(0, 105), h).status, proxy_status::need_more);
  // 106 bytes without a CR: the line would be 108 bytes or more.
  EXPECT_EQ(parse(s.substr(0, 106), h).status, proxy_status::error);
  EXPECT_EQ(parse(s.substr(0, 107), h).status, proxy_status::error);
  // Exactly 107 bytes including CRLF is allowed, also when split byte by byte.
  std::string ok = "PROXY UNKNOWN " + std::string(107 - 14 - 2, 'a') + "\r\n";
  ASSERT_EQ(ok.size(), 107u);
  EXPECT_EQ(parse(ok, h).status, proxy_status::done);
  expect_split(ok);
}

// Regression: a 108-byte v1 line (CR at index 106) was accepted; the spec's worst case
// is 107 bytes including the CRLF.
TEST(ProxyV1, Exactly108BytesIsAnError) {
  std::string bad = "PROXY UNKNOWN " + std::string(108 - 14 - 2, 'a') + "\r\n";
  ASSERT_EQ(bad.size(), 108u);
  proxy_header h;
  auto r = parse(bad, h);
  EXPECT_EQ(r.status, proxy_status::error);
  EXPECT_STREQ(r.error, "PROXY v1: header longer than 107 bytes");
  // And a TCP6 line padded to 108 bytes is refused too, not just UNKNOWN.
  std::string tcp6 = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
  ASSERT_EQ(tcp6.size(), 104u);
  EXPECT_EQ(parse(tcp6, h).status, proxy_status::done);
}

// Regression: "... 25 \r\n" (a space before the CRLF) was accepted.
TEST(ProxyV1, TrailingSpaceBeforeCrlfIsAnError) {
  proxy_header h;
  for (const char* b : {"PROXY TCP4 198.18.0.1 198.18.0.2 12345 25 \r\n",
                        "PROXY TCP6 2001:db8::1 2001:db8::2 1 2 \r\n", "PROXY UNKNOWN \r\n",
                        "PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2 \r\n"}) {
    auto r = parse(b, h);
    EXPECT_EQ(r.status, proxy_status::error) << b;
    EXPECT_STREQ(r.error, "PROXY v1: space before CRLF") << b;
  }
  // Without the space these are fine.
  EXPECT_EQ(parse("PROXY TCP4 198.18.0.1 198.18.0.2 12345 25\r\n", h).status, proxy_status::done);
  EXPECT_EQ(parse("PROXY UNKNOWN\r\n", h).status, proxy_status::done);
}

TEST(ProxyV2, Tcp4WithTlvsSplitByteByByte) {
  std::string tlvs = std::string("\x02\x00\x0bmx.test.com", 14) + std::string("\x05\x00\x03" "abc", 6) +
                     std::string("\x04\x00\x02zz", 5);
  std::string hdr = v2(0x21, 0x11, v4_block() + tlvs);
  proxy_header h;
  auto r = parse(hdr, h);
  ASSERT_EQ(r.status, proxy_status::done) << (r.error ? r.error : "");
  EXPECT_EQ(h.src.to_string(), "198.18.0.1:12345");
  EXPECT_EQ(h.dst.to_string(), "198.18.0.2:25");
  EXPECT_EQ(h.authority, "mx.test.com");
  EXPECT_EQ(h.unique_id, "abc");
  EXPECT_EQ(h.tlv_count, 3);
  expect_split(hdr);
}

TEST(ProxyV2, Tcp6) {
  std::string body(36, '\0');
  body[0] = '\x20';
  body[1] = '\x01';
  body[15] = 1;
  body[16] = '\x20';
  body[17] = '\x01';
  body[31] = 2;
  body[32] = 0x01;
  body[33] = 0x00;
  body[34] = 0x00;
  body[35] = 0x19;
  proxy_header h;
  ASSERT_EQ(parse(v2(0x21, 0x21, body), h).status, proxy_status::done);
  EXPECT_EQ(h.src.to_string(), "[2001::1]:256");
  EXPECT_EQ(h.dst.to_string(), "[2001::2]:25");
}

TEST(ProxyV2, LocalSkipsWholeLength) {
  // LOCAL (health checks): addresses and family are ignored, all of len is skipped.
  std::string hdr = v2(0x20, 0x11, v4_block() + std::string("\x99\x00\x01X", 4));
  proxy_header h;
  auto r = parse(hdr + "QUIT\r\n", h);
  ASSERT_EQ(r.status, proxy_status::done);
  EXPECT_TRUE(h.local);
  EXPECT_EQ(r.consumed, hdr.size());
  expect_split(hdr);
  // UNSPEC family with PROXY command: also the socket's own addresses.
  ASSERT_EQ(parse(v2(0x21, 0x00, ""), h).status, proxy_status::done);
  EXPECT_TRUE(h.local);
}

TEST(ProxyV2, Crc32c) {
  auto src = address::from_ip("198.18.0.7", 4000);
  auto dst = address::from_ip("198.18.0.8", 25);
  std::string hdr = encode_proxy_v2(*src, *dst, false, true);
  proxy_header h;
  auto r = parse(hdr, h);
  ASSERT_EQ(r.status, proxy_status::done) << (r.error ? r.error : "");
  EXPECT_TRUE(h.crc_verified);
  EXPECT_EQ(h.src.to_string(), "198.18.0.7:4000");
  // Flip one address bit: the checksum no longer matches.
  std::string bad = hdr;
  bad[17] ^= 1;
  r = parse(bad, h);
  ASSERT_EQ(r.status, proxy_status::error);
  EXPECT_STREQ(r.error, "PROXY v2: CRC32C mismatch");
}

TEST(ProxyV2, Rejects) {
  proxy_header h;
  EXPECT_EQ(parse(v2(0x11, 0x11, v4_block()), h).status, proxy_status::error);  // version 1 in v2
  EXPECT_EQ(parse(v2(0x22, 0x11, v4_block()), h).status, proxy_status::error);  // command 2
  EXPECT_EQ(parse(v2(0x21, 0x12, v4_block()), h).status, proxy_status::error);  // UDP
  EXPECT_EQ(parse(v2(0x21, 0x41, v4_block()), h).status, proxy_status::error);  // family 4
  EXPECT_EQ(parse(v2(0x21, 0x11, v4_block().substr(0, 8)), h).status, proxy_status::error);  // short block
  EXPECT_EQ(parse(v2(0x21, 0x11, v4_block() + std::string("\x01\x00\x09" "ab", 5)), h).status,
            proxy_status::error);  // TLV overruns
  EXPECT_EQ(parse(v2(0x21, 0x11, v4_block() + std::string("\x01\x00", 2)), h).status,
            proxy_status::error);  // truncated TLV header
  EXPECT_EQ(parse(v2(0x21, 0x11, v4_block() + std::string("\x03\x00\x02xx", 5)), h).status,
            proxy_status::error);  // CRC TLV of the wrong size
  std::string badsig("\r\n\r\n\0\r\nQUIT\x0b", 12);
  EXPECT_EQ(parse(badsig, h).status, proxy_status::error);
}

TEST(ProxyV2, HeaderCap) {
  std::string big = v2(0x21, 0x11, v4_block() + "\x04" + std::string("\x0f\xa0", 2) + std::string(4000, 'n'));
  proxy_header h;
  ASSERT_EQ(big.size(), 16u + 12 + 3 + 4000);
  EXPECT_EQ(parse(big, h, 4096).status, proxy_status::done);
  EXPECT_EQ(parse(big, h, 1024).status, proxy_status::error);
}

TEST(ProxyV2, CapRejectsBeforeReadingTheBody) {
  // Only the 16-byte fixed part has arrived; len says 60000: refuse now, do not wait.
  std::string h16 = v2(0x21, 0x11, "").substr(0, 14) + std::string("\xEA\x60", 2);
  proxy_header h;
  EXPECT_EQ(parse(h16, h, 4096).status, proxy_status::error);
}

TEST(ProxyEncode, RoundTripV1) {
  auto src = address::from_ip("2001:db8::9", 5555);
  auto dst = address::from_ip("2001:db8::a", 25);
  proxy_header h;
  ASSERT_EQ(parse(encode_proxy_v1(*src, *dst), h).status, proxy_status::done);
  EXPECT_EQ(h.src.to_string(), "[2001:db8::9]:5555");
}
