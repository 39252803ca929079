"""ConsoleClient against a plain unix-socket server standing in for a VM's console."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from livemig.console_client import ConsoleClient


def test_copies_output_and_types(tmp_path):
    path = tmp_path / "con.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    got = bytearray()

    def serve() -> None:
        srv.bind(str(path))
        srv.listen(1)
        conn, _ = srv.accept()
        conn.sendall(b"login: ")
        while b"\n" not in got:
            got.extend(conn.recv(100))
        conn.sendall(b"answer\n")
        conn.close()

    t = threading.Thread(target=serve)
    t.start()  # the client retries until the socket exists
    log = tmp_path / "console.log"
    c = ConsoleClient(path, log)
    c.type("echo hi\n")
    t.join(timeout=10)
    deadline = time.monotonic() + 10
    while log.read_bytes() != b"login: answer\n":
        assert time.monotonic() < deadline, log.read_bytes()
        time.sleep(0.01)
    assert bytes(got) == b"echo hi\n"
    c.close()
    srv.close()


def test_no_server_is_a_clear_timeout(tmp_path):
    with pytest.raises(TimeoutError, match="does not accept"):
        ConsoleClient(tmp_path / "missing.sock", tmp_path / "log", timeout=0.2)
