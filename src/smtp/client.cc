#include "src/smtp/client.hh"

#include <algorithm>
#include <charconv>
#include <cstring>

#include "src/smtp/command.hh"

namespace tern::smtp {

namespace {

bool ieq(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'a' && x <= 'z') x = char(x - 32);
    if (y >= 'a' && y <= 'z') y = char(y - 32);
    if (x != y) return false;
  }
  return true;
}

// Bytes outside printable ASCII become '?', up to `limit` bytes in all.
void append_sanitised(std::string& to, std::string_view s, size_t limit) {
  for (char c : s) {
    if (to.size() >= limit) return;
    unsigned char u = static_cast<unsigned char>(c);
    to.push_back(u >= 0x20 && u < 0x7f ? c : '?');
  }
}

// A string that may go into a command line: no control byte can end or split the line.
bool line_safe(std::string_view s) noexcept {
  for (char c : s) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) return false;
  }
  return true;
}

// RFC 3461 4.2: ORCPT=addr-type;xtext, addr-type an atom.
bool valid_orcpt(std::string_view v) noexcept {
  auto semi = v.find(';');
  if (semi == v.npos || semi == 0 || v.size() > 500) return false;
  for (char c : v.substr(0, semi)) {
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-')) return false;
  }
  return valid_xtext(v.substr(semi + 1));
}

void append_base64(std::string& to, std::string_view in) {
  static constexpr char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  size_t i = 0;
  auto b = [&](size_t k) { return static_cast<unsigned char>(in[k]); };
  for (; i + 3 <= in.size(); i += 3) {
    uint32_t v = (b(i) << 16) | (b(i + 1) << 8) | b(i + 2);
    to.push_back(tab[v >> 18]);
    to.push_back(tab[(v >> 12) & 63]);
    to.push_back(tab[(v >> 6) & 63]);
    to.push_back(tab[v & 63]);
  }
  if (i + 1 == in.size()) {
    uint32_t v = b(i) << 16;
    to.push_back(tab[v >> 18]);
    to.push_back(tab[(v >> 12) & 63]);
    to.append("==");
  } else if (i + 2 == in.size()) {
    uint32_t v = (b(i) << 16) | (b(i + 1) << 8);
    to.push_back(tab[v >> 18]);
    to.push_back(tab[(v >> 12) & 63]);
    to.push_back(tab[(v >> 6) & 63]);
    to.push_back('=');
  }
}

void append_number(std::string& to, uint64_t v) {
  char buf[24];
  auto r = std::to_chars(buf, buf + sizeof buf, v);
  to.append(buf, r.ptr);
}

// "c.d{1,3}.d{1,3}" at the start of `t`, followed by a space or the end, with c the class of
// the reply code (RFC 3463, RFC 2034 4).
bool parse_enhanced(std::string_view t, int cls, char (&out)[12]) noexcept {
  if (t.size() < 5 || t[0] != char('0' + cls) || t[1] != '.') return false;
  size_t i = 2;
  for (int part = 0; part < 2; ++part) {
    size_t start = i;
    while (i < t.size() && t[i] >= '0' && t[i] <= '9' && i - start < 4) ++i;
    if (i == start || i - start > 3) return false;
    if (part == 0) {
      if (i >= t.size() || t[i] != '.') return false;
      ++i;
    }
  }
  if (i < t.size() && t[i] != ' ') return false;
  memcpy(out, t.data(), i);
  out[i] = 0;
  return true;
}

void set_status(char (&out)[12], const char* s) noexcept {
  size_t n = std::min(strlen(s), sizeof out - 1);
  memcpy(out, s, n);
  out[n] = 0;
}

// postfix-like phrases for timeouts and lost connections ("... while %s").
const char* doing(client_stage s) noexcept {
  switch (s) {
    case client_stage::connect: return "connecting";
    case client_stage::greeting: return "receiving the initial server greeting";
    case client_stage::ehlo:
    case client_stage::helo: return "performing the HELO handshake";
    case client_stage::starttls: return "receiving the STARTTLS reply";
    case client_stage::tls_handshake: return "performing the TLS handshake";
    case client_stage::auth: return "performing authentication";
    case client_stage::mail: return "sending MAIL FROM";
    case client_stage::rcpt: return "sending RCPT TO";
    case client_stage::data_init: return "sending DATA command";
    case client_stage::body: return "sending message content";
    case client_stage::data_done: return "sending end of data -- message may be sent more than once";
    case client_stage::rset: return "sending RSET";
    case client_stage::idle: return "idle";
    case client_stage::quit: return "sending QUIT";
    case client_stage::done: return "done";
  }
  return "?";
}

