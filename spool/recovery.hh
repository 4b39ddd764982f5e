#pragma once
// Recovery at start: scan every segment, rebuild the queue (messages without a done
// record), truncate torn tails, copy corrupt regions to quarantine/, remove segments that
// hold no message at all, and report what was found. Runs before the shards start.
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace tern::spool {

struct queued_message {
  std::string id;
  std::string segment;  // path
  uint64_t offset = 0;  // record offset in the segment
  uint64_t size = 0;    // content bytes
  uint64_t arrival_us = 0;
  uint32_t nrcpt = 0;
};

struct recovery_report {
  uint32_t segments = 0;
  uint32_t segments_removed = 0;  // held no message: nothing to keep
  uint64_t messages = 0;          // message records seen
  uint64_t done = 0;              // done records seen
  uint64_t torn_bytes = 0;        // truncated
  uint64_t quarantined_bytes = 0;
  uint64_t max_epoch_ms = 0;      // newest queue-id epoch seen (ids stay unique)
  uint64_t max_segment_id = 0;
  std::vector<std::string> notes; // one line per repair, for the log
};

// repair=false: report only (tern-spool); repair=true: truncate/quarantine/remove.
bool recover_spool(const std::string& dir, bool repair, std::vector<queued_message>& queue,
                   recovery_report& rep, std::string& err);

}  // namespace tern::spool
