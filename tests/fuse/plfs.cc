// tern-plfs: a FUSE file system that can lose power.
//
// What it is for: proving that ternd's 250 means "on disk". kill -9 cannot prove an
// fsync, because the page cache outlives the process. tern-plfs keeps two images of every
// file and directory in memory:
//
//   - the current image, which every read, readdir and lookup sees (as the page cache
//     would), and which every write, truncate, create, unlink, rename and mkdir changes;
//   - the durable image, "what is on the platter", which changes only on fsync:
//       fsync/fdatasync of a file  -> that file's content and size become durable;
//       fsync of a directory       -> that directory's entries become durable (creations,
//                                     unlinks, renames in or out of it).
//     Nothing else is durable: not a new file's name until its directory is fsynced, not
//     a new directory until its parent is fsynced (POSIX; ext4 often does more, a test FS
//     must not).
//
// Writing "drop" to the control file /.plfs-control cuts the power: every current image
// is replaced by its durable one. Files return to their last synced content and size,
// unsynced names vanish (with everything below them), unsynced unlinks and renames are
// undone. "drop-torn SEED" is a harsher cut, as if some dirty data had been written back
// before it: a random-length prefix of each file's unsynced appends survives, cut at any
// byte (torn records), and each directory keeps all or none of its unsynced changes.
// "sync" makes everything durable (a sync(2) with every directory fsynced, for
// test setup). "fail-writes on" makes the disk refuse changes, as a failing or
// read-only-remounted disk does: every write, fsync, fdatasync, directory fsync, create,
// mknod, mkdir, unlink, rmdir, rename, truncate and fallocate returns EIO and changes
// nothing, while lookups, reads and readdir still work; "fail-writes off" ends it. The
// control file itself stays writable. Reading the control file gives counters
// (key=value lines; failed_ops counts the refused operations, fail_writes is 0 or 1).
//
// What it trusts: the tests that mount it. It is a test helper, not a file system for
// data: everything lives in memory (4 KiB copy-on-write blocks shared between the two
// images), inode numbers are never reused and inodes are never freed, metadata other
// than size (mode, owner, times) has no durable image, hard links and symlinks are not
// supported, fallocate(KEEP_SIZE) is a no-op (a preallocation is invisible to readers).
// flock and POSIX locks are left to the kernel, which then keeps them locally: right for
// a single host. It runs single-threaded: no locking needed, the kernel queues requests.
// Attribute and entry timeouts are zero and files are opened without keep_cache, so the
// kernel revalidates names and sizes on every use and drops cached pages on each open:
// after a drop a new open (a restarted ternd, tern-spool) reads the durable image, mmap
// included (direct_io stays off so mmap works).
#define FUSE_USE_VERSION 312

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <random>
#include <vector>

namespace {

constexpr size_t block_size = 4096;
constexpr fuse_ino_t control_ino = 2;  // FUSE_ROOT_ID is 1
constexpr const char* control_name = ".plfs-control";

using block = std::array<char, block_size>;
using block_ptr = std::shared_ptr<block>;

// A file's content: blocks by index, shared between images until one of them writes.
struct file_image {
  std::map<uint64_t, block_ptr> blocks;
  uint64_t size = 0;
};

struct node {
  fuse_ino_t ino = 0;
  mode_t mode = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  timespec atime{}, mtime{}, ctime{};
  // Regular files.
  file_image cur, durable;
  std::set<uint64_t> dirty;       // blocks changed since the last fsync
  bool size_dirty = false;
  uint64_t unsynced_bytes = 0;    // bytes written since the last fsync
  // Directories.
  std::map<std::string, fuse_ino_t> entries, durable_entries;
  fuse_ino_t parent = FUSE_ROOT_ID;