client_stage stage_of(client_cmd c) noexcept {
  switch (c) {
    case client_cmd::greeting: return client_stage::greeting;
    case client_cmd::ehlo:
    case client_cmd::lhlo: return client_stage::ehlo;
    case client_cmd::helo: return client_stage::helo;
    case client_cmd::starttls: return client_stage::starttls;
    case client_cmd::auth: return client_stage::auth;
    case client_cmd::mail: return client_stage::mail;
    case client_cmd::rcpt: return client_stage::rcpt;
    case client_cmd::data: return client_stage::data_init;
    case client_cmd::dot: return client_stage::data_done;
    case client_cmd::rset: return client_stage::rset;
    case client_cmd::quit: return client_stage::quit;
    case client_cmd::none: break;
  }
  return client_stage::idle;
}

}  // namespace

const char* command_name(client_cmd c) noexcept {
  switch (c) {
    case client_cmd::none: return "";
    case client_cmd::greeting: return "initial greeting";
    case client_cmd::ehlo: return "EHLO";
    case client_cmd::lhlo: return "LHLO";
    case client_cmd::helo: return "HELO";
    case client_cmd::starttls: return "STARTTLS";
    case client_cmd::auth: return "AUTH";
    case client_cmd::mail: return "MAIL FROM";
    case client_cmd::rcpt: return "RCPT TO";
    case client_cmd::data: return "DATA";
    case client_cmd::dot: return "end of DATA";
    case client_cmd::rset: return "RSET";
    case client_cmd::quit: return "QUIT";
  }
  return "";
}

const char* stage_name(client_stage s) noexcept {
  switch (s) {
    case client_stage::connect: return "connect";
    case client_stage::greeting: return "greeting";
    case client_stage::ehlo: return "ehlo";
    case client_stage::helo: return "helo";
    case client_stage::starttls: return "starttls";
    case client_stage::tls_handshake: return "tls_handshake";
    case client_stage::auth: return "auth";
    case client_stage::mail: return "mail";
    case client_stage::rcpt: return "rcpt";
    case client_stage::data_init: return "data_init";
    case client_stage::body: return "body";
    case client_stage::data_done: return "data_done";
    case client_stage::rset: return "rset";
    case client_stage::idle: return "idle";
    case client_stage::quit: return "quit";
    case client_stage::done: return "done";
  }
  return "?";
}

client_message message_of(const spool::message_view& m, std::span<const spool::rcpt_view> rcpts) noexcept {
  client_message c;
  c.sender = m.mail_from;
  c.size = m.content.size();
  c.body = m.body;
  c.smtputf8 = m.smtputf8;
  c.ret = m.ret;
  c.envid = m.envid;
  c.rcpts = rcpts;
  c.content = m.content;
  return c;
}

void client::reset(const client_config& cfg) {
  cfg_ = cfg;
  stage_ = client_stage::connect;
  in_.clear();
  in_off_ = 0;
  out_.clear();
  expect_.clear();
  expect_head_ = 0;
  caps_ = {};
  tls_active_ = tls_refused_ = authed_ = false;
  auth_step_ = 0;
  need_rset_ = false;
  failed_ = failure_permanent_ = false;
  failure_.code = 0;
  failure_.status[0] = 0;
  failure_.text.clear();
  failure_.cmd = client_cmd::none;
  n_messages_ = 0;
  r_lines_ = 0;
  r_ehlo_ = false;
  msg_active_ = false;
  msg_ = {};
  nres_ = 0;
  results_ready_ = false;
}

void client::connected() {
  if (stage_ != client_stage::connect) return;
  push(client_cmd::greeting);
  update_stage();
}

void client::push(client_cmd c, uint32_t idx) { expect_.push_back({c, idx}); }

