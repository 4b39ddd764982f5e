#pragma once
// SMTP command line parsing (RFC 5321 4.1, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531
// SMTPUTF8, RFC 3461 DSN, RFC 3030 CHUNKING). Pure functions over one line without its
// CRLF; nothing here allocates. Untrusted: every field is bounded and validated.
#include <cstdint>
#include <string_view>

namespace tern::smtp {

enum class verb : uint8_t {
  unknown, helo, ehlo, mail, rcpt, data, bdat, rset, noop, quit, vrfy, expn, help, starttls, auth
};

// Command table flags (Postfix smtpd_cmd_table): sync_after: the client must wait for the
// reply before sending more (pipelined bytes after it are a synchronisation error);
// junk: does no mail work (NOOP, RSET, VRFY, HELP; postfix counts NOOP, VRFY, ETRN, RSET)
// and counts toward limits.junk_commands.
enum cmd_flags : uint8_t { cmd_sync_after = 1, cmd_counts_error = 2, cmd_junk = 4 };

struct command {
  verb v = verb::unknown;
  uint8_t flags = 0;
  std::string_view arg;  // after the verb and one space; trailing spaces removed
};

command parse_command(std::string_view line) noexcept;

enum class parse_error : uint8_t {
  none, syntax, bad_address, unknown_param, bad_param, duplicate_param, too_long
};

struct mail_args {
  std::string_view address;  // empty: null sender
  uint64_t size = 0;         // SIZE=, 0 when not given
  uint8_t body = 0;          // 0 7BIT (default), 1 8BITMIME
  bool smtputf8 = false;
  uint8_t ret = 0;           // 0 none, 1 FULL, 2 HDRS
  std::string_view envid;
  std::string_view bad;      // the offending parameter, for the reply
};

struct rcpt_args {
  std::string_view address;  // the mailbox, a source route removed
  std::string_view path;     // what was inside <>, source route included (for replies)
  bool source_route = false; // "<@a,@b:user@domain>" (RFC 5321 4.1.2 / C)
  uint8_t notify = 0;  // spool::notify_flags
  std::string_view orcpt;
  std::string_view bad;
};

// "FROM:<addr> params" / "TO:<addr> params"
parse_error parse_mail(std::string_view arg, mail_args& out) noexcept;
parse_error parse_rcpt(std::string_view arg, rcpt_args& out) noexcept;

// "BDAT <size> [LAST]"
bool parse_bdat(std::string_view arg, uint64_t& size, bool& last) noexcept;

// RFC 3461 4: xtext ("+HH" escapes, printable ASCII except '+' and '=').
bool valid_xtext(std::string_view s) noexcept;
// Domain part of a mailbox (after the last '@'), empty if none.
std::string_view domain_of(std::string_view mailbox) noexcept;

// The local part (before the last '@') contains a routing operator: '@', '%' or '!',
// quoted or not ("user%host@d", "user@host@d", "\"user@host\"@d", "a!b!c@d"). Postfix
// marks such addresses RESOLVE_FLAG_ROUTED (trivial-rewrite resolve.c) whatever its own
// percent_hack/swap_bangpath settings: the next hop may route on them.
bool routed_local_part(std::string_view mailbox) noexcept;

bool is_ascii(std::string_view s) noexcept;
// Well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF).
bool valid_utf8(std::string_view s) noexcept;

}  // namespace tern::smtp
