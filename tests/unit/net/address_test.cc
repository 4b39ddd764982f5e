#include "net/address.hh"

#include <gtest/gtest.h>

using tern::net::address;
using tern::net::cidr;

TEST(Address, ParseHostPort) {
  auto a = address::parse("127.0.0.1:2525");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->to_string(), "127.0.0.1:2525");
  auto b = address::parse("[::1]:25");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->to_string(), "[::1]:25");
  EXPECT_FALSE(address::parse("localhost:25"));  // no names
  EXPECT_FALSE(address::parse("::1:25"));
  EXPECT_FALSE(address::parse("1.2.3.4:65536"));
  EXPECT_FALSE(address::parse("1.2.3.4:"));
}

TEST(Cidr, MatchV4V6AndMapped) {
  auto n = cidr::parse("10.0.0.0/8");
  ASSERT_TRUE(n);
  EXPECT_TRUE(n->contains(*address::from_ip("10.1.2.3", 0)));
  EXPECT_FALSE(n->contains(*address::from_ip("11.1.2.3", 0)));
  // IPv4-mapped IPv6 is normalised to IPv4.
  EXPECT_TRUE(n->contains(*address::from_ip("::ffff:10.9.9.9", 0)));
  auto v6 = cidr::parse("2001:db8::/32");
  ASSERT_TRUE(v6);
  EXPECT_TRUE(v6->contains(*address::from_ip("2001:db8:1::5", 0)));
  EXPECT_FALSE(v6->contains(*address::from_ip("2001:db9::5", 0)));
  auto odd = cidr::parse("192.0.2.128/25");
  ASSERT_TRUE(odd);
  EXPECT_TRUE(odd->contains(*address::from_ip("192.0.2.200", 0)));
  EXPECT_FALSE(odd->contains(*address::from_ip("192.0.2.100", 0)));
  auto host = cidr::parse("::1");
  ASSERT_TRUE(host);
  EXPECT_EQ(host->prefix, 128);
}

TEST(Cidr, RejectsBadNetworks) {
  EXPECT_FALSE(cidr::parse("10.1.2.3/8"));  // host bits set
  EXPECT_FALSE(cidr::parse("10.0.0.0/33"));
  EXPECT_FALSE(cidr::parse("10.0.0.0/"));
  EXPECT_FALSE(cidr::parse("example.com"));
}