void client::update_stage() {
  if (stage_ == client_stage::done) return;
  if (expect_head_ < expect_.size()) stage_ = stage_of(expect_[expect_head_].cmd);
}

void client::send_line(std::string_view a, std::string_view b) {
  out_.append(a);
  out_.append(b);
  out_.append("\r\n");
}

// --- input -------------------------------------------------------------------------------

void client::feed(const char* p, size_t n) {
  // During the handshake, and after the end, nothing the server says in clear counts.
  if (stage_ == client_stage::done || stage_ == client_stage::tls_handshake) return;
  if (stage_ == client_stage::connect) connected();
  in_.append(p, n);
  size_t off = 0;
  const size_t max_line = cfg_.limits.reply_line_length;
  while (stage_ != client_stage::done && stage_ != client_stage::tls_handshake) {
    const char* b = in_.data() + off;
    size_t avail = in_.size() - off;
    const char* nl = static_cast<const char*>(memchr(b, '\n', avail));
    if (!nl) {
      if (avail > max_line + 1) protocol_error("reply line too long");
      break;
    }
    std::string_view line(b, size_t(nl - b));
    off += line.size() + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.size() > max_line) {
      protocol_error("reply line too long");
      break;
    }
    in_off_ = off;
    on_line(line);
  }
  if (stage_ == client_stage::done || stage_ == client_stage::tls_handshake) {
    in_.clear();  // STARTTLS: whatever followed the 220 is discarded (CVE-2011-0411)
  } else {
    in_.erase(0, off);
  }
  in_off_ = 0;
}

void client::on_line(std::string_view line) {
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  if (line.size() < 3 || !digit(line[0]) || !digit(line[1]) || !digit(line[2]) ||
      (line.size() > 3 && line[3] != ' ' && line[3] != '-')) {
    protocol_error("malformed reply");
    return;
  }
  int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
  if (line[0] < '2' || line[0] > '5' || line[1] > '5') {
    protocol_error("reply code out of range");
    return;
  }
  std::string_view text = line.size() > 4 ? line.substr(4) : std::string_view{};
  if (r_lines_ == 0) {
    r_.code = uint16_t(code);
    r_.text.clear();
    if (!parse_enhanced(text, code / 100, r_.status)) {
      r_.status[0] = char('0' + code / 100);
      memcpy(r_.status + 1, ".0.0", 5);
    }
    r_ehlo_ = expect_head_ < expect_.size() &&
              (expect_[expect_head_].cmd == client_cmd::ehlo || expect_[expect_head_].cmd == client_cmd::lhlo);
  } else if (code != r_.code) {
    protocol_error("reply lines with different codes");
    return;
  }
  if (++r_lines_ > cfg_.limits.reply_lines) {
    protocol_error("too many reply lines");
    return;
  }
  if (r_lines_ > 1 && r_.text.size() < cfg_.limits.reply_text_length) r_.text.push_back(' ');
  append_sanitised(r_.text, text, cfg_.limits.reply_text_length);
  if (r_ehlo_ && r_lines_ > 1 && code / 100 == 2) parse_cap(text);
  if (line.size() > 3 && line[3] == '-') return;
  r_lines_ = 0;
  on_reply();
}

void client::parse_cap(std::string_view t) {
  size_t k = 0;
  while (k < t.size() && t[k] != ' ' && t[k] != '=') ++k;
  std::string_view key = t.substr(0, k), rest = k < t.size() ? t.substr(k + 1) : std::string_view{};
  if (ieq(key, "PIPELINING")) {
    caps_.pipelining = true;
  } else if (ieq(key, "SIZE")) {
    caps_.size = true;
    uint64_t v = 0;
    while (!rest.empty() && rest.front() == ' ') rest.remove_prefix(1);
    auto r = std::from_chars(rest.data(), rest.data() + rest.size(), v);
    caps_.size_limit = r.ec == std::errc{} ? v : 0;
  } else if (ieq(key, "8BITMIME")) {
    caps_.eightbitmime = true;
  } else if (ieq(key, "SMTPUTF8")) {
    caps_.smtputf8 = true;
  } else if (ieq(key, "DSN")) {
    caps_.dsn = true;
  } else if (ieq(key, "STARTTLS")) {
    caps_.starttls = true;
  } else if (ieq(key, "CHUNKING")) {
    caps_.chunking = true;
  } else if (ieq(key, "ENHANCEDSTATUSCODES")) {
    caps_.enhancedstatuscodes = true;
  } else if (ieq(key, "AUTH")) {  // "AUTH PLAIN LOGIN" and the old "AUTH=PLAIN LOGIN"
    caps_.auth = true;
    while (!rest.empty()) {
      size_t e = rest.find(' ');
      std::string_view mech = rest.substr(0, e);
      if (ieq(mech, "PLAIN")) caps_.auth_plain = true;
      if (ieq(mech, "LOGIN")) caps_.auth_login = true;
      if (e == rest.npos) break;
      rest.remove_prefix(e + 1);
    }
  }
}

