"""A small synchronous QMP client for the CLI (tests use the official qemu.qmp library)."""
from __future__ import annotations

import json
import socket
import time
from typing import Any

from .errors import MigrationError


class QMPClientError(MigrationError):
    def __init__(self, klass: str, desc: str):
        super().__init__(f"{klass}: {desc}")
        self.klass, self.desc = klass, desc


class QMPClient:
    def __init__(self, address: str, timeout: float = 30.0):
        self.events: list[dict] = []
        self._buf = b""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = self._connect(address)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise MigrationError(f"cannot connect to QMP at {address}: {e.strerror or e}") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        greeting = self._read()
        if "QMP" not in greeting:
            raise MigrationError(f"{address} did not greet like a QMP server")
        self.greeting = greeting["QMP"]
        self.cmd("qmp_capabilities")

    @staticmethod
    def _connect(address: str) -> socket.socket:
        if address.startswith("tcp:"):
            host, _, port = address[4:].partition(",")[0].rpartition(":")
            return socket.create_connection((host, int(port)))
        path = address[5:] if address.startswith("unix:") else address
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path.split(",")[0])
        except OSError:
            s.close()
            raise
        return s

    def _read(self) -> dict:
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise MigrationError("QMP connection closed")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPClientError(reply["error"].get("class", "GenericError"), reply["error"].get("desc", ""))
            return reply.get("return")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
