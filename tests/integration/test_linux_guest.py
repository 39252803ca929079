"""A real Linux guest (Debian's kernel + a busybox initramfs) migrated live while it boots.

One guest travels through the whole module, so the boot is paid once (minutes on kvm_pvm):
source --precopy--> A --postcopy--> B --file:--> C. Each step checks that the kernel log
carries on (no reboot, printk time continues, no oops) up to a later known line, that the
source stays paused, and, where the destination can be held before it runs, that every page of
guest RAM is identical; C then finishes the kernel's boot (``Run /init as init process``). Select
them with ``-m linux``. C then goes to D, whose console is a unix socket, and a line typed there
comes back as the guest tty's echo. The last step, D at the initramfs's busybox shell migrated to
E where a typed command is answered, needs a host whose KVM runs guest user space: kvm_pvm (this
project's CI machines) does not for a normal kernel (see pvm_compat), so there init is a program
that spins without a system call (``SPIN_INIT``), which keeps the kernel up and the console open,
and the last step moves D to E by postcopy instead, where a typed line is echoed by the tty.
"""
from __future__ import annotations

import re
import time

import pytest

from livemig.console_client import ConsoleClient
from livemig.guest.linux import COUNTER_PREFIX, INIT_MARKER, SPIN_APPEND
from livemig.machine.pvm_compat import host_is_pvm

from linuxtools import (MEMORY, assert_healthy, assert_log_continues, assert_same_ram,
                        linux_boot_args, wait_output)
from vmtools import VM, migrate

pytestmark = [pytest.mark.linux, pytest.mark.slow]