void client::on_reply() {
  if (expect_head_ == expect_.size()) {
    // Nothing was asked. A 421 is a server closing an idle connection; anything else is a
    // server out of step with us.
    if (r_.code == 421) {
      r_.cmd = client_cmd::none;
      fail_connection(r_, false);
    } else {
      protocol_error("reply without a command");
    }
    return;
  }
  expect e = expect_[expect_head_++];
  if (expect_head_ == expect_.size()) {
    expect_.clear();
    expect_head_ = 0;
  }
  r_.cmd = e.cmd;
  if (r_.code == 421 && e.cmd != client_cmd::quit && e.cmd != client_cmd::greeting) {
    fail_connection(r_, false);
    return;
  }
  // Bytes beyond the replies we are owed answer commands we have not sent: a server (or a
  // man in the middle) that runs ahead of us. After STARTTLS they are discarded instead.
  if (expect_head_ == expect_.size() && in_off_ < in_.size() && e.cmd != client_cmd::starttls &&
      e.cmd != client_cmd::quit) {
    protocol_error("server sent data ahead of our command");
    return;
  }
  switch (e.cmd) {
    case client_cmd::greeting: reply_greeting(); break;
    case client_cmd::ehlo:
    case client_cmd::lhlo:
    case client_cmd::helo: reply_hello(e.cmd); break;
    case client_cmd::starttls: reply_starttls(); break;
    case client_cmd::auth: reply_auth(); break;
    case client_cmd::mail: reply_mail(); break;
    case client_cmd::rcpt: reply_rcpt(e.idx); break;
    case client_cmd::data: reply_data(); break;
    case client_cmd::dot: reply_dot(e.idx); break;
    case client_cmd::rset:
      if (r_.code / 100 == 2) {
        need_rset_ = false;
        start_transaction();
      } else {
        fail_connection(r_, false);
      }
      break;
    case client_cmd::quit:
      stage_ = client_stage::done;
      expect_.clear();
      expect_head_ = 0;
      break;
    case client_cmd::none: break;
  }
  update_stage();
}

// --- connection setup --------------------------------------------------------------------

void client::reply_greeting() {
  if (r_.code != 220) {
    fail_connection(r_, r_.code >= 500);
    return;
  }
  send_hello();
}

void client::send_hello() {
  caps_ = {};
  bool lmtp = cfg_.protocol == client_protocol::lmtp;
  send_line(lmtp ? "LHLO " : "EHLO ", cfg_.helo_name);
  push(lmtp ? client_cmd::lhlo : client_cmd::ehlo);
}

void client::reply_hello(client_cmd c) {
  int cls = r_.code / 100;
  if (cls == 2) {
    if (c == client_cmd::helo) caps_ = {};
    else caps_.esmtp = true;
    after_hello();
    return;
  }
  if (cls == 3) {
    protocol_error("unexpected reply code to EHLO");
    return;
  }
  if (c == client_cmd::ehlo && cls == 5) {
    // HELO has no extensions, so no STARTTLS: with TLS required, stop here.
    if (!tls_active_ && cfg_.tls >= tls_policy::encrypt) {
      fail_local(true, "4.7.4", "TLS is required, but was not offered by host");
      return;
    }
    send_line("HELO ", cfg_.helo_name);
    push(client_cmd::helo);
    return;
  }
  fail_connection(r_, cls == 5);
}

