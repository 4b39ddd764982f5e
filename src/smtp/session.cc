#include "src/smtp/session.hh"

#include <time.h>

#include <algorithm>
#include <fmt/format.h>
#include <iterator>

#include "spool/record.hh"
#include "src/core/bytes.hh"
#include "src/core/log.hh"
#include "src/smtp/command.hh"

namespace tern::smtp {
namespace {

bool has_ctl(std::string_view s) {
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7F) return true;
  }
  return false;
}

void rfc5322_date(uint64_t us, char (&buf)[64]) {
  time_t t = static_cast<time_t>(us / 1000000);
  struct tm tm;
  gmtime_r(&t, &tm);
  strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S +0000 (UTC)", &tm);
}

}  // namespace

conn_info from_socket(const net::address& peer, const config::listener& l) {
  conn_info ci;
  ci.client = ci.peer = peer;
  ci.allow_bare_lf = l.allow_bare_lf;
  return ci;
}

conn_info from_proxy(const net::proxy_header& h, const net::address& peer, const config::listener& l) {
  conn_info ci;
  ci.peer = peer;
  ci.proxy_version = h.version;
  ci.allow_bare_lf = l.allow_bare_lf;
  if (h.local) {
    // v2 LOCAL, v2 UNSPEC/AF_UNIX, v1 UNKNOWN: the proxy talking for itself (health
    // checks). Its address is all we have, and it must not be what grants relaying:
    // the proxy usually sits in relay.networks (127.0.0.1), and anyone who can make it
    // send LOCAL would relay through us.
    ci.client = peer;
    ci.proxy_local = true;
    ci.relay_by_address = l.local_relay;
  } else {
    ci.client = h.src;
    ci.proxied = true;
  }
  return ci;
}

void session::reset(const policy* pol, session_host* host, const conn_info& ci) {
  pol_ = pol;
  host_ = host;
  ci_ = ci;
  client_ip_ = ci.client.ip();
  peer_ip_ = ci.proxied ? ci.peer.ip() : std::string();
  state_ = state::command;
  close_ = skipping_line_ = commit_taken_ = false;
  in_.clear();
  in_off_ = 0;
  out_.clear();
  helo_.clear();
  esmtp_ = false;
  errors_ = n_queued_ = n_cmds_ = n_rejected_ = n_junk_ = 0;
  reset_transaction();
}

void session::start(const char* refuse) {
  if (refuse) {
    reply(refuse);
    close_ = true;
    return;
  }
  fmt::format_to(std::back_inserter(out_), "220 {} ESMTP tern\r\n", pol_->hostname);
}

void session::reply(std::string_view text) {
  out_.append(text);
  out_.append("\r\n");
}

void session::reply_error(std::string_view text) {
  reply(text);
  count_error();
}

void session::count_error() {
  if (++errors_ >= pol_->limits.errors) {
    fmt::format_to(std::back_inserter(out_), "421 4.7.0 {} Error: too many errors\r\n", pol_->hostname);
    close_ = true;
  }
}

void session::feed(const char* p, size_t n) {
  if (close_) return;
  if (in_off_ == in_.size()) {
    in_.clear();
    in_off_ = 0;
  } else if (in_off_ > 65536 && in_off_ * 2 > in_.size()) {
    in_.erase(0, in_off_);
    in_off_ = 0;
  }
  in_.append(p, n);
}