EARLY_LINE = b"Linux version"
# where each hop happens and the later line its destination must reach (kernel 6.1, boot order)
PRECOPY_AT = b"x86/fpu: x87 FPU will use FXSAVE"  # timer interrupts on, before SMP alternatives
PRECOPY_LATER = b"Freeing SMP alternatives memory"
POSTCOPY_AT = PRECOPY_LATER
POSTCOPY_LATER = b"smp: Brought up 1 node"
FILE_AT = b"devtmpfs: initialized"
FILE_LATER = b"NET: Registered PF_NETLINK"
BOOT_DONE = b"Run /init as init process"  # the kernel's last line before user space
# init on kvm_pvm, which kills a normal kernel's init at its first system call (see the module doc)
INIT_ARGS = ["--append", SPIN_APPEND] if host_is_pvm() else []
BOOT_DONE_PVM = b"Run /bin/spin as init process"
TYPED_LINE = "livemig typed this line on the destination's console: 0123456789\n"  # > a 16-byte FIFO


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The VMs of the module (closed at the end) and the one that holds the guest now."""
    tmp = tmp_path_factory.mktemp("linux")
    state = {"tmp": tmp, "vms": [], "current": None}
    yield state
    for vm in state["vms"]:
        vm.close()
    if state["vms"]:
        import asyncio
        state["vms"][0].qmp._aloop.close()
        asyncio.set_event_loop(None)
    for vm in state["vms"]:
        assert "Traceback" not in vm.stderr(), f"{vm.name} printed a traceback:\n{vm.stderr()}"


def _vm(chain, name: str, **kw) -> VM:
    vm = VM(chain["tmp"], name, memory=MEMORY, **kw)
    chain["vms"].append(vm)
    return vm


def _dest(chain, name: str, **kw) -> VM:
    return _vm(chain, name, boot=["--machine", "linux"], incoming="defer", **kw)


def _current(chain) -> VM:
    vm = chain["current"]
    if vm is None:
        pytest.fail("an earlier step of the chain failed: no running Linux guest to migrate")
    return vm


def _precopy_held(src: VM, dst: VM, what: str) -> None:
    """Precopy from `src` to `dst`, which is held stopped after it, so that every page of guest RAM
    can be compared while neither side runs."""
    dst.cmd("stop")
    info = migrate(src, dst)
    assert info["status"] == "completed", info
    dst.wait_status({"completed"}, timeout=60)
    print(f"{what}: downtime {info.get('downtime')} ms, total {info.get('total-time')} ms, "
          f"{info['ram']['transferred'] >> 20} MiB")
    print(assert_same_ram(src, dst))


def _handed_over(src: VM, dst: VM, later: bytes, timeout: float) -> None:
    """The guest runs on `dst` and reaches `later`; `src` is paused and prints nothing more."""
    assert src.cmd("query-status")["status"] == "postmigrate"
    src_out = src.output()
    wait_output(dst, later, timeout)
    assert dst.cmd("query-status")["status"] == "running"
    dst_out = dst.output()
    assert_log_continues(src_out, dst_out)
    assert_healthy(dst_out, dst.name)
    assert src.output() == src_out, "the source guest ran after migration"


def test_boot_prints_early_line(chain):
    src = _vm(chain, "src", boot=linux_boot_args() + INIT_ARGS)
    took = wait_output(src, EARLY_LINE, 180)
    print(f"'{EARLY_LINE.decode()}' after {took:.1f} s")
    chain["current"] = src


def test_precopy_mid_boot(chain):
    src = _current(chain)
    wait_output(src, PRECOPY_AT, 600)
    dst = _dest(chain, "a")
    _precopy_held(src, dst, "precopy mid-boot")
    dst.cmd("cont")
    _handed_over(src, dst, PRECOPY_LATER, 300)
    chain["current"] = dst


def test_postcopy_mid_boot(chain):
    src = _current(chain)
    wait_output(src, POSTCOPY_AT, 600)
    dst = _dest(chain, "b")
    caps = [{"capability": c, "state": True} for c in ("events", "postcopy-ram")]
    src.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-set-capabilities", capabilities=caps + [{"capability": "postcopy-blocktime", "state": True}])
    src.cmd("migrate-set-parameters", **{"downtime-limit": 1})  # precopy alone cannot finish
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    addr = dst.cmd("query-migrate")["socket-address"][0]
    src.cmd("migrate", uri=f"tcp:{addr['host']}:{addr['port']}")
    src.cmd("migrate-start-postcopy")  # at once: nearly every page the kernel touches is demand-faulted
    info = src.wait_status({"completed", "failed"}, timeout=300)
    assert info["status"] == "completed", info
    dinfo = dst.wait_status({"completed"}, timeout=60)
    requests = info["ram"].get("postcopy-requests", 0)
    print(f"postcopy: downtime {info.get('downtime')} ms, total {info.get('total-time')} ms, "
          f"{requests} page requests, blocktime {dinfo.get('postcopy-blocktime')} ms")
    assert requests > 0, "no page was demand-faulted: this was not a postcopy migration"
    _handed_over(src, dst, POSTCOPY_LATER, 300)
    chain["current"] = dst


def test_save_to_file_and_load_in_fresh_process(chain):
    src = _current(chain)
    wait_output(src, FILE_AT, 600)
    path = chain["tmp"] / "linux.vmstate"
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": False}])
    src.cmd("migrate", uri=f"file:{path}")
    info = src.wait_status({"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info
    print(f"saved {path.stat().st_size >> 20} MiB in {info.get('total-time')} ms")
    dst = _dest(chain, "c")
    dst.cmd("stop")
    dst.cmd("migrate-incoming", uri=f"file:{path}")
    dst.wait_status({"completed"}, timeout=120)
    print(assert_same_ram(src, dst))
    dst.cmd("cont")
    _handed_over(src, dst, FILE_LATER, 300)
    chain["current"] = dst


def test_kernel_finishes_booting_on_the_destination(chain):
    """After three migrations the kernel runs every initcall to its end and starts /init."""
    vm = _current(chain)
    done = BOOT_DONE_PVM if INIT_ARGS else BOOT_DONE
    took = wait_output(vm, done, 1200)
    print(f"'{done.decode()}' {took:.0f} s after the file hop's check")
    assert_healthy(vm.output().split(done)[0], vm.name)


def test_typed_line_echoes_on_the_destination_console(chain):
    """The booted guest moves to a destination whose console is a unix socket; a line typed there,
    longer than the UART's FIFO, comes back whole as the echo of the guest's tty, which init holds
    open: the UART's receive interrupt, its routing and the tty's state all came across, and the
    console feeds the guest no faster than it reads (nothing lost to an overrun)."""
    src = _current(chain)
    if INIT_ARGS:
        time.sleep(5)  # init spins
    else:  # a host that runs user space: the initramfs's /init has started its counter and shell
        wait_output(src, INIT_MARKER.encode(), 1200)
        wait_output(src, f"{COUNTER_PREFIX} 1\n".encode(), 120)
    assert b"Kernel panic" not in src.output(), "init died"
    sock = chain["tmp"] / "d.console"
    dst = _dest(chain, "d", serial=f"unix:{sock},server=on,wait=off")
    console = ConsoleClient(sock, dst.serial)
    try:
        _precopy_held(src, dst, "precopy after boot")
        src_out = src.output()
        start = len(dst.output())
        dst.cmd("cont")
        _typed_line_echoes(src, dst, console, src_out, start)
    finally:
        console.close()
    chain["current"] = dst


def _typed_line_echoes(src: VM, dst: VM, console: ConsoleClient, src_out: bytes, start: int) -> None:
    """TYPED_LINE typed on `dst`'s console comes back as the tty's echo after output position
    `start`; the UART did not overrun, `dst` runs, the source is postmigrate and printed nothing
    after `src_out`, and the kernel log is healthy."""
    console.type(TYPED_LINE)
    echo = TYPED_LINE.rstrip("\n").encode() + b"\r\n"  # the tty echoes a newline as CR LF
    took = wait_output(dst, echo, 300, start=start)
    print(f"the typed line came back on {dst.name}'s console in {took:.1f} s")
    out = dst.output()
    assert b"input overrun" not in out, "the UART's receive FIFO overran"
    assert dst.cmd("query-status")["status"] == "running"
    assert src.cmd("query-status")["status"] == "postmigrate"
    assert_healthy(out, dst.name)
    assert src.output() == src_out, "the source guest ran after migration"


def _console_echo_after_postcopy(chain) -> None:
    src = _current(chain)
    sock = chain["tmp"] / "e.console"
    dst = _dest(chain, "e", serial=f"unix:{sock},server=on,wait=off")
    console = ConsoleClient(sock, dst.serial)
    try:
        migrate(src, dst, caps=["events", "postcopy-ram"], params={"downtime-limit": 1}, wait=False)
        src.cmd("migrate-start-postcopy")  # at once: the rest of guest RAM arrives on demand or pushed
        info = src.wait_status({"completed", "failed"}, timeout=300)
        assert info["status"] == "completed", info
        dst.wait_status({"completed"}, timeout=60)
        print(f"postcopy at the console: downtime {info.get('downtime')} ms, total {info.get('total-time')} ms, "
              f"{info['ram'].get('postcopy-requests', 0)} page requests")
        src_out = src.output()
        start = len(dst.output())
        _typed_line_echoes(src, dst, console, src_out, start)
    finally:
        console.close()
    chain["current"] = dst


def _counters(out: bytes) -> list[int]:
    return [int(n) for n in re.findall(COUNTER_PREFIX.encode() + rb" (\d+)", out)]


def test_console_answers_on_the_destination(chain):
    """Where KVM runs guest user space: the guest reaches the initramfs's busybox shell, is migrated
    to a destination whose console is a unix socket, and a command typed there is answered: the
    shell, its tty and the UART's receive interrupt all came across; the /init's counter (one line
    a second) carries on. On kvm_pvm, which kills a normal kernel's init at its first system call
    (SYSCALL faults, INT 0x80 is #UD), init spins in user mode (SPIN_INIT) and no shell can run:
    there the booted guest moves by postcopy, switched at once, to such a destination, and a line
    typed there comes back as the tty's echo (the kernel's tty, the UART and the kernel memory
    they use, demand-faulted, all came across), which proves everything but the shell."""
    if host_is_pvm():
        _console_echo_after_postcopy(chain)
        return
    src = _current(chain)  # /init started on an earlier VM of the chain: its counter goes on here
    wait_output(src, f"{COUNTER_PREFIX} ".encode(), 120)
    sock = chain["tmp"] / "e.console"
    dst = _dest(chain, "e", serial=f"unix:{sock},server=on,wait=off")
    console = ConsoleClient(sock, dst.serial)
    try:
        info = migrate(src, dst)
        assert info["status"] == "completed", info
        dst.wait_status({"completed"}, timeout=60)
        print(f"precopy at the shell: downtime {info.get('downtime')} ms, total {info.get('total-time')} ms")
        assert src.cmd("query-status")["status"] == "postmigrate"
        src_out = src.output()
        last = _counters(src_out)[-1]
        wait_output(dst, f"{COUNTER_PREFIX} {last + 1}\n".encode(), 120)
        assert _counters(dst.output())[0] == last + 1, "the counter did not carry on where it stopped"
        start = len(dst.output())
        console.type("echo LIVEMIG-$((6*7))-ANSWER\n")  # the echo of the typed line shows no 42
        took = wait_output(dst, b"LIVEMIG-42-ANSWER", 120, start=start)
        print(f"the shell answered on the destination's console in {took:.1f} s")
        assert dst.cmd("query-status")["status"] == "running"
        assert_healthy(dst.output(), dst.name)
        assert src.output() == src_out, "the source guest ran after migration"
    finally:
        console.close()
    chain["current"] = dst
