"""KvmMachine: one vCPU, one RAM block laid out like QEMU's pc machine, a UART, CMOS and port 0x92.

Threading: the vCPU runs KVM_RUN on its own thread. ``pause()`` sets ``kvm_run.immediate_exit`` and
kicks that thread with SIGUSR1; the thread parks only after a KVM_RUN that returned EINTR, so any
pending port-I/O-in has been completed by KVM and the vCPU state is consistent when ``pause()`` returns.

A Python SIGUSR1 handler must exist (otherwise the kick kills the process). The constructor installs
a no-op one when it runs on the main thread; a machine built on another thread requires the main thread
to have installed a SIGUSR1 handler first (``install_kick_handler()``), else GuestError.
"""
from __future__ import annotations

import mmap
import os
import signal
import struct
import sys
import threading
from typing import Callable

import numpy as np

from ..errors import GuestError
from ..threadname import NamedThread, VCPU_THREAD_NAME, set_thread_name
from . import kvm
from .chardev import open_chardev
from . import linux_boot, pvm_compat
from .devices import CmosRtc, CpuState, GlobalState, Port92, Serial16550
from .kvm_devices import vm_devices

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE = 4096
HIGH_BASE = 4 * GiB
LOWMEM_LIMIT = 0xE0000000  # at/above this, pc splits RAM: 3 GiB low, the rest at 4 GiB
LOWMEM_SPLIT = 3 * GiB
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
KICK_SIGNAL = signal.SIGUSR1

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_HUGETLB = 0x40000
_MAP_HUGE_2MB = 21 << 26  # log2(2 MiB) << MAP_HUGE_SHIFT
HUGE_PAGE = 2 << 20


def _noop_handler(signum, frame) -> None:  # pragma: no cover - trivial
    pass


def install_kick_handler() -> None:
    """Install the no-op SIGUSR1 handler (main thread only) unless a Python handler is already set."""
    cur = signal.getsignal(KICK_SIGNAL)
    if callable(cur):
        return
    if threading.current_thread() is not threading.main_thread():
        raise GuestError("KvmMachine built off the main thread needs a Python SIGUSR1 handler: "
                         "call livemig.machine.vm.install_kick_handler() from the main thread first")
    signal.signal(KICK_SIGNAL, _noop_handler)