void session::process() {
  while (!close_ && out_.size() < out_limit_) {
    size_t avail = in_.size() - in_off_;
    switch (state_) {
      case state::command: {
        if (avail == 0) return;
        std::string_view rest(in_.data() + in_off_, avail);
        size_t lf = rest.find('\n');
        size_t max = pol_->limits.line_length;
        if (skipping_line_) {
          if (lf == rest.npos) {
            in_off_ = in_.size();
            return;
          }
          in_off_ += lf + 1;
          skipping_line_ = false;
          reply_error("500 5.5.2 Error: line too long");
          continue;
        }
        if (lf == rest.npos) {
          if (avail >= max) {  // answer and resynchronise at the next LF
            skipping_line_ = true;
            in_off_ = in_.size();
          }
          return;
        }
        in_off_ += lf + 1;
        if (lf + 1 > max) {
          reply_error("500 5.5.2 Error: line too long");
          continue;
        }
        std::string_view line = rest.substr(0, lf);
        if (!line.empty() && line.back() == '\r') {
          line.remove_suffix(1);
        } else if (!ci_.allow_bare_lf) {
          // RFC 5321 2.3.8: lines end in CRLF. A client that ends commands with LF alone
          // is broken or probing for a parser that disagrees with ours (SMTP smuggling):
          // answer like postfix's smtpd_forbid_bare_newline = reject and hang up.
          reply("550 5.5.2 Error: bare <LF> received");
          close_ = true;
          return;
        }
        handle_line(line);
        continue;
      }
      case state::data:
        if (avail == 0) return;
        step_data();
        continue;
      case state::bdat:
        if (avail == 0 && bdat_left_ > 0) return;
        step_bdat();
        continue;
      case state::commit_wait:
      case state::closed:
        return;
    }
  }
}

void session::handle_line(std::string_view line) {
  ++n_cmds_;
  auto c = parse_command(line);
  if ((c.flags & cmd_junk) && ++n_junk_ > pol_->limits.junk_commands) {
    // postfix's smtpd_junk_command_limit, but final: a client that only NOOPs (or RSETs,
    // VRFYs, HELPs) forever holds a session slot and does no mail work.
    fmt::format_to(std::back_inserter(out_), "421 4.7.0 {} Error: too many junk commands\r\n",
                   pol_->hostname);
    close_ = true;
    return;
  }
  switch (c.v) {
    case verb::helo: cmd_helo(c.arg, false); return;
    case verb::ehlo: cmd_helo(c.arg, true); return;
    case verb::mail: cmd_mail(c.arg); return;
    case verb::rcpt: cmd_rcpt(c.arg); return;
    case verb::data: cmd_data(c.arg); return;
    case verb::bdat: cmd_bdat(c.arg); return;
    case verb::rset:
      if (!c.arg.empty()) return reply_error("501 5.5.4 Syntax: RSET");
      reset_transaction();
      return reply("250 2.0.0 Ok");
    case verb::noop: return reply("250 2.0.0 Ok");
    case verb::quit:
      reply("221 2.0.0 Bye");
      close_ = true;
      return;
    case verb::vrfy:
      if (c.arg.empty()) return reply_error("501 5.5.4 Syntax: VRFY address");
      return reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery");
    case verb::help:
      return reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP");
    case verb::expn:
    case verb::starttls:
    case verb::auth:
      return reply_error("502 5.5.1 Error: command not implemented");
    case verb::unknown:
      if (line.empty()) return reply_error("500 5.5.2 Error: bad syntax");
      return reply_error("500 5.5.2 Error: command not recognized");
  }
}

void session::cmd_helo(std::string_view arg, bool ehlo) {
  if (arg.empty() || has_ctl(arg) || arg.size() > 255)
    return reply_error(ehlo ? "501 5.5.4 Syntax: EHLO hostname" : "501 5.5.4 Syntax: HELO hostname");
  reset_transaction();
  helo_.assign(arg);
  esmtp_ = ehlo;
  if (!ehlo) {
    fmt::format_to(std::back_inserter(out_), "250 {}\r\n", pol_->hostname);
    return;
  }
  fmt::format_to(std::back_inserter(out_),
                 "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                 "250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n",
                 pol_->hostname, pol_->limits.message_size);
}

