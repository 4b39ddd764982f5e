#include "spool/scan.hh"

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace tern::spool {

std::string segment_dir(const std::string& d) { return d + "/segments"; }
std::string quarantine_dir(const std::string& d) { return d + "/quarantine"; }

std::string segment_name(uint64_t segment_id, uint32_t shard) {
  char b[64];
  snprintf(b, sizeof b, "%016llx-%u.seg", static_cast<unsigned long long>(segment_id), shard);
  return b;
}

bool ensure_spool_dirs(const std::string& spool_dir, std::string& err) {
  std::string path;
  auto make = [&](const std::string& p) {
    if (::mkdir(p.c_str(), 0700) != 0 && errno != EEXIST) {
      err = p + ": " + strerror(errno);
      return false;
    }
    return true;
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

bool scan_segment(const std::string& path, segment_scan& out,
                  const std::function<void(const record_view&, uint64_t)>& on_record) {
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
  out.file_size = static_cast<uint64_t>(st.st_size);
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
  std::span<const unsigned char> data(static_cast<const unsigned char*>(m),
                                      static_cast<size_t>(st.st_size));
  size_t off = 0;
  bool first = true;
  for (;;) {
    record_view rv;
    const char* why = nullptr;
    auto s = read_record(data, off, rv, &why);
    if (s == read_status::end) break;
    if (s == read_status::ok) {
      if (first) {
        out.header_ok = rv.type == record_type::segment && decode_segment_header(rv.payload, out.header);
        first = false;
      }
      on_record(rv, off);
      off += rv.size;
      out.valid_end = off;
      continue;
    }
    if (s == read_status::corrupt) {
      // Resynchronise: is there a valid record further on? If so, this is corruption in
      // the middle (quarantined by the caller); if not, it is a torn tail.
      size_t next = off + 1;
      record_view probe;
      while (next + record_header_size <= data.size() &&
             read_record(data, next, probe) != read_status::ok)
        ++next;
      if (next + record_header_size <= data.size()) {
        out.corrupt.emplace_back(off, next);
        off = next;
        continue;
      }
    }
    out.torn = true;
    out.torn_why = why;
    break;
  }
  munmap(m, static_cast<size_t>(st.st_size));
  return true;
}

}  // namespace tern::spool