  bool is_dir() const { return S_ISDIR(mode); }
};

struct counters {
  uint64_t writes = 0, bytes_written = 0, fsyncs = 0, fdatasyncs = 0, fsyncdirs = 0;
  uint64_t drops = 0, dropped_bytes = 0, dropped_files = 0, dropped_entries = 0;
  uint64_t torn_kept_bytes = 0, torn_kept_dirs = 0;
  uint64_t failed_ops = 0;
};

struct dir_snapshot {
  struct item {
    std::string name;
    fuse_ino_t ino;
    mode_t mode;
  };
  std::vector<item> items;
};

std::map<fuse_ino_t, std::unique_ptr<node>> nodes;  // by inode: drops walk in a set order
fuse_ino_t next_ino = control_ino + 1;
counters stats;
// "fail-writes on": every operation that would change an image fails with EIO.
bool fail_writes = false;

// True (and the request answered with EIO) when changes are refused.
bool refuse_change(fuse_req_t req) {
  if (!fail_writes) return false;
  ++stats.failed_ops;
  fuse_reply_err(req, EIO);
  return true;
}

timespec now() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

node* find(fuse_ino_t ino) {
  auto it = nodes.find(ino);
  return it == nodes.end() ? nullptr : it->second.get();
}

node* make_node(mode_t mode, const fuse_ctx* ctx) {
  auto n = std::make_unique<node>();
  n->ino = next_ino++;
  n->mode = mode;
  n->uid = ctx ? ctx->uid : 0;
  n->gid = ctx ? ctx->gid : 0;
  n->atime = n->mtime = n->ctime = now();
  node* p = n.get();
  nodes[p->ino] = std::move(n);
  return p;
}

struct stat attr_of(const node& n) {
  struct stat st{};
  st.st_ino = n.ino;
  st.st_mode = n.mode;
  st.st_nlink = n.is_dir() ? 2 : 1;
  st.st_uid = n.uid;
  st.st_gid = n.gid;
  st.st_size = n.is_dir() ? 4096 : static_cast<off_t>(n.cur.size);
  st.st_blksize = block_size;
  st.st_blocks = static_cast<blkcnt_t>(n.cur.blocks.size() * (block_size / 512));
  st.st_atim = n.atime;
  st.st_mtim = n.mtime;
  st.st_ctim = n.ctime;
  return st;
}

struct stat control_attr() {
  struct stat st{};
  st.st_ino = control_ino;
  st.st_mode = S_IFREG | 0600;
  st.st_nlink = 1;
  st.st_blksize = block_size;
  return st;
}

fuse_entry_param entry_of(const struct stat& st) {
  fuse_entry_param e{};
  e.ino = st.st_ino;
  e.generation = 1;
  e.attr = st;
  e.attr_timeout = 0;   // revalidate sizes on every use: a drop shrinks files
  e.entry_timeout = 0;  // and names: a drop removes and restores them
  return e;
}

// ---- file content ------------------------------------------------------------------

block& writable_block(node& n, uint64_t b) {
  block_ptr& p = n.cur.blocks[b];
  if (!p) {
    p = std::make_shared<block>();
    p->fill(0);
  } else if (p.use_count() > 1) {
    p = std::make_shared<block>(*p);  // shared with the durable image: copy on write
  }
  n.dirty.insert(b);
  return *p;
}

void write_data(node& n, const char* data, size_t len, uint64_t off) {
  for (size_t done = 0; done < len;) {
    uint64_t pos = off + done;
    uint64_t b = pos / block_size;
    size_t in = static_cast<size_t>(pos % block_size);
    size_t k = std::min(len - done, block_size - in);
    memcpy(writable_block(n, b).data() + in, data + done, k);
    done += k;
  }
  if (off + len > n.cur.size) {
    n.cur.size = off + len;
    n.size_dirty = true;
  }
  n.unsynced_bytes += len;
  n.mtime = n.ctime = now();
}

void truncate_to(node& n, uint64_t size) {
  if (size < n.cur.size) {
    // Drop whole blocks past the end; zero the tail of the last partial block, so that
    // growing the file later reads zeros, as on a real file system.
    uint64_t keep = (size + block_size - 1) / block_size;
    for (auto it = n.cur.blocks.lower_bound(keep); it != n.cur.blocks.end();) {
      n.dirty.insert(it->first);
      it = n.cur.blocks.erase(it);
    }
    if (size % block_size && n.cur.blocks.count(size / block_size)) {
      block& blk = writable_block(n, size / block_size);
      memset(blk.data() + size % block_size, 0, block_size - size % block_size);
    }
  }
  if (size != n.cur.size) n.size_dirty = true;
  n.cur.size = size;
  n.mtime = n.ctime = now();
}

std::string read_image(const file_image& img, size_t len, uint64_t off) {
  if (off >= img.size) return {};
  len = static_cast<size_t>(std::min<uint64_t>(len, img.size - off));
  std::string out(len, '\0');
  for (size_t done = 0; done < len;) {
    uint64_t pos = off + done;
    size_t in = static_cast<size_t>(pos % block_size);
    size_t k = std::min(len - done, block_size - in);
    auto it = img.blocks.find(pos / block_size);
    if (it != img.blocks.end()) memcpy(out.data() + done, it->second->data() + in, k);
    done += k;
  }
  return out;
}

// ---- durability --------------------------------------------------------------------

void commit_file(node& n) {
  for (uint64_t b : n.dirty) {
    auto it = n.cur.blocks.find(b);
    if (it == n.cur.blocks.end())
      n.durable.blocks.erase(b);
    else
      n.durable.blocks[b] = it->second;  // shared until the next write copies it
  }
  n.durable.size = n.cur.size;
  n.dirty.clear();
  n.size_dirty = false;
  n.unsynced_bytes = 0;
}

void commit_dir(node& n) { n.durable_entries = n.entries; }

void sync_all() {
  for (auto& [ino, n] : nodes) {
    if (n->is_dir())
      commit_dir(*n);
    else
      commit_file(*n);
  }
}

void drop_all() {
  ++stats.drops;
  for (auto& [ino, n] : nodes) {
    if (n->is_dir()) {
      for (auto& [name, child] : n->entries) {
        auto d = n->durable_entries.find(name);
        if (d == n->durable_entries.end() || d->second != child) ++stats.dropped_entries;
      }
      for (auto& [name, child] : n->durable_entries)
        if (!n->entries.count(name)) ++stats.dropped_entries;
      n->entries = n->durable_entries;
      for (auto& [name, child] : n->entries)
        if (node* c = find(child); c && c->is_dir()) c->parent = n->ino;
    } else {
      if (!n->dirty.empty() || n->size_dirty) ++stats.dropped_files;
      stats.dropped_bytes += n->unsynced_bytes;
      n->cur = n->durable;
      n->dirty.clear();
      n->size_dirty = false;
      n->unsynced_bytes = 0;
    }
    n->mtime = n->ctime = now();
  }
}

// A harsher power cut, like a file system that had written some of the dirty data back
// before the power went: of what was appended since the last fsync, a prefix of random
// length survives (cut at any byte: the spool sees torn records); unsynced overwrites
// below the durable size are lost; each directory keeps either all or none of its
// unsynced entry changes. What was fsynced survives as with drop_all.
void drop_torn(uint64_t seed) {
  std::mt19937_64 rng(seed);
  ++stats.drops;
  for (auto& [ino, n] : nodes) {
    if (n->is_dir()) {
      if (n->entries == n->durable_entries) continue;
      if (rng() & 1) {
        commit_dir(*n);
        ++stats.torn_kept_dirs;
      } else {
        for (auto& [name, child] : n->entries)
          if (!n->durable_entries.count(name) || n->durable_entries[name] != child) ++stats.dropped_entries;
        for (auto& [name, child] : n->durable_entries)
          if (!n->entries.count(name)) ++stats.dropped_entries;
        n->entries = n->durable_entries;
      }
      for (auto& [name, child] : n->entries)
        if (node* c = find(child); c && c->is_dir()) c->parent = n->ino;
      continue;
    }
    if (n->dirty.empty() && !n->size_dirty) continue;
    file_image was = n->cur;
    uint64_t from = n->durable.size;
    uint64_t keep = from;
    if (was.size > from) keep = from + rng() % (was.size - from + 1);
    n->cur = n->durable;
    n->dirty.clear();
    n->size_dirty = false;
    std::string tail = read_image(was, static_cast<size_t>(keep - from), from);
    uint64_t unsynced = n->unsynced_bytes;
    if (!tail.empty()) write_data(*n, tail.data(), tail.size(), from);
    commit_file(*n);
    ++stats.dropped_files;
    stats.torn_kept_bytes += tail.size();
    stats.dropped_bytes += unsynced > tail.size() ? unsynced - tail.size() : 0;
    n->mtime = n->ctime = now();
  }
}

std::string control_text() {
  uint64_t unsynced_bytes = 0, unsynced_files = 0, unsynced_dirs = 0;
  for (auto& [ino, n] : nodes) {
    if (n->is_dir()) {
      unsynced_dirs += n->entries != n->durable_entries;
    } else {
      unsynced_bytes += n->unsynced_bytes;
      unsynced_files += !n->dirty.empty() || n->size_dirty;
    }
  }
  char b[1024];
  snprintf(b, sizeof b,
           "writes=%llu\nbytes_written=%llu\nfsyncs=%llu\nfdatasyncs=%llu\nfsyncdirs=%llu\n"
           "drops=%llu\ndropped_bytes=%llu\ndropped_files=%llu\ndropped_entries=%llu\n"
           "torn_kept_bytes=%llu\ntorn_kept_dirs=%llu\n"
           "unsynced_bytes=%llu\nunsynced_files=%llu\nunsynced_dirs=%llu\n"
           "failed_ops=%llu\nfail_writes=%d\n",
           (unsigned long long)stats.writes, (unsigned long long)stats.bytes_written,
           (unsigned long long)stats.fsyncs, (unsigned long long)stats.fdatasyncs,
           (unsigned long long)stats.fsyncdirs, (unsigned long long)stats.drops,
           (unsigned long long)stats.dropped_bytes, (unsigned long long)stats.dropped_files,
           (unsigned long long)stats.dropped_entries, (unsigned long long)stats.torn_kept_bytes,
           (unsigned long long)stats.torn_kept_dirs, (unsigned long long)unsynced_bytes,
           (unsigned long long)unsynced_files, (unsigned long long)unsynced_dirs,
           (unsigned long long)stats.failed_ops, fail_writes ? 1 : 0);
  return b;
}

// ---- operations --------------------------------------------------------------------

void op_init(void*, fuse_conn_info* conn) {
  // Reads must see this server's current image, never a writeback copy in the kernel.
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
  auto root = std::make_unique<node>();
  root->ino = FUSE_ROOT_ID;
  root->mode = S_IFDIR | 0755;
  root->atime = root->mtime = root->ctime = now();
  nodes[FUSE_ROOT_ID] = std::move(root);
}

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (parent == FUSE_ROOT_ID && strcmp(name, control_name) == 0) {
    auto e = entry_of(control_attr());
    fuse_reply_entry(req, &e);
    return;
  }
  node* p = find(parent);
  if (!p || !p->is_dir()) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  auto it = p->entries.find(name);
  if (it == p->entries.end()) {
    fuse_reply_err(req, ENOENT);  // not cached: a drop may bring the name back
    return;
  }
  auto e = entry_of(attr_of(*find(it->second)));
  fuse_reply_entry(req, &e);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  if (ino == control_ino) {
    auto st = control_attr();
    fuse_reply_attr(req, &st, 0);
    return;
  }
  node* n = find(ino);
  if (!n) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  auto st = attr_of(*n);
  fuse_reply_attr(req, &st, 0);
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) {
  if (ino == control_ino) {  // open(O_TRUNC) of the control file: nothing to do
    auto st = control_attr();
    fuse_reply_attr(req, &st, 0);
    return;
  }
  node* n = find(ino);
  if (!n) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if (refuse_change(req)) return;
  if (to_set & FUSE_SET_ATTR_SIZE) {
    if (n->is_dir()) {
      fuse_reply_err(req, EISDIR);
      return;
    }
    truncate_to(*n, static_cast<uint64_t>(attr->st_size));
  }
  if (to_set & FUSE_SET_ATTR_MODE) n->mode = (n->mode & S_IFMT) | (attr->st_mode & 07777);
  if (to_set & FUSE_SET_ATTR_UID) n->uid = attr->st_uid;
  if (to_set & FUSE_SET_ATTR_GID) n->gid = attr->st_gid;
  if (to_set & FUSE_SET_ATTR_ATIME) n->atime = attr->st_atim;
  if (to_set & FUSE_SET_ATTR_MTIME) n->mtime = attr->st_mtim;
  if (to_set & FUSE_SET_ATTR_ATIME_NOW) n->atime = now();
  if (to_set & FUSE_SET_ATTR_MTIME_NOW) n->mtime = now();
  n->ctime = now();
  auto st = attr_of(*n);
  fuse_reply_attr(req, &st, 0);
}