void client::after_hello() {
  if (!tls_active_) {
    bool required = cfg_.tls >= tls_policy::encrypt;
    if (cfg_.tls != tls_policy::none && cfg_.tls_available && caps_.starttls && !tls_refused_) {
      send_line("STARTTLS");
      push(client_cmd::starttls);
      return;
    }
    if (required) {
      if (!cfg_.tls_available)
        fail_local(true, "4.7.5", "TLS is required, but our TLS engine is unavailable");
      else if (tls_refused_)
        fail_local(true, "4.7.4", "TLS is required, but host refused to start TLS");
      else
        fail_local(true, "4.7.4", "TLS is required, but was not offered by host");
      return;
    }
  }
  if (!cfg_.auth_user.empty() && !authed_) {
    if (!tls_active_) {
      fail_local(true, "4.7.0",
                 "AUTH credentials are configured, but the connection is not encrypted: not sending them");
      return;
    }
    // A server that offers no AUTH at all is used without (postfix does the same).
    if (caps_.auth) {
      if (caps_.auth_plain) {
        // RFC 4616: [authzid] NUL authcid NUL passwd, as the initial response (RFC 4954 4).
        std::string resp;
        resp.push_back('\0');
        resp.append(cfg_.auth_user);
        resp.push_back('\0');
        resp.append(cfg_.auth_password);
        out_.append("AUTH PLAIN ");
        append_base64(out_, resp);
        out_.append("\r\n");
        auth_step_ = 0;
        push(client_cmd::auth);
        return;
      }
      if (caps_.auth_login) {
        send_line("AUTH LOGIN");
        auth_step_ = 1;
        push(client_cmd::auth);
        return;
      }
      fail_local(true, "4.7.0",
                 "SASL authentication failed: server offered no supported mechanism (PLAIN, LOGIN)");
      return;
    }
  }
  stage_ = client_stage::idle;
}

void client::reply_starttls() {
  int cls = r_.code / 100;
  if (cls == 2) {
    stage_ = client_stage::tls_handshake;  // feed() drops the rest of the input
    return;
  }
  if (cls == 3) {
    protocol_error("unexpected reply code to STARTTLS");
    return;
  }
  if (cfg_.tls >= tls_policy::encrypt) {
    client_reply r = r_;
    r.code = 0;
    set_status(r.status, "4.7.4");
    r.text.assign("TLS is required, but host refused to start TLS: ");
    append_number(r.text, r_.code);
    r.text.push_back(' ');
    r.text.append(r_.text);
    fail_connection(r, false);
    return;
  }
  tls_refused_ = true;
  after_hello();
}

void client::tls_done(bool ok) {
  if (stage_ != client_stage::tls_handshake) return;
  if (!ok) {
    fail_local(true, "4.7.5", "Cannot start TLS: handshake failure");
    return;
  }
  tls_active_ = true;
  in_.clear();
  send_hello();  // RFC 3207 4.2: forget everything learnt in clear
  update_stage();
}

void client::reply_auth() {
  int cls = r_.code / 100;
  if (cls == 4 || cls == 5) {  // postfix defers on authentication failure
    fail_connection(r_, false);
    return;
  }
  if (cls == 2 && (auth_step_ == 0 || auth_step_ == 3)) {
    authed_ = true;
    after_hello();
    return;
  }
  if (cls == 3 && (auth_step_ == 1 || auth_step_ == 2)) {
    append_base64(out_, auth_step_ == 1 ? std::string_view(cfg_.auth_user) : std::string_view(cfg_.auth_password));
    out_.append("\r\n");
    ++auth_step_;
    push(client_cmd::auth);
    return;
  }
  protocol_error("unexpected reply code to AUTH");
}

// --- transactions ------------------------------------------------------------------------

