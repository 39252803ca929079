"""One VM process: a KVM machine, its QMP server, and the migration commands (QEMU's names)."""
from __future__ import annotations

import contextlib

import os
import signal
import stat
import sys
import threading
from typing import Any

from . import __version__
from . import state as S
from .errors import GuestError, MigrationError, TransportError
from .incoming import Incoming
from .options import NULLABLE, PARAMETERS, MigrationOptions
from .outgoing import Outgoing
from .postcopy import check_host
from .ramblock import Prefaulter
from .qmp import AfterReply, QMPError, QMPServer
from .tls import TlsCredsX509, TlsEndpoint, create_object
from .transport import URI, parse_uri

VERSION = {"qemu": {"major": 10, "minor": 2, "micro": 0}, "package": f"livemig {__version__}"}


class VMProcess:
    """Glue between QMP and the machine: run state, stop/cont, pmemsave and migration."""

    def __init__(self, machine: Any, qmp_address: str, incoming: str | None = None, prealloc: bool = True,
                 objects: list[TlsCredsX509] | None = None):
        self.machine = machine
        self.opts = MigrationOptions()
        self.objects: dict[str, TlsCredsX509] = {}  # --object / object-add, by id
        for obj in objects or []:
            if obj.id in self.objects:
                raise MigrationError(f"attempt to add duplicate property '{obj.id}' to object (type 'container')")
            self.objects[obj.id] = obj
        self.outgoing: Outgoing | None = None
        self.incoming: Incoming | None = None
        self.incoming_spec = incoming  # None, "defer" or a URI
        self.prealloc = prealloc  # allocate guest RAM in the background while waiting for a stream
        self.prefaulter: Prefaulter | None = None
        self.runstate = "inmigrate" if incoming else "prelaunch"
        self.autostart = True
        self.lock = threading.RLock()
        self.quit_event = threading.Event()
        self.qmp = QMPServer(qmp_address, version=VERSION)
        self._register()

    # -- life cycle
    def start(self) -> None:
        self.qmp.start()
        if self.incoming_spec and self.prealloc:
            m = self.machine  # guest RAM, then its second mapping (postcopy places pages there)
            addrs = [m.ram_host_addr] + ([m.ram_alias_addr] if m.ram_alias_addr else [])
            self.prefaulter = Prefaulter(addrs, m.memory_size).start()
        if self.incoming_spec and self.incoming_spec != "defer":
            self._start_incoming(self.incoming_spec, exit_on_error=True)
        elif not self.incoming_spec:
            self.machine.start()
            self.runstate = "running"

    def emit(self, event: str, data: dict | None = None) -> None:
        self.qmp.emit_event(event, data)

    def on_fatal(self, message: str) -> None:
        """The guest stopped for good (internal error, shutdown): report it like QEMU does."""
        print(f"livemig: guest stopped: {message}", file=sys.stderr, flush=True)
        self.runstate = "internal-error"
        self.emit("STOP", None)

    def wait(self) -> None:
        self.quit_event.wait()

    def shutdown(self) -> None:
        if self.prefaulter:
            self.prefaulter.stop()
        if self.incoming:
            self.incoming.cancel()
        if self.outgoing:
            try:
                self.outgoing.cancel()
            except MigrationError:
                pass
        self.qmp.close()
        self.quit_event.set()

    # -- QMP commands
    def _register(self) -> None:
        r = self.qmp.register
        r("query-status", self.q_query_status)
        r("stop", self.q_stop)
        r("cont", self.q_cont)
        r("quit", self.q_quit)
        r("x-livemig-query-hypervisor-areas", self.q_hypervisor_areas)
        r("x-livemig-query-registers", self.q_registers)
        r("pmemsave", self.q_pmemsave, {"val": ("int", True), "size": ("int", True), "filename": ("str", True)})
        r("migrate-set-capabilities", self.q_set_caps, {"capabilities": ("list", True)})
        r("query-migrate-capabilities", lambda a: self.opts.query_capabilities())
        kinds = {"int": "int", "bool": "bool", "str": "str"}
        r("migrate-set-parameters", self.q_set_params,
          {k: ("any" if k in NULLABLE else kinds[v[1]], False) for k, v in PARAMETERS.items()})
        r("query-migrate-parameters", lambda a: self.opts.query_parameters())
        r("migrate", self.q_migrate, {"uri": ("str", False), "channels": ("list", False), "detach": ("bool", False),
                                      "resume": ("bool", False), "blk": ("bool", False), "inc": ("bool", False)})
        r("migrate-incoming", self.q_migrate_incoming, {"uri": ("str", False), "channels": ("list", False),
                                                        "exit-on-error": ("bool", False)})
        r("migrate_cancel", self.q_migrate_cancel)
        r("migrate-pause", self.q_migrate_pause, allow_oob=True)
        r("migrate-recover", self.q_migrate_recover, {"uri": ("str", True)}, allow_oob=True)
        r("migrate-start-postcopy", self.q_start_postcopy)
        r("query-migrate", self.q_query_migrate)
        r("object-add", self.q_object_add, {"qom-type": ("str", True), "id": ("str", True), "dir": ("str", False),
                                            "endpoint": ("str", False), "verify-peer": ("bool", False)})
        r("object-del", self.q_object_del, {"id": ("str", True)})

    def q_query_status(self, args: dict) -> dict:
        return {"status": self.runstate, "running": self.runstate == "running", "singlestep": False}

    def q_stop(self, args: dict) -> None:
        with self.lock:
            if self.runstate == "inmigrate":
                self.autostart = False
                return
            if self.machine.running:
                self.machine.pause()
                self.runstate = "paused"
                self.emit("STOP", None)

    def q_cont(self, args: dict) -> None:
        with self.lock:
            if self.runstate == "inmigrate":
                self.autostart = True
                return
            if self.runstate == "internal-error":
                raise QMPError("Resetting the Virtual Machine is required")
            if self.outgoing and self.outgoing.state.status in S.RUNNING:
                raise QMPError("Migration is in progress; the guest is resumed when it ends")
            if not self.machine.running:
                self.machine.resume()
                self.runstate = "running"
                self.emit("RESUME", None)

    def q_quit(self, args: dict) -> AfterReply:
        def bye() -> None:
            self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            self.shutdown()
        return AfterReply({}, bye)

    def q_hypervisor_areas(self, args: dict) -> list:
        """Guest memory KVM writes on its own (kvmclock, steal time, ...): a RAM comparison between
        a source and its destination has to leave these bytes out. Only while the vCPU is stopped."""
        with self._vcpu_stopped():
            areas = self.machine.cpu.hypervisor_areas()
        return [{"addr": a, "size": n, "name": name} for a, n, name in areas]

    def q_registers(self, args: dict) -> dict:
        """The vCPU's general registers and control registers (like HMP's `info registers`).
        Only while the vCPU is stopped."""
        with self._vcpu_stopped():
            st = self.machine.cpu.save()
        names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer")
        return {n: st[n] for n in names}

    @contextlib.contextmanager
    def _vcpu_stopped(self):
        """Holds the monitor lock while the vCPU is stopped (its state can be read)."""
        with self.lock:
            if self.machine.running:
                raise QMPError("The vCPU must be stopped (use 'stop' first)")
            yield

    def q_pmemsave(self, args: dict) -> None:
        val, size, filename = args["val"], args["size"], args["filename"]
        if val < 0 or size < 0:
            raise QMPError("Invalid parameter 'val'/'size': must not be negative")
        m = self.machine
        try:
            fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise QMPError(f"Could not open '{filename}': {e.strerror}") from None
        try:
            mv = memoryview(m.ram)
            gpa, left = val, size
            while left:
                try:
                    off = m.gpa_to_offset(gpa)
                except GuestError as e:
                    raise QMPError(f"Invalid addr 0x{gpa:x}/size {left} specified: {e}") from None
                # stay inside one contiguous region of the block
                region_end = m.lowmem_size if gpa < (1 << 32) else m.memory_size
                n = min(left, region_end - off, 16 << 20)
                chunk = mv[off:off + n]
                while chunk:
                    w = os.write(fd, chunk)
                    chunk = chunk[w:]
                gpa += n
                left -= n
        finally:
            os.close(fd)

    def _migration_running(self) -> bool:
        return bool(self.outgoing and self.outgoing.state.status in S.RUNNING) or \
            bool(self.incoming and self.incoming.state.status in S.RUNNING)

    def q_set_caps(self, args: dict) -> None:
        if self._migration_running():
            raise QMPError("There's a migration process in progress")
        try:
            self.opts.set_capabilities(args["capabilities"])
        except MigrationError as e:
            raise QMPError(str(e)) from None
        if self.runstate == "inmigrate" and self.opts.cap("postcopy-ram"):
            try:  # as QEMU: a destination checks for userfaultfd as soon as postcopy is enabled
                check_host()
            except MigrationError as e:
                self.opts.set_capabilities([{"capability": "postcopy-ram", "state": False}])
                raise QMPError(str(e)) from None

    def q_set_params(self, args: dict) -> None:
        try:
            self.opts.set_parameters(args)
        except MigrationError as e:
            raise QMPError(str(e)) from None

    def q_object_add(self, args: dict) -> None:
        """Only tls-creds-x509 objects (the files are loaded and checked now, as QEMU does)."""
        if args["id"] in self.objects:
            raise QMPError(f"attempt to add duplicate property '{args['id']}' to object (type 'container')")
        try:
            obj = create_object(args)
        except MigrationError as e:
            raise QMPError(str(e)) from None
        self.objects[obj.id] = obj

    def q_object_del(self, args: dict) -> None:
        if self.objects.pop(args["id"], None) is None:
            raise QMPError(f"object '{args['id']}' not found")

    def _tls(self, endpoint: str, uri: URI) -> TlsEndpoint | None:
        """This side's TLS for a migration over `uri`, from the tls-creds and tls-hostname
        parameters (None: plaintext); QMPError when it cannot work."""
        cid = self.opts.param("tls-creds")
        if not cid:
            return None
        creds = self.objects.get(cid)
        if creds is None:
            raise QMPError(f"No TLS credentials with id '{cid}'")
        if creds.endpoint != endpoint:
            raise QMPError(f"Expected TLS credentials for a {endpoint} endpoint")
        if uri.scheme == "file":
            raise QMPError("TLS needs a socket: a file: migration cannot be encrypted (clear tls-creds)")
        if uri.scheme == "fd":
            try:
                is_sock = stat.S_ISSOCK(os.fstat(uri.fd).st_mode)
            except OSError:
                is_sock = True  # the transport reports the bad descriptor
            if not is_sock:
                raise QMPError(f"TLS needs a socket: fd {uri.fd} is not one (clear tls-creds)")
        tls = TlsEndpoint(creds, self.opts.param("tls-hostname"))
        try:
            tls.check_host(uri.host if uri.scheme == "tcp" else "")
        except TransportError as e:
            raise QMPError(str(e)) from None
        return tls

    def q_migrate(self, args: dict) -> None:
        prev = self.outgoing
        if prev is not None and not args.get("resume") and prev.state.status not in S.RUNNING:
            # a failed or cancelled migration shows its state before its cleanup ends (which stops
            # dirty logging and takes this lock): a new one starts after it
            prev.thread.join(timeout=10)
        with self.lock:
            if not args.get("resume") and prev is not None and prev.thread.is_alive() \
                    and prev.state.status not in S.RUNNING:
                raise QMPError("The previous migration is still ending; try again")
            if args.get("resume"):
                out = self.outgoing
                if out is None or out.state.status != S.POSTCOPY_PAUSED:
                    raise QMPError("Cannot resume if there is no paused migration")
                if out.tls is not None:  # as QEMU: the parameter in force when connecting
                    out.tls.hostname = self.opts.param("tls-hostname")
                try:
                    out.resume(parse_uri(self._uri_arg(args)))
                except (TransportError, MigrationError) as e:
                    raise QMPError(str(e)) from None
                return
            if self.runstate == "inmigrate" or (self.incoming and self.incoming.state.status != S.COMPLETED):
                raise QMPError("Guest is waiting for an incoming migration")
            if self._migration_running():
                raise QMPError("There's a migration process in progress")
            if self.runstate == "postmigrate":
                raise QMPError("The guest has already been migrated; it can't be migrated again")
            uri = self._uri_arg(args)
            try:
                target = parse_uri(uri)
            except TransportError as e:
                raise QMPError(str(e)) from None
            for name in ("x-switchover-budget", "x-postcopy-after-passes"):
                if self.opts.param(name) and not self.opts.cap("postcopy-ram"):
                    raise QMPError(f"Parameter '{name}' switches to postcopy: it needs the postcopy-ram capability")
            self._check_connections(target)
            out = Outgoing(self.machine, self.opts, target, self.emit, tls=self._tls("client", target))
            out.on_finish = self._outgoing_finished
            out.on_runstate = self._set_runstate
            self.outgoing = out
            out.start()

    def _check_connections(self, target: URI) -> None:
        """multifd and postcopy-preempt open more connections than the first: tcp: or unix: only."""
        if target.scheme not in ("tcp", "unix"):
            for cap in ("multifd", "postcopy-preempt"):
                if self.opts.cap(cap):
                    raise QMPError(f"{cap} opens several connections: use a tcp: or unix: URI")

    @staticmethod
    def _uri_arg(args: dict) -> str:
        uri, channels = args.get("uri"), args.get("channels")
        if (uri is None) == (channels is None):
            raise QMPError("Need either 'uri' or 'channels' argument" if uri is None
                           else "'uri' and 'channels' arguments are mutually exclusive; exactly one of the two should be present in 'migrate' qmp command ")
        if channels is not None:
            if len(channels) != 1 or not isinstance(channels[0], dict) or channels[0].get("channel-type") != "main":
                raise QMPError("Channel list has more than one entries" if len(channels) > 1 else "Channel must be of type 'main'")
            addr = channels[0].get("addr") or {}
            t = addr.get("transport")
            if t == "socket" and addr.get("type") == "inet":
                return f"tcp:{addr.get('host')}:{addr.get('port')}"
            if t == "socket" and addr.get("type") == "unix":
                return f"unix:{addr.get('path')}"
            if t == "socket" and addr.get("type") == "fd":
                return f"fd:{addr.get('str')}"
            if t == "file":
                return f"file:{addr.get('filename')},offset={int(addr.get('offset', 0))}"
            raise QMPError(f"Unsupported migration channel address {addr}")
        return uri

    def _set_runstate(self, runstate: str) -> None:
        self.runstate = runstate  # one assignment: atomic for the QMP thread

    def _outgoing_finished(self, out: Outgoing) -> None:
        with self.lock:
            if out.state.status == S.COMPLETED:
                self.runstate = "postmigrate"
            elif self.machine.running:
                self.runstate = "running"
            elif self.runstate == "finish-migrate":
                # failed after the guest stopped: a postcopy guest runs on the destination now
                self.runstate = "postmigrate" if getattr(out, "guest_moved", False) else "paused"

    def q_migrate_incoming(self, args: dict) -> None:
        with self.lock:
            if self.incoming_spec != "defer":
                raise QMPError("'-incoming' was not specified on the command line" if not self.incoming_spec
                               else "The incoming migration has already been started")
            if self.incoming:
                raise QMPError("The incoming migration has already been started")
            self._start_incoming(self._uri_arg(args), exit_on_error=args.get("exit-on-error", True))

    def _start_incoming(self, uri: str, exit_on_error: bool) -> None:
        try:
            target = parse_uri(uri)
            self._check_connections(target)
            inc = Incoming(self.machine, self.opts, target, self.emit, exit_on_error=exit_on_error,
                           on_started=self._incoming_started, tls=self._tls("server", target))
        except TransportError as e:
            raise QMPError(str(e)) from None
        inc.prefaulter = self.prefaulter
        self.incoming = inc
        inc.start()

    def _incoming_started(self) -> None:
        """The migration brought the guest in: it runs now, unless it was stopped on the source or
        `stop` (or -S) asked for it to stay paused until `cont` (as QEMU: RESUME only when it starts)."""
        gs = getattr(self.machine, "globalstate", None)
        with self.lock:
            if gs is not None and gs.received and gs.runstate != "running":
                self.runstate = "paused"  # it was stopped on the source: it stays stopped here
            elif self.autostart:
                self.machine.start()
                self.runstate = "running"
                self.emit("RESUME", None)
            else:
                self.runstate = "paused"

    def q_migrate_cancel(self, args: dict) -> None:
        if self.outgoing:
            try:
                self.outgoing.cancel()
            except MigrationError as e:
                raise QMPError(str(e)) from None
        elif self.incoming and self.incoming.state.status in (S.SETUP, S.ACTIVE):
            self.incoming.cancel()

    def q_migrate_pause(self, args: dict) -> None:
        """Postcopy recovery: cut the migration's connections; both sides pause (postcopy-paused)."""
        for mig in (self.outgoing, self.incoming):
            if mig is not None and mig.state.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER):
                mig.pause()
                return
        raise QMPError("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")

    def q_migrate_recover(self, args: dict) -> None:
        inc = self.incoming
        if inc is None or inc.state.status != S.POSTCOPY_PAUSED:
            raise QMPError("Migrate recover can only be run when postcopy is paused.")
        try:
            inc.recover(parse_uri(args["uri"]))
        except (TransportError, MigrationError) as e:
            raise QMPError(str(e)) from None

    def q_start_postcopy(self, args: dict) -> None:
        if not self.opts.cap("postcopy-ram"):
            raise QMPError("Enable postcopy with migrate-set-capabilities before the start of migration")
        if not self.outgoing:
            raise QMPError("Postcopy must be started after migration has been started")
        self.outgoing.start_postcopy()

    def q_query_migrate(self, args: dict) -> dict:
        if self.outgoing:
            return self.outgoing.query()
        if self.incoming:
            return self.incoming.query()
        return {}


def install_signal_handlers(proc: VMProcess) -> None:
    def handler(signum, frame):  # SIGTERM/SIGINT: leave like QEMU does on a signal
        proc.emit("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        proc.shutdown()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
