#include "src/queue/routing.hh"

#include <algorithm>

namespace tern::queue {

routing::routing(const config::config& cfg) {
  for (const auto& r : cfg.routes) {
    std::string name = "route:";
    for (size_t i = 0; i < r.domains.size(); ++i) name += (i ? "," : "") + r.domains[i];
    // Routes with the same domain list are one destination.
    uint32_t d = no_destination;
    for (uint32_t i = 0; i < dest_.size(); ++i)
      if (dest_[i].name == name) d = i;
    if (d == no_destination) {
      destination nd;
      nd.name = name;
      dest_.push_back(std::move(nd));
      d = static_cast<uint32_t>(dest_.size() - 1);
      for (const auto& dom : r.domains) domain_rules_.emplace_back(dom, d);
    }
    dest_[d].hops.push_back(r.hop);
  }
  if (!cfg.smarthosts.empty()) {
    destination s;
    s.name = "smarthost";
    s.smarthost = true;
    s.hops = cfg.smarthosts;
    dest_.push_back(std::move(s));
    smarthost_ = static_cast<uint32_t>(dest_.size() - 1);
  }
  for (auto& d : dest_) {
    d.down_until_ms.assign(d.hops.size(), 0);
    d.failures.assign(d.hops.size(), 0);
  }
}

uint32_t routing::route_for(std::string_view address) const {
  auto at = address.rfind('@');
  std::string_view dom = at == std::string_view::npos ? std::string_view() : address.substr(at + 1);
  if (!dom.empty() && dom.size() <= 255) {
    char low[256];
    for (size_t i = 0; i < dom.size(); ++i) {
      char c = dom[i];
      low[i] = c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c;
    }
    std::string_view d(low, dom.size());
    for (const auto& [pat, dest] : domain_rules_)
      if (config::domain_matches(d, pat)) return dest;
  }
  return smarthost_;
}

int routing::pick_host(uint32_t d, uint64_t now_ms, rng& r) const {
  const destination& ds = dest_[d];
  uint32_t best = UINT32_MAX;
  for (size_t i = 0; i < ds.hops.size(); ++i)
    if (ds.down_until_ms[i] <= now_ms) best = std::min(best, ds.hops[i].priority);
  if (best == UINT32_MAX) return -1;
  uint64_t total = 0;
  for (size_t i = 0; i < ds.hops.size(); ++i)
    if (ds.down_until_ms[i] <= now_ms && ds.hops[i].priority == best) total += ds.hops[i].weight;
  uint64_t x = r.below(total);
  for (size_t i = 0; i < ds.hops.size(); ++i) {
    if (ds.down_until_ms[i] > now_ms || ds.hops[i].priority != best) continue;
    if (x < ds.hops[i].weight) return static_cast<int>(i);
    x -= ds.hops[i].weight;
  }
  return -1;  // unreachable: total counted the same hosts
}

uint64_t routing::next_up_ms(uint32_t d) const {
  const destination& ds = dest_[d];
  uint64_t t = UINT64_MAX;
  for (uint64_t u : ds.down_until_ms) t = std::min(t, u);
  return t;
}

void routing::host_failed(uint32_t d, int host, uint64_t now_ms, uint64_t base_ms, uint64_t max_ms) {
  destination& ds = dest_[d];
  if (host < 0 || size_t(host) >= ds.hops.size()) return;
  uint32_t f = ++ds.failures[size_t(host)];
  uint64_t back = base_ms;
  for (uint32_t i = 1; i < f && back < max_ms; ++i) back *= 2;
  ds.down_until_ms[size_t(host)] = now_ms + std::min(back, max_ms);
}

void routing::host_ok(uint32_t d, int host) {
  destination& ds = dest_[d];
  if (host < 0 || size_t(host) >= ds.hops.size()) return;
  ds.failures[size_t(host)] = 0;
  ds.down_until_ms[size_t(host)] = 0;
}

}  // namespace tern::queue
