#pragma once
// One SMTP server session as a sans-I/O state machine.
//
// The shard feeds it received bytes and sends what it appends to out(); the session never
// touches a socket, a clock or the disk. That makes every dialogue testable byte for byte
// (tests/unit/smtp/session_test.cc) and lets a slot be reused for the next connection
// without allocating: all buffers keep their capacity.
//
// When a message is complete the session builds its spool record in its own buffer and
// stops (want_commit()). The shard hands record() to the spool writer, and calls
// commit_done(ok) once the group-commit fdatasync has completed: only then is the 250 sent.
//
// Trust: all input is untrusted. Lines are bounded (limits.line_length), messages by
// limits.message_size, recipients by limits.recipients (+ limits.recipient_overshoot
// before excess RCPTs count as errors), errors by limits.errors, commands that do no
// mail work by limits.junk_commands. Command lines end in CRLF only (a bare LF closes
// the session unless the listener has allow_bare_lf). Relay permission comes from the
// client address (relay.networks, unless conn_info says the address is not the
// client's) or from the recipient domain (relay.domains) when the recipient carries no
// routing (source route, or '@' '%' '!' in the local part). Client text that reaches
// the Received: header (HELO) is reduced to a token; addresses are validated first
// (non-ASCII needs SMTPUTF8 and valid UTF-8).
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "net/address.hh"
#include "net/proxy.hh"
#include "src/config/config.hh"
#include "src/smtp/data.hh"

namespace tern::smtp {

inline constexpr size_t queue_id_len = 18;

// What a session needs from its shard.
class session_host {
 public:
  virtual ~session_host() = default;
  virtual void new_queue_id(char (&out)[queue_id_len + 1]) = 0;
  virtual bool spool_healthy() const = 0;
  virtual uint64_t wall_us() const = 0;
};

// Shard-wide, read-only policy shared by the sessions of one shard.
struct policy {
  std::string hostname;
  config::limits limits;
  std::vector<net::cidr> relay_networks;
  std::vector<std::string> relay_domains;
  size_t buffer_keep = 64 * 1024;  // capacity a buffer keeps between uses; more is given back
};

struct conn_info {
  net::address client;  // the client as trusted: PROXY source when a trusted proxy sent one
  net::address peer;    // the socket peer
  bool proxied = false;      // client came from a PROXY header
  bool proxy_local = false;  // PROXY LOCAL/UNKNOWN/UNSPEC/UNIX: a health check, client = peer
  uint8_t proxy_version = 0;
  // The client address may grant relay permission through relay.networks. False for a
  // PROXY health check unless the listener sets local_relay: there `client` is the
  // proxy's own address, which says nothing about who is really talking.
  bool relay_by_address = true;
  bool allow_bare_lf = false;  // listener: accept LF alone as a command line end
};

// What the shard calls to describe a new connection to its session.
// A plain listener: the socket peer is the client.
conn_info from_socket(const net::address& peer, const config::listener& l);
// A proxy_protocol listener, once parse_proxy() said done: the header's source for a
// proxied connection; for a health check (h.local) the socket peer, without relay
// permission by address unless l.local_relay.
conn_info from_proxy(const net::proxy_header& h, const net::address& peer, const config::listener& l);

class session {
 public:
  session() = default;
  session(const session&) = delete;
  session& operator=(const session&) = delete;

  // (Re)initialise for a new connection; buffers keep their capacity.
  void reset(const policy* pol, session_host* host, const conn_info& ci);
  // Emit the greeting (220), or a 421 with `refuse` and close.
  void start(const char* refuse = nullptr);

  // Append received bytes and run the dialogue as far as it goes.
  void feed(const char* p, size_t n);
  void process();

