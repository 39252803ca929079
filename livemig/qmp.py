"""A QMP (QEMU Machine Protocol) server, shaped exactly like QEMU's monitor.

The framework handles the wire protocol: the greeting, capabilities
negotiation, request validation, argument checking, error replies, events and
out-of-band execution.  The machine-specific commands are registered by other
modules through :meth:`QMPServer.register`.

It speaks the protocol described in QEMU's ``docs/interop/qmp-spec.rst`` and
mirrors the wording of QEMU's own errors (``qapi/qmp-dispatch.c``,
``monitor/qmp.c``, ``qapi/qobject-input-visitor.c``, ``qobject/json-streamer.c``)
so that clients written for QEMU, in particular the ``qemu.qmp`` library,
drive it unmodified.

Threading model (per client connection):

* a reader thread parses the incoming byte stream with a streaming JSON
  splitter (qmp_json.py: no newline framing needed, input bounded);
* a worker thread runs in-band commands one by one; every in-band handler of
  every client runs under :attr:`QMPServer.lock` (the equivalent of QEMU's big
  QEMU lock), so handlers never run concurrently;
* a writer thread sends replies and events, each written whole.

Out-of-band commands (``exec-oob``, only for commands registered with
``allow_oob=True`` and only once the client enabled the ``oob`` capability)
run at once on the reader thread, *without* the lock, like QEMU's OOB
commands, so they can overtake a long-running in-band command.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import queue
import select
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .qmp_json import MAX_REQUEST_SIZE, JSONSplitter
from .threadname import NamedThread

__all__ = ["QMPError", "AfterReply", "QMPServer"]

log = logging.getLogger(__name__)

#: Unsent output (bytes) allowed to pile up for a client that does not read;
#: beyond it the client is disconnected rather than letting memory grow.
MAX_OUTPUT_BACKLOG = 16 << 20
#: In-band requests queued per client before the server stops reading from it
#: (QEMU's QMP_REQ_QUEUE_LEN_MAX).
MAX_QUEUED_REQUESTS = 8
#: How long a reply preceding an AfterReply callback may take to be sent.
AFTER_REPLY_FLUSH_TIMEOUT = 5.0

_ARG_TYPES: dict[str, str] = {
    # our type name -> the name QEMU's input visitor uses in its errors
    "str": "string",
    "int": "integer",
    "number": "number",
    "bool": "boolean",
    "list": "array",
    "dict": "object",
    "any": "any",
}

_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1  # QEMU accepts int64 and uint64 literals


def _type_ok(typ: str, value: Any) -> bool:
    if typ == "any":
        return True
    if typ == "str":
        return isinstance(value, str)
    if typ == "bool":
        return isinstance(value, bool)
    if typ == "int":
        return (isinstance(value, int) and not isinstance(value, bool)
                and _INT_MIN <= value <= _INT_MAX)
    if typ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ == "list":
        return isinstance(value, list)
    if typ == "dict":
        return isinstance(value, dict)
    raise AssertionError(typ)


class QMPError(Exception):
    """Raised by a command handler to send ``{"error": {"class", "desc"}}``."""

    def __init__(self, desc: str, klass: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.klass = klass

    def to_json(self) -> dict:
        return {"class": self.klass, "desc": self.desc}


class AfterReply:
    """A handler result: reply with ``value``, then call ``callback()``.

    The callback runs after the reply has been written to the client (or the
    client is gone, or a few seconds passed), on the server's thread, outside
    the command lock.  Used for ``quit``.
    """

    def __init__(self, value: Any, callback: Callable[[], Any]):
        if not callable(callback):
            raise TypeError("AfterReply callback must be callable")
        self.value = value
        self.callback = callback


@dataclass
class _Command:
    name: str
    handler: Callable[..., Any]
    args: dict[str, tuple[str, bool]]
    allow_oob: bool
    builtin: bool = False


# --------------------------------------------------------------------------
# Address parsing

_IGNORED_OPTIONS = {"server", "server=on", "nowait", "wait=off", "wait=on"}


def _split_options(spec: str) -> tuple[str, list[str]]:
    """Split QEMU-style 'value,opt,opt' where ',,' escapes a comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == ",":
            if i + 1 < len(spec) and spec[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts[0], parts[1:]


def _parse_address(address: str) -> tuple[str, Any]:
    if not isinstance(address, str):
        raise TypeError("QMP address must be a string")
    main, options = _split_options(address)
    for opt in options:
        if opt.strip() not in _IGNORED_OPTIONS:
            raise ValueError(f"unsupported QMP address option {opt!r} in {address!r}")
    if main.startswith("unix:"):
        path = main[len("unix:"):]
        if not path:
            raise ValueError(f"QMP address {address!r} has an empty socket path")
        return "unix", path
    if main.startswith("tcp:"):
        rest = main[len("tcp:"):]
        host, sep, port_s = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"QMP address {address!r} must be tcp:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_s, 10)
        except ValueError:
            raise ValueError(f"QMP address {address!r} has a bad port {port_s!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"QMP address {address!r} has a port out of range")
        return "tcp", (host, port)
    raise ValueError(f"QMP address {address!r} must start with 'unix:' or 'tcp:'")


def _loopback_sockaddr(host: str, port: int) -> tuple[int, tuple]:
    """Resolve HOST (which must be loopback) to (family, sockaddr)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if not ip.is_loopback:
            raise ValueError(f"QMP tcp address must be a loopback address, not {host!r}")
        if ip.version == 4:
            return socket.AF_INET, (str(ip), port)
        return socket.AF_INET6, (str(ip), port, 0, 0)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve QMP tcp host {host!r}: {exc}") from None
    if not infos:
        raise ValueError(f"cannot resolve QMP tcp host {host!r}")
    for info in infos:
        if not ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback:
            raise ValueError(f"QMP tcp host {host!r} does not resolve to loopback only")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


# --------------------------------------------------------------------------
# Per-client connection


class _Client:
    def __init__(self, server: "QMPServer", sock: socket.socket, label: str):
        self.server = server
        self.sock = sock
        self.label = label
        self.negotiated = False
        self.oob = False
        self._cond = threading.Condition()
        self._out: collections.deque[tuple[bytes, threading.Event | None]] = collections.deque()
        self._out_bytes = 0
        self.closed = False
        self._inq: queue.Queue = queue.Queue(maxsize=MAX_QUEUED_REQUESTS)
        self._sock_users = 2          # reader + writer; the last one closes the fd
        self._sock_lock = threading.Lock()
        self.splitter = JSONSplitter(server.max_request_size)

    def start(self) -> None:
        name = self.server.name
        for target, what in ((self._reader, "reader"), (self._writer, "writer"),
                             (self._worker, "worker")):
            NamedThread(target=target, name=f"{name}-qmp-{what}-{self.label}",
                             daemon=True).start()

    # -- output

    def send_bytes(self, data: bytes, *, wait: bool = False) -> bool:
        """Queue one whole message; with wait, block until written (bounded)."""
        event = threading.Event() if wait else None
        overflow = False
        with self._cond:
            if self.closed:
                return False
            if self._out_bytes + len(data) > MAX_OUTPUT_BACKLOG:
                overflow = True
            else:
                self._out.append((data, event))
                self._out_bytes += len(data)
                self._cond.notify()
        if overflow:
            log.warning("QMP client %s does not read its output; disconnecting it", self.label)
            self.close()
            return False
        if event is not None:
            event.wait(AFTER_REPLY_FLUSH_TIMEOUT)
            return event.is_set() and not self.closed
        return True

    def _writer(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._out and not self.closed:
                        self._cond.wait()
                    if self.closed:
                        break
                    data, event = self._out.popleft()
                    self._out_bytes -= len(data)
                try:
                    self.sock.sendall(data)
                except OSError:
                    self.close()
                    break
                if event is not None:
                    event.set()
        finally:
            self._release_sock()

    # -- input

    def _reader(self) -> None:
        try:
            while not self.closed:
                data = self.sock.recv(65536)
                if not data:
                    break
                for kind, value in self.splitter.feed(data):
                    if self.closed:
                        break
                    self._on_input(kind, value)
        except OSError:
            pass
        except Exception:  # pragma: no cover - defensive
            log.exception("QMP client %s: reader failed", self.label)
        finally:
            self.close()
            self._release_sock()

    def _on_input(self, kind: str, value: Any) -> None:
        if (kind == "obj" and self.oob and isinstance(value, dict)
                and "exec-oob" in value and "execute" not in value):
            # Out-of-band: run now, without the command lock.
            self.server._run_request(self, value)
            return
        done = None if self.oob else threading.Event()
        item = (kind, value, done)
        while True:
            try:
                self._inq.put(item, timeout=0.5)
                break
            except queue.Full:
                if self.closed:
                    return
        if done is not None:
            # Without OOB, QEMU handles one request at a time: wait for it, so
            # that e.g. the result of qmp_capabilities applies to what follows.
            while not done.wait(0.5):
                if self.closed:
                    return

    def _worker(self) -> None:
        while True:
            item = self._inq.get()
            if item is None or self.closed:
                if item is not None and item[2] is not None:
                    item[2].set()
                break
            kind, value, done = item
            try:
                if kind == "err":
                    self.server._send_reply(self, {"error": {"class": "GenericError", "desc": value}})
                else:
                    self.server._run_request(self, value)
            except Exception:  # pragma: no cover - defensive
                log.exception("QMP client %s: request failed", self.label)
            finally:
                if done is not None:
                    done.set()

    # -- teardown

    def close(self) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            pending = list(self._out)
            self._out.clear()
            self._out_bytes = 0
            self._cond.notify_all()
        for _, event in pending:
            if event is not None:
                event.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._inq.put_nowait(None)
        except queue.Full:
            pass  # the worker sees self.closed after its current item
        self.server._forget(self)

    def _release_sock(self) -> None:
        with self._sock_lock:
            self._sock_users -= 1
            last = self._sock_users == 0
        if last:
            try:
                self.sock.close()
            except OSError:
                pass


# --------------------------------------------------------------------------
# The server


_MISSING = object()


class QMPServer:
    """A QMP server on a unix socket or a loopback TCP port.

    ``address`` is ``unix:PATH`` or ``tcp:HOST:PORT`` (HOST loopback, PORT 0
    picks a free port), optionally followed by QEMU's ``,server=on,wait=off``
    or ``,server,nowait``, which are ignored.  The socket is bound at
    construction (so :attr:`address` is final); :meth:`start` starts serving.
    """

    def __init__(self, address: str, *, version: dict, name: str = "livemig",
                 max_request_size: int = MAX_REQUEST_SIZE):
        if not isinstance(version, dict):
            raise TypeError("version must be a dict shaped like QEMU's VersionInfo")
        self.version = json.loads(json.dumps(version))   # private, JSON-clean copy
        self.name = name
        self.max_request_size = max_request_size
        #: Held while any in-band command handler runs (QEMU's BQL).  Other
        #: modules may take it to serialise with command handlers.
        self.lock = threading.RLock()
        self._commands: dict[str, _Command] = {}
        self._commands_lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._clients_lock = threading.Lock()
        self._closed = False
        self._started = False
        self._accept_thread: threading.Thread | None = None
        self._unix_path: str | None = None
        self._unix_ident: tuple[int, int] | None = None
        self._client_seq = 0

        kind, where = _parse_address(address)
        if kind == "unix":
            self._listener = self._bind_unix(where)
            self._unix_path = where
            self.address = f"unix:{where}"
        else:
            host, port = where
            family, sockaddr = _loopback_sockaddr(host, port)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            self._listener = sock
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
            self.address = f"tcp:{shown}:{bound[1]}"
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe()

        self._add_builtin("qmp_capabilities", self._cmd_qmp_capabilities,
                          {"enable": ("list", False)})
        self._add_builtin("query-commands", self._cmd_query_commands, {})
        self._add_builtin("query-version", self._cmd_query_version, {})

    # -- socket setup

    def _bind_unix(self, path: str) -> socket.socket:
        encoded = os.fsencode(path)
        if len(encoded) > 107:
            raise ValueError(f"unix socket path too long ({len(encoded)} bytes): {path!r}")
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path!r} exists and is not a socket; not replacing it")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            directory = os.path.dirname(path) or "."
            # Bind inside a private (0700) directory, make it 0600, then move
            # it into place: it is never reachable with looser permissions.
            tmpdir = tempfile.mkdtemp(prefix=".qmp", dir=directory)
            tmp = os.path.join(tmpdir, "s")
            try:
                if len(os.fsencode(tmp)) <= 107:
                    sock.bind(tmp)
                    os.chmod(tmp, 0o600)
                    sock.listen(socket.SOMAXCONN)
                    os.replace(tmp, path)          # atomically replaces a stale socket
                else:
                    if os.path.lexists(path):
                        os.unlink(path)
                    sock.bind(path)
                    os.chmod(path, 0o600)
                    sock.listen(socket.SOMAXCONN)
            finally:
                try:
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
                    os.rmdir(tmpdir)
                except OSError:
                    pass
            st = os.lstat(path)
            self._unix_ident = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- registration

    def _add_builtin(self, name: str, handler: Callable, args: dict) -> None:
        self._commands[name] = _Command(name, handler, args, False, builtin=True)

    def register(self, name: str, handler: Callable[[dict], Any],
                 args: dict[str, tuple[str, bool]] | None = None,
                 *, allow_oob: bool = False) -> None:
        """Register a command.

        ``args`` maps argument name to ``(type, required)``; types are
        ``str int number bool list dict any``.  ``None`` means no arguments.
        The handler gets a dict of the given arguments and returns the reply
        value (``None`` means ``{}``), an :class:`AfterReply`, or raises
        :class:`QMPError`.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("command name must be a non-empty string")
        if not callable(handler):
            raise TypeError(f"handler for {name!r} is not callable")
        spec: dict[str, tuple[str, bool]] = {}
        for arg, entry in (args or {}).items():
            try:
                typ, required = entry
            except (TypeError, ValueError):
                raise ValueError(f"{name}: argument {arg!r} must be (type, required)") from None
            if typ not in _ARG_TYPES:
                raise ValueError(f"{name}: argument {arg!r} has unknown type {typ!r}")
            spec[str(arg)] = (typ, bool(required))
        with self._commands_lock:
            if name in self._commands:
                raise ValueError(f"QMP command {name!r} is already registered")
            self._commands[name] = _Command(name, handler, spec, bool(allow_oob))

    # -- lifecycle

    def start(self) -> None:
        """Start serving in background daemon threads; returns at once."""
        if self._closed:
            raise RuntimeError("QMP server is closed")
        if self._started:
            return
        self._started = True
        self._accept_thread = NamedThread(target=self._accept_loop,
                                               name=f"{self.name}-qmp-accept", daemon=True)
        self._accept_thread.start()

    def close(self) -> None:
        """Stop serving, disconnect every client, remove the unix socket file."""
        with self._clients_lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        thread = self._accept_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        for client in clients:
            client.close()
        try:
            self._listener.close()
        except OSError:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._unix_path is not None:
            try:
                st = os.lstat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ident:
                    os.unlink(self._unix_path)
            except OSError:
                pass

    def __enter__(self) -> "QMPServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            try:
                ready = poller.poll()
            except InterruptedError:  # pragma: no cover
                continue
            if self._closed:
                break
            if not any(fd == self._listener.fileno() for fd, _ in ready):
                continue
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if self._closed:
                    break
                log.warning("QMP accept failed: %s", exc)
                time.sleep(0.1)   # e.g. out of file descriptors; do not spin
                continue
            self._on_connect(sock)

    def _on_connect(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        with self._clients_lock:
            if self._closed:
                sock.close()
                return
            self._client_seq += 1
            client = _Client(self, sock, str(self._client_seq))
            self._clients.add(client)
        greeting = {"QMP": {"version": self.version, "capabilities": ["oob"]}}
        client.send_bytes(self._encode(greeting))
        client.start()

    def _forget(self, client: _Client) -> None:
        with self._clients_lock:
            self._clients.discard(client)

    # -- events

    def emit_event(self, event: str, data: dict | None = None) -> None:
        """Send an event to every client that finished negotiation."""
        now = time.time()
        seconds = int(now)
        msg: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
            "event": event,
        }
        if data is not None:
            msg["data"] = data
        encoded = self._encode(msg)      # raises if data is not JSON-serialisable
        with self._clients_lock:
            clients = [c for c in self._clients if c.negotiated]
        for client in clients:
            client.send_bytes(encoded)

    # -- dispatch

    @staticmethod
    def _encode(msg: dict) -> bytes:
        return (json.dumps(msg, allow_nan=False) + "\r\n").encode("utf-8")

    def _send_reply(self, client: _Client, msg: dict, *, wait: bool = False) -> None:
        try:
            data = self._encode(msg)
        except (TypeError, ValueError) as exc:
            log.error("QMP reply is not JSON-serialisable: %s", exc)
            err: dict[str, Any] = {"error": {"class": "GenericError",
                                             "desc": f"internal error: reply is not valid JSON ({exc})"}}
            if "id" in msg:
                err["id"] = msg["id"]
            data = self._encode(err)
        client.send_bytes(data, wait=wait)

    def _run_request(self, client: _Client, request: Any) -> None:
        rid: Any = _MISSING
        after: Callable[[], Any] | None = None
        negotiating = not client.negotiated
        try:
            if isinstance(request, dict) and "id" in request:
                rid = request["id"]
            result = self._dispatch(client, request)
            if isinstance(result, AfterReply):
                after = result.callback
                result = result.value
            response: dict[str, Any] = {"return": {} if result is None else result}
        except QMPError as exc:
            response = {"error": exc.to_json()}
        except Exception as exc:
            log.exception("QMP command failed")
            response = {"error": {"class": "GenericError", "desc": str(exc) or type(exc).__name__}}
        if negotiating and response.get("error", {}).get("class") == "CommandNotFound":
            response["error"]["desc"] = "Expecting capabilities negotiation with 'qmp_capabilities'"
        if rid is not _MISSING:
            response["id"] = rid
        self._send_reply(client, response, wait=after is not None)
        if after is not None:
            try:
                after()
            except Exception:
                log.exception("QMP AfterReply callback failed")

    def _dispatch(self, client: _Client, request: Any) -> Any:
        # Mirrors qmp_dispatch_check_obj() / qmp_dispatch() in QEMU.
        if not isinstance(request, dict):
            raise QMPError("QMP input must be a JSON object")
        allow_oob = client.oob
        exec_key: str | None = None
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise QMPError(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise QMPError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QMPError("QMP input member 'arguments' must be an object")
            elif key == "id":
                continue
            else:
                raise QMPError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise QMPError("QMP input lacks member 'execute'")
        name = request[exec_key]
        oob = exec_key == "exec-oob"
        with self._commands_lock:
            cmd = self._commands.get(name)
        if cmd is None or (not client.negotiated and name != "qmp_capabilities"):
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        if oob and not cmd.allow_oob:
            raise QMPError(f"The command {name} does not support OOB")
        args = dict(request.get("arguments", {}))
        self._check_args(cmd.args, args)
        if oob:
            return cmd.handler(args)
        with self.lock:
            if cmd.builtin:
                return cmd.handler(client, args)
            return cmd.handler(args)

    @staticmethod
    def _check_args(spec: dict[str, tuple[str, bool]], args: dict) -> None:
        # Same order as QEMU's input visitor: declared members, then leftovers.
        for name, (typ, required) in spec.items():
            if name not in args:
                if required:
                    raise QMPError(f"Parameter '{name}' is missing")
                continue
            if not _type_ok(typ, args[name]):
                raise QMPError(f"Invalid parameter type for '{name}', expected: {_ARG_TYPES[typ]}")
        for name in args:
            if name not in spec:
                raise QMPError(f"Parameter '{name}' is unexpected")

    # -- built-in commands

    def _cmd_qmp_capabilities(self, client: _Client, args: dict) -> dict:
        if client.negotiated:
            raise QMPError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        enable = args.get("enable", [])
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                raise QMPError(f"Invalid parameter type for 'enable[{i}]', expected: string")
            if cap != "oob":
                raise QMPError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
        client.oob = "oob" in enable
        client.negotiated = True
        return {}

    def _cmd_query_commands(self, client: _Client, args: dict) -> list:
        with self._commands_lock:
            return [{"name": name} for name in self._commands]

    def _cmd_query_version(self, client: _Client, args: dict) -> dict:
        return json.loads(json.dumps(self.version))
