#pragma once
// Delivery status notifications (RFC 3461, 3464, 6522, 6533, 3834): who gets one, and the
// message itself, the way postfix's bounce daemon writes them.
//
// Three kinds: failure (bounce), delay (warning: still queued, retried until a time) and
// success (delivered here, or relayed to a next hop that did not offer DSN). One DSN per
// original message and kind; it lists every recipient of that kind that wants it
// (plan_dsns), and goes to the original envelope sender with a null sender of its own. A
// message whose sender is null (a bounce itself) never gets one: no bounce loops.
//
// The message is multipart/report; report-type=delivery-status: (1) a text/plain
// explanation, (2) message/delivery-status (RFC 3464 fields), (3) the original returned as
// message/rfc822 or only its header section as text/rfc822-headers (RET, and a size bound
// when RET was not given). For an SMTPUTF8 original the global types of RFC 6533 are used
// (message/global-delivery-status, message/global, message/global-headers) and UTF-8 may
// appear in addresses.
//
// What it trusts: the options (hostname from the validated config), the DSN queue id, the
// times, and the planner's index lists. What it does not: every byte that came from a
// client or a remote server: addresses, ORCPT, ENVID, the remote host name, the remote reply,
// the original content. Text from them that goes into a header field or a DSN field has
// control bytes (CR and LF included) replaced by '?', non-UTF-8 bytes too (non-ASCII ones
// unless SMTPUTF8), and is cut to max_field_text, so it can never start a header line or a
// MIME part. The returned original is copied as is except that every line ending becomes
// CRLF and lines over 998 bytes are split (header lines folded). The MIME boundary is
// checked absent from every part it encloses and from To:.
//
// Pure: no I/O, no clock (times are passed in), no global state.
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "spool/record.hh"

namespace tern::queue {

enum class dsn_kind : uint8_t { failure = 0, delay = 1, success = 2 };

// What became of one recipient (or where it stands now).
enum class rcpt_outcome : uint8_t {
  failed = 0,       // 5xx, or expired after the queue lifetime (4.4.7): Action: failed
  deferred = 1,     // 4xx, still queued: Action: delayed
  delivered = 2,    // final delivery happened here (LMTP into a mailbox): Action: delivered
  relayed = 3,      // a next hop without DSN accepted it: Action: relayed
  relayed_dsn = 4,  // a next hop with DSN accepted it and NOTIFY went along: it reports, we don't
};

struct dsn_rcpt {
  std::string_view addr;    // the recipient as in the envelope (UTF-8 allowed with SMTPUTF8)
  uint8_t notify = 0;       // spool::notify_flags; 0: NOTIFY not given
  std::string_view orcpt;   // the ORCPT parameter as received ("rfc822;u+40example.org"), or empty
  rcpt_outcome outcome = rcpt_outcome::failed;
  std::string_view status;  // RFC 3463 code "5.1.1"; a malformed one is replaced by x.0.0
  std::string_view remote_host;  // the next hop's name ("mx.example"); empty: none
  std::string_view remote_ip;    // its address ("192.0.2.1"); may be empty
  std::string_view diagnostic;   // the remote reply, or the local reason
  bool remote_reply = false;     // diagnostic is the remote SMTP reply (Diagnostic-Code: smtp)
  uint64_t last_attempt_us = 0;  // wall clock; 0: not shown
};

// Whether a recipient with these NOTIFY flags wants a DSN of kind k (RFC 3461 4.1): NEVER
// wants none; given flags want only their kinds; no NOTIFY at all wants failure and delay
// (postfix: delay warnings when they are enabled), not success.
bool dsn_wanted(dsn_kind k, uint8_t notify) noexcept;

// Which recipients go into which DSN: indexes into rcpts, in order. All three lists are
// empty when the sender is null. A recipient is in `failure` when failed, `delay` when
// deferred and delay_due (the schedule says the one warning is due now:
// delay_warning_due), `success` when delivered or relayed (not relayed_dsn); each only if
// dsn_wanted.
struct dsn_plan {
  std::vector<uint32_t> failure;
  std::vector<uint32_t> delay;
  std::vector<uint32_t> success;
  bool empty() const noexcept { return failure.empty() && delay.empty() && success.empty(); }
};
dsn_plan plan_dsns(std::string_view sender, std::span<const dsn_rcpt> rcpts, bool delay_due);

struct dsn_options {
  std::string hostname;  // Reporting-MTA, From: MAILER-DAEMON@, Message-ID (config hostname)
  // When RET was not given, a failure DSN returns the whole original if it is at most this
  // many bytes, else only its header section (postfix bounce_size_limit, default 50000).
  // Expected config key: queue.bounce_size_limit.
  uint64_t return_size_limit = 50000;
  // Untrusted text (diagnostic, addresses, ORCPT, ENVID, host names) is cut to this many
  // bytes in any one header or DSN field; clamped to 900 so that every field line, name
  // included, stays within 998 bytes.
  size_t max_field_text = 900;
};

struct dsn_request {
  dsn_kind kind = dsn_kind::failure;
  std::string_view queue_id;     // the DSN's own queue id: Message-ID and MIME boundary
  uint64_t now_us = 0;           // Date:
  uint64_t retry_until_us = 0;   // delay: Will-Retry-Until (the original's expiry)
};

struct dsn_message {
  std::string sender;     // always empty: a DSN has the null reverse-path (RFC 3461 6.2)
  std::string recipient;  // the original envelope sender
  // The original was SMTPUTF8 and the DSN holds 8-bit bytes (UTF-8 addresses, headers,
  // the message/global part): send it with SMTPUTF8 (RFC 6531, 6533).
  bool smtputf8 = false;
  bool eight_bit = false;    // bytes >= 0x80 anywhere: send with BODY=8BITMIME
  bool headers_only = false; // the original's header section only was returned
  std::string boundary;
  std::string content;  // CRLF lines, each at most 998 bytes before its CRLF
};

// Build the DSN of kind r.kind about message m for the recipients rcpts[which[i]].
// Returns false (and builds nothing) when the sender is null, `which` is empty or has an
// index out of range, or the hostname or queue id is empty.
// Returned content: failure follows RET (FULL: all, HDRS: headers, none: all up to
// return_size_limit); delay and success return headers only (RFC 3461 4.3: RET is about
// failed DSNs; postfix does the same). A BINARYMIME original is returned as headers only
// (its body cannot be carried in an 8BITMIME message).
bool build_dsn(const dsn_options& o, const spool::message_view& m, std::span<const dsn_rcpt> rcpts,
               std::span<const uint32_t> which, const dsn_request& r, dsn_message& out);

// --- pieces, exposed for tests and the fuzz target -----------------------------------------

// "Fri, 04 Dec 2026 14:20:17 +0000 (UTC)" for a wall-clock time in microseconds. Locale
// independent.
std::string rfc5322_date(uint64_t us);
// Untrusted text for a header or DSN field: CR, LF, other controls and DEL become '?'; bytes
// >= 0x80 are kept only when utf8 and they form valid UTF-8, else '?'; cut to at most max
// bytes without splitting a UTF-8 sequence.
std::string sanitize_field(std::string_view s, size_t max, bool utf8);

}  // namespace tern::queue
