#pragma once
// Recovery at start: scan every segment, rebuild the queue (messages without a done
// record), repair damage (scan.hh: corrupt regions and damaged last records are copied to
// quarantine/ and listed in quarantine/ledger, kept in place; torn tails are copied and
// truncated), remove segments that were scanned clean and hold nothing, and report what
// was found. Runs before the shards start, under the spool lock.
//
// Never drops acknowledged mail: every byte it does not read as a record is either kept in
// the segment or copied to quarantine/ first (all-zero space excepted).
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "spool/scan.hh"

namespace tern::spool {

// A recipient's delivery state as the status records left it.
struct queued_rcpt {
  rcpt_state state = rcpt_state::pending;
  std::string dsn;   // "4.4.1"
  std::string text;  // the last diagnostic
};

struct queued_message {
  std::string id;
  std::string segment;  // path of the newest copy
  uint64_t offset = 0;  // record offset in the segment
  uint64_t record_size = 0;  // header + payload: what delivery reads
  uint64_t size = 0;    // content bytes
  uint64_t arrival_us = 0;
  uint32_t nrcpt = 0;
  // Delivery progress (status records, folded in file order).
  uint32_t attempts = 0;
  uint64_t next_attempt_us = 0;
  uint8_t flags = 0;                // status_flags
  std::vector<queued_rcpt> rcpts;   // nrcpt entries, or empty while none has a state
  uint32_t copies = 1;              // message records of this id (a copy moved forward: 2)
};

struct recovery_report {
  uint32_t segments = 0;
  uint32_t segments_removed = 0;  // held nothing live (see recover_spool): reclaimed
  uint64_t status = 0;            // status records seen
  uint64_t messages = 0;          // message records seen
  uint64_t done = 0;              // done records seen
  uint64_t torn_bytes = 0;        // truncated
  uint64_t unused_bytes = 0;      // pre-zeroed space after the last record (trimmed; not damage)
  uint64_t quarantined_bytes = 0; // new corrupt/tail regions (kept in place)
  uint32_t new_damage = 0;        // damaged regions not in the ledger yet (and bad messages)
  uint32_t known_damage = 0;      // damaged regions already quarantined by an earlier run
  uint64_t crc_bytes = 0;         // CRC work, for the linear-time tests
  uint64_t max_epoch_ms = 0;      // newest queue-id epoch seen (ids stay unique)
  uint64_t max_segment_id = 0;
  std::vector<std::string> notes; // one line per repair, for the log
  std::vector<std::string> kept_segments;  // segments left in place (repair): delivery tracks them
};

// One line for a damaged region: "SEGMENT: KIND at B..E (N bytes, crc32c X): WHY".
std::string describe(const std::string& segment_name, const damage& d);

// repair=false: report only (tern-spool check); repair=true: quarantine/truncate/remove.
//
// Reclamation (repair only). Segments are considered oldest first (by segment id). One is
// removed when it was scanned without damage and:
//   - each of its message records is done, or has a newer copy in a later segment;
//   - each of its status records is for a message that is done or has a newer copy in a
//     later segment (a newer copy is always followed by a status record with its state);
//   - each of its done records is for a message none of whose copies is in a segment that
//     stays: a done record must outlive the message it closes, or the message would come
//     back at the next start and be delivered again.
// Done and status records are always written after the message they refer to, by the
// shard that owns it, into that shard's current segment, and segment ids only grow, so
// oldest-first is an order in which every removal is safe; the directory is synced after
// each unlink so that a power cut keeps a prefix of that order.
bool recover_spool(const std::string& dir, bool repair, std::vector<queued_message>& queue,
                   recovery_report& rep, std::string& err);

}  // namespace tern::spool
