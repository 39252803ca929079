"""System calls made without releasing the GIL, for the remote-fault path.

A thread of the request path (fault, preempt, return) wakes with one page to handle. Every call
that releases the GIL on the way (a socket send, an ioctl, ctypes.memmove) lets a busy thread of
the same process (the loader, the background push) take it, and getting it back waits until
that thread blocks or is made to yield. For calls that cannot block and take microseconds, this
module keeps the GIL instead. Never use them for a call that may block, or on guest memory that
may not be there yet (the GIL would be held across a page fault).
"""
from __future__ import annotations

import ctypes
import errno
import socket

_py = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held across the call

_ioctl = _py.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int
_read = _py.read
_read.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_read.restype = ctypes.c_ssize_t
_send = _py.send
_send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_send.restype = ctypes.c_ssize_t
_pwrite = _py.pwrite
_pwrite.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long)
_pwrite.restype = ctypes.c_ssize_t

memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes._memmove_addr)  # type: ignore[attr-defined]


_addresses: dict[int, tuple[bytearray, object, int]] = {}  # id(buffer) -> (it, its export, address)
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)  # an int: IntFlag's | costs µs a call


def buffer_address(buf: bytearray) -> int:
    """Address of `buf`, remembered (the request path asks for the same few buffers at every
    fault). The remembered export pins the buffer: it cannot be resized, so the address holds."""
    hit = _addresses.get(id(buf))
    if hit is not None and hit[0] is buf:
        return hit[2]
    if len(_addresses) >= 64:  # transient buffers: forget them all now and then
        _addresses.clear()
    c = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(c)
    _addresses[id(buf)] = (buf, c, addr)
    return addr


def ioctl(fd: int, request: int, arg_addr: int) -> int:
    """ioctl(2) on a small argument at `arg_addr`: 0 or more, else -errno."""
    r = _ioctl(fd, request, arg_addr)
    return r if r >= 0 else -ctypes.get_errno()


def read_nowait(fd: int, buf: bytearray) -> int:
    """read(2) of a non-blocking fd into `buf`: bytes read, or -errno (-EAGAIN: nothing there)."""
    r = _read(fd, buffer_address(buf), len(buf))
    return r if r >= 0 else -ctypes.get_errno()


def pwrite(fd: int, src: int, length: int, offset: int) -> int:
    """pwrite(2) from address `src`: bytes written, or -errno."""
    r = _pwrite(fd, src, length, offset)
    return r if r >= 0 else -ctypes.get_errno()


def send_some(sock: socket.socket, data: bytes | bytearray) -> int:
    """send(2) with MSG_DONTWAIT: how many bytes of `data` went (0 if the socket has no room);
    OSError on a broken connection. The caller sends the rest the ordinary way. A bytearray
    should be a long-lived one (its address is remembered, see buffer_address)."""
    ptr = buffer_address(data) if type(data) is bytearray else data
    r = _send(sock.fileno(), ptr, len(data), _SEND_FLAGS)
    if r >= 0:
        return r
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
        return 0
    raise OSError(err, errno.errorcode.get(err, str(err)))
