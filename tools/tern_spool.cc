// tern-spool: list and dump the messages of a spool directory (like postcat), check it,
// and repair it offline.
// list, dump and check are read only and may run on a live spool (check reports damage,
// it does not repair). repair takes the spool lock, so it refuses while ternd runs, and
// does what ternd's recovery does at start.
// --json output is UTF-8: valid UTF-8 passes through; each byte that is not part of a valid
// UTF-8 sequence is written as \u00XX (its value; the only lossy case), control characters
// as \u00XX.
#include <time.h>

#include <CLI/CLI.hpp>
#include <array>
#include <cstdio>
#include <fmt/format.h>
#include <string>
#include <unordered_map>
#include <vector>

#include "spool/record.hh"
#include "spool/recovery.hh"
#include "spool/scan.hh"

using namespace tern::spool;

namespace {

// Length of the valid UTF-8 sequence at s[i] (RFC 3629: no overlongs, no surrogates, at
// most U+10FFFF), or 0.
size_t utf8_len(std::string_view s, size_t i) {
  auto u = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = u(i);
  size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k)
    if ((u(i + k) & 0xC0) != 0x80) return 0;
  unsigned char c1 = u(i + 1);
  if (c == 0xE0 && c1 < 0xA0) return 0;  // overlong
  if (c == 0xED && c1 > 0x9F) return 0;  // surrogates
  if (c == 0xF0 && c1 < 0x90) return 0;  // overlong
  if (c == 0xF4 && c1 > 0x8F) return 0;  // above U+10FFFF
  return n;
}

std::string json_str(std::string_view s) {
  std::string o = "\"";
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      o += '\\';
      o += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7F) {
      o += fmt::format("\\u{:04x}", c);
    } else if (c < 0x80) {
      o += static_cast<char>(c);
    } else if (size_t n = utf8_len(s, i)) {
      o.append(s.data() + i, n);
      i += n;
      continue;
    } else {
      o += fmt::format("\\u{:04x}", c);  // not UTF-8: the byte's value
    }
    ++i;
  }
  return o + "\"";
}

