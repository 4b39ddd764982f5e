#include "src/queue/dsn.hh"

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "src/core/bytes.hh"

namespace tern::queue {

namespace {

constexpr std::string_view crlf = "\r\n";
// RFC 5322 2.1.1: a line is at most 998 characters before its CRLF.
constexpr size_t max_line = 998;
// RFC 5322 2.1.1: lines SHOULD be at most 78 characters; we keep to it where we write text.
constexpr size_t text_width = 78;
// An upper bound on any untrusted value in one field, so that name + value fits a line.
constexpr size_t field_text_cap = 900;
// Remote host names and IP texts come from DNS and the routing; they are short.
constexpr size_t max_host_text = 255;
constexpr size_t max_ip_text = 64;
// Boundary candidates tried before giving up (the first one almost always works).
constexpr int boundary_tries = 64;

bool is_ascii(std::string_view s) noexcept {
  // OR a block without an early exit so that the compiler vectorizes it.
  for (size_t i = 0; i < s.size(); i += 4096) {
    size_t m = std::min<size_t>(4096, s.size() - i);
    unsigned char acc = 0;
    for (size_t j = 0; j < m; ++j) acc |= static_cast<unsigned char>(s[i + j]);
    if (acc & 0x80) return false;
  }
  return true;
}

// Back a split position off so that it does not fall inside a UTF-8 sequence (at most 3
// bytes; a position that cannot be fixed, such as inside invalid bytes, is kept).
size_t utf8_split_point(std::string_view s, size_t pos) noexcept {
  if (pos == 0 || pos >= s.size()) return pos;
  auto cont = [&](size_t i) { return (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80; };
  size_t p = pos;
  for (int i = 0; i < 3 && p > 0 && cont(p); ++i) --p;
  if (p == 0 || cont(p)) return pos;
  return p;
}

std::string_view trim_spaces(std::string_view s) noexcept {
  while (!s.empty() && s.front() == ' ') s.remove_prefix(1);
  while (!s.empty() && s.back() == ' ') s.remove_suffix(1);
  return s;
}

// A host name or IP text: letters, digits and "-._:[]" pass, anything else is '?'.
std::string sanitize_host(std::string_view s, size_t max) {
  std::string out;
  for (char c : s.substr(0, max)) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
              c == '.' || c == '_' || c == ':' || c == '[' || c == ']';
    out.push_back(ok ? c : '?');
  }
  return out;
}

// RFC 3463 status: class 2, 4 or 5, then two numbers of 1 to 3 digits.
bool valid_status(std::string_view s) noexcept {
  if (s.size() < 5 || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.') return false;
  size_t i = 2;
  for (int part = 0; part < 2; ++part) {
    size_t start = i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    if (i == start || i - start > 3) return false;
    if (part == 0) {
      if (i >= s.size() || s[i] != '.') return false;
      ++i;
    }
  }
  return i == s.size();
}

// RFC 6533 3: utf-8-addr-xtext, for a UTF-8 address in a non-global delivery-status field:
// printable ASCII except '+', '=' and '\' as is, everything else as \x{HEX} code points
// (bytes that are not UTF-8 as U+FFFD). Cut at max without splitting an escape.
std::string utf8_addr_xtext(std::string_view s, size_t max) {
  std::string out;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    uint32_t cp = 0;
    size_t len = utf8_seq(p + i, s.size() - i, &cp);
    if (len == 0) {
      cp = 0xFFFD;
      len = 1;
    }
    char unit[16];
    if (cp >= 0x21 && cp <= 0x7E && cp != '+' && cp != '=' && cp != '\\') {
      unit[0] = static_cast<char>(cp);
      unit[1] = 0;
    } else {
      snprintf(unit, sizeof unit, "\\x{%X}", static_cast<unsigned>(cp));
    }
    std::string_view u(unit);
    if (out.size() + u.size() > max) break;
    out += u;
    i += len;
  }
  return out;
}

// "Name: value", folded before spaces so that lines stay within 78 where the words allow;
// every line is within 998 because value is at most field_text_cap (callers sanitize and
// cut it). A folded line starts with the space it was folded at (RFC 5322 2.2.3).
void put_field(std::string& out, std::string_view name, std::string_view value) {
  value = trim_spaces(value);
  size_t line_start = out.size();
  out += name;
  out += ": ";
  bool first = true;
  size_t i = 0;
  while (i < value.size()) {
    // A segment: the spaces before a word, and the word.
    size_t j = i;
    while (j < value.size() && value[j] == ' ') ++j;
    while (j < value.size() && value[j] != ' ') ++j;
    std::string_view seg = value.substr(i, j - i);
    if (!first && out.size() - line_start + seg.size() > text_width) {
      out += crlf;
      line_start = out.size();
    }
    out += seg;
    first = false;
    i = j;
  }
  out += crlf;
}

// Text wrapped at 78: words are separated by spaces; a continuation line starts with
// `indent`; a word longer than a line is cut (at a UTF-8 boundary).
void put_wrapped(std::string& out, std::string_view text, std::string_view indent = {}) {
  size_t col = 0;
  bool line_empty = true;
  size_t i = 0;
  auto new_line = [&] {
    out += crlf;
    out += indent;
    col = indent.size();
    line_empty = true;
  };
  while (i < text.size()) {
    size_t ws = i;
    while (i < text.size() && text[i] == ' ') ++i;
    size_t spaces = i - ws;
    size_t we = i;
    while (we < text.size() && text[we] != ' ') ++we;
    std::string_view word = text.substr(i, we - i);
    if (word.empty()) break;  // trailing spaces
    if (!line_empty && col + spaces + word.size() > text_width) {
      new_line();
      spaces = 0;
    }
    out.append(spaces, ' ');
    col += spaces;
    while (col + word.size() > text_width) {
      size_t room = text_width > col ? text_width - col : 0;
      if (room == 0 || (room < 8 && !line_empty)) {
        new_line();
        continue;
      }
      size_t cut = utf8_split_point(word, room);
      if (cut == 0) cut = room;
      out += word.substr(0, cut);
      word.remove_prefix(cut);
      new_line();
    }
    out += word;
    col += word.size();
    line_empty = false;
    i = we;
  }
  out += crlf;
}

// One line of the returned original's header section, folded when over 998 bytes: before
// the last space or tab that fits, else cut and continued after an inserted TAB.
void put_header_line(std::string& out, std::string_view line) {
  bool inserted_tab = false;
  // Never fold between the field name and the start of its value (an empty first line is
  // legal but confuses readers).
  size_t min_fold = 1;
  if (size_t colon = line.find(':'); colon != std::string_view::npos && line[0] != ' ' && line[0] != '\t') {
    min_fold = colon + 1;
    while (min_fold < line.size() && (line[min_fold] == ' ' || line[min_fold] == '\t')) ++min_fold;
    ++min_fold;
  }
  for (;;) {
    size_t room = max_line - (inserted_tab ? 1 : 0);
    if (inserted_tab) out += '\t';
    if (line.size() <= room) {
      out += line;
      out += crlf;
      return;
    }
    size_t k = 0;
    for (size_t i = room; i >= min_fold; --i) {
      if (line[i] == ' ' || line[i] == '\t') {
        k = i;
        break;
      }
    }
    min_fold = 1;
    inserted_tab = k == 0;
    if (k == 0) {
      k = utf8_split_point(line, room);
      if (k == 0) k = room;
    }
    out += line.substr(0, k);
    out += crlf;
    line.remove_prefix(k);
  }
}

// A body line over 998 bytes is split (postfix's smtp_line_length_limit does the same).
void put_body_line(std::string& out, std::string_view line) {
  while (line.size() > max_line) {
    size_t k = utf8_split_point(line, max_line);
    if (k == 0) k = max_line;
    out += line.substr(0, k);
    out += crlf;
    line.remove_prefix(k);
  }
  out += line;
  out += crlf;
}

// The next line of s from pos: its text without the ending; CRLF, a lone LF and a lone CR
// each end a line. Returns the position after the ending.
size_t next_line(std::string_view s, size_t pos, std::string_view& line) noexcept {
  size_t e = pos;
  while (e < s.size() && s[e] != '\r' && s[e] != '\n') ++e;
  line = s.substr(pos, e - pos);
  if (e < s.size()) e += (s[e] == '\r' && e + 1 < s.size() && s[e + 1] == '\n') ? 2 : 1;
  return e;
}

// One line of the original (without its ending) where it needs rewriting. Returns false
// at the end of the header section when only headers are wanted.
bool put_original_line(std::string& out, std::string_view line, bool& in_headers, bool headers_only) {
  if (in_headers) {
    if (line.empty()) {
      if (headers_only) return false;
      in_headers = false;
      out += crlf;
      return true;
    }
    put_header_line(out, line);
  } else {
    put_body_line(out, line);
  }
  return true;
}

// The original as returned: CRLF line endings, long lines split; only the header section
// (up to the first empty line) when headers_only. Lines that are already right (CRLF, no
// other CR, at most 998 bytes: nearly all of them) are copied in runs, not one by one: a
// 10 MB RET=FULL bounce runs on the shard's thread.
void copy_original(std::string& out, std::string_view content, bool headers_only) {
  const char* d = content.data();
  const size_t n = content.size();
  bool in_headers = true;
  size_t pos = 0;
  size_t run = 0;  // [run, pos) is clean and not copied yet
  while (pos < n) {
    const auto* nl = static_cast<const char*>(memchr(d + pos, '\n', n - pos));
    size_t e = nl ? static_cast<size_t>(nl - d) : n;
    bool has_crlf = nl && e > pos && d[e - 1] == '\r';
    size_t t = has_crlf ? e - 1 : e;
    bool clean = has_crlf && t - pos <= max_line && !memchr(d + pos, '\r', t - pos);
    if (clean) {
      if (in_headers && t == pos) {  // the empty line after the header section
        if (headers_only) break;
        in_headers = false;
      }
      pos = e + 1;
      continue;
    }
    out.append(d + run, pos - run);
    std::string_view line;
    size_t next = next_line(content, pos, line);
    run = pos = next;
    if (!put_original_line(out, line, in_headers, headers_only)) return;
  }
  out.append(d + run, pos - run);
}

uint64_t splitmix64(uint64_t x) noexcept {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

const char* action_text(rcpt_outcome o) noexcept {
  switch (o) {
    case rcpt_outcome::failed: return "failed";
    case rcpt_outcome::deferred: return "delayed";
    case rcpt_outcome::delivered: return "delivered";
    case rcpt_outcome::relayed:
    case rcpt_outcome::relayed_dsn: return "relayed";
  }
  return "failed";
}

const char* default_status(dsn_kind k) noexcept {
  switch (k) {
    case dsn_kind::failure: return "5.0.0";
    case dsn_kind::delay: return "4.0.0";
    case dsn_kind::success: return "2.0.0";
  }
  return "5.0.0";
}

}  // namespace

std::string rfc5322_date(uint64_t us) {
  static constexpr const char* days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static constexpr const char* months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  time_t t = static_cast<time_t>(us / 1000000);
  struct tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  snprintf(buf, sizeof buf, "%s, %02d %s %04d %02d:%02d:%02d +0000 (UTC)", days[tm.tm_wday % 7], tm.tm_mday,
           months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
  return buf;
}

std::string sanitize_field(std::string_view s, size_t max, bool utf8) {
  std::string out;
  out.reserve(std::min(s.size(), max));
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = p[i];
    size_t len = 1;
    bool keep;
    if (c < 0x20 || c == 0x7F) {
      keep = false;
    } else if (c < 0x80) {
      keep = true;
    } else {
      len = utf8 ? utf8_seq(p + i, s.size() - i) : 0;
      keep = len > 0;
      if (!keep) len = 1;
    }
    size_t add = keep ? len : 1;
    if (out.size() + add > max) break;
    if (keep)
      out.append(s.data() + i, len);
    else
      out.push_back('?');
    i += len;
  }
  return out;
}

bool dsn_wanted(dsn_kind k, uint8_t notify) noexcept {
  if (notify & spool::notify_never) return false;
  if (notify == 0) return k != dsn_kind::success;
  switch (k) {
    case dsn_kind::failure: return notify & spool::notify_failure;
    case dsn_kind::delay: return notify & spool::notify_delay;
    case dsn_kind::success: return notify & spool::notify_success;
  }
  return false;
}

dsn_plan plan_dsns(std::string_view sender, std::span<const dsn_rcpt> rcpts, bool delay_due) {
  dsn_plan p;
  if (sender.empty()) return p;  // a bounce of a bounce: never (RFC 5321 4.5.5)
  for (uint32_t i = 0; i < rcpts.size(); ++i) {
    const auto& r = rcpts[i];
    switch (r.outcome) {
      case rcpt_outcome::failed:
        if (dsn_wanted(dsn_kind::failure, r.notify)) p.failure.push_back(i);
        break;
      case rcpt_outcome::deferred:
        if (delay_due && dsn_wanted(dsn_kind::delay, r.notify)) p.delay.push_back(i);
        break;
      case rcpt_outcome::delivered:
      case rcpt_outcome::relayed:
        if (dsn_wanted(dsn_kind::success, r.notify)) p.success.push_back(i);
        break;
      case rcpt_outcome::relayed_dsn:
        break;  // RFC 3461 5.2.2: the next hop got NOTIFY and reports itself
    }
  }
  return p;
}

bool build_dsn(const dsn_options& o, const spool::message_view& m, std::span<const dsn_rcpt> rcpts,
               std::span<const uint32_t> which, const dsn_request& r, dsn_message& out) {
  if (m.mail_from.empty() || which.empty() || o.hostname.empty() || r.queue_id.empty()) return false;
  for (uint32_t i : which)
    if (i >= rcpts.size()) return false;

  const bool global = m.smtputf8;
  const size_t maxf = std::min(o.max_field_text, field_text_cap);
  const std::string host = sanitize_host(o.hostname, max_host_text);

  // What goes back: RFC 3461 4.3 (RET is about failed DSNs), postfix's bounce_size_limit.
  bool headers_only = true;
  bool too_big = false;
  if (r.kind == dsn_kind::failure && m.body != spool::body_type::binary_mime) {
    if (m.ret == spool::dsn_ret::full) {
      headers_only = false;
    } else if (m.ret == spool::dsn_ret::none) {
      too_big = m.content.size() > o.return_size_limit;
      headers_only = too_big;
    }
  }

  // --- part 1: the explanation ---
  std::string text;
  put_wrapped(text, "This is the mail system at host " + host + ".");
  text += crlf;
  switch (r.kind) {
    case dsn_kind::failure:
      text +=
          "I'm sorry to have to inform you that your message could not\r\n"
          "be delivered to one or more recipients. ";
      text += headers_only ? "Its header section is attached\r\nbelow.\r\n" : "It's attached below.\r\n";
      if (too_big) {
        text += crlf;
        put_wrapped(text, "The message was larger than " + std::to_string(o.return_size_limit) +
                              " bytes, so only its header section is returned.");
      }
      text +=
          "\r\n"
          "For further assistance, please send mail to postmaster.\r\n"
          "\r\n"
          "If you do so, please include this problem report. You can\r\n"
          "delete your own text from the attached returned message.\r\n";
      break;
    case dsn_kind::delay: {
      text +=
          "####################################################################\r\n"
          "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
          "####################################################################\r\n"
          "\r\n";
      uint64_t age_s = r.now_us > m.arrival_us ? (r.now_us - m.arrival_us) / 1000000 : 0;
      std::string age = age_s >= 3600 ? std::to_string(age_s / 3600) + " hour(s)"
                                      : std::to_string(age_s / 60) + " minute(s)";
      put_wrapped(text, "Your message could not be delivered for " + age + ".");
      if (r.retry_until_us) put_wrapped(text, "It will be retried until " + rfc5322_date(r.retry_until_us) + ".");
      text +=
          "\r\n"
          "For further assistance, please send mail to postmaster.\r\n";
      break;
    }
    case dsn_kind::success:
      text +=
          "Your message was successfully delivered to the destination(s)\r\n"
          "listed below. If the message was delivered to a mailbox you will\r\n"
          "receive no further notifications. Otherwise you may still receive\r\n"
          "notifications of mail delivery errors from other systems.\r\n";
      break;
  }
  text += "\r\n                   The mail system\r\n";
  for (uint32_t i : which) {
    const auto& x = rcpts[i];
    std::string line = "<" + sanitize_field(x.addr, maxf, global) + ">: ";
    std::string diag = sanitize_field(x.diagnostic, maxf, global);
    std::string rhost = sanitize_host(x.remote_host, max_host_text);
    if (!rhost.empty() && !x.remote_ip.empty()) rhost += "[" + sanitize_host(x.remote_ip, max_ip_text) + "]";
    if (r.kind == dsn_kind::success) {
      line += x.outcome == rcpt_outcome::delivered ? "delivered" : "relayed";
      if (!rhost.empty()) line += " via " + rhost;
      if (!diag.empty()) line += ": " + diag;
    } else if (!rhost.empty() && x.remote_reply) {
      line += "host " + rhost + " said: " + (diag.empty() ? std::string("(no reply text)") : diag);
    } else if (!diag.empty()) {
      line += diag;
    } else {
      line += "delivery status " + (valid_status(x.status) ? std::string(x.status) : default_status(r.kind));
    }
    text += crlf;
    put_wrapped(text, line, "    ");
  }

  // --- part 2: the delivery report (RFC 3464 2.2, 2.3) ---
  std::string report;
  put_field(report, "Reporting-MTA", "dns; " + host);
  put_field(report, "X-Tern-Queue-ID", sanitize_host(m.id, 64));
  put_field(report, "X-Tern-Sender", std::string(is_ascii(m.mail_from) ? "rfc822; " : "utf-8; ") +
                                          (is_ascii(m.mail_from) || global ? sanitize_field(m.mail_from, maxf, global)
                                                                           : utf8_addr_xtext(m.mail_from, maxf)));
  if (!m.envid.empty()) put_field(report, "Original-Envelope-Id", sanitize_field(m.envid, maxf, false));
  put_field(report, "Arrival-Date", rfc5322_date(m.arrival_us));
  for (uint32_t i : which) {
    const auto& x = rcpts[i];
    report += crlf;
    if (!x.orcpt.empty()) {
      // RFC 3461 4.2: addr-type ";" xtext, kept as given (the parser checked it).
      std::string v = sanitize_field(x.orcpt, maxf, global);
      auto semi = v.find(';');
      if (semi != std::string::npos && semi + 1 < v.size() && v[semi + 1] != ' ') v.insert(semi + 1, " ");
      put_field(report, "Original-Recipient", v);
    }
    if (is_ascii(x.addr))
      put_field(report, "Final-Recipient", "rfc822; " + sanitize_field(x.addr, maxf, false));
    else if (global)
      put_field(report, "Final-Recipient", "utf-8; " + sanitize_field(x.addr, maxf, true));
    else
      put_field(report, "Final-Recipient", "utf-8; " + utf8_addr_xtext(x.addr, maxf));
    put_field(report, "Action", action_text(x.outcome));
    put_field(report, "Status", valid_status(x.status) ? std::string(x.status) : default_status(r.kind));
    std::string rhost = sanitize_host(x.remote_host, max_host_text);
    if (!rhost.empty()) put_field(report, "Remote-MTA", "dns; " + rhost);
    if (!x.diagnostic.empty())
      put_field(report, "Diagnostic-Code",
                std::string(x.remote_reply ? "smtp; " : "X-Tern; ") + sanitize_field(x.diagnostic, maxf, global));
    if (x.last_attempt_us) put_field(report, "Last-Attempt-Date", rfc5322_date(x.last_attempt_us));
    if (r.kind == dsn_kind::delay && r.retry_until_us)
      put_field(report, "Will-Retry-Until", rfc5322_date(r.retry_until_us));
  }

  // --- part 3: the original ---
  std::string original;
  original.reserve(headers_only ? 4096 : m.content.size() + m.content.size() / 64 + 2);
  copy_original(original, m.content, headers_only);

  // The only untrusted text in the top-level header section.
  const std::string to_addr = sanitize_field(m.mail_from, maxf, global);

  // --- the boundary: absent from every part it encloses (and from To:, for good measure) ---
  std::string qid;
  for (char c : r.queue_id.substr(0, 32))
    if ((c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) qid.push_back(c);
  std::string boundary;
  uint64_t seed = 0;
  for (char c : qid) seed = seed * 131 + static_cast<unsigned char>(c);
  for (int n = 0; n < boundary_tries; ++n) {
    std::string b = "=_tern_" + qid;
    if (n > 0) {
      char hex[17];
      snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(splitmix64(seed + n)));
      b += "_";
      b += hex;
    }
    if (text.find(b) == std::string::npos && report.find(b) == std::string::npos &&
        original.find(b) == std::string::npos && to_addr.find(b) == std::string::npos) {
      boundary = std::move(b);
      break;
    }
  }
  if (boundary.empty()) return false;  // 64 pseudo-random candidates all present: refuse

  const bool text_8bit = !is_ascii(text);
  const bool report_8bit = !is_ascii(report);
  const bool original_8bit = !is_ascii(original);
  const bool any_8bit = text_8bit || report_8bit || original_8bit || !is_ascii(to_addr);

  // --- assemble ---
  std::string& c = out.content;
  c.clear();
  c.reserve(text.size() + report.size() + original.size() + 2048);
  put_field(c, "From", "MAILER-DAEMON@" + host + " (Mail Delivery System)");
  c += "To: <" + to_addr + ">\r\n";
  put_field(c, "Subject", r.kind == dsn_kind::failure ? "Undelivered Mail Returned to Sender"
                          : r.kind == dsn_kind::delay ? "Delayed Mail (still being retried)"
                                                      : "Successful Mail Delivery Report");
  put_field(c, "Date", rfc5322_date(r.now_us));
  c += "Message-ID: <" + qid + "@" + host + ">\r\n";
  c += "Auto-Submitted: auto-replied\r\n";
  c += "MIME-Version: 1.0\r\n";
  c += global ? "Content-Type: multipart/report; report-type=global-delivery-status;\r\n"
              : "Content-Type: multipart/report; report-type=delivery-status;\r\n";
  c += "\tboundary=\"" + boundary + "\"\r\n";
  if (any_8bit) c += "Content-Transfer-Encoding: 8bit\r\n";
  c += "\r\nThis is a MIME-encapsulated message.\r\n\r\n";

  c += "--" + boundary + "\r\n";
  c += "Content-Description: Notification\r\n";
  c += text_8bit ? "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
                 : "Content-Type: text/plain; charset=us-ascii\r\n";
  c += crlf;
  c += text;

  c += "\r\n--" + boundary + "\r\n";
  c += "Content-Description: Delivery report\r\n";
  c += global ? "Content-Type: message/global-delivery-status\r\n" : "Content-Type: message/delivery-status\r\n";
  if (report_8bit) c += "Content-Transfer-Encoding: 8bit\r\n";
  c += crlf;
  c += report;

  c += "\r\n--" + boundary + "\r\n";
  const char* desc = r.kind == dsn_kind::failure ? (headers_only ? "Undelivered Message Headers" : "Undelivered Message")
                     : r.kind == dsn_kind::delay ? "Delayed Message Headers"
                                                 : "Delivered Message Headers";
  c += "Content-Description: ";
  c += desc;
  c += crlf;
  if (headers_only)
    c += global ? "Content-Type: message/global-headers\r\n" : "Content-Type: text/rfc822-headers\r\n";
  else
    c += global ? "Content-Type: message/global\r\n" : "Content-Type: message/rfc822\r\n";
  if (original_8bit) c += "Content-Transfer-Encoding: 8bit\r\n";
  c += crlf;
  c += original;
  c += "\r\n--" + boundary + "--\r\n";

  out.sender.clear();
  out.recipient = std::string(m.mail_from);
  out.eight_bit = any_8bit;
  // RFC 6531/6533: the DSN of an SMTPUTF8 message needs SMTPUTF8 when it carries UTF-8.
  out.smtputf8 = global && any_8bit;
  out.headers_only = headers_only;
  out.boundary = std::move(boundary);
  return true;
}

}  // namespace tern::queue
