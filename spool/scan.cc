#include "spool/scan.hh"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fmt/format.h>

#include "src/core/bytes.hh"
#include "src/core/crc32c.hh"

namespace tern::spool {

std::string segment_dir(const std::string& d) { return d + "/segments"; }
std::string quarantine_dir(const std::string& d) { return d + "/quarantine"; }

std::string segment_name(uint64_t segment_id, uint32_t shard) {
  char b[64];
  snprintf(b, sizeof b, "%016llx-%u.seg", static_cast<unsigned long long>(segment_id), shard);
  return b;
}

// Like mkdir -p, and durable: a directory this creates is fsynced into its parent (a new
// directory entry survives a power cut only once the parent directory is synced), so the
// first start on an empty disk cannot lose the spool that it acknowledged mail into.
bool ensure_spool_dirs(const std::string& spool_dir, std::string& err) {
  auto sync_dir = [&](const std::string& d) {
    int fd = ::open(d.empty() ? "/" : d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || ::fsync(fd) != 0) {
      err = (d.empty() ? std::string("/") : d) + ": fsync: " + strerror(errno);
      if (fd >= 0) ::close(fd);
      return false;
    }
    ::close(fd);
    return true;
  };
  auto parent = [](const std::string& p) {
    auto s = p.find_last_of('/');
    return s == std::string::npos ? std::string(".") : p.substr(0, s);
  };
  auto make = [&](const std::string& p) {
    if (::mkdir(p.c_str(), 0700) != 0) {
      if (errno == EEXIST) return true;
      err = p + ": " + strerror(errno);
      return false;
    }
    return sync_dir(parent(p));
  };
  for (size_t i = 1; i <= spool_dir.size(); ++i)
    if (i == spool_dir.size() || spool_dir[i] == '/')
      if (!make(spool_dir.substr(0, i))) return false;
  return make(segment_dir(spool_dir)) && make(quarantine_dir(spool_dir));
}

std::vector<std::string> list_segments(const std::string& spool_dir) {
  std::vector<std::string> out;
  std::string sd = segment_dir(spool_dir);
  DIR* d = opendir(sd.c_str());
  if (!d) return out;
  while (auto* e = readdir(d)) {
    std::string n = e->d_name;
    if (n.size() > 4 && n.compare(n.size() - 4, 4, ".seg") == 0) out.push_back(sd + "/" + n);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

constexpr size_t npos = static_cast<size_t>(-1);

uint64_t resync_budget(size_t size) { return 4 * uint64_t(size) + (64u << 10); }

// The next offset >= from where a record carrying `nonce` validates, or npos. Only offsets
// where the nonce bytes occur at the nonce position are candidates (memmem: linear).
size_t resync(std::span<const unsigned char> d, size_t from, uint64_t nonce, segment_scan& out) {
  unsigned char key[8];
  for (int i = 0; i < 8; ++i) key[i] = static_cast<unsigned char>(nonce >> (8 * i));
  size_t pos = from + record_nonce_offset;
  while (pos + 8 <= d.size()) {
    auto* hit = static_cast<const unsigned char*>(memmem(d.data() + pos, d.size() - pos, key, 8));
    if (!hit) return npos;
    size_t at = static_cast<size_t>(hit - d.data());
    size_t cand = at - record_nonce_offset;
    ++out.candidates;
    // Work bound: client bytes never hold the nonce, so candidates are real record headers
    // and the CRC work stays below twice the file. Only bytes that repeat the nonce outside
    // records (not something a client can write) could push it further: stop there, and
    // the caller keeps the rest in place as damage rather than spend quadratic time.
    uint32_t len = load_le32(hit - record_nonce_offset + 4);
    if (out.crc_bytes + 8 + len > resync_budget(d.size())) {
      out.budget_exhausted = true;
      return npos;
    }
    record_view rv;
    if (read_record(d, cand, nonce, rv, nullptr, &out.crc_bytes) == read_status::ok) return cand;
    pos = at + 1;
  }
  return npos;
}

bool all_zero(std::span<const unsigned char> d, size_t from) {
  static const unsigned char zero[4096] = {};
  size_t i = from;
  while (i < d.size()) {
    size_t n = std::min(sizeof zero, d.size() - i);
    if (memcmp(d.data() + i, zero, n) != 0) return false;
    i += n;
  }
  return true;
}

// Nothing valid follows `off`: torn (cannot be a record) or a complete-looking tail.
damage classify_tail(std::span<const unsigned char> d, size_t off, record_fault f, bool nonce_known,
                     bool budget_exhausted) {
  damage g;
  g.begin = off;
  g.end = d.size();
  g.why = fault_text(f);
  if (all_zero(d, off)) {
    g.kind = damage_kind::torn;
    g.all_zero = true;
    g.why = "zero-filled space after the last record";
    return g;
  }
  bool torn = f == record_fault::short_header || f == record_fault::past_eof || f == record_fault::bad_length;
  if (budget_exhausted) {
    g.kind = damage_kind::tail;  // unexamined: keep it, never truncate
    g.why = "resync work bound reached (the segment nonce occurs outside records)";
    return g;
  }
  if (f == record_fault::bad_nonce || !nonce_known) {
    // Without our nonce it is a record only if it validates on its own (a damaged nonce);
    // otherwise garbage that cannot be one of ours.
    record_view rv;
    torn = read_record(d, off, rv) != read_status::ok;
    if (!torn) g.why = "complete record with a damaged nonce";
  }
  g.kind = torn ? damage_kind::torn : damage_kind::tail;
  return g;
}

uint32_t crc_of(std::span<const unsigned char> d, uint64_t b, uint64_t e) {
  return crc32c(0, d.data() + b, static_cast<size_t>(e - b));
}

}  // namespace

bool scan_bytes(std::span<const unsigned char> d, segment_scan& out, const record_fn& on_record) {
  out.file_size = d.size();
  if (d.empty()) return true;
  // Version 1 (no nonce): refuse clearly rather than misread it.
  if (d.size() >= 12 + segment_magic_v1.size() && d[9] == 1 &&
      memcmp(d.data() + 12, segment_magic_v1.data(), segment_magic_v1.size()) == 0) {
    out.error = "segment format version 1 (TERNSEG1, no record nonce) is not supported by this tern; "
                "move the segment out of segments/ (no version 1 spools were deployed)";
    return false;
  }
  // The nonce: from the segment header record at 0; if that is damaged, from the nonce
  // field of the header or of the record right after it, if a record validates with it.
  size_t off = 0;
  record_view rv;
  record_fault f = record_fault::none;
  if (d.size() >= record_header_size) {
    uint64_t n0 = record_nonce(d.data());
    uint64_t n1 = d.size() >= segment_header_record_size + record_header_size
                      ? record_nonce(d.data() + segment_header_record_size)
                      : 0;
    record_view r1;
    // The header validates with its own nonce even when that field took a bit flip (the
    // CRC does not cover it): then the next record, valid with its own nonce but not with
    // the header's, tells. The header goes to quarantine; the rest of the segment is read.
    bool header_nonce_damaged = n1 && n1 != n0 &&
                                read_record(d, segment_header_record_size, n0, r1) != read_status::ok &&
                                read_record(d, segment_header_record_size, n1, r1) == read_status::ok;
    if (n0 && !header_nonce_damaged && read_record(d, 0, n0, rv, &f, &out.crc_bytes) == read_status::ok) {
      out.nonce = n0;
      out.nonce_known = true;
    } else {
      uint64_t cands[2] = {header_nonce_damaged ? 0 : n0, n1};
      for (uint64_t c : cands) {
        if (!c || out.nonce_known) continue;
        size_t next = resync(d, 1, c, out);
        if (next != npos) {
          out.nonce = c;
          out.nonce_known = true;
          damage g;
          g.kind = damage_kind::corrupt;
          g.begin = 0;
          g.end = next;
          g.why = header_nonce_damaged ? "damaged nonce in the segment header" : "damaged segment header";
          g.crc = crc_of(d, 0, next);
          out.damaged.push_back(g);
          off = next;
        }
      }
    }
  }
  if (!out.nonce_known && all_zero(d, 0)) {
    // Only zeros: a spare segment whose preparation (zeros first, header last) was cut
    // short. Nothing was ever written to it; not damage.
    out.unused_bytes = d.size();
    return true;
  }
  if (!out.nonce_known) {
    out.damaged.push_back(classify_tail(d, 0, d.size() < record_header_size ? record_fault::short_header : f, false,
                                       out.budget_exhausted));
    auto& g = out.damaged.back();
    if (!g.all_zero) g.why = g.kind == damage_kind::tail ? g.why : "no valid record (no segment header)";
    g.crc = crc_of(d, g.begin, g.end);
    return true;
  }
  for (;;) {
    auto s = read_record(d, off, out.nonce, rv, &f, &out.crc_bytes);
    if (s == read_status::end) break;
    if (s == read_status::ok) {
      if (off == 0)
        out.header_ok = rv.type == record_type::segment && decode_segment_header(rv.payload, out.header);
      on_record(rv, off);
      off += rv.size;
      out.valid_end = off;
      continue;
    }
    // Zeros right after the last good record, to the end: space written ahead of use
    // (spool.preallocate = "zero") that no batch reached. Not damage.
    if (off == out.valid_end && all_zero(d, off)) {
      out.unused_bytes = d.size() - off;
      break;
    }
    size_t next = resync(d, off + 1, out.nonce, out);
    if (next != npos) {
      damage g;
      g.kind = damage_kind::corrupt;
      g.begin = off;
      g.end = next;
      g.why = fault_text(f);
      g.crc = crc_of(d, off, next);
      out.damaged.push_back(g);
      off = next;
      continue;
    }
    damage g = classify_tail(d, off, f, true, out.budget_exhausted);
    g.crc = crc_of(d, g.begin, g.end);
    out.damaged.push_back(g);
    break;
  }
  return true;
}

bool scan_segment(const std::string& path, segment_scan& out, const record_fn& on_record) {
  out = segment_scan{};
  out.path = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    out.error = std::string("open: ") + strerror(errno);
    return false;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    out.error = std::string("fstat: ") + strerror(errno);
    ::close(fd);
    return false;
  }
  if (st.st_size == 0) {
    ::close(fd);
    return true;
  }
  void* m = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) {
    out.error = std::string("mmap: ") + strerror(errno);
    return false;
  }
  (void)madvise(m, static_cast<size_t>(st.st_size), MADV_SEQUENTIAL);
  std::span<const unsigned char> data(static_cast<const unsigned char*>(m), static_cast<size_t>(st.st_size));
  bool ok = scan_bytes(data, out, on_record);
  munmap(m, static_cast<size_t>(st.st_size));
  return ok;
}

