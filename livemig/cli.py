"""`livemig` command line: vm (one VM process), migrate (drive two VMs over QMP), demo."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import __version__


def parse_size(text: str) -> int:
    """QEMU -m syntax: a number with optional K/M/G/T suffix; a bare number means MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size '{text}'")
    num, unit = float(m.group(1)), (m.group(2) or "M").upper()
    return int(num * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def _need_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        print("livemig: /dev/kvm is not available on this host: KVM is needed to run a VM "
              "(load the kvm module or run on a host with virtualization)", file=sys.stderr)
        sys.exit(1)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("livemig: no permission to open /dev/kvm (run as root or join the kvm group)", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- vm
def cmd_vm(args: argparse.Namespace) -> int:
    _need_kvm()
    from .errors import MigrationError
    from .guest.image import make_image
    from .machine.pvm_compat import PVM_CMDLINE
    from .machine.vm import KvmMachine
    from .postcopy import minor_faults_supported
    from .monitor import VMProcess, install_signal_handlers
    from .tls import parse_object

    size = args.memory
    if size % (2 << 20) or size < (2 << 20):
        print(f"livemig: --memory must be a multiple of 2 MiB (got {size} bytes)", file=sys.stderr)
        return 1
    linux = args.machine == "linux" or (args.machine is None and bool(args.kernel))
    if args.kernel and not linux:
        print("livemig: --kernel needs --machine linux", file=sys.stderr)
        return 1
    if linux:
        if not args.kernel and not args.incoming:
            print("livemig: the Linux machine needs --kernel (or --incoming)", file=sys.stderr)
            return 1
        try:
            kernel, initrd, append = _linux_boot_files(args)
        except (OSError, MigrationError) as e:
            print(f"livemig: {e}", file=sys.stderr)
            return 1
        image = b""
    elif args.boot_sector:
        try:
            image = Path(args.boot_sector).read_bytes()[:512]
        except OSError as e:
            print(f"livemig: cannot read boot sector '{args.boot_sector}': {e.strerror}", file=sys.stderr)
            return 1
        if len(image) < 512:
            print(f"livemig: boot sector '{args.boot_sector}' is shorter than 512 bytes", file=sys.stderr)
            return 1
    else:
        image = make_image(args.ws_mib, args.prefill)
    try:  # as QEMU: credentials are loaded and checked at start-up
        objects = [parse_object(spec) for spec in args.object]
        ids = [o.id for o in objects]
        for dup in {i for i in ids if ids.count(i) > 1}:
            raise MigrationError(f"attempt to add duplicate property '{dup}' to object (type 'container')")
    except MigrationError as e:
        print(f"livemig: --object: {e}", file=sys.stderr)
        return 1
    # Threads hand the GIL over every 5 ms by default: far too long for a page request that has to
    # go from the fault thread to the wire, or from the return-path thread to the migration thread.
    sys.setswitchinterval(float(os.environ.get("LIVEMIG_SWITCH_INTERVAL", "0.0002")))
    holder: dict = {}

    def fatal(msg: str) -> None:
        if "proc" in holder:
            holder["proc"].on_fatal(msg)

    try:
        memfd = args.memory_backend == "memfd" or (
            args.memory_backend == "auto" and bool(args.incoming) and minor_faults_supported())
        machine = KvmMachine(size, args.serial, on_fatal=fatal, hugetlb=args.memory_backend == "hugetlb",
                             linux=linux, memfd=memfd)
    except (MigrationError, OSError) as e:
        print(f"livemig: cannot create the VM: {e}", file=sys.stderr)
        return 1
    if not args.incoming:
        try:
            if linux:
                if machine.pvm:
                    append = f"{append} {PVM_CMDLINE}"
                machine.load_linux(kernel, initrd, append)
            else:
                machine.load_boot_sector(image)
        except MigrationError as e:
            print(f"livemig: {e}", file=sys.stderr)
            return 1
    try:
        proc = VMProcess(machine, args.qmp, incoming=args.incoming, prealloc=args.incoming_prealloc == "on",
                         objects=objects)
    except (MigrationError, OSError) as e:
        print(f"livemig: cannot serve QMP on {args.qmp}: {e}", file=sys.stderr)
        return 1
    holder["proc"] = proc
    install_signal_handlers(proc)
    try:
        proc.start()
    except Exception as e:  # a bad --incoming URI
        print(f"livemig: {e}", file=sys.stderr)
        return 1
    proc.wait()
    machine.close()
    sys.stdout.flush()
    os._exit(0)


def _linux_boot_files(args: argparse.Namespace) -> tuple:
    """(Kernel or None, initrd bytes, command line) from --kernel/--initrd/--append."""
    from .guest.linux import DEFAULT_APPEND
    from .machine.linux_boot import load_kernel

    kernel = None
    if args.kernel:
        kernel = load_kernel(Path(args.kernel).read_bytes(), uncompressed=args.extract_vmlinux)
    initrd = Path(args.initrd).read_bytes() if args.initrd else b""
    append = DEFAULT_APPEND if args.append is None else args.append
    return kernel, initrd, append


# ----------------------------------------------------------------------------- migrate
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def run_migration(src_addr: str, dst_addr: str, uri: str | None, max_bandwidth: int | None,
                  downtime_limit: int | None, quiet: bool = False, timeout: float = 600.0,
                  postcopy: bool = False, preempt: bool = False, multifd: int = 0,
                  policy: dict | None = None, report: str | None = None, via: str | None = None,
                  postcopy_now: bool = False, tls_creds: str | None = None, tls_hostname: str | None = None,
                  preempt_requests: bool | None = None, urgent_process: bool = False,
                  params: dict | None = None) -> dict:
    """Drive one migration like `virsh migrate` does; returns the final query-migrate of both sides.

    `postcopy` without a `policy` switches after the first full pass, as QEMU's tests do; a
    `policy` ({"x-switchover-budget": ms} and/or {"x-postcopy-after-passes": n}) lets the source
    decide. `report` is a directory for the timeline JSON and plot. `via` is the URI the source
    connects to when it differs from the one the destination listens on (a relay between them).
    `postcopy_now` switches to postcopy right after `migrate` (almost every page demand-faulted).
    `tls_creds`: the id of the tls-creds-x509 objects (endpoint=client on the source,
    endpoint=server on the destination); every connection is TLS; `tls_hostname` is the name the
    destination's certificate must carry (default: the host of the tcp: URI). `preempt_requests`
    (postcopy-preempt): page requests on the preempt connection (x-preempt-requests); by default
    on when both sides are livemig; `urgent_process` then serves them in a process of its own on
    each side (x-urgent-process). `params`: more of the source's migration parameters."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from .qmpclient import QMPClient
    from .report import sample, write_report

    console = Console(stderr=True, quiet=quiet)
    src, dst = QMPClient(src_addr), QMPClient(dst_addr)
    if multifd:
        for side in (src, dst):
            side.cmd("migrate-set-parameters", **{"multifd-channels": multifd})
    if policy:
        postcopy = True
    # every capability this command knows is set on both sides, on or off: a VM that arrived by a
    # postcopy migration must not carry postcopy-ram into a precopy one
    wanted = {"events": True, "multifd": bool(multifd), "postcopy-ram": postcopy,
              "postcopy-preempt": postcopy and preempt}
    caps = [{"capability": k, "state": v} for k, v in wanted.items()]
    src.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-set-capabilities", capabilities=caps + [{"capability": "postcopy-blocktime", "state": postcopy}])
    src_params = dict(params or {})
    if max_bandwidth is not None:
        src_params["max-bandwidth"] = max_bandwidth
    if downtime_limit is not None:
        src_params["downtime-limit"] = downtime_limit
    src_params.update(policy or {})
    if src_params:
        src.cmd("migrate-set-parameters", **src_params)
    if postcopy and preempt:  # page requests on the preempt connection: livemig on both sides only
        if preempt_requests is None:
            preempt_requests = all("livemig" in side.cmd("query-version").get("package", "") for side in (src, dst))
        dst.cmd("migrate-set-parameters", **{"x-preempt-requests": preempt_requests})
        if preempt_requests:
            for side in (src, dst):
                side.cmd("migrate-set-parameters", **{"x-urgent-process": urgent_process})
    # set (or clear) TLS on both sides, like the capabilities
    dst.cmd("migrate-set-parameters", **{"tls-creds": tls_creds or ""})
    src.cmd("migrate-set-parameters", **{"tls-creds": tls_creds or "", "tls-hostname": tls_hostname or ""})
    uri = uri or f"tcp:127.0.0.1:{_free_port()}"
    dst.cmd("migrate-incoming", uri=uri)
    if uri.startswith("tcp:") and uri.endswith(":0"):
        addr = dst.cmd("query-migrate")["socket-address"][0]
        uri = f"tcp:{addr['host']}:{addr['port']}"
    t0 = time.monotonic()
    switched_at: float | None = None
    src.cmd("migrate", uri=via or uri)
    if postcopy and postcopy_now:
        src.cmd("migrate-start-postcopy")
        switched_at = time.monotonic()
    info: dict = {}
    samples: list[dict] = []

    def line(i: dict) -> Text:
        ram = i.get("ram", {})
        return Text(f"{i.get('status', '?'):>10} pass {ram.get('dirty-sync-count', 0)} "
                    f"sent {_fmt_bytes(ram.get('transferred', 0))} "
                    f"left {_fmt_bytes(ram.get('remaining', 0))} "
                    f"{ram.get('mbps', 0):.0f} Mbit/s exp.downtime {i.get('expected-downtime', '-')} ms")

    # Ctrl-C only raises a flag that the loop reads between QMP calls: a KeyboardInterrupt raised
    # in the middle of a QMP exchange or inside rich's locks could leave the client half-way
    # through a reply or a lock held, and the cancel after it would hang.
    interrupted = threading.Event()
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        with Live(Text("starting"), console=console, refresh_per_second=10, transient=False) as live:
            while not interrupted.is_set():
                info = src.cmd("query-migrate")
                samples.append(sample(time.monotonic() - t0, info))
                live.update(line(info))
                if switched_at is None and info.get("status") in ("postcopy-device", "postcopy-active"):
                    switched_at = time.monotonic()  # the policy switched
                if postcopy and not policy and switched_at is None and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                    src.cmd("migrate-start-postcopy")  # after the first full pass, as QEMU's tests do
                    switched_at = time.monotonic()
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > timeout:
                    src.cmd("migrate_cancel")
                time.sleep(0.1)
        if interrupted.is_set():
            console.print("cancelling the migration (Ctrl-C)")
            src.cmd("migrate_cancel")
            while (info := src.cmd("query-migrate")).get("status") not in ("completed", "failed", "cancelled"):
                time.sleep(0.05)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    dinfo = {}
    for _ in range(100):
        dinfo = dst.cmd("query-migrate")
        if dinfo.get("status") in ("completed", "failed") or info.get("status") != "completed":
            break
        time.sleep(0.05)
    src.close()
    dst.close()
    done = time.monotonic()
    samples.append(sample(done - t0, info))
    result = {"source": info, "destination": dinfo, "uri": uri,
              "switch_to_complete_s": round(done - switched_at, 3) if switched_at else None}
    if report:
        result["report"] = [str(p) for p in write_report(report, samples, result)]
    return result


def print_summary(result: dict, integrity: tuple[bool, str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    info = result["source"]
    ram = info.get("ram", {})
    t = Table(title=f"migration {info.get('status')}", show_header=False)
    t.add_row("status", info.get("status", "?"))
    if "error-desc" in info:
        t.add_row("error", info["error-desc"])
    if ram:
        total_ms = info.get("total-time", 0)
        t.add_row("total time", f"{total_ms} ms")
        t.add_row("downtime", f"{info.get('downtime', '-')} ms")
        t.add_row("setup time", f"{info.get('setup-time', '-')} ms")
        t.add_row("sent", f"{ram['transferred'] / 1e6:.1f} MB ({ram['normal']} pages, {ram['duplicate']} zero pages)")
        busy = max(total_ms - info.get("setup-time", 0), 1)
        t.add_row("throughput", f"{ram['transferred'] / 1e3 / busy:.0f} MB/s")
        t.add_row("passes (dirty syncs)", str(ram["dirty-sync-count"]))
    if ram.get("postcopy-requests") or result.get("switch_to_complete_s"):
        d = result.get("destination", {})
        pc = d.get("x-livemig-postcopy", {})
        t.add_row("postcopy", f"switchover -> complete {result.get('switch_to_complete_s')} s, "
                              f"{ram.get('postcopy-requests', 0)} page requests, "
                              f"{ram.get('postcopy-bytes', 0) / 1e6:.1f} MB after the switch")
        if pc:
            t.add_row("remote faults", f"{pc.get('faults', 0)} faults, latency p50 {pc.get('p50-us', '-')} us, "
                                       f"p99 {pc.get('p99-us', '-')} us; vCPU blocktime "
                                       f"{d.get('postcopy-vcpu-blocktime', ['-'])[0]} ms")
            if pc.get("mapped-at-fault"):
                t.add_row("faults on arrived pages", f"{pc['mapped-at-fault']} mapped at once, "
                                                     f"p50 {pc.get('mapped-at-fault-p50-us', '-')} us")
    if info.get("x-livemig-switchover-reason"):
        t.add_row("switched to postcopy", info["x-livemig-switchover-reason"])
    if result.get("report"):
        t.add_row("report", ", ".join(result["report"]))
    if integrity is not None:
        t.add_row("memory integrity", ("OK: " if integrity[0] else "FAILED: ") + integrity[1])
    Console().print(t)


def _policy(args: argparse.Namespace) -> dict | None:
    policy = {}
    if args.switchover_budget is not None:
        policy["x-switchover-budget"] = args.switchover_budget
    if args.postcopy_after_passes is not None:
        policy["x-postcopy-after-passes"] = args.postcopy_after_passes
    return policy or None


def cmd_migrate(args: argparse.Namespace) -> int:
    from .errors import MigrationError
    try:
        result = run_migration(args.src, args.dst, args.uri, args.max_bandwidth, args.downtime_limit,
                               postcopy=args.postcopy, preempt=args.preempt, multifd=args.multifd,
                               urgent_process=args.urgent_process,
                               policy=_policy(args), report=args.report, tls_creds=args.tls_creds,
                               tls_hostname=args.tls_hostname)
    except MigrationError as e:
        print(f"livemig: {e}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0 if result["source"].get("status") == "completed" else 1


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    _need_kvm()
    from .errors import MigrationError
    from .guest.image import make_image, passes_from_output

    if (args.postcopy or _policy(args)) and args.ws_mib is None:
        args.ws_mib = 0  # postcopy demo: the guest dirties all of its RAM
    if args.ws_mib is None:
        args.ws_mib = 256
    tmp = Path(tempfile.mkdtemp(prefix="livemig-demo-"))
    print(f"livemig demo ({'postcopy' if args.postcopy or _policy(args) else 'precopy'}): {_fmt_bytes(args.memory)} guest dirtying "
          f"{'all RAM' if not args.ws_mib else f'{args.ws_mib} MiB'} (work dir {tmp})")
    extra = None
    if args.tls:
        from .tls import make_test_pki
        pki = make_test_pki(tmp / "pki")  # a throw-away CA: both endpoints' files in one directory
        extra = {side: ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint={ep}"]
                 for side, ep in (("src", "client"), ("dst", "server"))}
        print(f"TLS on every connection (throw-away CA in {pki})")
    procs = start_vms(tmp, make_image(args.ws_mib, args.prefill), f"{args.memory >> 20}M", quiet=False,
                      extra=extra)
    rc = 1
    try:
        wait_workload(tmp, procs[0], 1)
        print(f"source guest running: {passes_from_output((tmp / 'src.log').read_bytes())} pass(es) done; migrating")
        result = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", None,
                               args.max_bandwidth, args.downtime_limit, postcopy=args.postcopy,
                               preempt=args.preempt, multifd=args.multifd, policy=_policy(args),
                               urgent_process=args.urgent_process,
                               report=args.report, tls_creds="tls0" if args.tls else None)
        integrity = None
        if result["source"].get("status") == "completed":
            integrity = verify_migrated(tmp, args.memory, args.ws_mib)
            rc = 0 if integrity[0] else 1
        print_summary(result, integrity)
    except MigrationError as e:
        print(f"livemig demo: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        stop_vms(tmp, procs)
    return rc


def start_vms(tmp: Path, image: bytes, memory: str, wrap: dict[str, list[str]] | None = None,
              quiet: bool = True, extra: dict[str, list[str]] | None = None) -> list[subprocess.Popen]:
    """A source VM running `image` and a destination waiting for it (`--incoming defer`), with QMP
    on unix:{tmp}/src.qmp, dst.qmp and serial logs src.log, dst.log; `wrap` prefixes a side's
    command (e.g. `ip netns exec NS`), `extra` adds options (e.g. `--object ...`). Returns
    [src, dst] once both answer QMP."""
    from .errors import MigrationError
    from .qmpclient import QMPClient

    (tmp / "guest.img").write_bytes(image)
    base = [sys.executable, "-m", "livemig", "vm", "--memory", memory, "--boot-sector", str(tmp / "guest.img")]
    procs = []
    for name, opts in (("src", []), ("dst", ["--incoming", "defer"])):
        cmd = (wrap or {}).get(name, []) + base + ["--qmp", f"unix:{tmp}/{name}.qmp",
                                                  "--serial", f"file:{tmp}/{name}.log"] + opts \
            + (extra or {}).get(name, [])
        out = subprocess.DEVNULL if quiet else open(tmp / f"{name}.out", "wb")
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if not quiet else subprocess.DEVNULL))
    try:
        for name in ("src", "dst"):
            QMPClient(f"unix:{tmp}/{name}.qmp").close()
    except Exception as e:
        stop_vms(tmp, procs)
        raise MigrationError(f"the VMs did not start: {e}") from None
    return procs


def wait_workload(tmp: Path, proc: subprocess.Popen, passes: int, timeout: float = 120.0) -> None:
    """Until the source's workload guest (serial log src.log in `tmp`) has done `passes` passes."""
    from .errors import MigrationError
    from .guest.image import passes_from_output

    log = tmp / "src.log"
    deadline = time.monotonic() + timeout
    while passes_from_output(log.read_bytes() if log.exists() else b"") < passes:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise MigrationError("the source guest did not start its workload")
        time.sleep(0.05)


def verify_migrated(tmp: Path, memory: int, ws_mib: int) -> tuple[bool, str]:
    """After a completed migration of the workload guest between the VMs whose QMP sockets and
    serial logs are src.qmp/dst.qmp and src.log/dst.log in `tmp`: the guest makes progress on the
    destination, the source is postmigrate, and the guest's memory invariant holds on the
    destination page by page against the paused source."""
    from .integrity import check, first_bytes
    from .qmpclient import QMPClient

    src, dst = QMPClient(f"unix:{tmp}/src.qmp"), QMPClient(f"unix:{tmp}/dst.qmp")
    dst_log = tmp / "dst.log"
    before = dst_log.stat().st_size  # the destination goes on printing one character per pass
    deadline = time.monotonic() + 60
    while dst_log.stat().st_size <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    running = dst_log.stat().st_size > before
    dst.cmd("stop")
    lo = 1 << 20
    top = min(memory, 3 << 30)
    end = top if not ws_mib else min(lo + (ws_mib << 20), top)
    src.cmd("pmemsave", val=lo, size=end - lo, filename=str(tmp / "src.ram"))
    dst.cmd("pmemsave", val=lo, size=end - lo, filename=str(tmp / "dst.ram"))
    ok, why = check(first_bytes(str(tmp / "src.ram")), first_bytes(str(tmp / "dst.ram")))
    for f in ("src.ram", "dst.ram"):
        (tmp / f).unlink()
    st = src.cmd("query-status")["status"]
    if not running:
        ok, why = False, "the guest did not make progress on the destination"
    elif st != "postmigrate":
        ok, why = False, f"source is '{st}', expected 'postmigrate'"
    dst.cmd("cont")
    src.close()
    dst.close()
    return ok, why + f"; guest running on the destination, source {st}"


def stop_vms(tmp: Path, procs: list, remove: bool = False) -> None:
    """`quit` the demo's two VMs over QMP (src.qmp, dst.qmp in `tmp`); kill what does not exit;
    with `remove`, delete `tmp` afterwards (benchmarks: the demo keeps its work dir to look at)."""
    from .qmpclient import QMPClient
    for n in ("src", "dst"):
        try:
            QMPClient(f"unix:{tmp}/{n}.qmp", timeout=2).cmd("quit")
        except Exception:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livemig", description="Live migration of KVM virtual machines.")
    p.add_argument("--version", action="version", version=f"livemig {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    vm = sub.add_parser("vm", help="run one VM in the foreground (like qemu-system-x86_64)")
    vm.add_argument("--memory", "-m", type=parse_size, default=parse_size("128M"), help="guest RAM (e.g. 1G)")
    vm.add_argument("--boot-sector", help="512-byte boot sector image (default: the built-in workload guest)")
    vm.add_argument("--ws-mib", type=int, default=0, help="built-in guest: working set in MiB (0 = all RAM)")
    vm.add_argument("--prefill", action="store_true", help="built-in guest: touch all RAM once first")
    vm.add_argument("--memory-backend", choices=("auto", "ram", "memfd", "hugetlb"), default="auto",
                    help="guest RAM: anonymous memory (THP), a memfd (shared memory), or 2 MiB hugetlb "
                         "pages (reserve them first); auto (default): memfd for an --incoming VM where "
                         "userfaultfd has minor faults on shared memory (postcopy then places pages "
                         "with UFFDIO_CONTINUE), else ram")
    vm.add_argument("--kernel", help="boot a Linux kernel (bzImage or ELF vmlinux) on the Linux machine")
    vm.add_argument("--initrd", help="with --kernel: initial ramdisk")
    vm.add_argument("--append", help="with --kernel: kernel command line (default: livemig.guest.linux.DEFAULT_APPEND)",
                    default=None)
    vm.add_argument("--extract-vmlinux", action="store_true",
                    help="with a bzImage: boot the ELF vmlinux inside it (no in-guest decompression)")
    vm.add_argument("--machine", choices=("bootsector", "linux"), default=None,
                    help="machine type (default: linux with --kernel, else bootsector); an incoming "
                         "Linux VM needs --machine linux or --kernel, like the source")
    vm.add_argument("--qmp", required=True, help="QMP socket: unix:PATH or tcp:127.0.0.1:PORT")
    vm.add_argument("--serial", default="null", help="UART backend: file:PATH, stdio, unix:PATH,server=on,wait=off, null")
    vm.add_argument("--incoming", help="wait for a migration: 'defer' or a URI")
    vm.add_argument("--incoming-prealloc", choices=("on", "off"), default="on",
                    help="with --incoming: allocate guest RAM in the background while waiting (default on)")
    vm.add_argument("--object", action="append", default=[], metavar="SPEC",
                    help="tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off] "
                         "(repeatable; migrate-set-parameters tls-creds=ID turns TLS on)")
    vm.set_defaults(func=cmd_vm)

    mg = sub.add_parser("migrate", help="migrate a running VM to a waiting one, over QMP")
    mg.add_argument("--from", dest="src", required=True, help="QMP address of the source VM")
    mg.add_argument("--to", dest="dst", required=True, help="QMP address of the destination VM")
    mg.add_argument("--uri", help="migration URI (default tcp:127.0.0.1:<free port>)")
    mg.add_argument("--max-bandwidth", type=parse_size_bytes, help="bytes/s (suffixes K/M/G allowed)")
    mg.add_argument("--downtime-limit", type=int, help="ms")
    mg.add_argument("--tls-creds", metavar="ID",
                    help="TLS on every connection: the id of the tls-creds-x509 object of both VMs")
    mg.add_argument("--tls-hostname", metavar="NAME",
                    help="the name in the destination's certificate (default: the host of a tcp: URI)")
    _migration_options(mg)
    mg.set_defaults(func=cmd_migrate)

    dm = sub.add_parser("demo", help="boot the workload guest and migrate it live to a second VM on this host")
    dm.add_argument("--memory", type=parse_size, default=parse_size("1G"))
    dm.add_argument("--ws-mib", type=int, default=None,
                    help="working set the guest dirties (0 = all RAM; default 256, all RAM with --postcopy)")
    dm.add_argument("--prefill", action="store_true", default=True)
    dm.add_argument("--no-prefill", dest="prefill", action="store_false")
    dm.add_argument("--max-bandwidth", type=parse_size_bytes, default=100_000_000_000)
    dm.add_argument("--downtime-limit", type=int, default=None)
    dm.add_argument("--tls", action="store_true", help="TLS on every connection (makes a throw-away CA)")
    _migration_options(dm)
    dm.set_defaults(func=cmd_demo)
    return p


def _migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--postcopy", action="store_true",
                   help="postcopy-ram; without a policy option, switch after the first full pass")
    p.add_argument("--preempt", action="store_true", help="with postcopy: postcopy-preempt (a second connection)")
    p.add_argument("--urgent-process", action="store_true",
                   help="with --preempt: each side serves page requests in a process of its own "
                        "(x-urgent-process; lower fault latency, ~23 MiB more memory a side)")
    p.add_argument("--multifd", type=int, default=0, metavar="N", help="precopy over N multifd channels")
    p.add_argument("--switchover-budget", type=int, metavar="MS",
                   help="switch to postcopy when precopy would not finish within MS ms (implies --postcopy)")
    p.add_argument("--postcopy-after-passes", type=int, metavar="N",
                   help="switch to postcopy after N full precopy passes (implies --postcopy)")
    p.add_argument("--report", metavar="DIR", help="write the sampled timeline (JSON) and a plot (PNG) into DIR")


def parse_size_bytes(text: str) -> int:
    """Like parse_size, but a bare number means bytes."""
    if text.strip().isdigit():
        return int(text)
    return parse_size(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
