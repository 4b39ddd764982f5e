// libFuzzer: ha::parse_frame never reads outside the frame, a VRRP verdict always points its
// payload inside the frame, and the payload it hands up survives ha::filter (the DPDK rx path
// end to end, without DPDK).
#include <cassert>
#include <cstdint>
#include <cstring>

#include "ha/frames.hh"
#include "ha/packet.hh"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tern::ha::rx_packet p;
  std::span<const uint8_t> frame(data, size);
  if (tern::ha::parse_frame(frame, p) != tern::ha::frame_kind::vrrp) return 0;
  assert(p.payload.data() >= data && p.payload.data() + p.payload.size() <= data + size);
  assert(p.src.family == tern::ha::ip_family::ipv4);
  const tern::ha::ip_address vip = tern::ha::ip_address::v4(192, 168, 1, 100);
  tern::ha::local_view us{.vrid = 51, .own_addresses = {}, .virtual_addresses = {&vip, 1}};
  tern::ha::advert a;
  (void)tern::ha::filter(p.ttl, p.src, p.dst, p.payload, us, a);
  return 0;
}
