#pragma once
// Reading whole segment files: used by recovery at start (with repair) and by tern-spool
// (read only). A segment is mapped read-only and walked record by record; every record of
// a segment must carry the segment's nonce (record.hh), so bytes written by clients are
// never taken for records.
//
// Damage rules (docs/architecture.md, "Recovery"): a record that is refused (bad nonce,
// length, type or CRC) starts a resynchronisation: the scan looks for the next offset
// where the nonce occurs at a record's nonce position (memmem, so every other offset costs
// nothing) and checks that candidate. If a valid record follows, the bytes in between are
// a `corrupt` region: kept in place, quarantined by recovery, and the walk goes on. If
// nothing valid follows:
// Zeros from the end of the last good record to the end of the file are not damage: a
// pre-zeroed segment (spool.preallocate = "zero") looks like that until it is full; they
// are reported as unused_bytes. Otherwise:
//   - `torn`: what is left cannot be a record: all zero, a header cut short, or a length
//     running past the end of the file (an interrupted append). Recovery copies the bytes
//     to quarantine/ (unless all zero) and truncates.
//   - `tail`: a complete-looking record (its length fits in the file) whose CRC, type or
//     nonce is bad: kept in place and quarantined, never truncated.
// Work is linear in the file size whatever the content: each resync candidate is a nonce
// occurrence, and the CRC runs at most once over each byte per candidate that starts at a
// real record header (counted in crc_bytes). Bytes repeating the nonce outside records
// (not something a client can write; found by fuzzing) are stopped by a work bound of
// 4 x the file size: the unexamined rest is kept in place as damage, never truncated.
#include <cstdint>
#include <functional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "spool/record.hh"

namespace tern::spool {

enum class damage_kind : uint8_t { corrupt, tail, torn };

struct damage {
  damage_kind kind{};
  uint64_t begin = 0, end = 0;  // [begin, end) in the segment
  uint32_t crc = 0;             // CRC32C of those bytes: the quarantine ledger's key
  const char* why = "";
  bool all_zero = false;        // torn only: zeros (preallocated space), nothing to keep
  bool known = false;           // already in the quarantine ledger (set by the caller)
};

struct segment_scan {
  std::string path;
  uint64_t file_size = 0;
  bool header_ok = false;
  segment_view header;
  bool nonce_known = false;
  uint64_t nonce = 0;
  uint64_t valid_end = 0;       // end of the last good record
  uint64_t unused_bytes = 0;    // zeros from valid_end to the end: pre-zeroed space, not damage
  std::vector<damage> damaged;  // in file order; at most one torn or tail, last
  uint64_t crc_bytes = 0;       // work done by the CRC (for the linear-time tests)
  uint64_t candidates = 0;      // resync candidates checked
  bool budget_exhausted = false;  // resync stopped at its work bound (rest kept as damage)
  std::string error;            // could not open/map the file, or a format it refuses

  bool clean() const noexcept { return error.empty() && damaged.empty(); }
  const damage* torn() const noexcept {
    return !damaged.empty() && damaged.back().kind == damage_kind::torn ? &damaged.back() : nullptr;
  }
};

using record_fn = std::function<void(const record_view&, uint64_t)>;

// Walk every valid record of one segment file. `on_record(view, offset)` sees records in
// file order, including the segment header. Returns false (and sets out.error) when the
// file cannot be read or is a version 1 segment.
bool scan_segment(const std::string& path, segment_scan& out, const record_fn& on_record);
// The same over bytes in memory (the fuzz target and unit tests).
bool scan_bytes(std::span<const unsigned char> data, segment_scan& out, const record_fn& on_record);

// Segment file names: "<dir>/segments/<16 hex segment id>-<shard>.seg".
std::string segment_dir(const std::string& spool_dir);
std::string quarantine_dir(const std::string& spool_dir);
std::string segment_name(uint64_t segment_id, uint32_t shard);
// Create the spool directory tree (like mkdir -p) with mode 0700.
bool ensure_spool_dirs(const std::string& spool_dir, std::string& err);
// Segment files of a spool directory, sorted by name (segment id, then shard).
std::vector<std::string> list_segments(const std::string& spool_dir);

// quarantine/ledger: one line per damaged region that recovery has copied to quarantine/,
// "<segment file name> <offset> <length> <crc32c hex>". A region found again at the same
// place with the same bytes is known damage: reported as such, not as new.
class quarantine_ledger {
 public:
  // A missing ledger is empty. False on a read error.
  bool load(const std::string& spool_dir, std::string& err);
  bool contains(const std::string& segment, const damage& d) const;
  // Append one line and fsync it (after the quarantine copy is durable).
  bool add(const std::string& spool_dir, const std::string& segment, const damage& d, std::string& err);
  size_t size() const noexcept { return keys_.size(); }

 private:
  static std::string key(const std::string& segment, const damage& d);
  std::set<std::string> keys_;
};

// Exclusive lock on a spool directory: flock(LOCK_EX|LOCK_NB) on "<dir>/lock", with our
// pid written into it. Returns the fd (keep it open for the life of the process), or -1
// with err = "spool DIR is in use by another ternd (pid N)" or the system error.
// `who` is written after the pid ("ternd", "tern-spool") so the refusal can name it.
int lock_spool(const std::string& spool_dir, std::string& err, const char* who = "ternd");

}  // namespace tern::spool