void session::cmd_mail(std::string_view arg) {
  if (helo_.empty()) return reply_error("503 5.5.1 Error: send HELO/EHLO first");
  if (have_mail_) return reply_error("503 5.5.1 Error: nested MAIL command");
  mail_args a;
  auto e = parse_mail(arg, a);
  switch (e) {
    case parse_error::none: break;
    case parse_error::syntax: return reply_error("501 5.5.4 Syntax: MAIL FROM:<address>");
    case parse_error::bad_address:
    case parse_error::too_long: return reply_error("501 5.1.7 Bad sender address syntax");
    case parse_error::unknown_param: return reply_error("555 5.5.4 Unsupported option");
    case parse_error::bad_param:
    case parse_error::duplicate_param: return reply_error("501 5.5.4 Bad MAIL parameter");
  }
  if (!esmtp_ && (a.size || a.body || a.smtputf8 || a.ret || !a.envid.empty()))
    return reply_error("555 5.5.4 Unsupported option (send EHLO for ESMTP parameters)");
  if (!is_ascii(a.address)) {
    // RFC 6531 3.5: a non-ASCII address needs the SMTPUTF8 parameter (553 X.6.7), and
    // then it must be UTF-8.
    if (!a.smtputf8) return reply_error("553 5.6.7 Must declare SMTPUTF8 to send unicode address");
    if (!valid_utf8(a.address)) return reply_error("501 5.1.7 Bad sender address syntax");
  }
  if (a.size > pol_->limits.message_size)
    return reply_error("552 5.3.4 Message size exceeds fixed limit");
  if (!host_->spool_healthy()) return reply_error("452 4.3.1 Insufficient system storage");
  have_mail_ = true;
  mail_from_.assign(a.address);
  envid_.assign(a.envid);
  body_ = a.body;
  ret_ = a.ret;
  smtputf8_ = a.smtputf8;
  reply("250 2.1.0 Ok");
}

bool session::relay_allowed(std::string_view rcpt, bool routed) const {
  if (ci_.relay_by_address && net::any_contains(pol_->relay_networks, ci_.client)) return true;
  // postfix allow_untrusted_routing = no: an untrusted client may not use a relay domain
  // as a stepping stone ("user%other@relaydomain", a source route, ...): the host for
  // the relay domain may honour the routing and send the mail anywhere.
  if (routed || routed_local_part(rcpt)) return false;
  auto dom = domain_of(rcpt);
  if (dom.empty() || dom.size() > 255) return false;
  char low[256];
  for (size_t i = 0; i < dom.size(); ++i) {
    char c = dom[i];
    low[i] = c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c;
  }
  std::string_view d(low, dom.size());
  for (const auto& r : pol_->relay_domains) {
    if (r[0] == '.') {
      if (d.size() > r.size() && d.substr(d.size() - r.size()) == r) return true;
    } else if (d == r) {
      return true;
    }
  }
  return false;
}

void session::cmd_rcpt(std::string_view arg) {
  if (!have_mail_) return reply_error("503 5.5.1 Error: need MAIL command");
  rcpt_args a;
  auto e = parse_rcpt(arg, a);
  switch (e) {
    case parse_error::none: break;
    case parse_error::syntax: return reply_error("501 5.5.4 Syntax: RCPT TO:<address>");
    case parse_error::bad_address:
    case parse_error::too_long: return reply_error("501 5.1.3 Bad recipient address syntax");
    case parse_error::unknown_param: return reply_error("555 5.5.4 Unsupported option");
    case parse_error::bad_param:
    case parse_error::duplicate_param: return reply_error("501 5.5.4 Bad RCPT parameter");
  }
  if (!esmtp_ && (a.notify || !a.orcpt.empty()))
    return reply_error("555 5.5.4 Unsupported option (send EHLO for ESMTP parameters)");
  if (!is_ascii(a.address)) {
    if (!smtputf8_) return reply_error("553 5.6.7 Must declare SMTPUTF8 to send unicode address");
    if (!valid_utf8(a.address)) return reply_error("501 5.1.3 Bad recipient address syntax");
  }
  if (a.address.find('@') == a.address.npos)
    return reply_error("550 5.1.3 Recipient address must include a domain");
  if (nrcpt_ >= pol_->limits.recipients) {
    // RFC 5321 4.5.3.1.8: a 452 here is a normal answer (the client sends the rest in
    // another transaction), not a client error. Like postfix's
    // smtpd_recipient_overshoot_limit, only a client that goes on far beyond the limit
    // starts to collect errors.
    if (++n_excess_rcpt_ > pol_->limits.recipient_overshoot)
      return reply_error("452 4.5.3 Error: too many recipients");
    return reply("452 4.5.3 Error: too many recipients");
  }
  if (!relay_allowed(a.address, a.source_route)) {
    ++n_rejected_;
    fmt::format_to(std::back_inserter(out_), "554 5.7.1 <{}>: Relay access denied\r\n", log::safe{a.path});
    return count_error();
  }
  spool::put_rcpt(rcpt_block_, a.address, a.notify, a.orcpt);
  if (nrcpt_ == 0) first_rcpt_.assign(a.address);
  ++nrcpt_;
  reply("250 2.1.5 Ok");
}

