#include "spool/recovery.hh"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "spool/record.hh"
#include "spool/scan.hh"

namespace tern::spool {
namespace {

bool fsync_dir(const std::string& d) {
  int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

bool copy_range(const std::string& from, uint64_t begin, uint64_t end, const std::string& to) {
  int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return false;
  int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (out < 0) {
    ::close(in);
    return false;
  }
  bool ok = true;
  char buf[65536];
  for (uint64_t off = begin; off < end && ok;) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(sizeof buf, end - off));
    ssize_t n = ::pread(in, buf, want, static_cast<off_t>(off));
    if (n <= 0) {
      ok = false;
      break;
    }
    ok = ::write(out, buf, static_cast<size_t>(n)) == n;
    off += static_cast<uint64_t>(n);
  }
  ok = ok && ::fsync(out) == 0;
  ::close(in);
  ::close(out);
  return ok;
}

std::string base(const std::string& p) {
  auto s = p.rfind('/');
  return s == p.npos ? p : p.substr(s + 1);
}

}  // namespace

bool recover_spool(const std::string& dir, bool repair, std::vector<queued_message>& queue,
                   recovery_report& rep, std::string& err) {
  rep = recovery_report{};
  std::unordered_map<std::string, queued_message> live;
  std::vector<std::string> order;  // arrival order of ids, for a stable queue
  for (const auto& path : list_segments(dir)) {
    ++rep.segments;
    segment_scan sc;
    uint64_t msgs_here = 0;
    bool ok = scan_segment(path, sc, [&](const record_view& rv, uint64_t off) {
      if (rv.type == record_type::message) {
        message_view m;
        if (!decode_message(rv.payload, m)) {
          rep.notes.push_back(fmt::format("{}: message record at {} does not decode; skipped", base(path), off));
          return;
        }
        ++rep.messages;
        ++msgs_here;
        uint64_t ep;
        uint32_t sh, sq;
        if (parse_queue_id(m.id, ep, sh, sq) && ep > rep.max_epoch_ms) rep.max_epoch_ms = ep;
        std::string id(m.id);
        if (!live.count(id)) order.push_back(id);
        live[id] = queued_message{id, path, off, m.content.size(), m.arrival_us, m.nrcpt};
      } else if (rv.type == record_type::done) {
        std::string_view id;
        if (decode_done(rv.payload, id)) {
          ++rep.done;
          live.erase(std::string(id));
        }
      }
    });
    if (!ok) {
      err = fmt::format("{}: {}", path, sc.error);
      return false;
    }
    if (sc.header_ok && sc.header.segment_id > rep.max_segment_id)
      rep.max_segment_id = sc.header.segment_id;
    for (auto [b, e] : sc.corrupt) {
      rep.quarantined_bytes += e - b;
      std::string q = fmt::format("{}/{}.{}.bad", quarantine_dir(dir), base(path), b);
      rep.notes.push_back(fmt::format("{}: corrupt bytes {}..{} skipped{}", base(path), b, e,
                                      repair ? ", copied to " + q : ""));
      if (repair) {
        ::mkdir(quarantine_dir(dir).c_str(), 0700);
        if (::access(q.c_str(), F_OK) != 0 && !copy_range(path, b, e, q)) {
          err = fmt::format("{}: cannot write quarantine file {}: {}", path, q, strerror(errno));
          return false;
        }
      }
    }
    if (sc.torn) {
      rep.torn_bytes += sc.file_size - sc.valid_end;
      rep.notes.push_back(fmt::format("{}: torn tail of {} bytes at {} ({}){}", base(path),
                                      sc.file_size - sc.valid_end, sc.valid_end,
                                      sc.torn_why ? sc.torn_why : "", repair ? ", truncated" : ""));
      if (repair) {
        int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
        if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(sc.valid_end)) != 0 || ::fsync(fd) != 0) {
          err = fmt::format("{}: cannot truncate torn tail: {}", path, strerror(errno));
          if (fd >= 0) ::close(fd);
          return false;
        }
        ::close(fd);
      }
    }
    if (!sc.header_ok && sc.valid_end > 0)
      rep.notes.push_back(fmt::format("{}: no valid segment header", base(path)));
    if (repair && msgs_here == 0 && sc.corrupt.empty()) {
      // Nothing queued in it (an empty segment from an earlier run, or a header only).
      // Done records only matter while the messages they close exist, and a segment
      // with no message records can only hold done records for messages in earlier
      // segments: keep it if it has any, remove it otherwise.
      bool has_done = false;
      segment_scan again;
      scan_segment(path, again, [&](const record_view& rv, uint64_t) {
        if (rv.type == record_type::done) has_done = true;
      });
      if (!has_done) {
        ::unlink(path.c_str());
        ++rep.segments_removed;
      }
    }
  }
  if (repair) fsync_dir(segment_dir(dir));
  queue.clear();
  queue.reserve(live.size());
  for (auto& id : order) {
    auto it = live.find(id);
    if (it != live.end()) queue.push_back(std::move(it->second));
  }
  return true;
}

}  // namespace tern::spool
