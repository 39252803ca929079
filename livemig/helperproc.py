"""A helper process of livemig's (the urgent postcopy paths): started with a control socket,
given file descriptors over it, ended by the parent; it dies with its parent.

Control messages: a 4-byte little-endian length, then JSON; file descriptors ride with the length.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Callable

from .threadname import NamedThread

_LEN = struct.Struct("<I")
PR_SET_PDEATHSIG = 1
MAX_FDS = 8


def send_msg(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    head = _LEN.pack(len(data))
    if fds:
        socket.send_fds(sock, [head], fds)
        sock.sendall(data)
    else:
        sock.sendall(head + data)


def recv_msg(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """One message and the descriptors sent with it; (None, []) when the peer has gone."""
    head, fds = b"", []
    while len(head) < 4:
        part, got, _, _ = socket.recv_fds(sock, 4 - len(head), MAX_FDS)
        fds += got
        if not part:
            return None, fds
        head += part
    (n,) = _LEN.unpack(head)
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            return None, fds
        data += part
    return json.loads(data), fds


class HelperProcess:
    """Parent side: `python3 -m <module> <control fd>`, and its control socket."""

    def __init__(self, module: str):
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", module, str(child.fileno())],
                                         pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.send_lock = threading.Lock()

    def send(self, obj: dict, fds: list[int] | None = None) -> None:
        with self.send_lock:
            send_msg(self.ctl, obj, fds)

    def wait(self) -> dict:
        """Block until the process ends: its last message ({"op": "done", ...} or {"op": "error",
        "error": ...}), or an error if it died without one."""
        while True:
            try:
                msg, fds = recv_msg(self.ctl)
            except OSError as e:
                return {"op": "error", "error": f"helper process: {e}"}
            for fd in fds:
                os.close(fd)
            if msg is None:
                return {"op": "error", "error": f"helper process exited ({self.proc.poll()}) without a report"}
            if msg.get("op") in ("done", "error"):
                return msg

    def close(self) -> None:
        """Tell it to end (it exits when the control socket closes) and reap it on a thread of its
        own: the migration's completion does not wait for a process to exit."""
        try:
            self.ctl.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ctl.close()
        NamedThread(target=self._reap, name="mig/urgent-reap", daemon=True).start()

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def child_main(argv: list[str], name: str, serve: Callable[[socket.socket], dict]) -> None:
    """The process's entry: die with the parent, run `serve`, send what it returns as the last
    message."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    ctl = socket.socket(fileno=int(argv[1]))
    if os.getppid() == 1:
        return  # the parent died before the death signal was set
    from .threadname import set_thread_name
    set_thread_name(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in a terminal: the parent decides
    result = serve(ctl)
    try:
        send_msg(ctl, result)
    except OSError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: nothing is left to do, and it takes tens of ms
