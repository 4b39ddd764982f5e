#pragma once
// Spool records: the on-disk format of tern's per-shard append-only segment log.
//
// Every record (version 2) is, little-endian:
//   u32 crc32c | u32 payload length | u8 type | u8 version (2) | u16 zero | u64 nonce | payload
// The nonce is the segment's 64-bit random number (getrandom at segment creation, carried
// by every record of that segment, the segment header record first). The CRC covers bytes
// 4..12 and the payload, not the nonce: the session builds and checksums its record before
// it knows which segment it goes to, and the writer supplies the nonce as a separate iovec
// (no copy, no second CRC pass). The nonce is checked for exact equality instead.
//
// What it trusts: nothing in the file. A reader bounds every length against the file and
// max_record_len before it looks at the payload. Message content comes from clients, who
// can write any bytes, including bytes that look like a record with a correct CRC; they
// cannot know the nonce, so a walker that demands the nonce never takes client bytes for a
// record, and a resynchronisation after damage (scan.cc) looks only at offsets where the
// nonce occurs: candidates are rejected in O(1), and the CRC work stays linear.
//
// Record types:
//   segment  first record of every segment: magic, shard, segment id, creation time
//   message  one accepted message: queue id, arrival time, client, envelope with DSN
//            parameters (RFC 3461), content (with our Received: header)
//   done     a message left the queue (delivered, bounced or deleted): queue id
//   pad      filler, ignored (health probes)
//   status   delivery progress of one message: attempts, next attempt, and the recipients
//            whose state changed (deferred / delivered / failed, with the DSN status and
//            the diagnostic). Folded in file order by recovery; a message copied forward
//            into a newer segment is followed by a status record that repeats its state.
// Version 1 segments (12-byte header, no nonce, magic TERNSEG1) are refused with a clear
// error: none were ever deployed.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace tern::spool {

enum class record_type : uint8_t { segment = 1, message = 2, done = 3, pad = 4, status = 5 };
inline constexpr uint8_t max_record_type = 5;

inline constexpr size_t record_header_size = 20;
inline constexpr size_t record_nonce_offset = 12;
inline constexpr uint8_t record_version = 2;
// The reader's bound on a payload length. The config check derives the largest
// message_size from it (max_record_for below), so every 250-acknowledged record fits.
inline constexpr uint32_t max_record_len = 1u << 30;
inline constexpr std::string_view segment_magic = "TERNSEG2";
inline constexpr std::string_view segment_magic_v1 = "TERNSEG1";
inline constexpr size_t segment_header_payload_size = 8 + 4 + 8 + 8;
inline constexpr size_t segment_header_record_size = record_header_size + segment_header_payload_size;

// --- size bounds -------------------------------------------------------------------------

// Our Received: header: literal text ~120 bytes, HELO (escaped, cut at 255: at most 4 bytes
// per input byte), client IP, hostname (255), queue id, one recipient (escaped, cut at 256),
// date (~40). 4 KiB covers it with room to spare.
inline constexpr uint64_t received_header_max = 4096;
// RFC 5321 4.5.3.1.3: the command parser refuses longer paths.
inline constexpr uint64_t max_path_len = 256;

// The largest record a session can build for a message of message_size content bytes with
// `recipients` recipients when command lines are at most line_length bytes: record header,
// envelope strings each bounded by the line (and IP texts by 64), per recipient address,
// NOTIFY and ORCPT, content length, Received: header and content.
constexpr uint64_t max_record_for(uint64_t message_size, uint64_t recipients, uint64_t line_length) {
  uint64_t addr = line_length < max_path_len ? line_length : max_path_len;
  uint64_t envelope = (2 + 18) + 8 + (2 + 64) + 2 + (2 + 64) + 3 * (2 + line_length) + 3 + 4;
  uint64_t per_rcpt = (2 + addr) + 1 + (2 + line_length);
  return record_header_size + envelope + recipients * per_rcpt + 4 + received_header_max + message_size;
}
// Whether every record such limits allow fits the reader's bound (payload <= max_record_len).
constexpr bool record_fits(uint64_t message_size, uint64_t recipients, uint64_t line_length) {
  return max_record_for(message_size, recipients, line_length) - record_header_size <= max_record_len;
}
// The largest message_size for which record_fits holds (0 when none does).
constexpr uint64_t max_message_size_for(uint64_t recipients, uint64_t line_length) {
  uint64_t fixed = max_record_for(0, recipients, line_length) - record_header_size;
  return fixed >= max_record_len ? 0 : max_record_len - fixed;
}

