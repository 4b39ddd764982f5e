#include "src/smtp/command.hh"

#include <gtest/gtest.h>

#include "spool/record.hh"

using namespace tern::smtp;

TEST(Command, VerbsAreCaseInsensitive) {
  EXPECT_EQ(parse_command("ehlo example.com").v, verb::ehlo);
  EXPECT_EQ(parse_command("EHLO example.com").arg, "example.com");
  EXPECT_EQ(parse_command("MaIl FROM:<a@b>").v, verb::mail);
  EXPECT_EQ(parse_command("QUIT").v, verb::quit);
  EXPECT_EQ(parse_command("DATA   ").arg, "");
  EXPECT_EQ(parse_command("XYZZY").v, verb::unknown);
  EXPECT_EQ(parse_command("").v, verb::unknown);
  EXPECT_TRUE(parse_command("DATA").flags & cmd_sync_after);
}

TEST(Command, MailFrom) {
  mail_args m;
  ASSERT_EQ(parse_mail("FROM:<user@example.com>", m), parse_error::none);
  EXPECT_EQ(m.address, "user@example.com");
  ASSERT_EQ(parse_mail("FROM:<>", m), parse_error::none);
  EXPECT_EQ(m.address, "");
  ASSERT_EQ(parse_mail("from: <a@b.c> SIZE=1000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1", m), parse_error::none);
  EXPECT_EQ(m.size, 1000u);
  EXPECT_EQ(m.body, 1);
  EXPECT_TRUE(m.smtputf8);
  EXPECT_EQ(m.ret, 2);
  EXPECT_EQ(m.envid, "QQ+2B1");
  ASSERT_EQ(parse_mail("FROM:<@relay.example:user@example.com>", m), parse_error::none);
  EXPECT_EQ(m.address, "user@example.com");
  ASSERT_EQ(parse_mail("FROM:<\"john doe\"@example.com>", m), parse_error::none);
  ASSERT_EQ(parse_mail("FROM:<jöhn@exämple.com> SMTPUTF8", m), parse_error::none);
}

TEST(Command, MailFromErrors) {
  mail_args m;
  EXPECT_EQ(parse_mail("FROM:user@example.com", m), parse_error::syntax);  // no brackets
  EXPECT_EQ(parse_mail("TO:<a@b>", m), parse_error::syntax);
  EXPECT_EQ(parse_mail("FROM:<a@b", m), parse_error::syntax);
  EXPECT_EQ(parse_mail("FROM:<a b@c>", m), parse_error::bad_address);
  EXPECT_EQ(parse_mail("FROM:<a@b..c>", m), parse_error::bad_address);
  EXPECT_EQ(parse_mail("FROM:<user>", m), parse_error::bad_address);
  EXPECT_EQ(parse_mail(std::string("FROM:<a\x01@b>"), m), parse_error::bad_address);
  EXPECT_EQ(parse_mail("FROM:<a@b> SIZE=abc", m), parse_error::bad_param);
  EXPECT_EQ(parse_mail("FROM:<a@b> SIZE=1 SIZE=2", m), parse_error::duplicate_param);
  EXPECT_EQ(parse_mail("FROM:<a@b> BODY=BINARYMIME", m), parse_error::bad_param);
  EXPECT_EQ(parse_mail("FROM:<a@b> RET=ALL", m), parse_error::bad_param);
  EXPECT_EQ(parse_mail("FROM:<a@b> ENVID=a=b", m), parse_error::bad_param);
  EXPECT_EQ(parse_mail("FROM:<a@b> ENVID=+2", m), parse_error::bad_param);
  EXPECT_EQ(parse_mail("FROM:<a@b> XFOO=1", m), parse_error::unknown_param);
  EXPECT_EQ(parse_mail("FROM:<a@b>SIZE=1", m), parse_error::syntax);
  EXPECT_EQ(parse_mail("FROM:<" + std::string(300, 'a') + "@b>", m), parse_error::too_long);
}