void session::cmd_data(std::string_view arg) {
  if (!arg.empty()) return reply_error("501 5.5.4 Syntax: DATA");
  if (!have_mail_) return reply_error("503 5.5.1 Error: need MAIL command");
  if (nrcpt_ == 0) return reply_error("503 5.5.1 Error: need RCPT command");
  if (bdat_used_) return reply_error("503 5.5.1 Error: DATA after BDAT in one transaction");
  if (in_off_ < in_.size()) {
    // Bytes after DATA before our 354: the client did not wait. Treating them as message
    // content or as commands would both be wrong (smuggling, desync): drop the session.
    reply("554 5.5.0 Error: SMTP protocol synchronization");
    close_ = true;
    return;
  }
  begin_message();
  state_ = state::data;
  reply("354 End data with <CR><LF>.<CR><LF>");
}

void session::cmd_bdat(std::string_view arg) {
  uint64_t size;
  bool last;
  if (!parse_bdat(arg, size, last)) {
    // The chunk length is unknown, so the stream cannot be resynchronised.
    reply("501 5.5.4 Syntax: BDAT size [LAST]");
    close_ = true;
    return;
  }
  const char* refuse = nullptr;
  if (!have_mail_)
    refuse = bdat_failed_ ? "503 5.5.1 Error: transaction failed, send RSET"
                          : "503 5.5.1 Error: need MAIL command";
  else if (nrcpt_ == 0)
    refuse = "503 5.5.1 Error: need RCPT command";
  bdat_ok_ = refuse == nullptr;
  if (bdat_ok_ && !bdat_used_) {
    bdat_used_ = true;
    begin_message();
  }
  bdat_left_ = size;
  bdat_last_ = last;
  state_ = state::bdat;
  bdat_refuse_ = refuse;  // answered once the chunk has been read and discarded
}

// Message buffers grow by a quarter, not by doubling (libstdc++'s reserve doubles), so the
// memory a message holds stays within 1.25 x its size (at least 8 KiB): the shard's
// message_memory budget counts capacity, and a 10 MiB message should not hold 16 MiB.
// (Small messages stay within tuning.buffer_keep, so the steady state reuses the buffer.)
void session::grow_message(size_t extra) {
  size_t need = msg_.size() + extra;
  if (need <= msg_.capacity()) return;
  size_t want = std::max({need, msg_.capacity() + msg_.capacity() / 4, size_t(8192)});
  std::string t;
  t.reserve(want);  // from empty: exactly `want`
  t.append(msg_);
  msg_.swap(t);
}

void session::step_data() {
  size_t avail = in_.size() - in_off_;
  if (dot_.size() <= pol_->limits.message_size) grow_message(avail);
  size_t used = dot_.feed(in_.data() + in_off_, avail, msg_);
  in_off_ += used;
  if (dot_.done()) finish_message(dot_.bare_cr() || dot_.bare_lf(), dot_.nul(), dot_.too_big());
}

