#include "ha/netlink.hh"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <functional>

namespace tern::ha {
namespace {

// Limit: bytes read per recv from the netlink socket. A dump of a few hundred addresses fits
// in several reads; a single message never exceeds this (the kernel sizes dump skbs to the
// page size, and we ask for capped ACKs). Default 32 KiB.
constexpr size_t netlink_recv_buffer = 32 * 1024;

std::string errno_text(int e) { return std::strerror(e); }

std::string to_text(const ip_address& a) {
    char buf[INET6_ADDRSTRLEN] = {};
    inet_ntop(a.family == ip_family::ipv4 ? AF_INET : AF_INET6, a.bytes.data(), buf, sizeof buf);
    return buf;
}

// Limit: bytes in one request we build. Our largest (the macvlan RTM_NEWLINK) is under 100.
constexpr size_t netlink_request_max = 512;

// One request being built: header, family header, attributes (with nesting), in a fixed
// buffer. Bytes are copied in with memcpy so nothing depends on the buffer's alignment.
class nl_request {
public:
    nl_request(uint16_t type, uint16_t flags) {
        len_ = NLMSG_HDRLEN;
        nlmsghdr h{};
        h.nlmsg_type = type;
        h.nlmsg_flags = uint16_t(flags | NLM_F_REQUEST);
        std::memcpy(buf_.data(), &h, sizeof h);
    }

    template <class T>
    void put_family_header(const T& t) { append(&t, sizeof t); }

    void attr(uint16_t type, const void* data, size_t len) {
        rtattr a{};
        a.rta_type = type;
        a.rta_len = uint16_t(RTA_LENGTH(len));
        append(&a, sizeof a);
        // append() pads to 4, and sizeof(rtattr) is 4: the payload starts at RTA_DATA.
        append(data, len);
    }
    void attr_u32(uint16_t type, uint32_t v) { attr(type, &v, sizeof v); }
    void attr_str(uint16_t type, std::string_view s) {
        std::string z(s);
        attr(type, z.c_str(), z.size() + 1);
    }
    size_t nest_begin(uint16_t type) {
        size_t at = len_;
        attr(type, nullptr, 0);
        return at;
    }
    void nest_end(size_t at) {
        uint16_t len = uint16_t(len_ - at);
        std::memcpy(buf_.data() + at + offsetof(rtattr, rta_len), &len, sizeof len);
    }

    // Sets length and sequence number; returns the bytes to send.
    std::span<const uint8_t> finish(uint32_t seq) {
        uint32_t len = uint32_t(len_);
        std::memcpy(buf_.data() + offsetof(nlmsghdr, nlmsg_len), &len, sizeof len);
        std::memcpy(buf_.data() + offsetof(nlmsghdr, nlmsg_seq), &seq, sizeof seq);
        return {buf_.data(), len_};
    }

private:
    void append(const void* p, size_t n) {
        // Every request is built from constants and checked names: overflowing is a bug.
        assert(len_ + NLMSG_ALIGN(n) <= buf_.size());
        if (n) std::memcpy(buf_.data() + len_, p, n);
        len_ += NLMSG_ALIGN(n);  // the padding is already zero
    }
    std::array<uint8_t, netlink_request_max> buf_{};
    size_t len_ = 0;
};

// Walks the rtattrs in a byte range, bounds-checked.
template <class F>
void for_each_attr(std::span<const uint8_t> b, F&& f) {
    while (b.size() >= sizeof(rtattr)) {
        rtattr a;
        std::memcpy(&a, b.data(), sizeof a);
        if (a.rta_len < sizeof(rtattr) || a.rta_len > b.size()) return;
        f(a.rta_type & NLA_TYPE_MASK, b.subspan(RTA_LENGTH(0), a.rta_len - RTA_LENGTH(0)));
        size_t step = RTA_ALIGN(a.rta_len);
        if (step >= b.size()) return;
        b = b.subspan(step);
    }
}

std::string attr_string(std::span<const uint8_t> v) {
    size_t n = 0;
    while (n < v.size() && v[n] != 0) ++n;
    return std::string(reinterpret_cast<const char*>(v.data()), n);
}

uint32_t attr_u32(std::span<const uint8_t> v) {
    uint32_t x = 0;
    if (v.size() >= sizeof x) std::memcpy(&x, v.data(), sizeof x);
    return x;
}

// One message of a reply: its type and its payload after the nlmsghdr.
using reply_fn = std::function<void(uint16_t type, std::span<const uint8_t> payload)>;

class nl_socket {
public:
    nl_socket() = default;
    nl_socket(const nl_socket&) = delete;
    nl_socket& operator=(const nl_socket&) = delete;
    ~nl_socket() {
        if (fd_ >= 0) ::close(fd_);
    }

