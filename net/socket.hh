#pragma once
// Listening sockets: one per shard and listener, SO_REUSEPORT so the kernel spreads
// connections over the shards.
#include <string>

#include "net/address.hh"

namespace tern::net {

// Returns the fd or -1 with err set ("bind 127.0.0.1:25: Address already in use").
// freebind: IP_FREEBIND, so the socket can be bound to an address the host does not hold
// yet (a VRRP virtual address: it serves the address the moment it arrives).
int open_listener(const address& a, int backlog, std::string& err, bool freebind = false);
// The address a socket is bound to (resolves port 0).
address local_address(int fd);

}  // namespace tern::net