// Adds a new node called name under parent; replies with an error and returns null if
// that cannot be done.
node* add_child(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  if (refuse_change(req)) return nullptr;
  node* p = find(parent);
  if (!p || !p->is_dir()) {
    fuse_reply_err(req, ENOTDIR);
    return nullptr;
  }
  if (p->entries.count(name) || (parent == FUSE_ROOT_ID && strcmp(name, control_name) == 0)) {
    fuse_reply_err(req, EEXIST);
    return nullptr;
  }
  if (strlen(name) > 255) {
    fuse_reply_err(req, ENAMETOOLONG);
    return nullptr;
  }
  node* n = make_node(mode, fuse_req_ctx(req));
  n->parent = parent;
  p->entries[name] = n->ino;
  p->mtime = p->ctime = now();
  return n;
}

void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t) {
  if (!S_ISREG(mode)) {
    fuse_reply_err(req, EPERM);
    return;
  }
  if (node* n = add_child(req, parent, name, mode)) {
    auto e = entry_of(attr_of(*n));
    fuse_reply_entry(req, &e);
  }
}

void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  if (node* n = add_child(req, parent, name, S_IFDIR | (mode & 07777))) {
    auto e = entry_of(attr_of(*n));
    fuse_reply_entry(req, &e);
  }
}