bool client::send(const client_message& m) {
  if (stage_ != client_stage::idle || m.rcpts.empty()) return false;
  msg_ = m;
  if (!msg_.size) msg_.size = m.content.size();
  nres_ = m.rcpts.size();
  if (results_.size() < nres_) results_.resize(nres_);
  for (size_t i = 0; i < nres_; ++i) {
    auto& r = results_[i];
    r.status = rcpt_status::pending;
    r.reply.code = 0;
    r.reply.status[0] = 0;
    r.reply.text.clear();
    r.reply.cmd = client_cmd::none;
  }
  results_ready_ = false;
  msg_active_ = true;
  mail_ok_ = false;
  next_rcpt_ = 0;
  n_accepted_ = 0;
  lone_dot_ = false;
  pos_ = 0;
  bol_ = true;
  body_end_ = false;
  owe_n_ = owe_off_ = 0;

  client_reply local;
  if (msg_.smtputf8 && !caps_.smtputf8) {
    set_status(local.status, "5.6.7");
    local.text.assign("SMTPUTF8 is required, but was not offered by host");
  } else if (caps_.size && caps_.size_limit && msg_.size > caps_.size_limit) {
    set_status(local.status, "5.3.4");
    local.text.assign("message size ");
    append_number(local.text, msg_.size);
    local.text.append(" exceeds size limit ");
    append_number(local.text, caps_.size_limit);
    local.text.append(" of server");
  } else if (!line_safe(msg_.sender)) {
    set_status(local.status, "5.1.7");
    local.text.assign("bad sender address syntax");
  }
  if (local.status[0]) {
    fail_all(rcpt_status::failed, local);
    finish_message(true);  // nothing was sent: no RSET needed
    return true;
  }
  if (need_rset_) {
    send_line("RSET");
    push(client_cmd::rset);
    update_stage();
    return true;
  }
  start_transaction();
  return true;
}

void client::start_transaction() {
  send_mail();
  if (caps_.pipelining) {
    // RFC 2920: MAIL, every RCPT and DATA in one write; the replies come back in order.
    bool any = false;
    for (uint32_t i = 0; i < nres_; ++i) {
      send_rcpt(i);  // a bad address is refused locally and not sent
      any = any || results_[i].status == rcpt_status::pending;
    }
    if (any) send_data();
  }
  update_stage();
}

void client::send_mail() {
  out_.append("MAIL FROM:<");
  out_.append(msg_.sender);
  out_.push_back('>');
  if (caps_.size) {
    out_.append(" SIZE=");
    append_number(out_, msg_.size);
  }
  if (msg_.body != spool::body_type::seven_bit && caps_.eightbitmime) out_.append(" BODY=8BITMIME");
  if (msg_.smtputf8 && caps_.smtputf8) out_.append(" SMTPUTF8");
  if (caps_.dsn) {
    if (msg_.ret == spool::dsn_ret::full) out_.append(" RET=FULL");
    if (msg_.ret == spool::dsn_ret::hdrs) out_.append(" RET=HDRS");
    if (!msg_.envid.empty() && msg_.envid.size() <= 100 && valid_xtext(msg_.envid)) {
      out_.append(" ENVID=");
      out_.append(msg_.envid);
    }
  }
  out_.append("\r\n");
  push(client_cmd::mail);
}

void client::send_rcpt(uint32_t i) {
  const auto& rc = msg_.rcpts[i];
  if (!line_safe(rc.addr)) {
    client_reply local;
    set_status(local.status, "5.1.3");
    local.text.assign("bad recipient address syntax");
    set_result(i, rcpt_status::failed, local);
    return;
  }
  out_.append("RCPT TO:<");
  out_.append(rc.addr);
  out_.push_back('>');
  if (caps_.dsn) {
    if (rc.notify & spool::notify_never) {
      out_.append(" NOTIFY=NEVER");
    } else if (rc.notify) {
      out_.append(" NOTIFY=");
      bool first = true;
      for (auto [f, name] : {std::pair{spool::notify_success, "SUCCESS"}, std::pair{spool::notify_failure, "FAILURE"},
                             std::pair{spool::notify_delay, "DELAY"}}) {
        if (!(rc.notify & f)) continue;
        if (!first) out_.push_back(',');
        out_.append(name);
        first = false;
      }
    }
    if (!rc.orcpt.empty() && valid_orcpt(rc.orcpt)) {
      out_.append(" ORCPT=");
      out_.append(rc.orcpt);
    }
  }
  out_.append("\r\n");
  push(client_cmd::rcpt, i);
}

void client::send_data() {
  send_line("DATA");
  push(client_cmd::data);
}

