"""PROXY protocol on a listener, byte-exact (haproxy doc/proxy-protocol.txt): the banner
comes only after the whole header; bad, late or untrusted headers get no SMTP at all."""
import socket
import struct
import time

import pytest

from conftest import free_port, recv_reply

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(cmd, fam, body):
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack("!H", len(body)) + body


def v4_block(src, dst, sport, dport):
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def start_proxied(factory, timeout):
    port = free_port()
    t = factory(listens=[{"address": f"127.0.0.1:{port}", "proxy_protocol": True,
                          "trusted_proxies": ["127.0.0.0/8"], "proxy_timeout": timeout}],
                networks=["198.18.0.0/15"])
    t.port = port
    return t.start()


@pytest.fixture
def proxied(ternd_factory):
    return start_proxied(ternd_factory, 10)


def read_all(s, timeout=3):
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            c = s.recv(4096)
            if not c:
                return data, True
            data += c
    except socket.timeout:
        return data, False
    except ConnectionResetError:  # closed with our bytes unread: still "closed, no SMTP"
        return data, True


def send_message(s):
    s.sendall(b"EHLO proxied.test\r\n")
    assert recv_reply(s).startswith(b"250-relay.test")
    s.sendall(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    r = recv_reply(s)
    assert r.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"), r
    s.sendall(b"Subject: p\r\n\r\nx\r\n.\r\nQUIT\r\n")
    return recv_reply(s)


def test_v1_header_byte_by_byte_banner_only_after_it(proxied):
    hdr = b"PROXY TCP4 198.18.7.7 198.18.0.1 40000 25\r\n"
    with socket.create_connection(("127.0.0.1", proxied.port)) as s:
        for i in range(len(hdr)):
            s.sendall(hdr[i:i + 1])
            time.sleep(0.005)
            s.settimeout(0.02)
            try:
                early = s.recv(100)
            except socket.timeout:
                early = b""
            if i < len(hdr) - 1:
                assert early == b"", f"server spoke after {i + 1} of {len(hdr)} header bytes"
        banner = early or recv_reply(s)
        assert banner == b"220 relay.test ESMTP tern\r\n"
        out = send_message(s)
        assert b"250 2.0.0 Ok: queued as" in out
    q = proxied.spool_list()
    assert len(q) == 1
    m = proxied.spool_dump(q[0]["id"])
    assert m["client"] == "198.18.7.7" and m["client_port"] == 40000 and m["peer"] == "127.0.0.1"
    assert m["content"].startswith("Received: from [198.18.7.7] (helo=proxied.test)\r\n")
    assert proxied.wait_log("client=unknown[198.18.7.7], proxy=[127.0.0.1]"), proxied.log()[-3000:]


def test_v2_with_tlvs_and_crc(proxied):
    body = v4_block("198.18.1.2", "198.18.0.1", 1234, 25)
    body += b"\x02" + struct.pack("!H", 8) + b"mx.local"   # AUTHORITY
    crc_at = 16 + len(body) + 3
    body += b"\x03\x00\x04\x00\x00\x00\x00"                # CRC32C, patched below
    hdr = bytearray(v2(1, 0x11, body))
    # CRC32C (Castagnoli) of the whole header with the checksum zeroed
    crc = 0xFFFFFFFF
    for byte in hdr:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    hdr[crc_at:crc_at + 4] = struct.pack("!I", crc)
    with socket.create_connection(("127.0.0.1", proxied.port)) as s:
        s.sendall(bytes(hdr))
        assert recv_reply(s) == b"220 relay.test ESMTP tern\r\n"
        assert b"queued as" in send_message(s)
    assert proxied.spool_dump(proxied.spool_list()[0]["id"])["client"] == "198.18.1.2"
    # The same header with one bit flipped in the address: closed, no banner.
    hdr[17] ^= 1
    with socket.create_connection(("127.0.0.1", proxied.port)) as s:
        s.sendall(bytes(hdr))
        data, closed = read_all(s)
        assert data == b"" and closed
    assert proxied.wait_log("PROXY v2: CRC32C mismatch"), proxied.log()[-3000:]


def test_v2_local_health_check_uses_socket_address(proxied):
    with socket.create_connection(("127.0.0.1", proxied.port)) as s:
        s.sendall(v2(0, 0x00, b""))
        assert recv_reply(s) == b"220 relay.test ESMTP tern\r\n"
        s.sendall(b"EHLO check\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
        out = recv_reply(s)
        # LOCAL: the client is the proxy itself (127.0.0.1), outside the relay networks.
        assert b"554 5.7.1 <c@d.test>: Relay access denied" in out
        s.sendall(b"QUIT\r\n")
        assert recv_reply(s) == b"221 2.0.0 Bye\r\n"


@pytest.mark.parametrize("garbage", [
    b"EHLO i.forgot.the.header\r\n",
    b"PROXY TCP4 198.18.0.1 198.18.0.2 1 2\n",                   # bare LF
    b"PROXY UNKNOWN " + b"x" * 120,                              # longer than 107
    SIG + bytes([0x21, 0x11]) + struct.pack("!H", 60000),       # over the v2 cap
    SIG + bytes([0x21, 0x12]) + struct.pack("!H", 12) + b"\0" * 12,  # UDP
])
def test_bad_headers_get_no_smtp(proxied, garbage):
    with socket.create_connection(("127.0.0.1", proxied.port)) as s:
        s.sendall(garbage)
        data, closed = read_all(s)
        assert data == b"" and closed
    assert proxied.spool_list() == []


def test_header_timeout(ternd_factory):
    proxied = start_proxied(ternd_factory, 1)
    with socket.create_connection(("127.0.0.1", proxied.port)) as s:
        s.sendall(b"PROXY TCP4 198.18.0.1")  # and then nothing
        t0 = time.time()
        data, closed = read_all(s, timeout=5)
        assert data == b"" and closed
        assert time.time() - t0 < 4.5
    assert proxied.wait_log("no complete PROXY header"), proxied.log()[-3000:]


def test_untrusted_source_is_closed_before_smtp(ternd_factory):
    port = free_port()
    t = ternd_factory(listens=[{"address": f"127.0.0.1:{port}", "proxy_protocol": True,
                                "trusted_proxies": ["198.18.0.0/15"]}]).start()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"PROXY TCP4 198.18.0.1 198.18.0.2 1 2\r\n")
        data, closed = read_all(s)
        assert data == b"" and closed
    assert t.wait_log("not in trusted_proxies"), t.log()[-3000:]


def test_plain_listener_never_parses_proxy(ternd):
    # Without proxy_protocol a PROXY line is just an unknown command: no auto-detection.
    with socket.create_connection(("127.0.0.1", ternd.port)) as s:
        assert recv_reply(s).startswith(b"220 ")
        s.sendall(b"PROXY TCP4 198.18.0.1 198.18.0.2 1 2\r\n")
        assert recv_reply(s) == b"500 5.5.2 Error: command not recognized\r\n"
