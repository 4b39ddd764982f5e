#include "src/smtp/command.hh"

#include "spool/record.hh"
#include "src/core/bytes.hh"

namespace tern::smtp {
namespace {

struct entry {
  std::string_view name;
  verb v;
  uint8_t flags;
};

constexpr entry table[] = {
    {"HELO", verb::helo, cmd_sync_after},
    {"EHLO", verb::ehlo, cmd_sync_after},
    {"MAIL", verb::mail, 0},
    {"RCPT", verb::rcpt, 0},
    {"DATA", verb::data, cmd_sync_after},
    {"BDAT", verb::bdat, 0},
    {"RSET", verb::rset, cmd_junk},
    {"NOOP", verb::noop, cmd_junk},
    {"QUIT", verb::quit, cmd_sync_after},
    {"VRFY", verb::vrfy, cmd_junk},
    {"EXPN", verb::expn, cmd_counts_error},
    {"HELP", verb::help, cmd_junk},
    {"STARTTLS", verb::starttls, cmd_sync_after | cmd_counts_error},
    {"AUTH", verb::auth, cmd_counts_error},
};

char upper(char c) noexcept { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c; }

bool iequal(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (upper(a[i]) != upper(b[i])) return false;
  return true;
}

bool starts_with_ci(std::string_view s, std::string_view p) noexcept {
  return s.size() >= p.size() && iequal(s.substr(0, p.size()), p);
}

// The <path> after "FROM:"/"TO:"; leaves `rest` at what follows the '>'.
parse_error parse_path(std::string_view& s, std::string_view& addr, bool allow_empty,
                       std::string_view* path = nullptr, bool* routed = nullptr) noexcept {
  while (!s.empty() && s[0] == ' ') s.remove_prefix(1);  // "MAIL FROM: <a@b>" is common
  if (s.empty() || s[0] != '<') return parse_error::syntax;
  bool quoted = false;
  size_t i = 1;
  for (; i < s.size(); ++i) {
    char c = s[i];
    auto uc = static_cast<unsigned char>(c);
    if (uc < 0x20 || uc == 0x7F) return parse_error::bad_address;
    if (quoted) {
      if (c == '\\' && i + 1 < s.size()) {
        ++i;
        continue;
      }
      if (c == '"') quoted = false;
      continue;
    }
    if (c == '"') {
      quoted = true;
      continue;
    }
    if (c == '>') break;
    if (c == ' ' || c == '<') return parse_error::bad_address;
  }
  if (i >= s.size() || quoted) return parse_error::syntax;
  addr = s.substr(1, i - 1);
  s.remove_prefix(i + 1);
  if (path) *path = addr;
  if (addr.size() > 256) return parse_error::too_long;  // RFC 5321 4.5.3.1.3 path limit
  // Source routes "<@a,@b:user@d>" are removed (RFC 5321 C: SHOULD ignore); the caller
  // learns that there was one (relay policy: untrusted clients may not use them).
  if (!addr.empty() && addr[0] == '@') {
    auto colon = addr.find(':');
    if (colon == addr.npos) return parse_error::bad_address;
    addr.remove_prefix(colon + 1);
    if (routed) *routed = true;
  }
  if (addr.empty()) return allow_empty ? parse_error::none : parse_error::bad_address;
  auto at = addr.rfind('@');
  if (at == addr.npos) return parse_error::none;  // "postmaster"; callers decide
  if (at == 0 || at + 1 == addr.size()) return parse_error::bad_address;
  auto dom = addr.substr(at + 1);
  if (dom[0] == '[') return dom.back() == ']' ? parse_error::none : parse_error::bad_address;
  for (char c : dom) {
    auto uc = static_cast<unsigned char>(c);
    if (!(uc >= 0x80 || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
          c == '-' || c == '.'))
      return parse_error::bad_address;
  }
  if (dom.front() == '.' || dom.back() == '.' || dom.find("..") != dom.npos) return parse_error::bad_address;
  return parse_error::none;
}

// Iterate "KEY[=VALUE]" parameters separated by spaces.
template <typename F>
parse_error each_param(std::string_view s, std::string_view& bad, F&& f) noexcept {
  if (!s.empty() && s[0] != ' ') return parse_error::syntax;
  while (!s.empty()) {
    while (!s.empty() && s[0] == ' ') s.remove_prefix(1);
    if (s.empty()) break;
    auto sp = s.find(' ');
    auto p = s.substr(0, sp);
    s = sp == s.npos ? std::string_view{} : s.substr(sp);
    auto eq = p.find('=');
    auto key = p.substr(0, eq);
    auto val = eq == p.npos ? std::string_view{} : p.substr(eq + 1);
    auto e = f(key, val, eq != p.npos);
    if (e != parse_error::none) {
      bad = p;
      return e;
    }
  }
  return parse_error::none;
}

bool all_digits(std::string_view s) noexcept {
  if (s.empty() || s.size() > 19) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

uint64_t to_u64(std::string_view s) noexcept {
  uint64_t v = 0;
  for (char c : s) v = v * 10 + static_cast<uint64_t>(c - '0');
  return v;
}

}  // namespace

command parse_command(std::string_view line) noexcept {
  command c;
  auto sp = line.find(' ');
  auto name = line.substr(0, sp);
  for (const auto& e : table) {
    if (iequal(name, e.name)) {
      c.v = e.v;
      c.flags = e.flags;
      break;
    }
  }
  if (c.v == verb::unknown) c.flags = cmd_counts_error;
  if (sp != line.npos) {
    c.arg = line.substr(sp + 1);
    while (!c.arg.empty() && (c.arg.back() == ' ' || c.arg.back() == '\t')) c.arg.remove_suffix(1);
  }
  return c;
}

bool valid_xtext(std::string_view s) noexcept {
  for (size_t i = 0; i < s.size(); ++i) {
    auto c = static_cast<unsigned char>(s[i]);
    if (c == '+') {
      if (i + 2 >= s.size()) return false;
      for (int k = 1; k <= 2; ++k) {
        char h = s[i + static_cast<size_t>(k)];
        if (!((h >= '0' && h <= '9') || (h >= 'A' && h <= 'F'))) return false;
      }
      i += 2;
      continue;
    }
    if (c < 33 || c > 126 || c == '=') return false;
  }
  return true;
}

std::string_view domain_of(std::string_view m) noexcept {
  auto at = m.rfind('@');
  return at == m.npos ? std::string_view{} : m.substr(at + 1);
}

bool routed_local_part(std::string_view m) noexcept {
  auto at = m.rfind('@');
  if (at == m.npos) return false;
  // Quotes and backslashes do not hide an operator: the next hop unquotes the local part
  // ("user@host"@d is user@host@d to postfix's resolver).
  return m.substr(0, at).find_first_of("@%!") != std::string_view::npos;
}

bool is_ascii(std::string_view s) noexcept {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

bool valid_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0, n = s.size(); i < n;) {
    size_t len = utf8_seq(p + i, n - i);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

parse_error parse_mail(std::string_view arg, mail_args& out) noexcept {
  out = mail_args{};
  if (!starts_with_ci(arg, "FROM:")) return parse_error::syntax;
  arg.remove_prefix(5);
  if (auto e = parse_path(arg, out.address, true); e != parse_error::none) return e;
  if (!out.address.empty() && out.address.find('@') == out.address.npos) return parse_error::bad_address;
  bool seen_size = false, seen_body = false, seen_ret = false, seen_envid = false;
  return each_param(arg, out.bad, [&](std::string_view k, std::string_view v, bool has_v) {
    if (iequal(k, "SIZE")) {
      if (seen_size) return parse_error::duplicate_param;
      seen_size = true;
      if (!all_digits(v)) return parse_error::bad_param;
      out.size = to_u64(v);
    } else if (iequal(k, "BODY")) {
      if (seen_body) return parse_error::duplicate_param;
      seen_body = true;
      if (iequal(v, "7BIT"))
        out.body = 0;
      else if (iequal(v, "8BITMIME"))
        out.body = 1;
      else
        return parse_error::bad_param;  // BINARYMIME is not advertised
    } else if (iequal(k, "SMTPUTF8")) {
      if (has_v || out.smtputf8) return parse_error::bad_param;
      out.smtputf8 = true;
    } else if (iequal(k, "RET")) {
      if (seen_ret) return parse_error::duplicate_param;
      seen_ret = true;
      if (iequal(v, "FULL"))
        out.ret = 1;
      else if (iequal(v, "HDRS"))
        out.ret = 2;
      else
        return parse_error::bad_param;
    } else if (iequal(k, "ENVID")) {
      if (seen_envid) return parse_error::duplicate_param;
      seen_envid = true;
      if (v.empty() || v.size() > 100 || !valid_xtext(v)) return parse_error::bad_param;
      out.envid = v;
    } else {
      return parse_error::unknown_param;
    }
    return parse_error::none;
  });
}

parse_error parse_rcpt(std::string_view arg, rcpt_args& out) noexcept {
  out = rcpt_args{};
  if (!starts_with_ci(arg, "TO:")) return parse_error::syntax;
  arg.remove_prefix(3);
  if (auto e = parse_path(arg, out.address, false, &out.path, &out.source_route); e != parse_error::none)
    return e;
  bool seen_notify = false;
  return each_param(arg, out.bad, [&](std::string_view k, std::string_view v, bool) {
    if (iequal(k, "NOTIFY")) {
      if (seen_notify) return parse_error::duplicate_param;
      seen_notify = true;
      if (iequal(v, "NEVER")) {
        out.notify = spool::notify_never;
        return parse_error::none;
      }
      while (!v.empty()) {
        auto comma = v.find(',');
        auto item = v.substr(0, comma);
        v = comma == v.npos ? std::string_view{} : v.substr(comma + 1);
        if (comma != std::string_view::npos && v.empty()) return parse_error::bad_param;
        uint8_t f;
        if (iequal(item, "SUCCESS"))
          f = spool::notify_success;
        else if (iequal(item, "FAILURE"))
          f = spool::notify_failure;
        else if (iequal(item, "DELAY"))
          f = spool::notify_delay;
        else
          return parse_error::bad_param;
        if (out.notify & f) return parse_error::bad_param;
        out.notify |= f;
      }
      if (!out.notify) return parse_error::bad_param;
    } else if (iequal(k, "ORCPT")) {
      if (!out.orcpt.empty()) return parse_error::duplicate_param;
      auto semi = v.find(';');
      if (semi == v.npos || semi == 0 || v.size() > 500) return parse_error::bad_param;
      auto type = v.substr(0, semi);
      if (!iequal(type, "rfc822") && !iequal(type, "utf-8")) return parse_error::bad_param;
      if (semi + 1 == v.size() || !valid_xtext(v.substr(semi + 1))) return parse_error::bad_param;
      out.orcpt = v;
    } else {
      return parse_error::unknown_param;
    }
    return parse_error::none;
  });
}

bool parse_bdat(std::string_view arg, uint64_t& size, bool& last) noexcept {
  auto sp = arg.find(' ');
  auto num = arg.substr(0, sp);
  if (!all_digits(num)) return false;
  size = to_u64(num);
  last = false;
  if (sp == arg.npos) return true;
  auto rest = arg.substr(sp + 1);
  while (!rest.empty() && rest[0] == ' ') rest.remove_prefix(1);
  if (!iequal(rest, "LAST")) return false;
  last = true;
  return true;
}

}  // namespace tern::smtp