    // Returns 0 or an errno.
    int open() {
        fd_ = ::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
        if (fd_ < 0) return errno;
        sockaddr_nl sa{};
        sa.nl_family = AF_NETLINK;
        if (::bind(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) < 0) return errno;
        // Extended ACKs carry the kernel's own explanation ("Invalid prefix for given
        // prefix length"); capped ACKs do not echo our request back. Both are best effort.
        int one = 1;
        (void)::setsockopt(fd_, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
        (void)::setsockopt(fd_, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
        seq_ = uint32_t(::getpid()) ^ 0x5a5a0000u;
        return 0;
    }

    // Sends req and reads until its ACK (or, for a dump, NLMSG_DONE). Every other message
    // with our sequence number goes to on_reply. Returns 0 or the errno the kernel gave;
    // ext_msg gets the extended-ACK text when the kernel sent one.
    int exchange(nl_request& req, const reply_fn& on_reply, std::string& ext_msg) {
        uint32_t seq = ++seq_;
        auto bytes = req.finish(seq);
        sockaddr_nl kernel{};
        kernel.nl_family = AF_NETLINK;
        ssize_t s = ::sendto(fd_, bytes.data(), bytes.size(), 0,
                             reinterpret_cast<sockaddr*>(&kernel), sizeof kernel);
        if (s < 0) return errno;
        if (size_t(s) != bytes.size()) return EMSGSIZE;

        std::vector<uint8_t> buf(netlink_recv_buffer);
        for (;;) {
            ssize_t n = ::recv(fd_, buf.data(), buf.size(), 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                return errno;
            }
            std::span<const uint8_t> rest(buf.data(), size_t(n));
            while (rest.size() >= NLMSG_HDRLEN) {
                nlmsghdr h;
                std::memcpy(&h, rest.data(), sizeof h);
                if (h.nlmsg_len < NLMSG_HDRLEN || h.nlmsg_len > rest.size()) return EBADMSG;
                auto payload = rest.subspan(NLMSG_HDRLEN, h.nlmsg_len - NLMSG_HDRLEN);
                size_t step = NLMSG_ALIGN(h.nlmsg_len);
                rest = step >= rest.size() ? std::span<const uint8_t>() : rest.subspan(step);
                if (h.nlmsg_seq != seq) continue;  // a stale reply to an earlier request
                if (h.nlmsg_type == NLMSG_ERROR) {
                    nlmsgerr e;
                    if (payload.size() < sizeof e) return EBADMSG;
                    std::memcpy(&e, payload.data(), sizeof e);
                    if (h.nlmsg_flags & NLM_F_ACK_TLVS) {
                        size_t off = sizeof e;
                        if (!(h.nlmsg_flags & NLM_F_CAPPED))
                            off += e.msg.nlmsg_len >= NLMSG_HDRLEN ? NLMSG_ALIGN(e.msg.nlmsg_len) - NLMSG_HDRLEN : 0;
                        if (off < payload.size()) {
                            for_each_attr(payload.subspan(off), [&](uint16_t t, auto v) {
                                if (t == NLMSGERR_ATTR_MSG) ext_msg = attr_string(v);
                            });
                        }
                    }
                    return -e.error;  // 0 is the ACK
                }
                if (h.nlmsg_type == NLMSG_DONE) {
                    int err = 0;
                    if (payload.size() >= sizeof err) std::memcpy(&err, payload.data(), sizeof err);
                    return err < 0 ? -err : 0;
                }
                // A GET's answer (the ACK we asked for follows it) or one part of a dump.
                if (on_reply) on_reply(h.nlmsg_type, payload);
            }
        }
    }

private:
    int fd_ = -1;
    uint32_t seq_ = 0;
};

// Formats "<what>: <errno text>" plus the kernel's extended-ACK text when there is one.
std::string fail(std::string what, int e, const std::string& ext) {
    what += ": ";
    what += errno_text(e);
    if (!ext.empty()) {
        what += " (";
        what += ext;
        what += ")";
    }
    return what;
}

// What RTM_GETLINK tells us beyond link_info: the kind (macvlan, veth, ...) and the parent.
struct raw_link {
    int ifindex = 0;
    unsigned flags = 0;
    std::string name;
    mac_address mac{};
    std::string kind;
    int parent = 0;  // IFLA_LINK
};

void parse_link(std::span<const uint8_t> payload, raw_link& out) {
    ifinfomsg ifi;
    if (payload.size() < sizeof ifi) return;
    std::memcpy(&ifi, payload.data(), sizeof ifi);
    out.ifindex = ifi.ifi_index;
    out.flags = ifi.ifi_flags;
    for_each_attr(payload.subspan(NLMSG_ALIGN(sizeof ifi)), [&](uint16_t t, auto v) {
        switch (t) {
        case IFLA_IFNAME: out.name = attr_string(v); break;
        case IFLA_ADDRESS:
            if (v.size() == out.mac.size()) std::memcpy(out.mac.data(), v.data(), v.size());
            break;
        case IFLA_LINK: out.parent = int(attr_u32(v)); break;
        case IFLA_LINKINFO:
            for_each_attr(v, [&](uint16_t t2, auto v2) {
                if (t2 == IFLA_INFO_KIND) out.kind = attr_string(v2);
            });
            break;
        default: break;
        }
    });
}

// RTM_GETLINK by name. Returns 0 (found) or an errno (ENODEV: no such interface).
int get_link(nl_socket& nl, std::string_view ifname, raw_link& out, std::string& ext) {
    nl_request req(RTM_GETLINK, NLM_F_ACK);
    ifinfomsg ifi{};
    ifi.ifi_family = AF_UNSPEC;
    req.put_family_header(ifi);
    req.attr_str(IFLA_IFNAME, ifname);
    bool seen = false;
    int e = nl.exchange(req, [&](uint16_t type, std::span<const uint8_t> p) {
        if (type == RTM_NEWLINK) {
            parse_link(p, out);
            seen = true;
        }
    }, ext);
    if (e == 0 && !seen) return ENODEV;
    return e;
}

bool check_name(std::string_view ifname, std::string& err) {
    if (ifname.empty() || ifname.size() >= IFNAMSIZ) {
        err = "interface name '" + std::string(ifname) + "' is empty or longer than " +
              std::to_string(IFNAMSIZ - 1) + " characters";
        return false;
    }
    return true;
}

bool open_socket(nl_socket& nl, std::string& err) {
    int e = nl.open();
    if (e != 0) {
        err = fail("opening a NETLINK_ROUTE socket", e, "");
        return false;
    }
    return true;
}

// One IPv4 address request (RTM_NEWADDR / RTM_DELADDR) for ifindex.
nl_request address_request(uint16_t type, uint16_t flags, int ifindex, const virtual_address& va,
                           uint32_t lifetime_s = 0) {
    nl_request req(type, uint16_t(flags | NLM_F_ACK));
    ifaddrmsg ifa{};
    ifa.ifa_family = AF_INET;
    ifa.ifa_prefixlen = va.prefix;
    ifa.ifa_scope = RT_SCOPE_UNIVERSE;
    ifa.ifa_index = uint32_t(ifindex);
    req.put_family_header(ifa);
    req.attr(IFA_LOCAL, va.address.bytes.data(), 4);
    req.attr(IFA_ADDRESS, va.address.bytes.data(), 4);
    if (type == RTM_NEWADDR && va.prefix < 31) {
        // `ip addr add ... brd +`: host part all ones. /31 and /32 have no broadcast.
        uint32_t a;
        std::memcpy(&a, va.address.bytes.data(), 4);
        uint32_t mask = va.prefix == 0 ? 0 : htonl(~uint32_t(0) << (32 - va.prefix));
        uint32_t brd = a | ~mask;
        req.attr(IFA_BROADCAST, &brd, 4);
    }
    if (type == RTM_NEWADDR && lifetime_s) {
        // A finite lifetime: the kernel deletes the address by itself unless it is renewed,
        // so a ternd killed as master does not leave it answering ARP.
        ifa_cacheinfo ci{};
        ci.ifa_prefered = lifetime_s;
        ci.ifa_valid = lifetime_s;
        req.attr(IFA_CACHEINFO, &ci, sizeof ci);
    }
    return req;
}

bool valid_address(const virtual_address& va, const std::string& ifname, std::string& err) {
    if (va.address.family != ip_family::ipv4) {
        err = "address " + to_text(va.address) + " on " + ifname +
              ": only IPv4 virtual addresses are supported";
        return false;
    }
    if (va.prefix > 32) {
        err = "address " + to_text(va.address) + "/" + std::to_string(va.prefix) + " on " +
              ifname + ": prefix longer than 32";
        return false;
    }
    return true;
}

int set_link_up(nl_socket& nl, int ifindex, std::string& ext) {
    nl_request req(RTM_NEWLINK, NLM_F_ACK);
    ifinfomsg ifi{};
    ifi.ifi_family = AF_UNSPEC;
    ifi.ifi_index = ifindex;
    ifi.ifi_flags = IFF_UP;
    ifi.ifi_change = IFF_UP;
    req.put_family_header(ifi);
    return nl.exchange(req, nullptr, ext);
}

bool write_sysctl(const std::string& ifname, const char* key, const char* value,
                  std::string& err) {
    // /proc/sys/net belongs to the network namespace of the opener, and the interface name is
    // used as is (dots included; only sysctl(8) rewrites dots).
    std::string path = "/proc/sys/net/ipv4/conf/" + ifname + "/" + key;
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        err = fail("opening " + path, errno, "");
        return false;
    }
    size_t len = std::strlen(value);
    ssize_t n = ::write(fd, value, len);
    int e = errno;
    ::close(fd);
    if (n != ssize_t(len)) {
        err = fail("writing " + std::string(value) + " to " + path, n < 0 ? e : EIO, "");
        return false;
    }
    return true;
}

}  // namespace

std::optional<link_info> query_link(std::string_view ifname, std::string& err) {
    if (!check_name(ifname, err)) return std::nullopt;
    nl_socket nl;
    if (!open_socket(nl, err)) return std::nullopt;
    raw_link raw;
    std::string ext;
    int e = get_link(nl, ifname, raw, ext);
    if (e != 0) {
        err = fail("looking up interface " + std::string(ifname), e, ext);
        return std::nullopt;
    }
    link_info out;
    out.ifindex = raw.ifindex;
    out.name = raw.name;
    out.mac = raw.mac;
    out.up = (raw.flags & IFF_UP) != 0;

    nl_request req(RTM_GETADDR, NLM_F_DUMP);
    ifaddrmsg ifa{};
    ifa.ifa_family = AF_INET;
    req.put_family_header(ifa);
    std::vector<ip_address> secondaries;
    e = nl.exchange(req, [&](uint16_t type, std::span<const uint8_t> p) {
        ifaddrmsg m;
        if (type != RTM_NEWADDR || p.size() < sizeof m) return;
        std::memcpy(&m, p.data(), sizeof m);
        if (m.ifa_family != AF_INET || int(m.ifa_index) != out.ifindex) return;
        uint32_t flags = m.ifa_flags;
        std::optional<ip_address> local, address;
        for_each_attr(p.subspan(NLMSG_ALIGN(sizeof m)), [&](uint16_t t, auto v) {
            if (v.size() != 4 && t != IFA_FLAGS) return;
            ip_address a = ip_address::v4(v[0], v[1], v[2], v[3]);
            if (t == IFA_LOCAL) local = a;
            else if (t == IFA_ADDRESS) address = a;
            else if (t == IFA_FLAGS) flags = attr_u32(v);
        });
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on a
        // point-to-point link and equal to IFA_LOCAL otherwise.
        auto a = local ? local : address;
        if (!a) return;
        (flags & IFA_F_SECONDARY ? secondaries : out.ipv4).push_back(*a);
    }, ext);
    if (e != 0) {
        err = fail("listing the IPv4 addresses of " + std::string(ifname), e, ext);
        return std::nullopt;
    }
    out.ipv4.insert(out.ipv4.end(), secondaries.begin(), secondaries.end());
    return out;
}

netlink_addresses::netlink_addresses(int ifindex, std::string ifname)
    : ifindex_(ifindex), ifname_(std::move(ifname)) {}

bool netlink_addresses::add(std::span<const virtual_address> addresses) {
    nl_socket nl;
    if (!open_socket(nl, error_)) return false;
    for (const auto& va : addresses) {
        if (!valid_address(va, ifname_, error_)) return false;
        auto req = address_request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, ifindex_, va, lifetime_s_);
        std::string ext;
        int e = nl.exchange(req, nullptr, ext);
        if (e != 0 && e != EEXIST) {
            error_ = fail("adding " + to_text(va.address) + "/" + std::to_string(va.prefix) +
                              " to " + ifname_ + " (ifindex " + std::to_string(ifindex_) + ")",
                          e, ext);
            return false;
        }
    }
    return true;
}

bool netlink_addresses::remove(std::span<const virtual_address> addresses) {
    nl_socket nl;
    if (!open_socket(nl, error_)) return false;
    bool ok = true;
    for (const auto& va : addresses) {
        std::string err;
        if (!valid_address(va, ifname_, err)) {
            if (ok) error_ = err;
            ok = false;
            continue;
        }
        auto req = address_request(RTM_DELADDR, 0, ifindex_, va);
        std::string ext;
        int e = nl.exchange(req, nullptr, ext);
        if (e != 0 && e != EADDRNOTAVAIL && e != ENOENT) {
            if (ok) {
                error_ = fail("removing " + to_text(va.address) + "/" +
                                  std::to_string(va.prefix) + " from " + ifname_ +
                                  " (ifindex " + std::to_string(ifindex_) + ")",
                              e, ext);
            }
            ok = false;
        }
    }
    return ok;
}

std::string vmac_name(uint8_t vrid) { return "vrrp." + std::to_string(vrid); }

bool create_vmac(const link_info& parent, uint8_t vrid, std::string& name_out, int& ifindex_out,
                 std::string& err) {
    const std::string name = vmac_name(vrid);
    const mac_address vmac = virtual_mac_v4(vrid);
    if (vrid == 0) {
        err = "vmac: VRID 0 is not a valid virtual router";
        return false;
    }
    nl_socket nl;
    if (!open_socket(nl, err)) return false;

    raw_link existing;
    std::string ext;
    int e = get_link(nl, name, existing, ext);
    bool create = true;
    if (e == 0) {
        if (existing.kind != "macvlan") {
            err = "vmac: interface " + name + " exists and is not a macvlan (kind '" +
                  existing.kind + "'); not touching it";
            return false;
        }
        if (existing.mac == vmac && existing.parent == parent.ifindex) {
            create = false;  // left by an earlier run: reuse
        } else {
            // keepalived does the same: a stale vmac with the wrong MAC or parent goes.
            if (!delete_link(existing.ifindex, err)) return false;
        }
    } else if (e != ENODEV) {
        err = fail("vmac: looking up " + name, e, ext);
        return false;
    }

    if (create) {
        nl_request req(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        ifinfomsg ifi{};
        ifi.ifi_family = AF_UNSPEC;
        req.put_family_header(ifi);
        req.attr_u32(IFLA_LINK, uint32_t(parent.ifindex));
        req.attr_str(IFLA_IFNAME, name);
        req.attr(IFLA_ADDRESS, vmac.data(), vmac.size());
        size_t info = req.nest_begin(IFLA_LINKINFO);
        req.attr(IFLA_INFO_KIND, "macvlan", 7);
        size_t data = req.nest_begin(IFLA_INFO_DATA);
        req.attr_u32(IFLA_MACVLAN_MODE, MACVLAN_MODE_PRIVATE);
        req.nest_end(data);
        req.nest_end(info);
        ext.clear();
        e = nl.exchange(req, nullptr, ext);
        if (e != 0) {
            err = fail("vmac: creating macvlan " + name + " on " + parent.name, e, ext);
            return false;
        }
    }

    raw_link made;
    ext.clear();
    e = get_link(nl, name, made, ext);
    if (e != 0) {
        err = fail("vmac: looking up " + name + " after creating it", e, ext);
        return false;
    }

    // The sysctls go in before the link comes up, so it never answers ARP the wrong way.
    static constexpr struct {
        bool on_parent;
        const char* key;
        const char* value;
    } sysctls[] = {
        {false, "arp_ignore", "1"},   {false, "arp_announce", "2"},
        {false, "accept_local", "1"}, {false, "rp_filter", "0"},
        {true, "arp_ignore", "1"},    {true, "arp_filter", "1"},
        {true, "arp_announce", "2"},
    };
    for (const auto& s : sysctls) {
        if (!write_sysctl(s.on_parent ? parent.name : name, s.key, s.value, err)) return false;
    }

    ext.clear();
    e = set_link_up(nl, made.ifindex, ext);
    if (e != 0) {
        err = fail("vmac: setting " + name + " up", e, ext);
        return false;
    }
    name_out = name;
    ifindex_out = made.ifindex;
    return true;
}

bool delete_link(int ifindex, std::string& err) {
    nl_socket nl;
    if (!open_socket(nl, err)) return false;
    nl_request req(RTM_DELLINK, NLM_F_ACK);
    ifinfomsg ifi{};
    ifi.ifi_family = AF_UNSPEC;
    ifi.ifi_index = ifindex;
    req.put_family_header(ifi);
    std::string ext;
    int e = nl.exchange(req, nullptr, ext);
    if (e != 0 && e != ENODEV) {
        err = fail("deleting interface with ifindex " + std::to_string(ifindex), e, ext);
        return false;
    }
    return true;
}

}  // namespace tern::ha
