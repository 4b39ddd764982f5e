#include "src/core/crc32c.hh"

#include <gtest/gtest.h>

#include <string>

TEST(Crc32c, KnownVectors) {
  // RFC 3720 B.4 test vectors.
  std::string zeros(32, '\0'), ones(32, '\xFF');
  EXPECT_EQ(tern::crc32c(0, zeros.data(), zeros.size()), 0x8A9136AAu);
  EXPECT_EQ(tern::crc32c(0, ones.data(), ones.size()), 0x62A8AB43u);
  EXPECT_EQ(tern::crc32c(0, "123456789", 9), 0xE3069283u);
}

TEST(Crc32c, Incremental) {
  std::string s = "The quick brown fox jumps over the lazy dog, twice or more.";
  uint32_t whole = tern::crc32c(0, s.data(), s.size());
  for (size_t cut = 0; cut <= s.size(); ++cut) {
    uint32_t c = tern::crc32c(0, s.data(), cut);
    EXPECT_EQ(tern::crc32c(c, s.data() + cut, s.size() - cut), whole) << cut;
  }
}