void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  if (refuse_change(req)) return;
  node* p = find(parent);
  if (p && p->is_dir() && !(fi->flags & O_EXCL)) {
    // Lost a race with another creator: open what is there (the kernel did the lookup).
    auto it = p->entries.find(name);
    if (it != p->entries.end()) {
      node* n = find(it->second);
      if (n->is_dir()) {
        fuse_reply_err(req, EISDIR);
        return;
      }
      if (fi->flags & O_TRUNC) truncate_to(*n, 0);
      fi->keep_cache = 0;
      auto e = entry_of(attr_of(*n));
      fuse_reply_create(req, &e, fi);
      return;
    }
  }
  if (node* n = add_child(req, parent, name, S_IFREG | (mode & 07777))) {
    fi->keep_cache = 0;
    fi->direct_io = 0;
    auto e = entry_of(attr_of(*n));
    fuse_reply_create(req, &e, fi);
  }
}

void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (refuse_change(req)) return;
  node* p = find(parent);
  if (!p || !p->is_dir()) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  auto it = p->entries.find(name);
  if (it == p->entries.end()) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if (find(it->second)->is_dir()) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  p->entries.erase(it);  // the inode stays: open descriptors, and a drop may restore it
  p->mtime = p->ctime = now();
  fuse_reply_err(req, 0);
}