// --- quarantine ledger -------------------------------------------------------------------

std::string quarantine_ledger::key(const std::string& segment, const damage& d) {
  return fmt::format("{} {} {} {:08x}", segment, d.begin, d.end - d.begin, d.crc);
}

bool quarantine_ledger::load(const std::string& spool_dir, std::string& err) {
  keys_.clear();
  std::string p = quarantine_dir(spool_dir) + "/ledger";
  FILE* f = fopen(p.c_str(), "re");
  if (!f) {
    if (errno == ENOENT) return true;
    err = p + ": " + strerror(errno);
    return false;
  }
  char line[512];
  while (fgets(line, sizeof line, f)) {
    std::string l(line);
    while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
    if (!l.empty() && l[0] != '#') keys_.insert(l);
  }
  bool ok = !ferror(f);
  fclose(f);
  if (!ok) err = p + ": read error";
  return ok;
}

bool quarantine_ledger::contains(const std::string& segment, const damage& d) const {
  return keys_.count(key(segment, d)) > 0;
}

bool quarantine_ledger::add(const std::string& spool_dir, const std::string& segment, const damage& d,
                            std::string& err) {
  std::string p = quarantine_dir(spool_dir) + "/ledger";
  std::string k = key(segment, d);
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  std::string line = k + "\n";
  bool ok = fd >= 0 && ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size()) &&
            ::fsync(fd) == 0;
  if (!ok) err = p + ": " + strerror(errno);
  if (fd >= 0) ::close(fd);
  if (ok) keys_.insert(k);
  return ok;
}

// --- lock --------------------------------------------------------------------------------

int lock_spool(const std::string& spool_dir, std::string& err, const char* who) {
  std::string p = spool_dir + "/lock";
  int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    err = fmt::format("spool {}: cannot open {}: {}", spool_dir, p, strerror(errno));
    return -1;
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    char buf[128] = {};
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    ::close(fd);
    if (e != EWOULDBLOCK) {
      err = fmt::format("spool {}: cannot lock {}: {}", spool_dir, p, strerror(e));
      return -1;
    }
    long pid = 0;
    char name[64] = "ternd";
    if (n > 0) sscanf(buf, "%ld %63s", &pid, name);
    err = fmt::format("spool {} is in use by another {} (pid {})", spool_dir, name, pid);
    return -1;
  }
  std::string me = fmt::format("{} {}\n", static_cast<long>(getpid()), who);
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, me.data(), me.size(), 0) != static_cast<ssize_t>(me.size())) {
    err = fmt::format("spool {}: cannot write {}: {}", spool_dir, p, strerror(errno));
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace tern::spool