class KvmMachine:
    def __init__(self, memory_size: int, serial: str = "null", *,
                 on_fatal: Callable[[str], None] | None = None, hugetlb: bool = False,
                 linux: bool = False, memfd: bool = False) -> None:
        """``linux``: the machine for a Linux kernel: in-kernel PICs, IOAPIC, LAPIC and PIT, the
        UART on IRQ 4, the whole vCPU state migrated, and the kvm_pvm fixups where needed."""
        if memory_size < 2 * MiB or memory_size % (2 * MiB):
            raise GuestError(f"memory size {memory_size} is not a multiple of 2 MiB >= 2 MiB")
        install_kick_handler()
        self.memory_size = memory_size
        self.on_fatal = on_fatal
        self.hugetlb = hugetlb
        self.memfd = memfd and not hugetlb
        self.ram_fd: int | None = None  # memfd backend: the file behind guest RAM
        # memfd backend: a second mapping of guest RAM that the guest does not use; a postcopy
        # destination writes pages there before it maps them into the guest (minor faults)
        self.ram_alias: mmap.mmap | None = None
        self.ram_alias_addr = 0
        self.linux = linux
        self.pvm = linux and pvm_compat.host_is_pvm()
        self._fixups: pvm_compat.EmulationFixups | None = None
        self.page_size = HUGE_PAGE if hugetlb else 4096  # host page size of the RAM block
        self.lowmem_size = LOWMEM_SPLIT if memory_size >= LOWMEM_LIMIT else memory_size
        self.highmem_size = memory_size - self.lowmem_size

        self._system = self._vm = self._vcpu = None
        self.ram = None
        self._chardev = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._ctl = threading.Lock()
        self._want_pause = False
        self._stop = False
        self._parked = False
        self._dead = False
        self._started = False
        self._dirty_logging = False
        self._vmm_dirty: set[int] = set()  # pages this process wrote for the guest since the last sync
        self._vmm_dirty_lock = threading.Lock()
        self._manual_protect = False
        self.fatal_message: str | None = None
        try:
            self._setup(serial)
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------
    def _setup(self, serial: str) -> None:
        self._system = kvm.KvmSystem()
        if not self._system.check_extension(kvm.KVM_CAP_IMMEDIATE_EXIT):
            raise GuestError("KVM lacks KVM_CAP_IMMEDIATE_EXIT")
        self._vm = self._system.create_vm()
        try:  # dirty log in manual-protect mode: fetching and re-protecting become separate steps
            self._vm.enable_cap(kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)
            self._manual_protect = True
        except GuestError:
            self._manual_protect = False
        # both before creating a vCPU
        self._vm.set_tss_addr(TSS_ADDR)
        self._vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        if self.linux:  # before the vCPU, so it gets an in-kernel LAPIC
            self._vm.create_irqchip()
            self._vm.create_pit2()

        if self.hugetlb:
            try:  # 2 MiB hugetlb pages, like QEMU's memory-backend-memfd,hugetlb=on
                self.ram = mmap.mmap(-1, self.memory_size,
                                     flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB | _MAP_HUGE_2MB,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                raise GuestError(f"cannot map {self.memory_size >> 20} MiB of 2 MiB huge pages ({e.strerror}): "
                                 f"reserve them first, e.g. echo N > /proc/sys/vm/nr_hugepages") from None
        elif self.memfd:  # like QEMU's memory-backend-memfd: shared memory, mapped by this file
            self.ram_fd = os.memfd_create("livemig-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.ram_fd, self.memory_size)
            self.ram = mmap.mmap(self.ram_fd, self.memory_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.ram_alias = mmap.mmap(self.ram_fd, self.memory_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.ram_alias_addr = kvm.buffer_address(self.ram_alias)
        else:
            self.ram = mmap.mmap(-1, self.memory_size,
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
            try:  # like QEMU: transparent huge pages for guest RAM (postcopy turns them off again)
                self.ram.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, AttributeError):
                pass
        self.ram_host_addr = kvm.buffer_address(self.ram)
        # (slot, gpa, block offset, size)
        self._slots: list[tuple[int, int, int, int]] = [(0, 0, 0, self.lowmem_size)]
        if self.highmem_size:
            self._slots.append((1, HIGH_BASE, self.lowmem_size, self.highmem_size))
        self._set_slots(0)

        self._vcpu = self._vm.create_vcpu(0)
        cpuid = self._system.supported_cpuid()
        if self.pvm:
            cpuid = pvm_compat.adjust_cpuid(cpuid)
            self._fixups = pvm_compat.EmulationFixups(
                self._vcpu, lambda gpa: self.ram_host_addr + self.gpa_to_offset(gpa), self._vmm_wrote)
        self._vcpu.set_cpuid2(cpuid)

        self._chardev = open_chardev(serial)
        self.cpu = CpuState(self._vcpu, msr_list=self._system.msr_index_list() if self.linux else None)
        irq = None
        if self.linux:
            vm = self._vm
            irq = lambda level: vm.irq_line(4, level)  # noqa: E731 - ISA IRQ 4, as COM1
        self.serial = Serial16550(self._chardev, irq_handler=irq)
        self.rtc = CmosRtc(self.lowmem_size, self.highmem_size)
        self.port92 = Port92(on_reset=self._reset_request)
        pio = [self.serial, self.rtc, self.port92]
        self.globalstate = GlobalState()  # the run state a migration carries
        # load order: in-kernel chips and clock, then the vCPU (LAPIC, MSRs), then the rest
        self._devices = (vm_devices(self._vm) if self.linux else []) + [self.cpu] + pio + [self.globalstate]
        self._ports: dict[int, object] = {}
        for d in pio:
            for p in d.ports:
                self._ports[p] = d

    def _set_slots(self, flags: int) -> None:
        for slot, gpa, off, size in self._slots:
            self._vm.set_user_memory_region(slot, flags, gpa, size, self.ram_host_addr + off)

    def _reset_request(self) -> None:
        self._fatal_from_vcpu("guest requested a system reset (port 0x92 bit 0)")

    # -- memory ---------------------------------------------------------------------------
    def gpa_to_offset(self, gpa: int) -> int:
        if 0 <= gpa < self.lowmem_size:
            return gpa
        if HIGH_BASE <= gpa < HIGH_BASE + self.highmem_size:
            return gpa - HIGH_BASE + self.lowmem_size
        raise GuestError(f"guest-physical address {gpa:#x} is not RAM")

    def read_guest(self, gpa: int, n: int) -> bytes:
        """Bytes of guest RAM, read with the GIL held: never for pages postcopy may not have placed."""
        off = self.gpa_to_offset(gpa)
        return bytes(self.ram[off:off + n])

    def _write_guest(self, gpa: int, data: bytes) -> None:
        off = self.gpa_to_offset(gpa)
        if off + len(data) > self.memory_size or (off < self.lowmem_size < off + len(data)):
            raise GuestError(f"{len(data)} bytes at {gpa:#x} do not fit in guest RAM")
        self.ram[off:off + len(data)] = data

    def load_linux(self, kernel: "linux_boot.Kernel", initrd: bytes = b"", cmdline: str = "") -> None:
        """Put a kernel, initrd and command line in RAM and set the vCPU for the 64-bit boot protocol."""
        if not self.linux:
            raise GuestError("load_linux needs the Linux machine (linux=True)")
        if self.running:
            raise GuestError("load_linux while the guest runs")
        cmd = cmdline.encode()
        if b"\0" in cmd or len(cmd) >= linux_boot.CMDLINE_MAX:
            raise GuestError("kernel command line is too long or holds a NUL byte")
        for seg in kernel.segments:
            if seg.paddr + seg.memsz > self.lowmem_size:
                raise GuestError(f"kernel segment at {seg.paddr:#x} (+{seg.memsz:#x}) is beyond the "
                                 f"{self.lowmem_size >> 20} MiB of low RAM")
            self._write_guest(seg.paddr, seg.data)
            if seg.memsz > len(seg.data):  # .bss: RAM is fresh (zero) unless reloaded
                self._write_guest(seg.paddr + len(seg.data), bytes(seg.memsz - len(seg.data)))
        initrd_addr = 0
        if initrd:
            initrd_addr = linux_boot.initrd_address(kernel, len(initrd), self.lowmem_size)
            self._write_guest(initrd_addr, initrd)
        self._write_guest(linux_boot.CMDLINE_ADDR, cmd + b"\0")
        e820 = linux_boot.e820_map(self.lowmem_size, self.highmem_size, HIGH_BASE)
        self._write_guest(linux_boot.BOOT_PARAMS_ADDR,
                          linux_boot.boot_params(kernel, cmd, initrd_addr, len(initrd), e820))
        for addr, table in linux_boot.page_tables().items():
            self._write_guest(addr, table)
        self._write_guest(linux_boot.GDT_ADDR, linux_boot.GDT)
        self._enter_long_mode(kernel.entry)

    def _enter_long_mode(self, entry: int) -> None:
        v = self._vcpu
        sr = v.get_sregs()
        code = (0, 0xFFFFFFFF, linux_boot.BOOT_CS, 0x0B, 1, 0, 0, 1, 1, 1, 0, 0)  # type..unusable
        data = (0, 0xFFFFFFFF, linux_boot.BOOT_DS, 0x03, 1, 0, 1, 1, 0, 1, 0, 0)
        for i, name in enumerate(kvm.SEG_NAMES):
            if name == "cs":
                kvm.SEGMENT.pack_into(sr, i * kvm.SEGMENT.size, *code)
            elif name in ("ds", "es", "fs", "gs", "ss"):
                kvm.SEGMENT.pack_into(sr, i * kvm.SEGMENT.size, *data)
            elif name == "tr":
                kvm.SEGMENT.pack_into(sr, i * kvm.SEGMENT.size, 0, 0xFFFF, 0, 0x0B, 1, 0, 0, 0, 0, 0, 0, 0)
        kvm.DTABLE.pack_into(sr, kvm.SREGS_GDT, linux_boot.GDT_ADDR, len(linux_boot.GDT) - 1)
        kvm.DTABLE.pack_into(sr, kvm.SREGS_IDT, 0, 0)
        ctrl = dict(cr0=0x80000011, cr2=0, cr3=linux_boot.PML4_ADDR, cr4=0x20, cr8=0, efer=0x500)
        for i, n in enumerate(kvm.SREGS_CTRL_NAMES):
            if n in ctrl:  # PE|ET|PG (caches on), PAE, LME|LMA; apic_base stays
                struct.pack_into("<Q", sr, kvm.SREGS_CTRL + 8 * i, ctrl[n])
        v.set_sregs(sr)
        regs = dict.fromkeys(kvm.REG_NAMES, 0)
        regs.update(rip=entry, rsi=linux_boot.BOOT_PARAMS_ADDR, rsp=0x8FF0, rflags=0x2)
        v.set_regs(regs)
        fpu = bytearray(kvm.FPU.size)
        kvm.FPU.pack_into(fpu, 0, bytes(128), 0x37F, 0, 0, 0, 0, 0, bytes(256), 0x1F80)
        v.set_fpu(fpu)
        lapic = bytearray(v.get_lapic())
        struct.pack_into("<I", lapic, 0x350, 0x700)  # LVT LINT0: ExtINT (the PIC's virtual wire)
        struct.pack_into("<I", lapic, 0x360, 0x400)  # LVT LINT1: NMI
        v.set_lapic(lapic)

    def load_boot_sector(self, image: bytes) -> None:
        """Put the first 512 bytes at 0x7c00 and set the BIOS hand-over state (real mode, 0:7c00, DL=0x80)."""
        if len(image) < 512:
            raise GuestError(f"boot sector is {len(image)} bytes, need 512")
        if self.running:
            raise GuestError("load_boot_sector while the guest runs")
        self.ram[0x7C00:0x7E00] = bytes(image[:512])
        v = self._vcpu
        sr = v.get_sregs()
        for i, name in enumerate(kvm.SEG_NAMES):
            base, limit, sel, *attrs = kvm.SEGMENT.unpack_from(sr, i * kvm.SEGMENT.size)
            if name in ("tr", "ldt"):
                continue
            # real-mode segment: selector 0, base 0, 64 KiB limit
            typ = 0x0B if name == "cs" else 0x03
            kvm.SEGMENT.pack_into(sr, i * kvm.SEGMENT.size, 0, 0xFFFF, 0, typ, 1, 0, 0, 1, 0, 0, 0, 0)
        regs = dict.fromkeys(kvm.REG_NAMES, 0)
        regs.update(rip=0x7C00, rdx=0x80, rsp=0x6F00, rflags=0x2)
        v.set_sregs(sr)
        v.set_regs(regs)
        self.port92.outport = 0x02  # the BIOS left A20 on

    # -- vCPU thread ----------------------------------------------------------------------
    def start(self) -> None:
        with self._ctl:
            if self._started:
                return
            if self._dead:
                raise GuestError(f"vCPU is stopped: {self.fatal_message}")
            self._started = True
            self._want_pause = False
            self._vcpu.immediate_exit = 0
            self._thread = NamedThread(target=self._vcpu_main, name=VCPU_THREAD_NAME, daemon=True)
            self._thread.start()

    def vcpu_thread_ids(self) -> list[int]:
        """Kernel thread ids of the vCPU threads (userfaultfd reports them for faults)."""
        t = self._thread
        return [t.native_id] if t is not None and t.native_id is not None else []

    @property
    def running(self) -> bool:
        return self._started and not self._dead and not self._want_pause and not self._stop

    @property
    def halted(self) -> bool:
        """The guest executed HLT (with no interrupt source it stays there)."""
        return self.cpu.halted

    def pause(self) -> None:
        with self._ctl:
            if not self._started or self._dead:
                return
            with self._cv:
                if self._want_pause and self._parked:
                    return
                self._want_pause = True
                self._vcpu.immediate_exit = 1
                self._cv.notify_all()  # wakes a halted vCPU
                while not self._parked and not self._dead:
                    signal.pthread_kill(self._thread.ident, KICK_SIGNAL)
                    self._cv.wait(0.05)

    def resume(self) -> None:
        with self._ctl:
            if self._dead:
                raise GuestError(f"vCPU is stopped: {self.fatal_message}")
            if not self._started:
                pass
            else:
                with self._cv:
                    if not self._want_pause:
                        return
                    self._want_pause = False
                    self._vcpu.immediate_exit = 0
                    self._cv.notify_all()
                    return
        self.start()

    def _park(self) -> bool:
        """Called on the vCPU thread after a KVM_RUN returned EINTR. Returns False to exit the thread."""
        with self._cv:
            if not self._want_pause and not self._stop:
                return True
            self._parked = True
            self._cv.notify_all()
            while self._want_pause and not self._stop:
                self._cv.wait()
            self._parked = False
            return not self._stop

    def _fatal_from_vcpu(self, msg: str) -> None:
        self.fatal_message = msg
        raise _VcpuFatal(msg)

    def _vcpu_main(self) -> None:
        set_thread_name(VCPU_THREAD_NAME)  # before any guest code: tells vCPU faults apart by name
        try:
            self._vcpu_loop()
        except _VcpuFatal as e:
            self._die(str(e))
        except BaseException as e:  # a bug in a device model must not leave pause() hanging
            self._die(f"vCPU thread crashed: {type(e).__name__}: {e}")
        else:
            with self._cv:
                self._parked = False
                self._cv.notify_all()

    def _die(self, msg: str) -> None:
        self.fatal_message = msg
        with self._cv:
            self._dead = True
            self._cv.notify_all()
        print(f"livemig: vCPU stopped: {msg}", file=sys.stderr, flush=True)
        cb = self.on_fatal
        if cb is not None:
            try:
                cb(msg)
            except Exception as e:  # pragma: no cover
                print(f"livemig: on_fatal callback failed: {e}", file=sys.stderr, flush=True)

    def _vcpu_loop(self) -> None:
        vcpu = self._vcpu
        run = vcpu.run
        fd = vcpu.fd
        ioctl = kvm.libc_ioctl
        get_errno = kvm.ctypes.get_errno
        KVM_RUN = kvm.KVM_RUN
        EINTR = kvm.errno.EINTR
        EAGAIN = kvm.errno.EAGAIN
        EXIT_IO = kvm.KVM_EXIT_IO
        EXIT_HLT = kvm.KVM_EXIT_HLT
        EXIT_INTR = kvm.KVM_EXIT_INTR
        io_unpack = kvm.RUN_IO.unpack_from
        u32 = struct.Struct("<I").unpack_from
        ports = self._ports
        OUT = kvm.KVM_EXIT_IO_OUT
        cpu = self.cpu
        cv = self._cv
        linux = self.linux
        fixups = self._fixups
        EXIT_MMIO = kvm.KVM_EXIT_MMIO
        EXIT_INTERNAL = kvm.KVM_EXIT_INTERNAL_ERROR
        mmio_unpack = kvm.RUN_MMIO.unpack_from
        while True:
            if cpu.halted:
                # HLT with no interrupt source: idle until paused (or stopped); stays halted
                # across pause/resume unless a load() clears it. No KVM_RUN is pending here.
                with cv:
                    while cpu.halted and not self._want_pause and not self._stop:
                        cv.wait()
                if not self._park():
                    return
                continue
            if ioctl(fd, KVM_RUN, None) < 0:
                e = get_errno()
                if e == EINTR or e == EAGAIN:
                    if self._want_pause or self._stop:
                        if not self._park():
                            return
                    continue
                self._fatal_from_vcpu(f"KVM_RUN failed: errno {e} ({kvm.os.strerror(e)})")
            (reason,) = u32(run, 8)
            if reason == EXIT_IO:
                direction, size, port, count, off = io_unpack(run, 32)
                dev = ports.get(port)
                if direction == OUT:
                    if dev is None:
                        continue
                    if size == 1:
                        for i in range(count):
                            dev.pio_write(port, 1, run[off + i])
                    else:
                        for i in range(count):
                            p = off + i * size
                            dev.pio_write(port, size, int.from_bytes(run[p:p + size], "little"))
                else:
                    for i in range(count):
                        p = off + i * size
                        if dev is None:
                            run[p:p + size] = b"\xff" * size
                        else:
                            v = dev.pio_read(port, size) if size == 1 else _wide_read(dev, port, size)
                            run[p:p + size] = (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                continue
            if reason == EXIT_INTR:
                continue
            if reason == EXIT_HLT:
                cpu.halted = True
                continue
            if reason == EXIT_MMIO and linux:  # nothing is mapped there: reads float high
                addr, data, ln, wr = mmio_unpack(run, kvm.RUN_UNION)
                if not wr:
                    run[kvm.RUN_UNION + 8:kvm.RUN_UNION + 8 + min(ln, 8)] = b"\xff" * min(ln, 8)
                continue
            if reason == EXIT_INTERNAL and fixups is not None and fixups.handle(run):
                continue
            self._fatal_from_vcpu(self._describe_exit(reason))

    def _describe_exit(self, reason: int) -> str:
        run = self._vcpu.run
        name = kvm.EXIT_NAMES.get(reason, str(reason))
        msg = f"KVM exit {name} ({reason})"
        try:
            regs = self._vcpu.get_regs()
            msg += f" at rip={regs['rip']:#x}"
        except GuestError:
            pass
        if reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            sub, nd = kvm.RUN_INTERNAL.unpack_from(run, kvm.RUN_UNION)
            data = struct.unpack_from(f"<{min(nd, 16)}Q", run, kvm.RUN_UNION + 8)
            msg += f": suberror {sub}, data [{', '.join(hex(x) for x in data)}]"
        elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
            hw, cpu = kvm.RUN_FAIL_ENTRY.unpack_from(run, kvm.RUN_UNION)
            msg += f": hardware entry failure reason {hw:#x}"
        elif reason == kvm.KVM_EXIT_SYSTEM_EVENT:
            typ, _ = kvm.RUN_SYSTEM_EVENT.unpack_from(run, kvm.RUN_UNION)
            msg += f": type {typ}"
        elif reason == kvm.KVM_EXIT_MMIO:
            addr, data, ln, wr = kvm.RUN_MMIO.unpack_from(run, kvm.RUN_UNION)
            msg += f": {'write' if wr else 'read'} of {ln} bytes at {addr:#x}"
        elif reason == kvm.KVM_EXIT_SHUTDOWN:
            msg += " (triple fault)"
        return msg

    # -- dirty logging --------------------------------------------------------------------
    def dirty_log_start(self) -> None:
        self._set_slots(kvm.KVM_MEM_LOG_DIRTY_PAGES)
        self._dirty_logging = True

    def dirty_log_stop(self) -> None:
        self._set_slots(0)
        self._dirty_logging = False

    def dirty_log_sync(self, clear: bool = True) -> np.ndarray:
        """Fetch-and-clear the dirty bitmap of the whole block (bit i of word w = page 64*w + i).

        clear=False (the last sync, with the vCPU stopped) only fetches: re-protecting every dirty
        page for logging that is about to stop costs milliseconds of downtime per GiB."""
        if not self._dirty_logging:
            raise GuestError("dirty logging is not enabled")
        npages = self.memory_size // PAGE
        bitmap = np.zeros((npages + 63) // 64, dtype="<u8")
        base = bitmap.ctypes.data
        for slot, gpa, off, size in self._slots:
            # off is a multiple of 2 MiB, so each slot's bitmap starts on a u64 boundary
            addr = base + (off // PAGE) // 8
            self._vm.get_dirty_log(slot, addr)
            if self._manual_protect and clear:
                self._vm.clear_dirty_log(slot, 0, size // PAGE, addr)
        with self._vmm_dirty_lock:
            mine, self._vmm_dirty = self._vmm_dirty, set()
        if mine:  # writes made here (emulated instructions) that KVM's log cannot see
            pages = np.fromiter(mine, dtype=np.int64, count=len(mine))
            np.bitwise_or.at(bitmap, pages // 64, np.left_shift(np.uint64(1), (pages % 64).astype(np.uint64)))
        return bitmap

    def _vmm_wrote(self, gpa: int) -> None:
        """A guest byte at `gpa` was written by this process (not by the guest through KVM)."""
        if self._dirty_logging:
            with self._vmm_dirty_lock:
                self._vmm_dirty.add(self.gpa_to_offset(gpa) // PAGE)

    # -- devices --------------------------------------------------------------------------
    def devices(self) -> list:
        return list(self._devices)

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        t = self._thread
        if t is not None and t.is_alive():
            with self._cv:
                self._stop = True
                self._want_pause = True
                if self._vcpu is not None:
                    self._vcpu.immediate_exit = 1
                self._cv.notify_all()
            while t.is_alive():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    break
                t.join(0.05)
        self._thread = None
        self._started = False
        if self._chardev is not None:
            self._chardev.close()
            self._chardev = None
        if self._vcpu is not None:
            self._vcpu.close()
            self._vcpu = None
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        if self._system is not None:
            self._system.close()
            self._system = None
        for name in ("ram", "ram_alias"):
            mapping = getattr(self, name)
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:
                    pass  # views are still exported; the mapping goes when they do
                setattr(self, name, None)
        if self.ram_fd is not None:  # the memfd holds guest RAM until its last reference goes
            os.close(self.ram_fd)
            self.ram_fd = None

    def take_ram_alias(self) -> mmap.mmap | None:
        """Hand the second mapping of guest RAM over (to a postcopy destination, which unmaps it
        when it is done); None if there is none."""
        alias, self.ram_alias, self.ram_alias_addr = self.ram_alias, None, 0
        return alias

    def __enter__(self) -> "KvmMachine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _VcpuFatal(Exception):
    pass


def _wide_read(dev, port: int, size: int) -> int:
    """A 16/32-bit IN on 8-bit devices: consecutive byte ports, like the ISA bus splits it."""
    v = 0
    for i in range(size):
        v |= (dev.pio_read(port + i, 1) & 0xFF) << (8 * i) if (port + i) in dev.ports else 0xFF << (8 * i)
    return v