  // Output waiting to be sent; the shard takes it with take_output().
  bool has_output() const noexcept { return !out_.empty(); }
  void take_output(std::string& into) {
    into.swap(out_);
    out_.clear();
  }
  // The session is over: send what is left, then close.
  bool closing() const noexcept { return close_; }
  // A complete message waits for its spool commit.
  bool want_commit() const noexcept { return state_ == state::commit_wait && !commit_taken_; }
  std::string_view record() noexcept {
    commit_taken_ = true;
    return msg_;
  }
  bool commit_pending() const noexcept { return state_ == state::commit_wait; }
  // The record handed to the spool, while its commit is pending (delivery reads its id).
  std::string_view committed_record() const noexcept { return msg_; }
  void commit_done(bool ok);
  // Bytes received but not yet processed (the shard pauses reading when this grows).
  size_t pending_input() const noexcept { return in_.size() - in_off_; }
  // Output waiting for take_output(). process() stops (and resumes at the next call) once
  // this reaches the limit: a client that pipelines commands and never reads its replies
  // cannot make the session buffer replies without bound.
  size_t output_size() const noexcept { return out_.size(); }
  void set_output_limit(size_t n) noexcept { out_limit_ = n; }
  // Memory held by the message buffer (the shard's message_memory budget counts it).
  size_t message_bytes() const noexcept { return msg_.capacity(); }
  // Reading DATA or BDAT content: the state in which message memory grows.
  bool receiving_message() const noexcept { return state_ == state::data || state_ == state::bdat; }
  // Give back buffer capacity above policy.buffer_keep (idle between uses).
  void trim() noexcept;

  // Timeouts, decided by the shard's clock.
  void idle_timeout();
  void session_timeout();
  // The daemon is stopping: 421 4.3.2 and close.
  void shutdown();
  // One line for the connection, postfix-style, at disconnect.
  void log_disconnect(bool lost) const;

  const std::string& client_ip() const noexcept { return client_ip_; }
  // Counters for logs and metrics.
  uint32_t messages() const noexcept { return n_queued_; }
  uint32_t errors() const noexcept { return errors_; }

 private:
  enum class state : uint8_t { command, data, bdat, commit_wait, closed };
  void reply(std::string_view text);
  void reply_error(std::string_view text);
  void count_error();  // one more error; past limits.errors: 421 and close
  void handle_line(std::string_view line);
  void cmd_helo(std::string_view arg, bool ehlo);
  void cmd_mail(std::string_view arg);
  void cmd_rcpt(std::string_view arg);
  void cmd_data(std::string_view arg);
  void cmd_bdat(std::string_view arg);
  void reset_transaction();
  void begin_message();
  void finish_message(bool bare, bool nul, bool too_big);
  bool relay_allowed(std::string_view rcpt, bool routed) const;
  void put_received_helo();
  void grow_message(size_t extra);
  void step_data();
  void step_bdat();

  const policy* pol_ = nullptr;
  session_host* host_ = nullptr;
  conn_info ci_;
  // The addresses as text, formatted once per connection (Received:, log lines).
  std::string client_ip_, peer_ip_;
  state state_ = state::command;
  bool close_ = false;
  bool skipping_line_ = false;  // over-long line: discard to the next LF
  bool commit_taken_ = false;

  std::string in_;
  size_t in_off_ = 0;
  std::string out_;
  size_t out_limit_ = SIZE_MAX;

  // Session
  std::string helo_;
  bool esmtp_ = false;
  uint32_t errors_ = 0;
  uint32_t n_queued_ = 0;
  uint32_t n_cmds_ = 0;
  uint32_t n_rejected_ = 0;
  uint32_t n_junk_ = 0;  // junk commands since the session started or last queued a message

  // Transaction
  bool have_mail_ = false;
  std::string mail_from_;
  std::string envid_;
  uint8_t body_ = 0, ret_ = 0;
  bool smtputf8_ = false;
  std::string rcpt_block_;  // recipients encoded as spool records want them
  std::string first_rcpt_;
  uint32_t nrcpt_ = 0;
  uint32_t n_excess_rcpt_ = 0;  // RCPTs over limits.recipients in this transaction
  bool bdat_used_ = false;
  bool bdat_failed_ = false;  // this transaction's BDAT was refused; swallow the rest

  // Message being received: the spool record under construction.
  std::string msg_;
  size_t rec_start_ = 0, content_len_at_ = 0, content_start_ = 0;
  char id_[queue_id_len + 1] = {};
  dot_decoder dot_;
  eol_checker eol_;
  uint64_t bdat_left_ = 0;
  bool bdat_last_ = false;
  bool bdat_ok_ = false;  // the current chunk belongs to a valid transaction
  const char* bdat_refuse_ = nullptr;
  uint64_t bdat_total_ = 0;
};

}  // namespace tern::smtp
