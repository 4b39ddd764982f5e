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

const char* kind_text(damage_kind k) {
  switch (k) {
    case damage_kind::corrupt: return "corrupt region";
    case damage_kind::tail: return "damaged last record";
    case damage_kind::torn: return "torn tail";
  }
  return "?";
}

}  // namespace

std::string describe(const std::string& segment, const damage& d) {
  return fmt::format("{}: {} at {}..{} ({} bytes, crc32c {:08x}): {}", segment, kind_text(d.kind), d.begin, d.end,
                     d.end - d.begin, d.crc, d.why);
}

bool recover_spool(const std::string& dir, bool repair, std::vector<queued_message>& queue,
                   recovery_report& rep, std::string& err) {
  rep = recovery_report{};
  std::unordered_map<std::string, queued_message> live;
  std::unordered_map<std::string, std::vector<uint32_t>> copies_of;  // id -> segments with a message record
  std::unordered_map<std::string, bool> done_ids;
  std::vector<std::string> order;  // arrival order of ids, for a stable queue
  struct seg_info {
    std::string path;
    bool removable_scan = false;  // clean, and a header (or nothing but zeros)
    std::vector<std::string> messages, dones, statuses;
  };
  std::vector<seg_info> segs;
  quarantine_ledger ledger;
  if (!ledger.load(dir, err)) return false;
  bool qdir_dirty = false;
  for (const auto& path : list_segments(dir)) {
    ++rep.segments;
    uint32_t seg_index = static_cast<uint32_t>(segs.size());
    segs.push_back(seg_info{path, false, {}, {}, {}});
    seg_info& si = segs.back();
    segment_scan sc;
    std::string name = base(path);
    bool ok = scan_segment(path, sc, [&](const record_view& rv, uint64_t off) {
      if (rv.type == record_type::message) {
        message_view m;
        if (!decode_message(rv.payload, m)) {
          rep.notes.push_back(fmt::format("{}: message record at {} does not decode; skipped", name, off));
          ++rep.new_damage;
          si.messages.push_back("");  // keeps the segment: something is there we cannot read
          return;
        }
        ++rep.messages;
        uint64_t ep;
        uint32_t sh, sq;
        if (parse_queue_id(m.id, ep, sh, sq) && ep > rep.max_epoch_ms) rep.max_epoch_ms = ep;
        std::string id(m.id);
        si.messages.push_back(id);
        copies_of[id].push_back(seg_index);
        if (done_ids.count(id)) return;  // ids are never reused: done is final
        auto it = live.find(id);
        if (it == live.end()) {
          order.push_back(id);
          queued_message q;
          q.id = id;
          q.segment = path;
          q.offset = off;
          q.record_size = rv.size;
          q.size = m.content.size();
          q.arrival_us = m.arrival_us;
          q.nrcpt = m.nrcpt;
          live.emplace(id, std::move(q));
        } else {
          // A copy moved forward: the newest copy is the one to read; the state so far stays
          // (the status record after the copy repeats it anyway).
          it->second.segment = path;
          it->second.offset = off;
          it->second.record_size = rv.size;
          ++it->second.copies;
        }
      } else if (rv.type == record_type::done) {
        std::string_view id;
        if (decode_done(rv.payload, id)) {
          ++rep.done;
          std::string sid(id);
          si.dones.push_back(sid);
          done_ids[sid] = true;
          live.erase(sid);
        }
      } else if (rv.type == record_type::status) {
        status_view st;
        if (!decode_status(rv.payload, st)) {
          rep.notes.push_back(fmt::format("{}: status record at {} does not decode; skipped", name, off));
          ++rep.new_damage;
          si.statuses.push_back("");
          return;
        }
        ++rep.status;
        std::string sid(st.id);
        si.statuses.push_back(sid);
        auto it = live.find(sid);
        if (it == live.end()) return;  // done already, or its message is gone (reclaimed)
        auto& q = it->second;
        q.attempts = st.attempts;
        q.next_attempt_us = st.next_attempt_us;
        q.flags = st.flags;
        for_each_status(st, [&](const rcpt_status& e) {
          if (e.index >= q.nrcpt) return;  // not ours to invent
          if (q.rcpts.empty()) q.rcpts.resize(q.nrcpt);
          auto& r = q.rcpts[e.index];
          r.state = e.state;
          r.dsn = std::string(e.dsn);
          r.text = std::string(e.text);
        });
      }
    });
    if (!ok) {
      err = fmt::format("{}: {}", path, sc.error);
      return false;
    }
    rep.crc_bytes += sc.crc_bytes;
    if (sc.header_ok && sc.header.segment_id > rep.max_segment_id)
      rep.max_segment_id = sc.header.segment_id;
    for (auto& d : sc.damaged) {
      uint64_t len = d.end - d.begin;
      bool keep_in_place = d.kind != damage_kind::torn;
      if (keep_in_place && ledger.contains(name, d)) {
        d.known = true;
        ++rep.known_damage;
        continue;  // quarantined by an earlier run: not new
      }
      ++rep.new_damage;
      if (d.kind == damage_kind::torn)
        rep.torn_bytes += len;
      else
        rep.quarantined_bytes += len;
      std::string q = fmt::format("{}/{}.{}.{:08x}.bad", quarantine_dir(dir), name, d.begin, d.crc);
      bool copy = !d.all_zero;
      rep.notes.push_back(describe(name, d) +
                          (!repair ? ""
                           : keep_in_place ? ", copied to " + q + " (kept in the segment, listed in the ledger)"
                           : copy ? ", copied to " + q + ", truncated"
                                  : ", truncated"));
      if (!repair) continue;
      if (copy) {
        ::mkdir(quarantine_dir(dir).c_str(), 0700);
        if (!copy_range(path, d.begin, d.end, q)) {
          err = fmt::format("{}: cannot write quarantine file {}: {}", path, q, strerror(errno));
          return false;
        }
        qdir_dirty = true;
      }
      if (keep_in_place) {
        if (!ledger.add(dir, name, d, err)) return false;
      } else {
        int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
        if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(d.begin)) != 0 || ::fsync(fd) != 0) {
          err = fmt::format("{}: cannot truncate torn tail: {}", path, strerror(errno));
          if (fd >= 0) ::close(fd);
          return false;
        }
        ::close(fd);
      }
    }
    if (sc.unused_bytes > 0) {
      // A pre-zeroed segment that a crash (or an older writer) left with its zeros: give
      // the space back. Not damage, no note; the summary counts it.
      rep.unused_bytes += sc.unused_bytes;
      if (repair) {
        int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
        if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(sc.valid_end)) != 0 || ::fsync(fd) != 0) {
          err = fmt::format("{}: cannot trim pre-zeroed space: {}", path, strerror(errno));
          if (fd >= 0) ::close(fd);
          return false;
        }
        ::close(fd);
      }
    }
    if (!sc.header_ok && sc.file_size > sc.unused_bytes)
      rep.notes.push_back(fmt::format("{}: no valid segment header", name));
    // Only a segment scanned without any damage (new or known) may ever be removed: one
    // with quarantined bytes may still hold mail.
    si.removable_scan = sc.clean() && (sc.header_ok || sc.file_size == sc.unused_bytes);
  }
  if (repair) {
    // Reclamation, oldest first (the rules are in recovery.hh).
    std::vector<bool> removed(segs.size(), false);
    auto newest_copy = [&](const std::string& id) -> int64_t {
      auto it = copies_of.find(id);
      return it == copies_of.end() || it->second.empty() ? -1 : int64_t(it->second.back());
    };
    for (uint32_t i = 0; i < segs.size(); ++i) {
      const seg_info& si = segs[i];
      if (!si.removable_scan) {
        rep.kept_segments.push_back(si.path);
        continue;
      }
      bool keep = false;
      for (const auto& id : si.messages)
        if (id.empty() || (!done_ids.count(id) && newest_copy(id) <= int64_t(i))) keep = true;
      for (const auto& id : si.statuses)
        if (id.empty() || (!done_ids.count(id) && newest_copy(id) >= 0 && newest_copy(id) <= int64_t(i)))
          keep = true;
      for (const auto& id : si.dones) {
        auto it = copies_of.find(id);
        if (it == copies_of.end()) continue;
        for (uint32_t sgi : it->second)
          if (sgi != i && !removed[sgi]) keep = true;
      }
      if (keep) {
        rep.kept_segments.push_back(si.path);
        continue;
      }
      if (::unlink(si.path.c_str()) != 0) {
        rep.notes.push_back(fmt::format("{}: cannot remove: {}", base(si.path), strerror(errno)));
        rep.kept_segments.push_back(si.path);
        continue;
      }
      // One directory sync per removal: a power cut keeps a prefix of the oldest-first
      // order, so no done record disappears before the message it closes.
      fsync_dir(segment_dir(dir));
      removed[i] = true;
      ++rep.segments_removed;
    }
    fsync_dir(segment_dir(dir));
    if (qdir_dirty) fsync_dir(quarantine_dir(dir));
  }
  queue.clear();
  queue.reserve(live.size());
  for (auto& id : order) {
    auto it = live.find(id);
    if (it != live.end()) queue.push_back(std::move(it->second));
  }
  return true;
}

}  // namespace tern::spool