// Without pipelining: the next RCPT, else DATA when someone was accepted, else the end.
void client::after_rcpts() {
  while (next_rcpt_ < nres_) {
    uint32_t i = next_rcpt_++;
    send_rcpt(i);
    if (results_[i].status == rcpt_status::pending) return;  // sent: wait for its reply
  }
  if (n_accepted_) {
    send_data();
  } else {
    finish_message(false);  // RFC 5321 3.3: no DATA without a recipient; RSET before the next
  }
}

void client::reply_mail() {
  int cls = r_.code / 100;
  if (cls == 3) {
    protocol_error("unexpected reply code to MAIL FROM");
    return;
  }
  if (cls == 2) {
    mail_ok_ = true;
    if (!caps_.pipelining) after_rcpts();
  } else {
    fail_all(cls == 4 ? rcpt_status::deferred : rcpt_status::failed, r_);
    if (!caps_.pipelining) finish_message(false);
  }
  // Pipelined, and no RCPT could be sent: nothing else is owed.
  if (caps_.pipelining && msg_active_ && expect_head_ == expect_.size()) finish_message(false);
}

void client::reply_rcpt(uint32_t i) {
  int cls = r_.code / 100;
  if (cls == 3) {
    protocol_error("unexpected reply code to RCPT TO");
    return;
  }
  if (mail_ok_) {  // else the MAIL reply already decided (pipelining)
    if (cls == 2) {
      set_result(i, rcpt_status::accepted, r_);
      ++n_accepted_;
    } else {
      set_result(i, cls == 4 ? rcpt_status::deferred : rcpt_status::failed, r_);
    }
  }
  if (!caps_.pipelining) after_rcpts();
}

void client::reply_data() {
  int cls = r_.code / 100;
  if (cls == 3) {
    if (!n_accepted_) {
      // RFC 2920 3.1: DATA went with the pipeline, but nobody was accepted.
      send_line(".");
      lone_dot_ = true;
      push(client_cmd::dot);
      return;
    }
    stage_ = client_stage::body;
    return;
  }
  if (cls == 2) {
    protocol_error("unexpected reply code to DATA");
    return;
  }
  if (mail_ok_) {
    for (uint32_t i = 0; i < nres_; ++i) {
      if (results_[i].status == rcpt_status::accepted)
        set_result(i, cls == 4 ? rcpt_status::deferred : rcpt_status::failed, r_);
    }
  }
  finish_message(false);
}

size_t client::produce(size_t budget) {
  if (stage_ != client_stage::body) return 0;
  const char* c = msg_.content.data();
  const size_t n = msg_.content.size();
  size_t put = 0;
  auto owe = [&](const char* s, uint8_t k) {
    memcpy(owe_ + owe_n_, s, k);
    owe_n_ = uint8_t(owe_n_ + k);
  };
  for (;;) {
    if (owe_n_) {
      size_t k = std::min<size_t>(owe_n_ - owe_off_, budget - put);
      out_.append(owe_ + owe_off_, k);
      owe_off_ = uint8_t(owe_off_ + k);
      put += k;
      if (owe_off_ < owe_n_) break;
      owe_n_ = owe_off_ = 0;
    }
    if (body_end_) {
      // The final dot is out: the reply(s) to it are owed.
      ++n_messages_;
      if (cfg_.protocol == client_protocol::lmtp) {
        for (uint32_t i = 0; i < nres_; ++i) {
          if (results_[i].status == rcpt_status::accepted) push(client_cmd::dot, i);
        }
      } else {
        push(client_cmd::dot);
      }
      update_stage();
      break;
    }
    if (put == budget) break;
    if (pos_ == n) {
      body_end_ = true;
      if (!bol_) owe("\r\n", 2);
      owe(".\r\n", 3);
      continue;
    }
    char ch = c[pos_];
    if (bol_ && ch == '.') {  // RFC 5321 4.5.2
      owe("..", 2);
      ++pos_;
      bol_ = false;
      continue;
    }
    if (ch == '\r' || ch == '\n') {  // CRLF, or a bare CR or LF made one
      owe("\r\n", 2);
      pos_ += (ch == '\r' && pos_ + 1 < n && c[pos_ + 1] == '\n') ? 2 : 1;
      bol_ = true;
      continue;
    }
    size_t lim = std::min(budget - put, n - pos_);
    const char* s = c + pos_;
    const char* lf = static_cast<const char*>(memchr(s, '\n', lim));
    size_t run = lf ? size_t(lf - s) : lim;
    const char* cr = static_cast<const char*>(memchr(s, '\r', run));
    if (cr) run = size_t(cr - s);
    out_.append(s, run);
    pos_ += run;
    put += run;
    bol_ = false;
  }
  return put;
}