// DSN NOTIFY flags (RFC 3461 4.1); 0 means "not given".
enum notify_flags : uint8_t { notify_never = 1, notify_success = 2, notify_failure = 4, notify_delay = 8 };
enum class dsn_ret : uint8_t { none = 0, full = 1, hdrs = 2 };
enum class body_type : uint8_t { seven_bit = 0, eight_bit_mime = 1, binary_mime = 2 };

// --- writing -----------------------------------------------------------------------------

// Append a record header placeholder; returns the record's start offset in buf.
size_t begin_record(std::string& buf, record_type t);
// Patch length and CRC of the record that starts at `start` and runs to the end of buf.
// The nonce field stays zero: the writer supplies it (set_record_nonce for tests/tools).
void finish_record(std::string& buf, size_t start) noexcept;
// Store a segment nonce in a finished record (the CRC does not cover it).
void set_record_nonce(char* record, uint64_t nonce) noexcept;
uint64_t record_nonce(const unsigned char* record) noexcept;
// A fresh random nonce (getrandom); never 0, so zero-filled space never matches.
uint64_t new_nonce() noexcept;

struct envelope_in {
  std::string_view id;
  uint64_t arrival_us = 0;
  std::string_view client_ip;    // the client as we trust it (PROXY source when trusted)
  uint16_t client_port = 0;
  std::string_view peer_ip;      // the socket peer (the proxy when PROXY was used)
  std::string_view helo;
  std::string_view mail_from;    // without angle brackets; empty for the null sender
  std::string_view envid;        // DSN ENVID, xtext-decoded? no: stored as received
  dsn_ret ret = dsn_ret::none;
  body_type body = body_type::seven_bit;
  bool smtputf8 = false;
};

// Message payload layout: envelope fields, u32 nrcpt, recipients, u32 content length,
// content. put_message_head writes the envelope fields; put_rcpt each recipient;
// the caller then writes u32 nrcpt... see encode order below (nrcpt first, so the
// recipient count is known before they are written: recipients are fixed at DATA time).
void put_message_head(std::string& buf, const envelope_in& e, uint32_t nrcpt);
void put_rcpt(std::string& buf, std::string_view addr, uint8_t notify, std::string_view orcpt);

void encode_segment_header(std::string& buf, uint32_t shard, uint64_t segment_id,
                           uint64_t created_us, uint64_t nonce);
void encode_done(std::string& buf, std::string_view id, uint64_t nonce = 0);

// --- reading -----------------------------------------------------------------------------

enum class read_status : uint8_t { ok, end, bad };
// Why a record was refused, in the order the checks run (cheapest first: the nonce check is
// an 8-byte compare, the CRC comes last).
enum class record_fault : uint8_t {
  none,
  short_header,  // fewer than record_header_size bytes left
  bad_nonce,     // not this segment's nonce
  bad_length,    // above max_record_len
  past_eof,      // the payload would run past the end of the data
  bad_type,      // unknown type, wrong version, or reserved bits set
  bad_crc,
};
const char* fault_text(record_fault f) noexcept;

struct record_view {
  record_type type{};
  std::string_view payload;
  size_t size = 0;  // header + payload
};

