#pragma once
// The per-shard queue manager: which message to deliver next, to which destination, and
// what to write to the spool when an attempt ends. Postfix's qmgr, for one shard.
//
// Life of a message:
//   queued (deferred until next_attempt, or due)  --next_load-->  loading (the shard reads
//   its record through the ring)  --loaded-->  active: its pending recipients are routed
//   and grouped into one job per destination  --take_job/job_done-->  when every job of
//   the round has ended: delivered/failed recipients are final, deferred ones wait for the
//   next attempt (retry schedule with jitter, expiry after max_lifetime = failed 4.4.7).
//   The round's outcome is written to the spool: a status record with the recipients that
//   changed (and the attempt count and next attempt time), a done record when nothing is
//   left; the message's memory is freed once those records are durable.
//
// Destinations (routing.hh) have a concurrency bound (connections per shard). A
// connection that cannot be set up marks its host down (back-off) and the destination
// tries its next host at once; only when every host is down are its jobs deferred, with
// the last failure as the reason. Mail for a domain with no destination is deferred with
// "no route".
//
// Spool reclamation at run time (the rules of spool/recovery.hh): the manager counts, per
// segment, the messages whose newest record is in it and that are not done. Segments are
// removed strictly oldest first, one at a time (the shard unlinks and syncs the directory,
// then calls segment_removed), never the writer's current one. A message deferred while
// its record is in an older segment than the writer's current one is copied forward at the
// end of its round (its record, which is in memory, then a status record with its whole
// state), so a long-deferred message never pins an old segment: disk use stays bounded
// by live mail plus about one segment.
//
// Bounded: at most active_limit messages (and active_bytes of records) are loaded at once;
// the rest wait in the queue as small entries (id, location, state).
//
// Pure: no I/O, no clock (every call takes the time), randomness from an injected seed.
// Not thread-safe: one per shard. Trusts the spool records it is given only after
// decoding them (a record that does not decode is deferred, never crashes the shard).
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <queue>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "spool/record.hh"
#include "src/queue/routing.hh"
#include "src/queue/schedule.hh"

namespace tern::queue {

// A message as the queue keeps it between attempts (no content).
struct message_info {
  std::string id;
  std::string segment;  // path of the segment holding its newest record
  uint64_t offset = 0;
  uint64_t record_size = 0;
  uint64_t arrival_us = 0;
  uint32_t attempts = 0;
  uint64_t next_attempt_us = 0;  // 0: now
  uint8_t flags = 0;
  // Per recipient state from the spool (status records); empty: all pending.
  std::vector<spool::rcpt_state> state;
};

// What an attempt learned about one recipient of a job.
struct rcpt_result {
  spool::rcpt_state state = spool::rcpt_state::deferred;  // delivered, failed or deferred
  std::string dsn;   // "2.0.0", "4.4.1", "5.1.1"
  std::string text;  // the diagnostic: remote reply or local reason (for logs and the spool)
  // For delivery status notifications (src/queue/dsn.hh).
  std::string reply;        // the remote SMTP reply ("550 5.1.1 ..."), empty for a local reason
  std::string remote_host;  // the next hop's name and address, when there was a conversation
  std::string remote_ip;
  bool hop_dsn = false;         // the next hop offered DSN (NOTIFY went along: it reports)
  bool final_delivery = false;  // LMTP: delivered into a mailbox, not relayed
};

// A result decided here (no conversation behind it).
inline rcpt_result local_result(spool::rcpt_state st, std::string dsn, std::string text) {
  rcpt_result r;
  r.state = st;
  r.dsn = std::move(dsn);
  r.text = std::move(text);
  return r;
}

using msg_handle = uint32_t;

// One delivery of one message to one destination: the recipients that go there.
struct job {
  msg_handle msg = 0;
  uint32_t dest = 0;
  std::vector<uint32_t> rcpts;  // indices into the message's recipients
};

struct load_request {
  msg_handle msg = 0;
  std::string segment;
  uint64_t offset = 0;
  uint64_t size = 0;
};

struct connect_request {
  uint32_t dest = 0;
  int host = 0;
  const config::next_hop* hop = nullptr;
};

// A record for the shard to append to its spool writer; `token` comes back in
// record_durable().
struct record_out {
  uint64_t token = 0;
  const std::string* bytes = nullptr;
};

// An event of the round, for the shard: log lines, and bounces to generate.
struct round_result {
  msg_handle msg = 0;
  std::string id;
  bool finished = false;  // nothing left to deliver: a done record was written
  std::vector<uint32_t> failed_now;   // recipients that failed in this round (bounce them)
  std::vector<uint32_t> delivered_now;
  // Recipients whose result in this round was decided without a conversation (no route,
  // no host reachable, an unreadable record, expiry): the shard logs them; results from a
  // connection were logged with their relay already.
  std::vector<uint32_t> decided_here;
  bool expired = false;
  bool delay_warning = false;  // a delay DSN is due now (queue.delay_warning); flagged as sent
  uint64_t expires_us = 0;     // arrival + max_lifetime (Will-Retry-Until)
};

class manager {
 public:
  struct options {
    retry_policy retry;
    uint32_t concurrency = 20;
    uint32_t active_limit = 1000;          // messages loaded at once
    uint64_t active_bytes = 256ull << 20;  // bytes of records loaded at once
    uint64_t host_backoff_ms = 60000;      // first back-off of a failed host (doubles)
    uint64_t host_backoff_max_ms = 3600000;
    uint64_t seed = 1;
  };