std::string when(uint64_t us) {
  time_t t = static_cast<time_t>(us / 1000000);
  struct tm tm;
  gmtime_r(&t, &tm);
  char b[32];
  strftime(b, sizeof b, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return b;
}

const char* notify_text(uint8_t n, std::string& buf) {
  buf.clear();
  if (!n) return "";
  if (n & notify_never) return "NEVER";
  for (auto [f, name] : {std::pair{notify_success, "SUCCESS"}, {notify_failure, "FAILURE"}, {notify_delay, "DELAY"}})
    if (n & f) buf += (buf.empty() ? "" : ",") + std::string(name);
  return buf.c_str();
}

struct entry {
  std::string segment;
  uint64_t offset;
  std::string payload;  // the message record's payload (copied: the mapping goes away)
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tern-spool: inspect, check and repair a tern spool directory"};
  app.require_subcommand(1);
  bool json = false;
  app.add_flag("--json", json, "machine-readable output (UTF-8)");
  std::string dir;
  auto* list = app.add_subcommand("list", "list queued messages (those without a done record)");
  list->add_option("dir", dir, "spool directory")->required();
  list->add_flag("--json", json, "machine-readable output (UTF-8)");
  bool all = false, with_content = false;
  list->add_flag("--all", all, "include messages that have a done record");
  list->add_flag("--content", with_content, "with --json: include each message's content");
  auto* dump = app.add_subcommand("dump", "show one message: envelope and content");
  std::string id;
  dump->add_option("dir", dir, "spool directory")->required();
  dump->add_option("id", id, "queue id")->required();
  dump->add_flag("--json", json, "machine-readable output (UTF-8)");
  auto* check = app.add_subcommand("check", "report damage not repaired yet; exit 1 if any (read only)");
  check->add_option("dir", dir, "spool directory")->required();
  check->add_flag("--json", json, "machine-readable output (UTF-8)");
  auto* repair = app.add_subcommand("repair", "repair as ternd's recovery does (needs the spool lock)");
  repair->add_option("dir", dir, "spool directory")->required();
  CLI11_PARSE(app, argc, argv);

  if (repair->parsed()) {
    std::string err;
    int lk = lock_spool(dir, err, "tern-spool");
    if (lk < 0) {
      fmt::print(stderr, "tern-spool: {}\n", err);
      return 2;
    }
    std::vector<queued_message> q;
    recovery_report rep;
    if (!recover_spool(dir, true, q, rep, err)) {
      fmt::print(stderr, "tern-spool: {}\n", err);
      return 2;
    }
    for (auto& n : rep.notes) fmt::print("{}\n", n);
    fmt::print("{} segment(s), {} queued, {} new damaged region(s) repaired, {} known\n", rep.segments, q.size(),
               rep.new_damage, rep.known_damage);
    return 0;
  }

  std::vector<entry> msgs;
  std::unordered_map<std::string, bool> done;
  // Delivery progress per id (status records, folded in file order) and the newest copy
  // of each message (a message copied forward appears twice; the newest one counts).
  struct progress {
    uint32_t attempts = 0;
    uint64_t next_us = 0;
    std::unordered_map<uint32_t, std::array<std::string, 3>> rcpt;  // index -> state, dsn, text
  };
  std::unordered_map<std::string, progress> prog;
  std::unordered_map<std::string, size_t> newest;
  std::vector<std::string> problems, known;
  quarantine_ledger ledger;
  {
    std::string err;
    if (!ledger.load(dir, err)) problems.push_back(err);
  }
  auto segs = list_segments(dir);
  for (const auto& path : segs) {
    segment_scan sc;
    bool ok = scan_segment(path, sc, [&](const record_view& rv, uint64_t off) {
      if (rv.type == record_type::message) {
        message_view mv;
        if (!decode_message(rv.payload, mv))  // a valid record whose payload does not decode
          problems.push_back(fmt::format("{}: message record at {} does not decode", path, off));
        else
          newest[std::string(mv.id)] = msgs.size();
        msgs.push_back({path, off, std::string(rv.payload)});
      } else if (rv.type == record_type::status) {
        status_view sv;
        if (!decode_status(rv.payload, sv)) {
          problems.push_back(fmt::format("{}: status record at {} does not decode", path, off));
          return;
        }
        auto& pg = prog[std::string(sv.id)];
        pg.attempts = sv.attempts;
        pg.next_us = sv.next_attempt_us;
        for_each_status(sv, [&](const rcpt_status& e) {
          pg.rcpt[e.index] = {rcpt_state_text(e.state), std::string(e.dsn), std::string(e.text)};
        });
      } else if (rv.type == record_type::done) {
        std::string_view d;
        if (decode_done(rv.payload, d)) done[std::string(d)] = true;
      }
    });
    if (!ok) problems.push_back(path + ": " + sc.error);
    std::string name = path.substr(path.rfind('/') + 1);
    for (auto& d : sc.damaged) {
      if (d.kind != damage_kind::torn && ledger.contains(name, d))
        known.push_back(describe(name, d) + " (quarantined earlier)");
      else
        problems.push_back(describe(name, d));
    }
  }

  if (check->parsed()) {
    if (json) {
      fmt::print("{{\"segments\":{},\"messages\":{},\"problems\":[", segs.size(), msgs.size());
      for (size_t i = 0; i < problems.size(); ++i) fmt::print("{}{}", i ? "," : "", json_str(problems[i]));
      fmt::print("],\"known\":[");
      for (size_t i = 0; i < known.size(); ++i) fmt::print("{}{}", i ? "," : "", json_str(known[i]));
      fmt::print("]}}\n");
    } else {
      for (auto& p : problems) fmt::print("{}\n", p);
      for (auto& p : known) fmt::print("known: {}\n", p);
      fmt::print("{} segment(s), {} message record(s), {} problem(s), {} known damaged region(s)\n", segs.size(),
                 msgs.size(), problems.size(), known.size());
    }
    return problems.empty() ? 0 : 1;
  }

  if (list->parsed()) {
    size_t n = 0;
    if (json) fmt::print("[");
    for (auto& e : msgs) {
      message_view m;
      if (!decode_message(e.payload, m)) continue;
      bool is_done = done.count(std::string(m.id)) > 0;
      if (is_done && !all) continue;
      if (auto nw = newest.find(std::string(m.id)); nw != newest.end() && &msgs[nw->second] != &e) continue;
      std::vector<std::string> rcpts;
      for_each_rcpt(m, [&](const rcpt_view& r) { rcpts.emplace_back(r.addr); });
      const progress* pg = nullptr;
      if (auto it = prog.find(std::string(m.id)); it != prog.end()) pg = &it->second;
      auto rstate = [&](uint32_t i) -> std::array<std::string, 3> {
        if (pg)
          if (auto it = pg->rcpt.find(i); it != pg->rcpt.end()) return it->second;
        return {"pending", "", ""};
      };
      if (json) {
        fmt::print("{}{{\"id\":{},\"arrival\":{},\"size\":{},\"from\":{},\"client\":{},\"helo\":{},\"done\":{},"
                   "\"attempts\":{},\"next_attempt\":{},\"recipients\":[",
                   n ? "," : "", json_str(m.id), json_str(when(m.arrival_us)), m.content.size(), json_str(m.mail_from),
                   json_str(m.client_ip), json_str(m.helo), is_done ? "true" : "false", pg ? pg->attempts : 0,
                   json_str(pg && pg->next_us ? when(pg->next_us) : ""));
        for (size_t i = 0; i < rcpts.size(); ++i) fmt::print("{}{}", i ? "," : "", json_str(rcpts[i]));
        fmt::print("],\"recipient_state\":[");
        for (size_t i = 0; i < rcpts.size(); ++i) {
          auto st = rstate(static_cast<uint32_t>(i));
          fmt::print("{}{{\"address\":{},\"state\":{},\"dsn\":{},\"diagnostic\":{}}}", i ? "," : "",
                     json_str(rcpts[i]), json_str(st[0]), json_str(st[1]), json_str(st[2]));
        }
        fmt::print("]");
        if (with_content) fmt::print(",\"content\":{}", json_str(m.content));
        fmt::print("}}");
      } else {
        if (n == 0) fmt::print("{:<18} {:>8} {:<20}  {}\n", "-Queue ID-", "-Size-", "-Arrival Time-", "-Sender/Recipient-");
        fmt::print("{:<18}{} {:>8} {:<20}  {}\n", m.id, is_done ? "-" : " ", m.content.size(), when(m.arrival_us),
                   m.mail_from.empty() ? "MAILER-DAEMON" : std::string(m.mail_from));
        if (pg && pg->attempts)
          fmt::print("{:>52}({} attempt(s){})\n", "", pg->attempts,
                     pg->next_us ? ", next " + when(pg->next_us) : std::string());
        for (size_t i = 0; i < rcpts.size(); ++i) {
          auto st = rstate(static_cast<uint32_t>(i));
          if (st[0] == "pending") {
            fmt::print("{:>52}{}\n", "", rcpts[i]);
          } else {
            fmt::print("{:>52}{} [{}{}]\n", "", rcpts[i], st[0], st[1].empty() ? "" : " " + st[1]);
            if (!st[2].empty()) fmt::print("{:>56}({})\n", "", st[2]);
          }
        }
      }
      ++n;
    }
    if (json)
      fmt::print("]\n");
    else
      fmt::print("-- {} message(s) in {} segment(s)\n", n, segs.size());
    for (auto& p : problems) fmt::print(stderr, "warning: {}\n", p);
    return 0;
  }

  // dump
  for (auto& e : msgs) {
    message_view m;
    if (!decode_message(e.payload, m) || m.id != id) continue;
    std::string nb;
    if (json) {
      fmt::print("{{\"id\":{},\"segment\":{},\"offset\":{},\"arrival\":{},\"client\":{},\"client_port\":{},\"peer\":{},"
                 "\"helo\":{},\"from\":{},\"envid\":{},\"ret\":{},\"body\":{},\"smtputf8\":{},\"done\":{},\"recipients\":[",
                 json_str(m.id), json_str(e.segment), e.offset, json_str(when(m.arrival_us)), json_str(m.client_ip),
                 m.client_port, json_str(m.peer_ip), json_str(m.helo), json_str(m.mail_from), json_str(m.envid),
                 static_cast<int>(m.ret), static_cast<int>(m.body), m.smtputf8 ? "true" : "false",
                 done.count(id) ? "true" : "false");
      size_t i = 0;
      for_each_rcpt(m, [&](const rcpt_view& r) {
        fmt::print("{}{{\"address\":{},\"notify\":{},\"orcpt\":{}}}", i++ ? "," : "", json_str(r.addr),
                   json_str(notify_text(r.notify, nb)), json_str(r.orcpt));
      });
      fmt::print("],\"content\":{}}}\n", json_str(m.content));
    } else {
      fmt::print("*** ENVELOPE RECORDS {} ***\n", m.id);
      fmt::print("segment: {} offset {}\narrival_time: {}\nclient_address: {}\nclient_port: {}\n", e.segment, e.offset,
                 when(m.arrival_us), m.client_ip, m.client_port);
      if (!m.peer_ip.empty()) fmt::print("proxy_peer: {}\n", m.peer_ip);
      fmt::print("helo_name: {}\nsender: {}\n", m.helo, m.mail_from);
      if (!m.envid.empty()) fmt::print("envid: {}\n", m.envid);
      if (m.ret != dsn_ret::none) fmt::print("ret: {}\n", m.ret == dsn_ret::full ? "FULL" : "HDRS");
      for_each_rcpt(m, [&](const rcpt_view& r) {
        fmt::print("recipient: {}", r.addr);
        if (r.notify) fmt::print(" notify={}", notify_text(r.notify, nb));
        if (!r.orcpt.empty()) fmt::print(" orcpt={}", r.orcpt);
        fmt::print("\n");
      });
      fmt::print("*** MESSAGE CONTENTS {} ***\n", m.id);
      fwrite(m.content.data(), 1, m.content.size(), stdout);
      fmt::print("*** END OF MESSAGE {} ***\n", m.id);
    }
    return 0;
  }
  fmt::print(stderr, "tern-spool: {}: no message {}\n", dir, id);
  return 1;
}