void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (refuse_change(req)) return;
  node* p = find(parent);
  if (!p || !p->is_dir()) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  auto it = p->entries.find(name);
  if (it == p->entries.end()) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  node* d = find(it->second);
  if (!d->is_dir()) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  if (!d->entries.empty()) {
    fuse_reply_err(req, ENOTEMPTY);
    return;
  }
  p->entries.erase(it);
  p->mtime = p->ctime = now();
  fuse_reply_err(req, 0);
}

void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
               const char* newname, unsigned int flags) {
  if (refuse_change(req)) return;
  if (flags & ~RENAME_NOREPLACE) {
    fuse_reply_err(req, EINVAL);  // RENAME_EXCHANGE, RENAME_WHITEOUT: not needed
    return;
  }
  node* p = find(parent);
  node* np = find(newparent);
  if (!p || !np || !p->is_dir() || !np->is_dir()) {
    fuse_reply_err(req, ENOTDIR);
    return;
  }
  auto it = p->entries.find(name);
  if (it == p->entries.end()) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  fuse_ino_t moving = it->second;
  node* m = find(moving);
  auto dst = np->entries.find(newname);
  if (dst != np->entries.end()) {
    if (dst->second == moving) {
      fuse_reply_err(req, 0);
      return;
    }
    if (flags & RENAME_NOREPLACE) {
      fuse_reply_err(req, EEXIST);
      return;
    }
    node* old = find(dst->second);
    if (old->is_dir() != m->is_dir()) {
      fuse_reply_err(req, old->is_dir() ? EISDIR : ENOTDIR);
      return;
    }
    if (old->is_dir() && !old->entries.empty()) {
      fuse_reply_err(req, ENOTEMPTY);
      return;
    }
  }
  // A directory moved below itself: the kernel checks this for us (it holds the dcache).
  p->entries.erase(it);
  np->entries[newname] = moving;
  if (m->is_dir()) m->parent = newparent;
  p->mtime = p->ctime = np->mtime = np->ctime = m->ctime = now();
  fuse_reply_err(req, 0);
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  if (ino == control_ino) {
    fi->direct_io = 1;  // no page cache: every read asks for fresh counters
    fuse_reply_open(req, fi);
    return;
  }
  node* n = find(ino);
  if (!n) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if (n->is_dir()) {
    fuse_reply_err(req, EISDIR);
    return;
  }
  if ((fi->flags & O_TRUNC) && refuse_change(req)) return;
  if (fi->flags & O_TRUNC) truncate_to(*n, 0);
  fi->keep_cache = 0;  // each open drops the kernel's cached pages: a drop is then seen
  fi->direct_io = 0;   // mmap needs the page cache (recovery maps segments)
  fuse_reply_open(req, fi);
}

