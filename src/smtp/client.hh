#pragma once
// One SMTP or LMTP client connection (delivery side) as a sans-I/O state machine.
//
// The mirror of smtp::session: the host (the shard's delivery code) owns the socket, the
// clock, the timers and the TLS transport. It feeds the client the application bytes it
// receives (feed()), sends what the client appends to its output (take_output()), pulls
// message content in pieces of a byte budget it chooses (produce()), switches the transport
// to TLS when the client asks (stage() == tls_handshake, then tls_done()), and reads the
// results per recipient when a message is finished (has_results(), results()). The client
// never touches a socket, a clock or the disk, so every dialogue is testable byte for byte
// (tests/unit/smtp/client_test.cc) and a slot can be reused without allocating: buffers and
// result strings keep their capacity.
//
// The host's loop, by contract:
//   reset(cfg); ... TCP connect ...; connected();
//   on every event (bytes, tls result, timer, socket writable), after the call:
//     take_output() and send it;
//     switch (stage()):
//       tls_handshake: start TLS on the transport (once), then tls_done(ok);
//       body:          produce(budget) while the socket takes more (back-pressure);
//       idle:          if has_results(), read results(); then send(next) or quit();
//       done:          close the socket; failed()/failure() say why when it failed;
//       otherwise:     (re)arm the timer for stage(); on expiry call timeout().
//   lost() when the connection breaks.
//
// Trust: every server byte is untrusted. A reply line is bounded (limits.reply_line_length)
// as is the number of lines of one reply (limits.reply_lines); a reply code is three digits
// 2xx..5xx followed by ' ', '-' or the end of the line, and every line of a reply carries
// the same code; anything else is a protocol error that ends the connection. Server text
// is sanitised (bytes outside printable ASCII become '?') and cut (limits.reply_text_length)
// before it reaches a result. A server may not send bytes ahead of the replies to commands
// we sent (that is a protocol error), and bytes after the 220 to STARTTLS are discarded
// (STARTTLS response injection, CVE-2011-0411): nothing said in clear survives into TLS.
//
// What it trusts: the host's message (the spool record it decoded): its content view stays
// valid and unchanged until the message has its results; its strings come from our own
// session's validated envelope, and are still checked for control bytes before they go
// into a command line (an address with CR/LF/NUL fails that recipient, never the dialogue).
//
// Security policy (postfix-like): with tls encrypt/verify, nothing but EHLO/LHLO/STARTTLS
// and QUIT is ever sent in clear; when TLS cannot be had the connection fails as a
// deferral. AUTH credentials are only ever sent over TLS. The client does not verify
// certificates: `verify` differs from `encrypt` only in what the host's TLS transport
// checks; the host reports a failed verification as tls_done(false).
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "spool/record.hh"

