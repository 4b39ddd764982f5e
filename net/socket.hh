#pragma once
// Listening sockets: one per shard and listener, SO_REUSEPORT so the kernel spreads
// connections over the shards.
#include <string>

#include "net/address.hh"

namespace tern::net {

// Returns the fd or -1 with err set ("bind 127.0.0.1:25: Address already in use").
int open_listener(const address& a, int backlog, std::string& err);
// The address a socket is bound to (resolves port 0).
address local_address(int fd);

}  // namespace tern::net