void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) {
  if (ino == control_ino) {
    std::string t = control_text();
    if (static_cast<size_t>(off) >= t.size()) {
      fuse_reply_buf(req, nullptr, 0);
      return;
    }
    t = t.substr(static_cast<size_t>(off), size);
    fuse_reply_buf(req, t.data(), t.size());
    return;
  }
  node* n = find(ino);
  if (!n) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  std::string d = read_image(n->cur, size, static_cast<uint64_t>(off));
  n->atime = now();
  fuse_reply_buf(req, d.data(), d.size());
}

void op_write(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
              fuse_file_info* fi) {
  if (ino == control_ino) {
    std::string cmd(buf, size);
    while (!cmd.empty() && (cmd.back() == '\n' || cmd.back() == ' ')) cmd.pop_back();
    if (cmd == "drop") {
      drop_all();
    } else if (cmd.rfind("drop-torn ", 0) == 0) {
      drop_torn(strtoull(cmd.c_str() + 10, nullptr, 10));
    } else if (cmd == "sync") {
      sync_all();
    } else if (cmd == "fail-writes on") {
      fail_writes = true;
    } else if (cmd == "fail-writes off") {
      fail_writes = false;
    } else {
      fuse_reply_err(req, EINVAL);
      return;
    }
    fuse_reply_write(req, size);
    return;
  }
  node* n = find(ino);
  if (!n) {
    fuse_reply_err(req, ENOENT);
    return;
  }
  if (refuse_change(req)) return;
  uint64_t at = (fi->flags & O_APPEND) ? n->cur.size : static_cast<uint64_t>(off);
  write_data(*n, buf, size, at);
  ++stats.writes;
  stats.bytes_written += size;
  fuse_reply_write(req, size);
}

void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); }

void op_release(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); }

void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info*) {
  if (refuse_change(req)) return;
  if (node* n = find(ino); n && !n->is_dir()) {
    // fdatasync makes the size durable too: it is needed to read the data back.
    commit_file(*n);
    ++(datasync ? stats.fdatasyncs : stats.fsyncs);
  }
  fuse_reply_err(req, 0);
}

void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  node* n = find(ino);
  if (!n || !n->is_dir()) {
    fuse_reply_err(req, n ? ENOTDIR : ENOENT);
    return;
  }
  // A snapshot: offsets stay valid while the directory changes under a reader.
  auto* s = new dir_snapshot;
  s->items.push_back({".", n->ino, S_IFDIR});
  s->items.push_back({"..", n->parent, S_IFDIR});
  for (auto& [name, child] : n->entries) s->items.push_back({name, child, find(child)->mode});
  fi->fh = reinterpret_cast<uint64_t>(s);
  fuse_reply_open(req, fi);
}

void op_readdir(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  auto* s = reinterpret_cast<dir_snapshot*>(fi->fh);
  std::string buf(size, '\0');
  size_t used = 0;
  for (size_t i = static_cast<size_t>(off); i < s->items.size(); ++i) {
    struct stat st{};
    st.st_ino = s->items[i].ino;
    st.st_mode = s->items[i].mode;
    size_t need = fuse_add_direntry(req, buf.data() + used, size - used, s->items[i].name.c_str(),
                                    &st, static_cast<off_t>(i + 1));
    if (need > size - used) break;
    used += need;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void op_releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  delete reinterpret_cast<dir_snapshot*>(fi->fh);
  fuse_reply_err(req, 0);
}

void op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  if (refuse_change(req)) return;
  if (node* n = find(ino); n && n->is_dir()) {
    commit_dir(*n);
    ++stats.fsyncdirs;
  }
  fuse_reply_err(req, 0);
}