  manager(routing& r, const options& o);

  // A message enters the queue: fresh (after its commit) or recovered at start.
  void add(message_info m);
  size_t queued() const noexcept { return live_; }
  size_t active() const noexcept { return active_; }

  // 1. Loading. While the active set has room, the next due message to read (its whole
  // record). The shard reads it into buffer(h) and calls loaded().
  bool next_load(uint64_t now_us, load_request& req);
  std::string& buffer(msg_handle h) { return msgs_[h].record; }
  // ok=false: the read failed (err for the log); the message is deferred.
  void loaded(msg_handle h, bool ok, const std::string& err, uint64_t now_us);
  // The decoded record of an active message (valid until its round ends).
  const spool::message_view& view(msg_handle h) const { return msgs_[h].view; }
  const std::string& id_of(msg_handle h) const { return msgs_[h].info.id; }
  // The round's result for recipient i of an active or writing message.
  const rcpt_result* last(msg_handle h, uint32_t i) const {
    return i < msgs_[h].last.size() ? &msgs_[h].last[i] : nullptr;
  }
  uint64_t arrival_us(msg_handle h) const { return msgs_[h].info.arrival_us; }
  // The recipient addresses of a job, in job order.
  std::vector<spool::rcpt_view> job_rcpts(const job& j) const;

  // 2. Connections: a destination with jobs waiting and room under its concurrency. The
  // shard opens the connection and calls connected() or connect_failed().
  bool next_connect(uint64_t now_ms, uint64_t now_us, connect_request& req);
  void connected(uint32_t dest, int host);
  // The host could not be used (refused, timeout, TLS failure, greeting refused): it is
  // backed off; if no host of the destination is left, its waiting jobs are deferred with
  // `reason` (dsn 4.x.x).
  void connect_failed(uint32_t dest, int host, const std::string& dsn, const std::string& reason,
                      uint64_t now_ms, uint64_t now_us);
  // A connection to dest ended (closed after use or after a failure already reported).
  void disconnected(uint32_t dest);

  // 3. Jobs for a connected session of dest; nullopt when none waits (idle or quit).
  std::unique_ptr<job> take_job(uint32_t dest);
  // The job ended with one result per job recipient (in job order).
  void job_done(std::unique_ptr<job> j, std::span<const rcpt_result> results, uint64_t now_us);
  // The job could not be completed on its connection (the connection failed mid-way): it
  // goes back to the front of its destination's queue, to be tried on another host.
  void job_requeue(std::unique_ptr<job> j);