void session::step_bdat() {
  size_t avail = in_.size() - in_off_;
  size_t take = static_cast<size_t>(std::min<uint64_t>(avail, bdat_left_));
  const char* p = in_.data() + in_off_;
  if (bdat_ok_) {
    eol_.feed(p, take);
    if (bdat_total_ + take <= pol_->limits.message_size) {
      grow_message(take);
      msg_.append(p, take);
    }
    bdat_total_ += take;
  }
  in_off_ += take;
  bdat_left_ -= take;
  if (bdat_left_ > 0) return;
  state_ = state::command;
  if (!bdat_ok_) return reply_error(bdat_refuse_);
  if (bdat_total_ > pol_->limits.message_size) {
    reset_transaction();
    bdat_failed_ = true;  // later chunks of this transaction are refused until RSET/MAIL
    return reply_error("552 5.3.4 Error: message file too big");
  }
  if (bdat_last_) {
    eol_.finish();
    return finish_message(eol_.bad(), eol_.nul(), false);
  }
  fmt::format_to(std::back_inserter(out_), "250 2.0.0 {} octets received\r\n", bdat_total_);
}

void session::begin_message() {
  host_->new_queue_id(id_);
  msg_.clear();
  rec_start_ = spool::begin_record(msg_, spool::record_type::message);
  uint64_t now = host_->wall_us();
  spool::envelope_in e;
  e.id = std::string_view(id_, queue_id_len);
  e.arrival_us = now;
  e.client_ip = client_ip_;
  e.client_port = ci_.client.port();
  e.peer_ip = peer_ip_;
  e.helo = helo_;
  e.mail_from = mail_from_;
  e.envid = envid_;
  e.ret = static_cast<spool::dsn_ret>(ret_);
  e.body = static_cast<spool::body_type>(body_);
  e.smtputf8 = smtputf8_;
  spool::put_message_head(msg_, e, nrcpt_);
  msg_.append(rcpt_block_);
  content_len_at_ = msg_.size();
  put_u32(msg_, 0);
  content_start_ = msg_.size();
  char date[64];
  rfc5322_date(now, date);
  // Received: (RFC 5321 4.4) with the real client address, from PROXY when trusted.
  // "from" is followed by what we know, the address literal; the HELO name is only a
  // sanitised token in the comment ("from [addr] (helo=name)"), so a HELO such as
  // "x ([6.6.6.6]) by mx.trusted.example" cannot forge structure (RFC 5321 4.4
  // Extended-Domain = address-literal FWS "(" TCP-info ")").
  fmt::format_to(std::back_inserter(msg_), "Received: from [{}{}] (helo=", ci_.client.family() == AF_INET6 ? "IPv6:" : "",
                 client_ip_);
  put_received_helo();
  // RFC 6531 3.7.3: "UTF8SMTP" is ESMTP with SMTPUTF8.
  fmt::format_to(std::back_inserter(msg_), ")\r\n\tby {} (tern) with {} id {}", pol_->hostname,
                 esmtp_ ? (smtputf8_ ? "UTF8SMTP" : "ESMTP") : "SMTP", std::string_view(id_, queue_id_len));
  // The recipient was validated by parse_rcpt (no controls, no CR/LF) and is ASCII unless
  // the transaction is SMTPUTF8, in which case it is valid UTF-8 and stays as it is.
  if (nrcpt_ == 1) {
    msg_.append("\r\n\tfor <");
    msg_.append(first_rcpt_);
    msg_.push_back('>');
  }
  fmt::format_to(std::back_inserter(msg_), "; {}\r\n", date);
  dot_.reset(pol_->limits.message_size);
  eol_.reset();
  bdat_total_ = 0;
}

void session::put_received_helo() {
  // A token: letters, digits and "-._:" pass (host names, and the inside of address
  // literals); anything else, including space ( ) [ ] ; \ " controls and non-ASCII,
  // becomes '?'. HELO is at most 255 bytes (cmd_helo).
  for (char c : helo_) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
              c == '.' || c == '_' || c == ':';
    msg_.push_back(ok ? c : '?');
  }
}