namespace tern::smtp {

enum class client_protocol : uint8_t { smtp, lmtp };
enum class tls_policy : uint8_t { none, may, encrypt, verify };

struct client_limits {
  size_t reply_line_length = 2048;  // bytes of one reply line, CRLF excluded
  size_t reply_lines = 256;         // lines of one (multi-line) reply
  size_t reply_text_length = 512;   // bytes of server text kept in a result
};

struct client_config {
  std::string helo_name;  // our name in EHLO/LHLO/HELO
  client_protocol protocol = client_protocol::smtp;
  tls_policy tls = tls_policy::may;
  bool tls_available = false;  // the host can run a TLS handshake on this connection
  // AUTH: used when auth_user is not empty, the server offers AUTH PLAIN or LOGIN and the
  // connection is secure. Credentials with an insecure connection: the connection fails.
  std::string auth_user;
  std::string auth_password;
  client_limits limits;
};

// The command a reply answered (postfix: "in reply to RCPT TO command").
enum class client_cmd : uint8_t {
  none,  // decided locally: no server reply involved
  greeting, ehlo, lhlo, helo, starttls, auth, mail, rcpt, data, dot, rset, quit
};
// "RCPT TO", "end of DATA", "initial greeting", ...; "" for none.
const char* command_name(client_cmd c) noexcept;

// What the client waits for: the host arms its timer for this stage.
enum class client_stage : uint8_t {
  connect,        // reset(): the host is connecting
  greeting,       // the 220
  ehlo,           // the reply to EHLO or LHLO
  helo,           // the reply to HELO (EHLO fallback)
  starttls,       // the reply to STARTTLS
  tls_handshake,  // the host runs the handshake, then calls tls_done()
  auth,           // a reply in the AUTH exchange
  mail,           // the reply to MAIL FROM (the first reply owed when pipelining)
  rcpt,
  data_init,      // the 354 to DATA
  body,           // the host pulls content with produce() (no reply awaited)
  data_done,      // the reply(s) after the final dot
  rset,
  idle,           // ready: send() a message or quit()
  quit,           // the reply to QUIT
  done,           // over: close the connection
};
const char* stage_name(client_stage s) noexcept;

// One server reply, or a local decision (code 0).
struct client_reply {
  uint16_t code = 0;      // the server's code; 0 when decided locally
  char status[12] = {};   // enhanced status "x.y.z": from the reply, else x.0.0
  std::string text;       // server text, lines joined by ' ', sanitised and cut
  client_cmd cmd = client_cmd::none;  // which command it answered
};

enum class rcpt_status : uint8_t {
  pending,    // no reply yet
  accepted,   // RCPT 2xx, waiting for the end of DATA
  delivered,  // final: 2xx after the dot
  deferred,   // final: try again later
  failed,     // final: bounce
};

struct rcpt_result {
  rcpt_status status = rcpt_status::pending;
  client_reply reply;
};

// What the server announced in its EHLO/LHLO reply (forgotten after STARTTLS).
struct server_caps {
  bool esmtp = false;  // EHLO/LHLO succeeded
  bool pipelining = false, size = false, eightbitmime = false, smtputf8 = false, dsn = false;
  bool starttls = false, chunking = false, enhancedstatuscodes = false;
  bool auth = false, auth_plain = false, auth_login = false;
  uint64_t size_limit = 0;  // SIZE n; 0: none given
};

// A message to send: the envelope as stored by the spool and the content as stored.
struct client_message {
  std::string_view sender;  // empty: null sender "<>"
  uint64_t size = 0;        // for SIZE= and the size check; 0: content.size()
  spool::body_type body = spool::body_type::seven_bit;
  bool smtputf8 = false;    // the message needs SMTPUTF8
  spool::dsn_ret ret = spool::dsn_ret::none;
  std::string_view envid;   // xtext as stored; sent only when valid
  std::span<const spool::rcpt_view> rcpts;  // orcpt "type;xtext" as stored
  std::string_view content;  // lines in CRLF, possibly bare CR/LF; need not end in CRLF
};
// The message of a decoded spool record; rcpts is the subset to deliver (the host decodes
// them with spool::for_each_rcpt and keeps them alive).
client_message message_of(const spool::message_view& m, std::span<const spool::rcpt_view> rcpts) noexcept;

class client {
 public:
  client() = default;
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  // (Re)initialise for a new connection; buffers keep their capacity. Stage: connect.
  void reset(const client_config& cfg);
  // The TCP connection is up: wait for the greeting.
  void connected();

  // Received application bytes (after TLS decryption). Runs the dialogue as far as it goes.
  void feed(const char* p, size_t n);
  void feed(std::string_view s) { feed(s.data(), s.size()); }

  // The TLS handshake the client asked for (stage tls_handshake) has ended.
  void tls_done(bool ok);

  // Give a message; only in stage idle (returns false otherwise, and when the message
  // has no recipients). The message may be finished at once, without sending anything
  // (size over the server's limit, SMTPUTF8 not offered): has_results() says so.
  bool send(const client_message& m);
  // In stage body: append at most `budget` bytes of the transformed content (dot-stuffed,
  // CR and LF alone made CRLF, a final CRLF added, then ".\r\n") to the output. Returns
  // the bytes appended; after the final dot the stage is data_done.
  size_t produce(size_t budget);
  // Stage idle: send QUIT (stage quit; the host's quit timer bounds the wait). Elsewhere:
  // the connection is given up at once (stage done); an unfinished message is deferred.
  void quit();

  // The host's timer for stage() fired / the connection broke. Both end the connection
  // (in stage quit quietly, without a failure).
  void timeout();
  void lost();

  client_stage stage() const noexcept { return stage_; }
  bool has_output() const noexcept { return !out_.empty(); }
  size_t output_size() const noexcept { return out_.size(); }
  void take_output(std::string& into) {
    into.swap(out_);
    out_.clear();
  }