  // 4. Spool records of ended rounds, in order; record_durable() when written, with the
  // segment and offset the writer reports for it.
  bool next_record(record_out& out);
  size_t records_waiting() const noexcept { return to_hand_.size(); }
  void record_durable(uint64_t token, bool ok, uint64_t now_us, const std::string& segment = {},
                      uint64_t offset = 0);

  // 5. Segments. The writer's current segment (the shard tells it after every batch and
  // rollover); segments recovery kept that hold no queued message (their done records may
  // close messages of older segments); the next segment to remove, one at a time.
  void set_current_segment(const std::string& path);
  void track_segment(const std::string& path);
  bool next_removal(std::string& path);
  void segment_removed(const std::string& path, bool ok);
  size_t segments() const noexcept { return segs_.size(); }
  uint64_t moved() const noexcept { return moved_; }
  // Rounds that ended (for log lines and bounces); the shard drains them in the same loop
  // iteration, while view() of their message is still valid (until record_durable).
  std::vector<round_result>& results() noexcept { return results_; }

  // The earliest time something becomes due (a deferred message, a host back up); UINT64_MAX
  // when nothing waits. In wall-clock microseconds for messages.
  uint64_t next_due_us() const;
  uint64_t next_host_up_ms() const;

  // Statistics.
  uint64_t rounds() const noexcept { return rounds_; }

 private:
  enum class mstate : uint8_t { free, queued, loading, active, writing };
  struct msg {
    mstate st = mstate::free;
    message_info info;
    std::string record;          // while loading/active
    spool::message_view view;    // decoded record (points into `record`)
    uint32_t jobs_open = 0;      // jobs of the current round not ended yet
    std::vector<spool::rcpt_state> before;  // state at the round's start (what changed)
    std::vector<rcpt_result> last;          // per recipient: the round's results
    std::vector<bool> local;                // per recipient: decided without a conversation
    uint64_t writing_token = 0;
    bool moving = false;  // the round's records start with a copy of the message record
  };
  struct dest_state {
    std::deque<std::unique_ptr<job>> waiting;
    uint32_t connections = 0;
    uint32_t connecting = 0;
    std::string last_dsn, last_reason;  // the last host failure, for deferrals
  };
  struct due_entry {
    uint64_t at;
    msg_handle h;
    bool operator>(const due_entry& o) const { return at > o.at; }
  };

  msg_handle alloc();
  void defer_job(job& j, const std::string& dsn, const std::string& reason);
  void defer_waiting(uint32_t dest, const std::string& dsn, const std::string& reason, uint64_t now_us);
  void maybe_end_round(msg_handle h, uint64_t now_us);
  void end_round(msg_handle h, uint64_t now_us);

  routing& routes_;
  options opt_;
  rng rng_;
  std::vector<msg> msgs_;
  std::vector<msg_handle> free_;
  std::priority_queue<due_entry, std::vector<due_entry>, std::greater<due_entry>> due_;
  std::vector<dest_state> dests_;
  std::unordered_map<uint64_t, std::string> records_;  // token -> bytes, until durable (node-stable)
  std::deque<uint64_t> to_hand_;                        // tokens not handed to the shard yet
  std::unordered_map<uint64_t, msg_handle> writing_;  // token of a round's last record -> message
  uint64_t next_token_ = 1;
  std::vector<round_result> results_;
  size_t live_ = 0, active_ = 0;
  uint64_t active_bytes_ = 0;
  uint64_t rounds_ = 0;
  uint64_t moved_ = 0;
  // Segment path -> live messages in it. std::map: the names sort by segment id (16 hex
  // digits), so begin() is the oldest.
  std::map<std::string, uint32_t> segs_;
  std::string current_;
  bool removing_ = false;
};

}  // namespace tern::queue