// Read the record at `off` of a segment whose nonce is `nonce`. end: off == size; bad:
// see `fault`. `crc_bytes`, when given, is increased by the bytes run through the CRC (the
// resync cost test counts work with it).
read_status read_record(std::span<const unsigned char> data, size_t off, uint64_t nonce,
                        record_view& out, record_fault* fault = nullptr,
                        uint64_t* crc_bytes = nullptr) noexcept;
// The same without the nonce check: one record built in memory (a session's record before
// the writer gives it a nonce). Never use it to walk a segment.
read_status read_record(std::span<const unsigned char> data, size_t off, record_view& out,
                        const char** why = nullptr) noexcept;

struct message_view {
  std::string_view id;
  uint64_t arrival_us = 0;
  std::string_view client_ip;
  uint16_t client_port = 0;
  std::string_view peer_ip;
  std::string_view helo;
  std::string_view mail_from;
  std::string_view envid;
  dsn_ret ret = dsn_ret::none;
  body_type body = body_type::seven_bit;
  bool smtputf8 = false;
  uint32_t nrcpt = 0;
  std::string_view rcpt_block;  // nrcpt x (str16 addr, u8 notify, str16 orcpt)
  std::string_view content;
};

struct rcpt_view {
  std::string_view addr;
  uint8_t notify = 0;
  std::string_view orcpt;
};

bool decode_message(std::string_view payload, message_view& out) noexcept;
// Iterate recipients; returns false if the block is malformed.
template <typename F>
bool for_each_rcpt(const message_view& m, F&& f);

struct segment_view {
  uint32_t shard = 0;
  uint64_t segment_id = 0;
  uint64_t created_us = 0;
};
bool decode_segment_header(std::string_view payload, segment_view& out) noexcept;
bool decode_done(std::string_view payload, std::string_view& id) noexcept;

// --- delivery status ----------------------------------------------------------------------

enum class rcpt_state : uint8_t { pending = 0, deferred = 1, delivered = 2, failed = 3 };
const char* rcpt_state_text(rcpt_state s) noexcept;
inline bool rcpt_final(rcpt_state s) noexcept { return s == rcpt_state::delivered || s == rcpt_state::failed; }
// status flags
enum status_flags : uint8_t { status_delay_warned = 1 };
// A diagnostic longer than this is cut (it is the remote server's text; the log keeps it).
inline constexpr size_t max_status_text = 1000;

struct rcpt_status {
  uint32_t index = 0;   // the recipient's position in the message record
  rcpt_state state = rcpt_state::pending;
  std::string_view dsn;   // "2.0.0", "4.4.1", "5.1.1"
  std::string_view text;  // "host a.example[192.0.2.1] said: 550 5.1.1 ... (in reply to RCPT TO)"
};

struct status_view {
  std::string_view id;
  uint32_t attempts = 0;
  uint64_t next_attempt_us = 0;  // wall clock; 0: as soon as possible
  uint8_t flags = 0;
  uint32_t count = 0;
  std::string_view entries;  // count x (u32 index, u8 state, str16 dsn, str16 text)
};

void encode_status(std::string& buf, std::string_view id, uint32_t attempts, uint64_t next_attempt_us,
                   uint8_t flags, std::span<const rcpt_status> changed, uint64_t nonce = 0);
bool decode_status(std::string_view payload, status_view& out) noexcept;
// Iterate the entries; false if the block is malformed.
template <typename F>
bool for_each_status(const status_view& s, F&& f);

// Queue ids: 18 upper-case hex digits: epoch (ms, 11), shard (2), sequence (5).
std::string format_queue_id(uint64_t epoch_ms, uint32_t shard, uint32_t seq);
void format_queue_id_to(char* out19, uint64_t epoch_ms, uint32_t shard, uint32_t seq) noexcept;
bool parse_queue_id(std::string_view id, uint64_t& epoch_ms, uint32_t& shard, uint32_t& seq) noexcept;

}  // namespace tern::spool

#include "spool/record_inl.hh"