void session::finish_message(bool bare, bool nul, bool too_big) {
  state_ = state::command;
  if (too_big) {
    reset_transaction();
    return reply_error("552 5.3.4 Error: message file too big");
  }
  if (bare) {
    reset_transaction();
    return reply_error("550 5.5.2 Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8)");
  }
  if (nul) {
    reset_transaction();
    return reply_error("550 5.6.0 Error: NUL character in message data");
  }
  if (bdat_used_ && bdat_total_ == 0) {
    reset_transaction();
    return reply_error("554 5.6.0 Error: empty message");
  }
  store_le32(msg_.data() + content_len_at_, static_cast<uint32_t>(msg_.size() - content_start_));
  spool::finish_record(msg_, rec_start_);
  state_ = state::commit_wait;
  commit_taken_ = false;
}

void session::commit_done(bool ok) {
  state_ = state::command;
  if (ok) {
    ++n_queued_;
    n_junk_ = 0;  // like postfix: the junk count starts again after mail is queued
    fmt::format_to(std::back_inserter(out_), "250 2.0.0 Ok: queued as {}\r\n", std::string_view(id_, queue_id_len));
    if (log::enabled(log::level::info)) {
      std::string_view id(id_, queue_id_len);
      log::info("{}: client=unknown[{}]{}{}{}, helo=<{}>, from=<{}>, size={}, nrcpt={}", id, client_ip_,
                ci_.proxied ? ", proxy=[" : "", peer_ip_, ci_.proxied ? "]" : "",
                log::safe{helo_}, log::safe{mail_from_}, msg_.size() - content_start_, nrcpt_);
    }
  } else {
    reply("451 4.3.0 Error: queue file write error, try again later");
    ++errors_;
  }
  reset_transaction();
}

void session::reset_transaction() {
  have_mail_ = false;
  mail_from_.clear();
  envid_.clear();
  body_ = ret_ = 0;
  smtputf8_ = false;
  rcpt_block_.clear();
  first_rcpt_.clear();
  nrcpt_ = n_excess_rcpt_ = 0;
  bdat_used_ = bdat_failed_ = false;
  bdat_total_ = 0;
  if (state_ != state::commit_wait) {
    if (msg_.capacity() > pol_->buffer_keep) std::string().swap(msg_);
    msg_.clear();
  }
}

void session::trim() noexcept {
  size_t keep = pol_ ? pol_->buffer_keep : 0;
  auto shrink = [keep](std::string& b) {
    if (b.capacity() > keep) std::string().swap(b);
  };
  if (in_off_ == in_.size()) {
    in_.clear();
    in_off_ = 0;
    shrink(in_);
  }
  if (out_.empty()) shrink(out_);
  if (state_ != state::commit_wait && !receiving_message() && msg_.empty()) shrink(msg_);
  if (rcpt_block_.empty()) shrink(rcpt_block_);
}

void session::idle_timeout() {
  if (close_) return;
  fmt::format_to(std::back_inserter(out_), "421 4.4.2 {} Error: timeout exceeded\r\n", pol_->hostname);
  close_ = true;
}

void session::session_timeout() {
  if (close_) return;
  fmt::format_to(std::back_inserter(out_), "421 4.4.2 {} Error: session time limit exceeded\r\n",
                 pol_->hostname);
  close_ = true;
}

void session::shutdown() {
  if (close_) return;
  fmt::format_to(std::back_inserter(out_), "421 4.3.2 {} Service shutting down\r\n", pol_->hostname);
  close_ = true;
}

void session::log_disconnect(bool lost) const {
  if (!log::enabled(log::level::info)) return;
  // A PROXY health check says so ("proxy_local_v2"): its address is the proxy's own.
  log::info("{} from unknown[{}]{}{}{}{}{}{}{} commands={} queued={} rejected={} errors={}",
            lost ? "lost connection" : "disconnect", client_ip_, ci_.proxied ? " proxy=[" : "", peer_ip_,
            ci_.proxied ? "] proxy_v" : (ci_.proxy_local ? " proxy_local_v" : ""),
            ci_.proxied || ci_.proxy_local ? (ci_.proxy_version == 1 ? "1" : "2") : "",
            helo_.empty() ? "" : " helo=<", log::safe{helo_, helo_.empty() ? 0u : 256u}, helo_.empty() ? "" : ">",
            n_cmds_, n_queued_, n_rejected_, errors_);
}

}  // namespace tern::smtp