TEST(Command, RcptTo) {
  rcpt_args r;
  ASSERT_EQ(parse_rcpt("TO:<x@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40example.com", r), parse_error::none);
  EXPECT_EQ(r.address, "x@example.com");
  EXPECT_EQ(r.notify, tern::spool::notify_success | tern::spool::notify_failure);
  EXPECT_EQ(r.orcpt, "rfc822;x+40example.com");
  ASSERT_EQ(parse_rcpt("TO:<x@example.com> NOTIFY=NEVER", r), parse_error::none);
  EXPECT_EQ(r.notify, tern::spool::notify_never);
  EXPECT_EQ(parse_rcpt("TO:<>", r), parse_error::bad_address);
  EXPECT_EQ(parse_rcpt("TO:<x@y> NOTIFY=NEVER,SUCCESS", r), parse_error::bad_param);
  EXPECT_EQ(parse_rcpt("TO:<x@y> NOTIFY=SUCCESS,SUCCESS", r), parse_error::bad_param);
  EXPECT_EQ(parse_rcpt("TO:<x@y> NOTIFY=", r), parse_error::bad_param);
  EXPECT_EQ(parse_rcpt("TO:<x@y> NOTIFY=DELAY,", r), parse_error::bad_param);
  EXPECT_EQ(parse_rcpt("TO:<x@y> ORCPT=x@y", r), parse_error::bad_param);
  EXPECT_EQ(parse_rcpt("TO:<x@y> ORCPT=foo;x", r), parse_error::bad_param);
  EXPECT_EQ(parse_rcpt("TO:<x@y> SIZE=1", r), parse_error::unknown_param);
}

TEST(Command, Bdat) {
  uint64_t size;
  bool last;
  ASSERT_TRUE(parse_bdat("100", size, last));
  EXPECT_EQ(size, 100u);
  EXPECT_FALSE(last);
  ASSERT_TRUE(parse_bdat("0 LAST", size, last));
  EXPECT_TRUE(last);
  ASSERT_TRUE(parse_bdat("5 last", size, last));
  EXPECT_FALSE(parse_bdat("", size, last));
  EXPECT_FALSE(parse_bdat("-1", size, last));
  EXPECT_FALSE(parse_bdat("10 MORE", size, last));
  EXPECT_FALSE(parse_bdat("99999999999999999999", size, last));  // overflow
}

TEST(Command, Xtext) {
  EXPECT_TRUE(valid_xtext("abc+2B+3D"));
  EXPECT_FALSE(valid_xtext("abc+2"));
  EXPECT_FALSE(valid_xtext("abc+zz"));
  EXPECT_FALSE(valid_xtext("a b"));
  EXPECT_FALSE(valid_xtext("a=b"));
}

TEST(Command, JunkFlags) {
  for (const char* j : {"NOOP", "RSET", "VRFY x", "HELP"}) EXPECT_TRUE(parse_command(j).flags & cmd_junk) << j;
  for (const char* n : {"EHLO x", "HELO x", "MAIL FROM:<>", "RCPT TO:<a@b>", "DATA", "QUIT", "BDAT 1", "XYZZY"})
    EXPECT_FALSE(parse_command(n).flags & cmd_junk) << n;
}

TEST(Command, SourceRouteIsReported) {
  rcpt_args r;
  ASSERT_EQ(parse_rcpt("TO:<@a.test,@b.test:u@d.test>", r), parse_error::none);
  EXPECT_EQ(r.address, "u@d.test");
  EXPECT_EQ(r.path, "@a.test,@b.test:u@d.test");
  EXPECT_TRUE(r.source_route);
  ASSERT_EQ(parse_rcpt("TO:<u@d.test>", r), parse_error::none);
  EXPECT_FALSE(r.source_route);
  EXPECT_EQ(r.path, "u@d.test");
}

TEST(Command, RoutedLocalPart) {
  for (const char* m : {"u%h@d", "u@h@d", "\"u@h\"@d", "a!b!c@d", "\"a%b\"@d", "u\\@h@d", "!@d", "%@d"})
    EXPECT_TRUE(routed_local_part(m)) << m;
  for (const char* m : {"u@d", "u.v+w@d", "\"u v\"@d", "postmaster", "u@h%d", "u@d!x", ""})
    EXPECT_FALSE(routed_local_part(m)) << m;
}

TEST(Command, Utf8) {
  EXPECT_TRUE(is_ascii("abc~\x7f"));
  EXPECT_FALSE(is_ascii("d\xc3\xb6rte"));
  EXPECT_TRUE(valid_utf8("d\xc3\xb6rte \xe7\x94\xa8 \xf0\x9f\x93\xa7"));
  EXPECT_TRUE(valid_utf8(""));
  for (const char* bad : {"\xc3", "\xc3(", "\x80", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                          "\xf8\x88\x80\x80\x80", "\xff", "\xe7\x94"})
    EXPECT_FALSE(valid_utf8(bad)) << bad;
}