void client::reply_dot(uint32_t i) {
  int cls = r_.code / 100;
  if (lone_dot_) {  // the transaction is over whatever it says
    finish_message(true);
    return;
  }
  if (cls == 3) {
    protocol_error("unexpected reply code to end of DATA");
    return;
  }
  rcpt_status st = cls == 2 ? rcpt_status::delivered : cls == 4 ? rcpt_status::deferred : rcpt_status::failed;
  if (cfg_.protocol == client_protocol::lmtp) {
    set_result(i, st, r_);  // RFC 2033 4.2: one reply per accepted recipient, in order
    if (expect_head_ < expect_.size()) return;
  } else {
    for (uint32_t k = 0; k < nres_; ++k) {
      if (results_[k].status == rcpt_status::accepted) set_result(k, st, r_);
    }
  }
  finish_message(true);
}

void client::finish_message(bool clean) {
  need_rset_ = !clean;
  // Nothing should be left open here; if a path ever does, the recipient is deferred, not
  // lost. (Built only then: the steady state does not allocate.)
  for (uint32_t i = 0; i < nres_; ++i) {
    auto st = results_[i].status;
    if (st != rcpt_status::pending && st != rcpt_status::accepted) continue;
    client_reply none;
    set_status(none.status, "4.3.0");
    none.text.assign("no final reply for this recipient");
    fail_all(rcpt_status::deferred, none);
    break;
  }
  msg_active_ = false;
  results_ready_ = true;
  stage_ = client_stage::idle;
}

void client::set_result(uint32_t i, rcpt_status st, const client_reply& r) {
  auto& x = results_[i];
  x.status = st;
  x.reply.code = r.code;
  memcpy(x.reply.status, r.status, sizeof r.status);
  x.reply.text.assign(r.text);
  x.reply.cmd = r.cmd;
}

void client::fail_all(rcpt_status st, const client_reply& r) {
  for (uint32_t i = 0; i < nres_; ++i) {
    auto s = results_[i].status;
    if (s == rcpt_status::pending || s == rcpt_status::accepted) set_result(i, st, r);
  }
}

// --- the end -----------------------------------------------------------------------------

void client::fail_connection(const client_reply& r, bool permanent) {
  if (stage_ == client_stage::done) return;
  failed_ = true;
  failure_permanent_ = permanent;
  failure_.code = r.code;
  memcpy(failure_.status, r.status, sizeof r.status);
  failure_.text.assign(r.text);
  failure_.cmd = r.cmd;
  if (msg_active_) {
    fail_all(rcpt_status::deferred, failure_);
    msg_active_ = false;
    results_ready_ = true;
  }
  stage_ = client_stage::done;
  expect_.clear();
  expect_head_ = 0;
}

void client::fail_local(bool deferral, const char* status, std::string_view text) {
  client_reply r;
  set_status(r.status, status);
  r.text.assign(text);
  fail_connection(r, !deferral);
}

void client::protocol_error(std::string_view why) {
  std::string t("protocol error: ");
  t.append(why);
  fail_local(true, "4.5.0", t);
}

void client::quit() {
  if (stage_ == client_stage::done) return;
  if (stage_ == client_stage::idle) {
    send_line("QUIT");
    push(client_cmd::quit);
    update_stage();
    return;
  }
  fail_local(true, "4.3.0", "connection given up by the delivery agent");
}

void client::timeout() {
  if (stage_ == client_stage::done) return;
  if (stage_ == client_stage::quit) {
    stage_ = client_stage::done;
    return;
  }
  std::string t("conversation timed out while ");
  t.append(doing(stage_));
  fail_local(true, "4.4.2", t);
}

void client::lost() {
  if (stage_ == client_stage::done) return;
  if (stage_ == client_stage::quit) {
    stage_ = client_stage::done;
    return;
  }
  std::string t("lost connection while ");
  t.append(doing(stage_));
  fail_local(true, "4.4.2", t);
}

}  // namespace tern::smtp
