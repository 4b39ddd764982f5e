#pragma once
// Reading whole segment files: used by recovery at start (with repair) and by tern-spool
// (read only). A segment is mapped read-only and walked record by record.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "spool/record.hh"

namespace tern::spool {

struct segment_scan {
  std::string path;
  uint64_t file_size = 0;
  bool header_ok = false;
  segment_view header;
  uint64_t valid_end = 0;   // end of the last good record; a torn tail starts here
  bool torn = false;        // an incomplete record at the end (interrupted append)
  const char* torn_why = nullptr;
  // Corrupt regions [begin, end) followed by valid records again; they are skipped.
  std::vector<std::pair<uint64_t, uint64_t>> corrupt;
  std::string error;        // could not open/map the file
};

// Walk every valid record of one segment file. `on_record(view, offset)` sees records in
// file order, including the segment header.
bool scan_segment(const std::string& path, segment_scan& out,
                  const std::function<void(const record_view&, uint64_t)>& on_record);

// Segment file names: "<dir>/segments/<16 hex segment id>-<shard>.seg".
std::string segment_dir(const std::string& spool_dir);
std::string quarantine_dir(const std::string& spool_dir);
std::string segment_name(uint64_t segment_id, uint32_t shard);
// Create the spool directory tree (like mkdir -p) with mode 0700.
bool ensure_spool_dirs(const std::string& spool_dir, std::string& err);
// Segment files of a spool directory, sorted by name (segment id, then shard).
std::vector<std::string> list_segments(const std::string& spool_dir);

}  // namespace tern::spool
