"""haproxy 2.6 (Debian) in front of ternd with send-proxy-v2 and SMTP health checks."""
import shutil
import smtplib
import socket
import subprocess
import time

import pytest

from conftest import free_port

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")


def test_haproxy_send_proxy_v2_and_smtpchk(ternd_factory, tmp_path):
    tern_port, front_port = free_port(), free_port()
    t = ternd_factory(shards=2, listens=[{"address": f"127.0.0.1:{tern_port}", "proxy_protocol": True,
                                           "trusted_proxies": ["127.0.0.3/32"]}],
                      networks=["127.0.0.2/32"]).start()
    stats = tmp_path / "haproxy.sock"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind 127.0.0.1:{front_port}
    default_backend tern
backend tern
    option smtpchk EHLO haproxy.test
    source 127.0.0.3
    server t1 127.0.0.1:{tern_port} send-proxy-v2 check check-send-proxy inter 200ms rise 1
""")
    hp = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Wait until haproxy's SMTP check (through PROXY v2) sees the server UP.
        deadline, status = time.time() + 10, ""
        while time.time() < deadline:
            if stats.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(stats))
                    s.sendall(b"show stat\n")
                    status = b"".join(iter(lambda: s.recv(65536), b"")).decode()
                if ",t1," in status and ",UP," in status:
                    break
            time.sleep(0.1)
        assert ",UP," in status, status
        # A client on 127.0.0.2: only the PROXY header can tell ternd who it is, and only
        # 127.0.0.2 may relay, so a queued message proves the header was used.
        with smtplib.SMTP("127.0.0.1", front_port, source_address=("127.0.0.2", 0)) as c:
            c.sendmail("a@example.org", ["b@example.net"], b"Subject: via haproxy\r\n\r\nhi\r\n")
        q = t.spool_list()
        assert len(q) == 1
        m = t.spool_dump(q[0]["id"])
        assert m["client"] == "127.0.0.2" and m["peer"] == "127.0.0.3"
        assert t.wait_log("proxy=[127.0.0.3]"), t.log()[-3000:]
    finally:
        hp.terminate()
        hp.wait(10)
