"""The client end of a `--serial unix:PATH,server=on` console: a copy of what the guest prints goes
to a file (read it to follow the console) and text can be typed into the guest."""
from __future__ import annotations

import socket
import time
from pathlib import Path

from .threadname import NamedThread


class ConsoleClient:
    def __init__(self, sock_path: str | Path, copy_to: str | Path, timeout: float = 30) -> None:
        """Connect (retrying until `timeout` while the VM creates the socket) and start copying."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(sock_path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"console {sock_path} does not accept connections") from None
                time.sleep(0.05)
        self._out = open(copy_to, "ab", buffering=0)
        self._thread = NamedThread(target=self._copy, name="console-copy", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            while data := self.sock.recv(65536):
                self._out.write(data)
        except OSError:
            pass

    def type(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)
        self._out.close()
