#include "spool/record.hh"

#include <sys/random.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "src/core/bytes.hh"
#include "src/core/crc32c.hh"

namespace tern::spool {
namespace {
void put_str16(std::string& b, std::string_view s) {
  put_u16(b, static_cast<uint16_t>(s.size()));
  b.append(s.data(), s.size());
}
}  // namespace

size_t begin_record(std::string& buf, record_type t) {
  size_t start = buf.size();
  char h[record_header_size] = {};
  h[8] = static_cast<char>(t);
  h[9] = static_cast<char>(record_version);
  buf.append(h, sizeof h);
  return start;
}

namespace {
// CRC over bytes 4..12 (length, type, version, reserved) and the payload: not the nonce.
uint32_t record_crc(const unsigned char* p, size_t len) noexcept {
  uint32_t c = crc32c(0, p + 4, 8);
  return crc32c(c, p + record_header_size, len);
}
}  // namespace

void finish_record(std::string& buf, size_t start) noexcept {
  char* p = buf.data() + start;
  size_t len = buf.size() - start - record_header_size;
  store_le32(p + 4, static_cast<uint32_t>(len));
  store_le32(p, record_crc(reinterpret_cast<const unsigned char*>(p), len));
}

void set_record_nonce(char* rec, uint64_t nonce) noexcept {
  store_le32(rec + record_nonce_offset, static_cast<uint32_t>(nonce));
  store_le32(rec + record_nonce_offset + 4, static_cast<uint32_t>(nonce >> 32));
}

uint64_t record_nonce(const unsigned char* rec) noexcept { return load_le64(rec + record_nonce_offset); }

uint64_t new_nonce() noexcept {
  uint64_t n = 0;
  for (;;) {
    ssize_t r = getrandom(&n, sizeof n, 0);
    if (r == static_cast<ssize_t>(sizeof n) && n != 0) return n;
    if (r < 0 && errno != EINTR) {
      // getrandom cannot fail on Linux >= 3.17 once the pool is ready; never return a
      // predictable value silently: mix the clock as a last resort and say nothing more.
      timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      n ^= uint64_t(ts.tv_nsec) * 0x9E3779B97F4A7C15ull ^ uint64_t(ts.tv_sec);
      if (n) return n;
    }
  }
}

const char* fault_text(record_fault f) noexcept {
  switch (f) {
    case record_fault::none: return "ok";
    case record_fault::short_header: return "record header cut short";
    case record_fault::bad_nonce: return "not a record of this segment (nonce mismatch)";
    case record_fault::bad_length: return "record length out of bounds";
    case record_fault::past_eof: return "record runs past the end of the file";
    case record_fault::bad_type: return "unknown record type or version";
    case record_fault::bad_crc: return "CRC32C mismatch";
  }
  return "?";
}

void put_message_head(std::string& b, const envelope_in& e, uint32_t nrcpt) {
  put_str16(b, e.id);
  put_u64(b, e.arrival_us);
  put_str16(b, e.client_ip);
  put_u16(b, e.client_port);
  put_str16(b, e.peer_ip);
  put_str16(b, e.helo);
  put_str16(b, e.mail_from);
  put_str16(b, e.envid);
  put_u8(b, static_cast<uint8_t>(e.ret));
  put_u8(b, static_cast<uint8_t>(e.body));
  put_u8(b, e.smtputf8 ? 1 : 0);
  put_u32(b, nrcpt);
}

void put_rcpt(std::string& b, std::string_view addr, uint8_t notify, std::string_view orcpt) {
  put_str16(b, addr);
  put_u8(b, notify);
  put_str16(b, orcpt);
}

void encode_segment_header(std::string& buf, uint32_t shard, uint64_t segment_id,
                           uint64_t created_us, uint64_t nonce) {
  size_t s = begin_record(buf, record_type::segment);
  buf.append(segment_magic);
  put_u32(buf, shard);
  put_u64(buf, segment_id);
  put_u64(buf, created_us);
  finish_record(buf, s);
  set_record_nonce(buf.data() + s, nonce);
}

void encode_done(std::string& buf, std::string_view id, uint64_t nonce) {
  size_t s = begin_record(buf, record_type::done);
  put_str16(buf, id);
  finish_record(buf, s);
  set_record_nonce(buf.data() + s, nonce);
}

namespace {
read_status check_record(std::span<const unsigned char> data, size_t off, const uint64_t* nonce,
                         record_view& out, record_fault& fault, uint64_t* crc_bytes) noexcept {
  if (off >= data.size()) return read_status::end;
  size_t rem = data.size() - off;
  const unsigned char* p = data.data() + off;
  auto bad = [&](record_fault f) {
    fault = f;
    return read_status::bad;
  };
  if (rem < record_header_size) return bad(record_fault::short_header);
  if (nonce && load_le64(p + record_nonce_offset) != *nonce) return bad(record_fault::bad_nonce);
  uint32_t crc = load_le32(p), len = load_le32(p + 4);
  if (len > max_record_len) return bad(record_fault::bad_length);
  if (rem - record_header_size < len) return bad(record_fault::past_eof);
  uint8_t type = p[8], ver = p[9];
  if (type < 1 || type > max_record_type || ver != record_version || p[10] != 0 || p[11] != 0)
    return bad(record_fault::bad_type);
  if (crc_bytes) *crc_bytes += 8 + len;
  if (record_crc(p, len) != crc) return bad(record_fault::bad_crc);
  out.type = static_cast<record_type>(type);
  out.payload = std::string_view(reinterpret_cast<const char*>(p + record_header_size), len);
  out.size = record_header_size + len;
  fault = record_fault::none;
  return read_status::ok;
}
}  // namespace

read_status read_record(std::span<const unsigned char> data, size_t off, uint64_t nonce,
                        record_view& out, record_fault* fault, uint64_t* crc_bytes) noexcept {
  record_fault f = record_fault::none;
  auto s = check_record(data, off, &nonce, out, f, crc_bytes);
  if (fault) *fault = f;
  return s;
}

read_status read_record(std::span<const unsigned char> data, size_t off, record_view& out,
                        const char** why) noexcept {
  record_fault f = record_fault::none;
  auto s = check_record(data, off, nullptr, out, f, nullptr);
  if (why && s == read_status::bad) *why = fault_text(f);
  return s;
}

bool decode_message(std::string_view payload, message_view& m) noexcept {
  byte_reader r(reinterpret_cast<const unsigned char*>(payload.data()), payload.size());
  m.id = r.str16();
  m.arrival_us = r.u64();
  m.client_ip = r.str16();
  m.client_port = r.u16();
  m.peer_ip = r.str16();
  m.helo = r.str16();
  m.mail_from = r.str16();
  m.envid = r.str16();
  uint8_t ret = r.u8(), body = r.u8(), utf8 = r.u8();
  m.nrcpt = r.u32();
  if (!r.ok() || ret > 2 || body > 2 || utf8 > 1) return false;
  m.ret = static_cast<dsn_ret>(ret);
  m.body = static_cast<body_type>(body);
  m.smtputf8 = utf8 != 0;
  // Recipients: walk once to find the block's end.
  size_t block_start = payload.size() - r.remaining();
  for (uint32_t i = 0; i < m.nrcpt; ++i) {
    r.str16();
    r.u8();
    r.str16();
    if (!r.ok()) return false;
  }
  size_t block_end = payload.size() - r.remaining();
  m.rcpt_block = payload.substr(block_start, block_end - block_start);
  uint32_t clen = r.u32();
  m.content = r.bytes(clen);
  return r.ok() && r.remaining() == 0 && !m.id.empty();
}

bool decode_segment_header(std::string_view payload, segment_view& out) noexcept {
  if (payload.size() != segment_header_payload_size || payload.substr(0, 8) != segment_magic)
    return false;
  byte_reader r(reinterpret_cast<const unsigned char*>(payload.data()) + 8, payload.size() - 8);
  out.shard = r.u32();
  out.segment_id = r.u64();
  out.created_us = r.u64();
  return r.ok();
}

bool decode_done(std::string_view payload, std::string_view& id) noexcept {
  byte_reader r(reinterpret_cast<const unsigned char*>(payload.data()), payload.size());
  id = r.str16();
  return r.ok() && r.remaining() == 0 && !id.empty();
}

const char* rcpt_state_text(rcpt_state s) noexcept {
  switch (s) {
    case rcpt_state::pending: return "pending";
    case rcpt_state::deferred: return "deferred";
    case rcpt_state::delivered: return "delivered";
    case rcpt_state::failed: return "failed";
  }
  return "?";
}

void encode_status(std::string& buf, std::string_view id, uint32_t attempts, uint64_t next_attempt_us,
                   uint8_t flags, std::span<const rcpt_status> changed, uint64_t nonce) {
  size_t s = begin_record(buf, record_type::status);
  put_str16(buf, id);
  put_u32(buf, attempts);
  put_u64(buf, next_attempt_us);
  buf.push_back(static_cast<char>(flags));
  put_u32(buf, static_cast<uint32_t>(changed.size()));
  for (const auto& e : changed) {
    put_u32(buf, e.index);
    buf.push_back(static_cast<char>(e.state));
    put_str16(buf, e.dsn.substr(0, 16));
    put_str16(buf, e.text.substr(0, max_status_text));
  }
  finish_record(buf, s);
  set_record_nonce(buf.data() + s, nonce);
}

bool decode_status(std::string_view payload, status_view& out) noexcept {
  byte_reader r(reinterpret_cast<const unsigned char*>(payload.data()), payload.size());
  out.id = r.str16();
  out.attempts = r.u32();
  out.next_attempt_us = r.u64();
  out.flags = r.u8();
  out.count = r.u32();
  if (!r.ok() || out.id.empty()) return false;
  size_t at = payload.size() - r.remaining();
  out.entries = payload.substr(at);
  // Validate the entries now so that for_each_status cannot see a truncated block.
  uint32_t n = 0;
  return for_each_status(out, [&](const rcpt_status&) { ++n; }) && n == out.count;
}

void format_queue_id_to(char* out, uint64_t epoch_ms, uint32_t shard, uint32_t seq) noexcept {
  static const char hex[] = "0123456789ABCDEF";
  uint64_t fields[3] = {epoch_ms & 0xFFFFFFFFFFFull, shard & 0xFFu, seq & 0xFFFFFu};
  int widths[3] = {11, 2, 5};
  char* p = out;
  for (int f = 0; f < 3; ++f)
    for (int i = widths[f] - 1; i >= 0; --i) *p++ = hex[(fields[f] >> (4 * i)) & 0xF];
  *p = 0;
}

std::string format_queue_id(uint64_t epoch_ms, uint32_t shard, uint32_t seq) {
  char b[19];
  format_queue_id_to(b, epoch_ms, shard, seq);
  return b;
}

bool parse_queue_id(std::string_view id, uint64_t& epoch_ms, uint32_t& shard, uint32_t& seq) noexcept {
  if (id.size() != 18) return false;
  uint64_t v[3] = {0, 0, 0};
  size_t w[3] = {11, 2, 5}, at = 0;
  for (int f = 0; f < 3; ++f)
    for (size_t i = 0; i < w[f]; ++i) {
      char c = id[at++];
      int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
      if (d < 0) return false;
      v[f] = v[f] * 16 + static_cast<uint64_t>(d);
    }
  epoch_ms = v[0];
  shard = static_cast<uint32_t>(v[1]);
  seq = static_cast<uint32_t>(v[2]);
  return true;
}

}  // namespace tern::spool
