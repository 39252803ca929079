"""QMPServer driven by the real qemu.qmp client library, plus raw-socket edge cases."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time

import pytest

from livemig.qmp import AfterReply, QMPError, QMPServer
from livemig.qmp_json import JSONSplitter

# qemu.qmp is a test dependency (.[test]): without it these tests fail, they never skip
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

VERSION = {"qemu": {"major": 10, "minor": 2, "micro": 0}, "package": "livemig 0.1.0"}


# ---------------------------------------------------------------- fixtures


def _make_server(address: str, **kw) -> tuple[QMPServer, dict]:
    state: dict = {"quit": threading.Event(), "quit_reply_sent_first": None}
    srv = QMPServer(address, version=VERSION, **kw)

    def echo(args):
        return {"s": args["s"], "n": args.get("n", 0)}

    def fail(args):
        raise QMPError("Device 'x' not found", "DeviceNotFound")

    def boom(args):
        raise RuntimeError("kaboom")

    def quit_(args):
        return AfterReply({}, state["quit"].set)

    def emit(args):
        srv.emit_event("STOP")
        srv.emit_event("MIGRATION", {"status": args["status"]})

    def slow(args):
        time.sleep(args.get("t", 0.3))
        return {"slept": True}

    srv.register("echo", echo, {"s": ("str", True), "n": ("int", False)})
    srv.register("typed", lambda a: a, {"i": ("int", False), "x": ("number", False),
                                        "b": ("bool", False), "l": ("list", False),
                                        "d": ("dict", False), "a": ("any", False)})
    srv.register("fail", fail)
    srv.register("boom", boom)
    srv.register("nothing", lambda a: None)
    srv.register("quit", quit_)
    srv.register("emit", emit, {"status": ("str", True)})
    srv.register("slow", slow, {"t": ("number", False)})
    srv.register("ping", lambda a: {"pong": True}, allow_oob=True)
    srv.start()
    return srv, state


@pytest.fixture
def unix_server(tmp_path):
    path = str(tmp_path / "qmp.sock")
    srv, state = _make_server(f"unix:{path},server=on,wait=off")
    yield srv, path, state
    srv.close()


@pytest.fixture
def tcp_server():
    srv, state = _make_server("tcp:127.0.0.1:0,server,nowait")
    yield srv, state
    srv.close()


class Raw:
    """A bare socket client that reads CRLF-terminated JSON messages."""

    def __init__(self, path: str | tuple):
        fam = socket.AF_UNIX if isinstance(path, str) else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(3)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes | str | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data) + "\n"
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        assert line.endswith(b"\r")
        return json.loads(line)

    def cmd(self, data) -> dict:
        self.send(data)
        return self.recv()

    def negotiate(self, enable=None) -> None:
        greeting = self.recv()
        assert "QMP" in greeting
        req = {"execute": "qmp_capabilities"}
        if enable is not None:
            req["arguments"] = {"enable": enable}
        assert self.cmd(req) == {"return": {}}

    def close(self):
        self.sock.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


# ----------------------------------------------------- qemu.qmp client tests


def test_greeting_negotiation_and_builtins(unix_server):
    srv, path, _ = unix_server

    async def go():
        client = QMPClient("t")
        await client.connect(path)
        try:
            assert client.greeting.QMP.version == VERSION
            assert list(client.greeting.QMP.capabilities) == ["oob"]
            assert await client.execute("query-version") == VERSION
            names = {c["name"] for c in await client.execute("query-commands")}
            assert {"qmp_capabilities", "query-commands", "query-version", "echo", "quit"} <= names
            with pytest.raises(ExecuteError) as ei:
                await client.execute("qmp_capabilities")
            assert ei.value.error_class == "CommandNotFound"
            assert str(ei.value) == "Capabilities negotiation is already complete, command ignored"
        finally:
            await client.disconnect()

    run(go())
    assert srv.address == f"unix:{path}"


def test_command_args_and_errors_tcp(tcp_server):
    srv, _ = tcp_server
    assert srv.address.startswith("tcp:127.0.0.1:")
    port = int(srv.address.rsplit(":", 1)[1])
    assert port > 0

    async def expect_error(client, cmd, args, klass, desc):
        with pytest.raises(ExecuteError) as ei:
            await client.execute(cmd, args)
        assert (ei.value.error_class, str(ei.value)) == (klass, desc)

    async def go():
        client = QMPClient("t")
        await client.connect(("127.0.0.1", port))
        try:
            assert await client.execute("echo", {"s": "hi", "n": 3}) == {"s": "hi", "n": 3}
            assert await client.execute("echo", {"s": "hi"}) == {"s": "hi", "n": 0}
            assert await client.execute("nothing") == {}
            await expect_error(client, "echo", {}, "GenericError", "Parameter 's' is missing")
            await expect_error(client, "echo", {"s": "a", "zz": 1}, "GenericError",
                               "Parameter 'zz' is unexpected")
            await expect_error(client, "echo", {"s": 5}, "GenericError",
                               "Invalid parameter type for 's', expected: string")
            await expect_error(client, "echo", {"s": "a", "n": True}, "GenericError",
                               "Invalid parameter type for 'n', expected: integer")
            await expect_error(client, "echo", {"s": "a", "n": 1.5}, "GenericError",
                               "Invalid parameter type for 'n', expected: integer")
            await expect_error(client, "nothing", {"x": 1}, "GenericError",
                               "Parameter 'x' is unexpected")
            await expect_error(client, "no-such", None, "CommandNotFound",
                               "The command no-such has not been found")
            await expect_error(client, "fail", None, "DeviceNotFound", "Device 'x' not found")
            await expect_error(client, "boom", None, "GenericError", "kaboom")
            for arg, bad, expected in [("x", "1", "number"), ("b", 1, "boolean"),
                                       ("l", {}, "array"), ("d", [], "object")]:
                await expect_error(client, "typed", {arg: bad}, "GenericError",
                                   f"Invalid parameter type for '{arg}', expected: {expected}")
            ok = {"i": -5, "x": 2, "b": False, "l": [1], "d": {"k": None}, "a": None}
            assert await client.execute("typed", ok) == ok
            # still healthy after all of that
            assert await client.execute("echo", {"s": "end"}) == {"s": "end", "n": 0}
        finally:
            await client.disconnect()

    run(go())


def test_events_reach_negotiated_clients(unix_server):
    srv, path, _ = unix_server
    raw = Raw(path)
    assert "QMP" in raw.recv()   # never negotiates: must not get events

    async def go():
        client = QMPClient("t")
        await client.connect(path)
        try:
            with client.listener() as listener:
                await client.execute("emit", {"status": "active"})
                first = await listener.get()
                second = await listener.get()
        finally:
            await client.disconnect()
        return first, second

    first, second = run(go())
    assert first["event"] == "STOP" and "data" not in first
    assert second["event"] == "MIGRATION" and second["data"] == {"status": "active"}
    ts = second["timestamp"]
    assert set(ts) == {"seconds", "microseconds"} and abs(ts["seconds"] - time.time()) < 60
    assert 0 <= ts["microseconds"] < 1_000_000
    # the un-negotiated raw client saw nothing but can still negotiate now
    assert raw.cmd({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}
    srv.emit_event("RESUME", {})
    ev = raw.recv()
    assert ev["event"] == "RESUME" and ev["data"] == {}
    raw.close()


def test_after_reply_runs_after_the_reply(unix_server):
    _, path, state = unix_server

    async def go():
        client = QMPClient("t")
        await client.connect(path)
        try:
            assert await client.execute("quit") == {}
        finally:
            await client.disconnect()

    run(go())
    assert state["quit"].wait(2)


def test_legacy_sync_client(unix_server):
    _, path, _ = unix_server
    mon = QEMUMonitorProtocol(path)
    try:
        with mon:
            greeting = mon.connect()
            assert greeting["QMP"]["version"] == VERSION
            assert mon.cmd("echo", s="x") == {"s": "x", "n": 0}
            resp = mon.cmd_raw("fail")
            assert resp["error"] == {"class": "DeviceNotFound", "desc": "Device 'x' not found"}
            mon.cmd("emit", status="completed")
            ev = mon.pull_event(wait=2)
            assert ev["event"] in ("STOP", "MIGRATION")
    finally:
        mon._aloop.close()   # the legacy shim creates an event loop it never closes
        asyncio.set_event_loop(None)


# ------------------------------------------------------------ unix sockets


def test_unix_socket_mode_stale_and_cleanup(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                 # leaves a stale socket file behind
    srv = QMPServer(f"unix:{path}", version=VERSION)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        srv.start()
        raw = Raw(path)
        assert raw.recv()["QMP"]["capabilities"] == ["oob"]
        raw.close()
        assert os.listdir(tmp_path) == ["s"]      # no temporary leftovers
    finally:
        srv.close()
    assert not os.path.exists(path)
    srv.close()   # idempotent

    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        QMPServer(f"unix:{regular}", version=VERSION)
    assert regular.read_text() == "keep me"


def test_address_validation(tmp_path):
    for bad in ["tcp:8.8.8.8:0", "tcp:0.0.0.0:0", "udp:127.0.0.1:1", "unix:", "tcp:127.0.0.1:x",
                f"unix:{tmp_path}/a,bogus=1"]:
        with pytest.raises(ValueError):
            QMPServer(bad, version=VERSION)
    srv = QMPServer("tcp:localhost:0,server=on,wait=off", version=VERSION)
    try:
        assert srv.address.split(":")[1] in ("127.0.0.1", "[::1]")
    finally:
        srv.close()


def test_register_validation():
    srv = QMPServer("tcp:127.0.0.1:0", version=VERSION)
    try:
        with pytest.raises(ValueError):
            srv.register("query-version", lambda a: None)
        with pytest.raises(ValueError):
            srv.register("x", lambda a: None, {"a": ("float", True)})
        srv.register("x", lambda a: None)
        with pytest.raises(ValueError):
            srv.register("x", lambda a: None)
    finally:
        srv.close()


# -------------------------------------------------------------- raw socket


def test_negotiation_rules_raw(unix_server):
    _, path, _ = unix_server
    raw = Raw(path)
    greeting = raw.recv()
    assert greeting == {"QMP": {"version": VERSION, "capabilities": ["oob"]}}
    expecting = {"class": "CommandNotFound",
                 "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert raw.cmd({"execute": "query-version", "id": "a"}) == {"error": expecting, "id": "a"}
    assert raw.cmd({"execute": "nonexistent"}) == {"error": expecting}
    assert raw.cmd({"exec-oob": "ping", "id": 1})["error"]["desc"] == \
        "QMP input member 'exec-oob' is unexpected"
    assert raw.cmd({"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}) == \
        {"error": {"class": "GenericError",
                   "desc": "Parameter 'enable[0]' does not accept value 'bogus'"}}
    assert raw.cmd({"execute": "qmp_capabilities", "id": {"x": [1]}}) == \
        {"return": {}, "id": {"x": [1]}}
    assert raw.cmd({"execute": "qmp_capabilities"})["error"]["class"] == "CommandNotFound"
    # oob not enabled on this connection
    assert raw.cmd({"exec-oob": "ping", "id": 2})["error"]["desc"] == \
        "QMP input member 'exec-oob' is unexpected"
    assert raw.cmd({"execute": "ping", "id": 3}) == {"return": {"pong": True}, "id": 3}
    raw.close()


def test_malformed_and_non_object_input_raw(unix_server):
    _, path, _ = unix_server
    raw = Raw(path)
    raw.negotiate()

    def gerr(desc):
        return {"error": {"class": "GenericError", "desc": desc}}

    r = raw.cmd('{"execute": nonsense}\n')
    assert r["error"]["class"] == "GenericError" and r["error"]["desc"].startswith("JSON parse error")
    assert "id" not in r
    assert raw.cmd("[1, 2]\n") == gerr("QMP input must be a JSON object")
    assert raw.cmd("42\n") == gerr("QMP input must be a JSON object")
    assert raw.cmd('"str"') == gerr("QMP input must be a JSON object")
    assert raw.cmd({"arguments": {}}) == gerr("QMP input lacks member 'execute'")
    assert raw.cmd({"execute": 5, "id": 7}) == {**gerr("QMP input member 'execute' must be a string"), "id": 7}
    assert raw.cmd({"execute": "echo", "arguments": [1]}) == \
        gerr("QMP input member 'arguments' must be an object")
    assert raw.cmd({"execute": "echo", "foo": 1}) == gerr("QMP input member 'foo' is unexpected")
    assert raw.cmd('{"execute": "echo", "execute": "echo"}')["error"]["desc"] == \
        "JSON parse error, duplicate key"
    assert raw.cmd("}\n")["error"]["desc"].startswith("JSON parse error")
    assert raw.cmd("nan\n")["error"]["desc"] == "JSON parse error, invalid keyword 'nan'"
    # an integer longer than Python converts is an error reply, not a dropped connection
    assert raw.cmd('{"execute": "echo", "arguments": {"n": %s}}\n' % ("9" * 5000)) == \
        gerr("JSON parse error, number too long")
    # an unterminated request is flushed by a control character, as the QMP spec says
    raw.send('{"execute": "echo", "arguments": {"s": ')
    assert raw.cmd(b"\x01")["error"]["desc"].startswith("JSON parse error")
    # the connection still works
    assert raw.cmd({"execute": "echo", "arguments": {"s": "ok"}, "id": None}) == \
        {"return": {"s": "ok", "n": 0}, "id": None}
    raw.close()


def test_streaming_without_newlines_raw(unix_server):
    _, path, _ = unix_server
    raw = Raw(path)
    raw.negotiate()
    # two requests back to back with no separator, the second split mid-string
    raw.send('{"execute":"echo","arguments":{"s":"a}{\\"b"},"id":1}{"execute":"ech')
    time.sleep(0.05)
    raw.send('o","arguments":{"s":"\u00e9"},"id":2}')
    assert raw.recv() == {"return": {"s": 'a}{"b', "n": 0}, "id": 1}
    assert raw.recv() == {"return": {"s": "\u00e9", "n": 0}, "id": 2}
    raw.close()


def test_oversized_request_raw(tmp_path):
    path = str(tmp_path / "q")
    srv, _ = _make_server(f"unix:{path}", max_request_size=64 * 1024)
    try:
        raw = Raw(path)
        raw.negotiate()
        big = '{"execute": "echo", "arguments": {"s": "' + "x" * 200_000 + '"}}\n'
        r = raw.cmd(big)
        assert r == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
        # exactly one error for the whole oversized request, then back to normal
        assert raw.cmd({"execute": "echo", "arguments": {"s": "y"}, "id": 9}) == \
            {"return": {"s": "y", "n": 0}, "id": 9}
        deep = "[" * 2000 + "]" * 2000 + "\n"
        assert raw.cmd(deep)["error"]["desc"] == "JSON nesting depth limit exceeded"
        assert raw.cmd({"execute": "nothing", "id": 10}) == {"return": {}, "id": 10}
        raw.close()
    finally:
        srv.close()


def test_default_limit_is_one_mib():
    sp = JSONSplitter()
    out = sp.feed(b'"' + b"a" * (1 << 20) + b'"')
    assert out == [("err", "JSON token size limit exceeded")]
    assert len(sp.buf) == 0
    assert sp.feed(b" {}") == [("obj", {})]


def test_oob_execution(unix_server):
    _, path, _ = unix_server
    raw = Raw(path)
    raw.negotiate(enable=["oob"])
    assert raw.cmd({"exec-oob": "echo", "arguments": {"s": "a"}, "id": 1}) == \
        {"error": {"class": "GenericError", "desc": "The command echo does not support OOB"}, "id": 1}
    # an OOB command overtakes a slow in-band one
    raw.send({"execute": "slow", "arguments": {"t": 0.4}, "id": "slow"})
    raw.send({"exec-oob": "ping", "id": "oob"})
    assert raw.recv() == {"return": {"pong": True}, "id": "oob"}
    assert raw.recv() == {"return": {"slept": True}, "id": "slow"}
    assert raw.cmd({"execute": "ping", "exec-oob": "ping"})["error"]["desc"] == \
        "QMP input member 'exec-oob' clashes with 'execute'"
    raw.close()


def test_client_disconnect_mid_request_does_not_disturb_others(unix_server):
    _, path, _ = unix_server
    a, b = Raw(path), Raw(path)
    a.negotiate()
    b.negotiate()
    a.send({"execute": "slow", "arguments": {"t": 0.2}})
    a.send('{"execute": "echo", "argu')      # half a request, then hang up
    a.close()
    assert b.cmd({"execute": "echo", "arguments": {"s": "b"}}) == {"return": {"s": "b", "n": 0}}

    async def go():
        client = QMPClient("t")
        await client.connect(path)
        try:
            return await client.execute("echo", {"s": "c"})
        finally:
            await client.disconnect()

    assert run(go()) == {"s": "c", "n": 0}
    b.close()


def test_handlers_are_serialised(unix_server):
    srv, path, _ = unix_server
    active = []
    overlap = []

    def guarded(args):
        active.append(1)
        if len(active) > 1:
            overlap.append(True)
        time.sleep(0.02)
        active.pop()
        return {}

    srv.register("guarded", guarded)
    clients = [Raw(path) for _ in range(4)]
    for c in clients:
        c.negotiate()
    for _ in range(3):
        for c in clients:
            c.send({"execute": "guarded"})
    for c in clients:
        for _ in range(3):
            assert c.recv() == {"return": {}}
        c.close()
    assert not overlap


def test_close_disconnects_clients(tmp_path):
    path = str(tmp_path / "q")
    srv, _ = _make_server(f"unix:{path}")
    raw = Raw(path)
    raw.negotiate()
    srv.close()
    with pytest.raises((EOFError, ConnectionError)):
        raw.recv()
    raw.close()
    assert not os.path.exists(path)
