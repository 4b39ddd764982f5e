// Dot-unstuffing and every SMTP smuggling variant (bare LF/CR around the dot, NUL next to
// it): only <CR><LF>.<CR><LF> ends a message, and anything else is flagged.
#include "src/smtp/data.hh"

#include <gtest/gtest.h>

#include <string>

using tern::smtp::dot_decoder;
using tern::smtp::eol_checker;

namespace {
struct outcome {
  bool done;
  size_t consumed;
  std::string content;
  bool bare_cr, bare_lf, nul, too_big;
};

outcome run(const std::string& in, uint64_t max = 1 << 20, size_t chunk = 0) {
  dot_decoder d;
  d.reset(max);
  std::string out;
  size_t used = 0;
  if (chunk == 0) chunk = in.size() ? in.size() : 1;
  while (used < in.size() && !d.done()) {
    size_t n = std::min(chunk, in.size() - used);
    used += d.feed(in.data() + used, n, out);
  }
  return {d.done(), used, out, d.bare_cr(), d.bare_lf(), d.nul(), d.too_big()};
}
}  // namespace

TEST(DotDecoder, PlainMessageEndsAtCrLfDotCrLf) {
  auto o = run("Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<a@b>\r\n");
  EXPECT_TRUE(o.done);
  EXPECT_EQ(o.content, "Subject: x\r\n\r\nhello\r\n");
  EXPECT_EQ(o.consumed, std::string("Subject: x\r\n\r\nhello\r\n.\r\n").size());
  EXPECT_FALSE(o.bare_cr || o.bare_lf || o.nul);
}

TEST(DotDecoder, EmptyMessage) {
  auto o = run(".\r\n");
  EXPECT_TRUE(o.done);
  EXPECT_EQ(o.content, "");
}

TEST(DotDecoder, Unstuffing) {
  auto o = run("..hidden\r\n...\r\n.x\r\n.\r\n");
  EXPECT_TRUE(o.done);
  EXPECT_EQ(o.content, ".hidden\r\n..\r\nx\r\n");
}

TEST(DotDecoder, SameResultAtEverySplit) {
  std::string msg = "a\r\n..b\r\n.\r\n";
  auto whole = run(msg);
  for (size_t c = 1; c <= msg.size(); ++c) {
    auto o = run(msg, 1 << 20, c);
    EXPECT_EQ(o.content, whole.content) << c;
    EXPECT_TRUE(o.done) << c;
  }
}

// Each smuggling variant: the would-be end marker does not end the message, and the
// bytes after it (a smuggled second transaction) stay message content.
TEST(DotDecoder, SmugglingVariantsDoNotEndTheMessage) {
  using namespace std::string_literals;
  const std::string variants[] = {
      "\n.\n"s,        // bare LF both sides
      "\n.\r\n"s,      // bare LF before the dot
      "\r\n.\n"s,      // bare LF after the dot
      "\r.\r"s,        // bare CR both sides
      "\r.\r\n"s,      // bare CR before
      "\r\n.\rX"s,     // bare CR after
      "\r\n.\0\r\n"s,  // NUL next to the dot
      "\r\n\0.\r\n"s,  // NUL before the dot
  };
  for (const auto& marker : variants) {
    std::string in = "Subject: a\r\n\r\nbody" + marker + "MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n";
    auto o = run(in);
    EXPECT_FALSE(o.done) << "variant ends the message: " << testing::PrintToString(marker);
    EXPECT_EQ(o.consumed, in.size());
    EXPECT_TRUE(o.bare_cr || o.bare_lf || o.nul) << testing::PrintToString(marker);
    // The real end afterwards still works, and the message is flagged for rejection.
    auto o2 = run(in + "\r\n.\r\n");
    EXPECT_TRUE(o2.done);
    EXPECT_TRUE(o2.bare_cr || o2.bare_lf || o2.nul);
  }
}

TEST(DotDecoder, BareLfInsideALineIsFlagged) {
  auto o = run("a\nb\r\n.\r\n");
  EXPECT_TRUE(o.done);
  EXPECT_TRUE(o.bare_lf);
  auto p = run("a\rb\r\n.\r\n");
  EXPECT_TRUE(p.done);
  EXPECT_TRUE(p.bare_cr);
}

TEST(DotDecoder, OversizedIsCountedNotStored) {
  std::string body(5000, 'x');
  auto o = run(body + "\r\n.\r\n", 1000);
  EXPECT_TRUE(o.done);
  EXPECT_TRUE(o.too_big);
  EXPECT_EQ(o.content.size(), 1000u);
}

TEST(EolChecker, Bdat) {
  eol_checker e;
  e.feed("abc\r", 4);
  e.feed("\ndef\r\n", 6);  // CRLF split across chunks is fine
  e.finish();
  EXPECT_FALSE(e.bad());
  e.reset();
  e.feed("abc\ndef", 7);
  EXPECT_TRUE(e.bad());
  e.reset();
  e.feed("abc\r", 4);
  e.finish();
  EXPECT_TRUE(e.bad());
  e.reset();
  e.feed("a\0b", 3);
  EXPECT_TRUE(e.nul());
}
