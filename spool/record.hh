#pragma once
// Spool records: the on-disk format of tern's per-shard append-only segment log.
//
// Every record is   u32 crc32c | u32 payload length | u8 type | u8 version | u16 zero | payload
// (little-endian), and the CRC covers everything after the CRC field. A reader never trusts
// a length: it bounds it against the file and max_record_len before it looks at the payload,
// and stops at the first torn (incomplete) or corrupt (bad CRC/type) record.
//
// Record types:
//   segment  first record of every segment: magic, shard, segment id, creation time
//   message  one accepted message: queue id, arrival time, client, envelope with DSN
//            parameters (RFC 3461), content (with our Received: header)
//   done     a message left the queue (delivered, bounced or deleted): queue id
//   pad      filler, ignored (health probes)
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace tern::spool {

enum class record_type : uint8_t { segment = 1, message = 2, done = 3, pad = 4 };

inline constexpr size_t record_header_size = 12;
inline constexpr uint8_t record_version = 1;
inline constexpr uint32_t max_record_len = 1u << 30;  // far above any message_size limit
inline constexpr std::string_view segment_magic = "TERNSEG1";

// DSN NOTIFY flags (RFC 3461 4.1); 0 means "not given".
enum notify_flags : uint8_t { notify_never = 1, notify_success = 2, notify_failure = 4, notify_delay = 8 };
enum class dsn_ret : uint8_t { none = 0, full = 1, hdrs = 2 };
enum class body_type : uint8_t { seven_bit = 0, eight_bit_mime = 1, binary_mime = 2 };

// --- writing -----------------------------------------------------------------------------

// Append a record header placeholder; returns the record's start offset in buf.
size_t begin_record(std::string& buf, record_type t);
// Patch length and CRC of the record that starts at `start` and runs to the end of buf.
void finish_record(std::string& buf, size_t start) noexcept;

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
                           uint64_t created_us);
void encode_done(std::string& buf, std::string_view id);

// --- reading -----------------------------------------------------------------------------

enum class read_status : uint8_t { ok, end, torn, corrupt };

struct record_view {
  record_type type{};
  std::string_view payload;
  size_t size = 0;  // header + payload
};

// Read the record at `off`. end: off == size. torn: the record does not fit in the data
// (or fails its CRC and is the last thing in the file, i.e. an interrupted append).
// corrupt: bad CRC/type/length with more data after it.
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

// Queue ids: 18 upper-case hex digits: epoch (ms, 11), shard (2), sequence (5).
std::string format_queue_id(uint64_t epoch_ms, uint32_t shard, uint32_t seq);
void format_queue_id_to(char* out19, uint64_t epoch_ms, uint32_t shard, uint32_t seq) noexcept;
bool parse_queue_id(std::string_view id, uint64_t& epoch_ms, uint32_t& shard, uint32_t& seq) noexcept;

}  // namespace tern::spool

#include "spool/record_inl.hh"
