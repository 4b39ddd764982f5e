// tern-spool: list and dump the messages of a spool directory offline (like postcat).
// Read only: it never repairs; it reports torn tails and corrupt regions it sees.
#include <time.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <fmt/format.h>
#include <string>
#include <unordered_map>
#include <vector>

#include "spool/record.hh"
#include "spool/scan.hh"

using namespace tern::spool;

namespace {

std::string json_str(std::string_view s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += static_cast<char>(c);
    } else if (c < 0x20 || c >= 0x7F) {
      o += fmt::format("\\u{:04x}", c);
    } else {
      o += static_cast<char>(c);
    }
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
  CLI::App app{"tern-spool: inspect a tern spool directory offline"};
  app.require_subcommand(1);
  bool json = false;
  app.add_flag("--json", json, "machine-readable output");
  std::string dir;
  auto* list = app.add_subcommand("list", "list queued messages (those without a done record)");
  list->add_option("dir", dir, "spool directory")->required();
  bool all = false, with_content = false;
  list->add_flag("--all", all, "include messages that have a done record");
  list->add_flag("--content", with_content, "with --json: include each message's content");
  auto* dump = app.add_subcommand("dump", "show one message: envelope and content");
  std::string id;
  dump->add_option("dir", dir, "spool directory")->required();
  dump->add_option("id", id, "queue id")->required();
  auto* check = app.add_subcommand("check", "report torn tails and corrupt regions; exit 1 if any");
  check->add_option("dir", dir, "spool directory")->required();
  CLI11_PARSE(app, argc, argv);

  std::vector<entry> msgs;
  std::unordered_map<std::string, bool> done;
  std::vector<std::string> problems;
  auto segs = list_segments(dir);
  for (const auto& path : segs) {
    segment_scan sc;
    bool ok = scan_segment(path, sc, [&](const record_view& rv, uint64_t off) {
      if (rv.type == record_type::message) {
        msgs.push_back({path, off, std::string(rv.payload)});
      } else if (rv.type == record_type::done) {
        std::string_view d;
        if (decode_done(rv.payload, d)) done[std::string(d)] = true;
      }
    });
    if (!ok) problems.push_back(path + ": " + sc.error);
    if (sc.torn) problems.push_back(fmt::format("{}: torn tail at {} ({} bytes): {}", path, sc.valid_end,
                                                sc.file_size - sc.valid_end, sc.torn_why ? sc.torn_why : ""));
    for (auto [b, e] : sc.corrupt) problems.push_back(fmt::format("{}: corrupt bytes {}..{}", path, b, e));
  }

  if (check->parsed()) {
    if (json) {
      fmt::print("{{\"segments\":{},\"messages\":{},\"problems\":[", segs.size(), msgs.size());
      for (size_t i = 0; i < problems.size(); ++i) fmt::print("{}{}", i ? "," : "", json_str(problems[i]));
      fmt::print("]}}\n");
    } else {
      for (auto& p : problems) fmt::print("{}\n", p);
      fmt::print("{} segment(s), {} message record(s), {} problem(s)\n", segs.size(), msgs.size(), problems.size());
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
      std::vector<std::string> rcpts;
      for_each_rcpt(m, [&](const rcpt_view& r) { rcpts.emplace_back(r.addr); });
      if (json) {
        fmt::print("{}{{\"id\":{},\"arrival\":{},\"size\":{},\"from\":{},\"client\":{},\"helo\":{},\"done\":{},"
                   "\"recipients\":[",
                   n ? "," : "", json_str(m.id), json_str(when(m.arrival_us)), m.content.size(), json_str(m.mail_from),
                   json_str(m.client_ip), json_str(m.helo), is_done ? "true" : "false");
        for (size_t i = 0; i < rcpts.size(); ++i) fmt::print("{}{}", i ? "," : "", json_str(rcpts[i]));
        fmt::print("]");
        if (with_content) fmt::print(",\"content\":{}", json_str(m.content));
        fmt::print("}}");
      } else {
        if (n == 0) fmt::print("{:<18} {:>8} {:<20}  {}\n", "-Queue ID-", "-Size-", "-Arrival Time-", "-Sender/Recipient-");
        fmt::print("{:<18}{} {:>8} {:<20}  {}\n", m.id, is_done ? "-" : " ", m.content.size(), when(m.arrival_us),
                   m.mail_from.empty() ? "MAILER-DAEMON" : std::string(m.mail_from));
        for (auto& r : rcpts) fmt::print("{:>52}{}\n", "", r);
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