  // The last message given to send() has a final result for every recipient (until the
  // next send()). Results are in the message's recipient order.
  bool has_results() const noexcept { return results_ready_; }
  std::span<const rcpt_result> results() const noexcept { return {results_.data(), nres_}; }

  // The connection ended on a failure (greeting, EHLO, TLS, AUTH, protocol, 421, timeout,
  // lost); failure() says why: the server's reply (code, status, text, command), or a local
  // decision (code 0, e.g. "4.7.4 TLS is required, but was not offered by host", "4.5.0
  // protocol error: ...", "4.4.2 conversation timed out while ..."). Recipients of the
  // message in progress without a final result are deferred with it, whatever the code.
  // failure_is_permanent(): the server refused us with a 5xx greeting or EHLO/LHLO/HELO
  // reply; the host decides what that means for its queue (the code is in failure()).
  bool failed() const noexcept { return failed_; }
  const client_reply& failure() const noexcept { return failure_; }
  bool failure_is_permanent() const noexcept { return failure_permanent_; }

  const server_caps& caps() const noexcept { return caps_; }
  bool secure() const noexcept { return tls_active_; }
  // Messages sent to the end of DATA on this connection.
  uint32_t messages() const noexcept { return n_messages_; }

 private:
  struct expect {
    client_cmd cmd;
    uint32_t idx;  // RCPT: recipient index; dot (LMTP): index of the accepted recipient
  };
  void push(client_cmd c, uint32_t idx = 0);
  void send_line(std::string_view a, std::string_view b = {});
  void send_hello();
  void after_hello();
  void start_transaction();
  void send_mail();
  void send_rcpt(uint32_t i);
  void send_data();
  void after_rcpts();
  void on_line(std::string_view line);
  void on_reply();
  void reply_greeting();
  void reply_hello(client_cmd c);
  void reply_starttls();
  void reply_auth();
  void reply_mail();
  void reply_rcpt(uint32_t i);
  void reply_data();
  void reply_dot(uint32_t i);
  void finish_message(bool clean);
  void set_result(uint32_t i, rcpt_status st, const client_reply& r);
  void fail_all(rcpt_status st, const client_reply& r);  // every recipient without a final result
  void fail_local(bool deferral, const char* status, std::string_view text);
  void fail_connection(const client_reply& r, bool permanent);
  void protocol_error(std::string_view why);
  void update_stage();
  void parse_cap(std::string_view line);

  client_config cfg_;
  client_stage stage_ = client_stage::connect;
  std::string in_;
  size_t in_off_ = 0;  // feed(): input consumed up to the line being handled
  std::string out_;
  std::vector<expect> expect_;
  size_t expect_head_ = 0;

  server_caps caps_;
  bool tls_active_ = false;
  bool tls_refused_ = false;  // STARTTLS refused (policy may): go on in clear
  bool authed_ = false;
  uint8_t auth_step_ = 0;   // 0 PLAIN sent; LOGIN: 1 AUTH LOGIN sent, 2 user sent, 3 password sent
  bool need_rset_ = false;
  bool failed_ = false, failure_permanent_ = false;
  client_reply failure_;
  uint32_t n_messages_ = 0;

  // The reply being read.
  client_reply r_;
  size_t r_lines_ = 0;
  bool r_ehlo_ = false;  // parse capability lines into caps_

  // The message in progress.
  bool msg_active_ = false;
  client_message msg_;
  std::vector<rcpt_result> results_;  // grows only: the strings keep their capacity
  size_t nres_ = 0;
  bool results_ready_ = false;
  bool mail_ok_ = false;
  uint32_t next_rcpt_ = 0;    // without pipelining: the next RCPT to send
  uint32_t n_accepted_ = 0;
  bool lone_dot_ = false;     // 354 without an accepted recipient: a lone dot was sent
  // Content transformation state (produce()).
  size_t pos_ = 0;
  bool bol_ = true;           // the next content byte starts a line
  bool body_end_ = false;     // content consumed; owe_ holds the rest
  char owe_[8] = {};          // bytes decided but not yet emitted (at most 5)
  uint8_t owe_n_ = 0, owe_off_ = 0;
};

}  // namespace tern::smtp