void op_statfs(fuse_req_t req, fuse_ino_t) {
  struct statvfs sv{};
  sv.f_bsize = sv.f_frsize = block_size;
  sv.f_blocks = 1u << 24;  // 64 GiB: the spool checks nothing, the numbers only look sane
  uint64_t used = 0;
  for (auto& [ino, n] : nodes) used += n->cur.blocks.size();
  sv.f_bfree = sv.f_bavail = sv.f_blocks > used ? sv.f_blocks - used : 0;
  sv.f_files = 1u << 20;
  sv.f_ffree = sv.f_favail = sv.f_files > nodes.size() ? sv.f_files - nodes.size() : 0;
  sv.f_namemax = 255;
  fuse_reply_statfs(req, &sv);
}

void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, fuse_file_info*) {
  node* n = find(ino);
  if (!n || n->is_dir()) {
    fuse_reply_err(req, n ? EISDIR : ENOENT);
    return;
  }
  if (refuse_change(req)) return;
  if (mode & ~FALLOC_FL_KEEP_SIZE) {
    fuse_reply_err(req, EOPNOTSUPP);
    return;
  }
  // KEEP_SIZE reserves blocks nobody can read: nothing to model. Mode 0 grows the size.
  uint64_t end = static_cast<uint64_t>(off) + static_cast<uint64_t>(len);
  if (!(mode & FALLOC_FL_KEEP_SIZE) && end > n->cur.size) truncate_to(*n, end);
  fuse_reply_err(req, 0);
}

}  // namespace

int main(int argc, char** argv) {
  fuse_args args = FUSE_ARGS_INIT(argc, argv);
  fuse_cmdline_opts opts;
  if (fuse_parse_cmdline(&args, &opts) != 0) return 1;
  if (opts.show_help || opts.show_version || !opts.mountpoint) {
    printf("usage: %s [-f] [-o option,...] MOUNTPOINT\n"
           "A FUSE file system that keeps unsynced data in memory and loses it on\n"
           "'echo drop > MOUNTPOINT/%s'. Always single-threaded.\n",
           argv[0], control_name);
    fuse_opt_free_args(&args);
    free(opts.mountpoint);
    return opts.mountpoint ? 0 : 1;
  }
  fuse_opt_add_arg(&args, "-odefault_permissions,fsname=tern-plfs,subtype=tern-plfs");

  fuse_lowlevel_ops ops{};
  ops.init = op_init;
  ops.lookup = op_lookup;
  ops.getattr = op_getattr;
  ops.setattr = op_setattr;
  ops.mknod = op_mknod;
  ops.mkdir = op_mkdir;
  ops.unlink = op_unlink;
  ops.rmdir = op_rmdir;
  ops.rename = op_rename;
  ops.open = op_open;
  ops.read = op_read;
  ops.write = op_write;
  ops.flush = op_flush;
  ops.release = op_release;
  ops.fsync = op_fsync;
  ops.opendir = op_opendir;
  ops.readdir = op_readdir;
  ops.releasedir = op_releasedir;
  ops.fsyncdir = op_fsyncdir;
  ops.statfs = op_statfs;
  ops.create = op_create;
  ops.fallocate = op_fallocate;
  // No flock/getlk/setlk: the kernel then keeps locks locally, which is what one host needs.

  int rc = 1;
  fuse_session* se = fuse_session_new(&args, &ops, sizeof ops, nullptr);
  if (se) {
    if (fuse_set_signal_handlers(se) == 0) {
      if (fuse_session_mount(se, opts.mountpoint) == 0) {
        fuse_daemonize(opts.foreground);
        rc = fuse_session_loop(se) != 0;  // single-threaded by design
        fuse_session_unmount(se);
      }
      fuse_remove_signal_handlers(se);
    }
    fuse_session_destroy(se);
  }
  free(opts.mountpoint);
  fuse_opt_free_args(&args);
  return rc;
}
