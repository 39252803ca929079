"""Thin /dev/kvm bindings: ioctl numbers, struct layouts and fd wrappers (x86-64 only).

Conventions:
* Small fixed structs go through ``fcntl.ioctl`` with a bytearray <= 1024 bytes (that releases
  the GIL); anything larger goes through ctypes ``libc.ioctl`` (which always releases it).
* ``KVM_RUN`` is issued with ctypes ``libc.ioctl(fd, KVM_RUN, 0)`` and ``use_errno=True``: it drops the
  GIL and reports EINTR instead of retrying (``fcntl.ioctl`` retries EINTR per PEP 475).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct

from ..errors import GuestError

# ---------------------------------------------------------------------------------------------
# ioctl numbers (checked against <linux/kvm.h>, x86-64)

KVMIO = 0xAE


def _ioc(d: int, nr: int, size: int) -> int:
    return (d << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(3, nr, size)


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, 16)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, 416)
KVM_SET_FPU = _iow(0x8D, 416)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_MP_STATE = _ior(0x98, 4)
KVM_SET_MP_STATE = _iow(0x99, 4)
KVM_GET_VCPU_EVENTS = _ior(0x9F, 64)
KVM_SET_VCPU_EVENTS = _iow(0xA0, 64)
KVM_ENABLE_CAP = _iow(0xA3, 104)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, 24)

# in-kernel devices and the full vCPU state (the Linux machine)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, 8)
KVM_GET_IRQCHIP = _iowr(0x62, 520)
KVM_SET_IRQCHIP = _ior(0x63, 520)  # really _IOR in <linux/kvm.h>
KVM_CREATE_PIT2 = _iow(0x77, 64)
KVM_SET_CLOCK = _iow(0x7B, 48)
KVM_GET_CLOCK = _ior(0x7C, 48)
KVM_TRANSLATE = _iowr(0x85, 24)
KVM_GET_LAPIC = _ior(0x8E, 1024)
KVM_SET_LAPIC = _iow(0x8F, 1024)
KVM_GET_PIT2 = _ior(0x9F, 112)
KVM_SET_PIT2 = _iow(0xA0, 112)
KVM_GET_DEBUGREGS = _ior(0xA1, 128)
KVM_SET_DEBUGREGS = _iow(0xA2, 128)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, 4096)
KVM_SET_XSAVE = _iow(0xA5, 4096)
KVM_GET_XCRS = _ior(0xA6, 392)
KVM_SET_XCRS = _iow(0xA7, 392)

assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46 and KVM_GET_SREGS == 0x8138AE83
assert KVM_GET_DIRTY_LOG == 0x4010AE42 and KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
assert KVM_SET_IRQCHIP == 0x8208AE63 and KVM_GET_PIT2 == 0x8070AE9F and KVM_GET_VCPU_EVENTS == 0x8040AE9F

# capabilities
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IRQCHIP = 0
KVM_CAP_PIT2 = 33
KVM_CAP_XSAVE2 = 208

KVM_PIT_SPEAKER_DUMMY = 1
KVM_CLOCK_REALTIME = 1 << 2
# kvm_irqchip chip ids
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
IRQCHIP_SIZE = 520  # u32 chip_id, u32 pad, 512 bytes of chip state
XSAVE_SIZE = 4096
LAPIC_SIZE = 1024
PIT2_SIZE = 112
CLOCK_SIZE = 48  # u64 clock, u32 flags, u32 pad0, u64 realtime, u64 host_tsc, u32 pad[4]
XCRS_SIZE = 392
DEBUGREGS_SIZE = 128
# kvm_vcpu_events: exception {injected, nr, has_error_code, pending, u32 error_code}, ..., flags at 20
EVENTS_FLAGS = 20
KVM_VCPUEVENT_VALID_NMI_PENDING = 1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 2

# memory region flags
KVM_MEM_LOG_DIRTY_PAGES = 1

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# mp_state
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3

# ---------------------------------------------------------------------------------------------
# struct layouts

# struct kvm_run (the mmap'ed page of a vCPU)
RUN_REQUEST_INTERRUPT_WINDOW = 0  # u8
RUN_IMMEDIATE_EXIT = 1  # u8
RUN_EXIT_REASON = 8  # u32
RUN_UNION = 32
# io: u8 direction, u8 size, u16 port, u32 count, u64 data_offset
RUN_IO = struct.Struct("<BBHIQ")
# mmio: u64 phys_addr, u8 data[8], u32 len, u8 is_write
RUN_MMIO = struct.Struct("<Q8sIB")
# internal: u32 suberror, u32 ndata, u64 data[16]
RUN_INTERNAL = struct.Struct("<II")
# fail_entry: u64 hardware_entry_failure_reason, u32 cpu
RUN_FAIL_ENTRY = struct.Struct("<QI")
# system_event: u32 type, u32 ndata, u64 data[16]
RUN_SYSTEM_EVENT = struct.Struct("<II")

# struct kvm_userspace_memory_region
MEM_REGION = struct.Struct("<IIQQQ")  # slot, flags, guest_phys_addr, memory_size, userspace_addr
# struct kvm_dirty_log
DIRTY_LOG = struct.Struct("<IIQ")  # slot, pad, bitmap pointer
# struct kvm_clear_dirty_log
CLEAR_DIRTY_LOG = struct.Struct("<IIQQ")  # slot, num_pages, first_page, bitmap pointer
# struct kvm_enable_cap
ENABLE_CAP = struct.Struct("<II4Q64x")

# struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
REGS = struct.Struct("<18Q")

# struct kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable, pad
SEGMENT = struct.Struct("<QIHBBBBBBBBBx")
SEG_ATTRS = ("type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
# struct kvm_dtable: base, limit, pad[3]
DTABLE = struct.Struct("<QH6x")
SEG_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
# struct kvm_sregs: 8 segments, gdt, idt, cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap[4]
SREGS_SEGS = 0
SREGS_GDT = 8 * 24
SREGS_IDT = SREGS_GDT + 16
SREGS_CTRL = SREGS_IDT + 16  # 7 x u64
SREGS_CTRL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
SREGS_BITMAP = SREGS_CTRL + 7 * 8  # 4 x u64
SREGS_SIZE = 312
assert SREGS_BITMAP + 32 == SREGS_SIZE

# struct kvm_fpu: fpr[8][16], fcw u16, fsw u16, ftwx u8, pad u8, last_opcode u16, last_ip u64,
# last_dp u64, xmm[16][16], mxcsr u32, pad u32
FPU = struct.Struct("<128sHHBxHQQ256sI4x")
assert FPU.size == 416

# struct kvm_msrs { u32 nmsrs, pad; struct kvm_msr_entry { u32 index, reserved; u64 data } [] }
MSR_ENTRY = struct.Struct("<IIQ")

# struct kvm_cpuid_entry2: function, index, flags, eax, ebx, ecx, edx, padding[3]
CPUID_ENTRY_SIZE = 40

# ---------------------------------------------------------------------------------------------
# libc

_libc = ctypes.CDLL(None, use_errno=True)
libc_ioctl = _libc.ioctl
libc_ioctl.restype = ctypes.c_int
libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


def _err(what: str, e: int) -> GuestError:
    return GuestError(f"{what}: {os.strerror(e)} (errno {e})")


def ioctl_int(fd: int, req: int, arg: int = 0, what: str = "ioctl") -> int:
    """An ioctl with an integer argument; returns the non-negative result."""
    if 0 <= arg < 1 << 31:
        try:
            return fcntl.ioctl(fd, req, arg)
        except OSError as e:
            raise _err(what, e.errno or 0) from None
    return ioctl_ptr(fd, req, arg, what)  # fcntl.ioctl takes only a C int


def ioctl_buf(fd: int, req: int, buf: bytearray, what: str = "ioctl") -> int:
    """An ioctl on a mutable buffer (in place). Large buffers go through ctypes (GIL released)."""
    if len(buf) <= 1024:
        try:
            return fcntl.ioctl(fd, req, buf, True)
        except OSError as e:
            raise _err(what, e.errno or 0) from None
    cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
    r = libc_ioctl(fd, req, ctypes.addressof(cbuf))
    del cbuf
    if r < 0:
        raise _err(what, ctypes.get_errno())
    return r


def ioctl_ptr(fd: int, req: int, addr: int, what: str = "ioctl") -> int:
    r = libc_ioctl(fd, req, addr)
    if r < 0:
        raise _err(what, ctypes.get_errno())
    return r


def buffer_address(buf) -> int:
    """Address of a writable buffer (bytearray, mmap); holds no export afterwards."""
    c = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(c)
    del c
    return addr


# ---------------------------------------------------------------------------------------------
# fd wrappers


class KvmSystem:
    """The /dev/kvm fd."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise GuestError(f"cannot open {path}: {e.strerror}") from None
        ver = ioctl_int(self.fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if ver != 12:
            os.close(self.fd)
            raise GuestError(f"unsupported KVM API version {ver}")

    def check_extension(self, cap: int) -> int:
        return ioctl_int(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return ioctl_int(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, nent: int = 256) -> bytearray:
        """struct kvm_cpuid2 (header + entries) as returned by KVM_GET_SUPPORTED_CPUID."""
        buf = bytearray(8 + nent * CPUID_ENTRY_SIZE)
        struct.pack_into("<I", buf, 0, nent)
        ioctl_buf(self.fd, KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        (n,) = struct.unpack_from("<I", buf, 0)
        return buf[: 8 + n * CPUID_ENTRY_SIZE]

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        probe = bytearray(4)
        try:
            fcntl.ioctl(self.fd, KVM_GET_MSR_INDEX_LIST, probe, True)
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise _err("KVM_GET_MSR_INDEX_LIST", e.errno or 0) from None
        (n,) = struct.unpack_from("<I", probe)
        buf = bytearray(4 + 4 * n)
        struct.pack_into("<I", buf, 0, n)
        ioctl_buf(self.fd, KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
        (n,) = struct.unpack_from("<I", buf)
        return list(struct.unpack_from(f"<{n}I", buf, 4))

    def create_vm(self) -> "KvmVm":
        fd = ioctl_int(self.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return KvmVm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVm:
    """A VM fd."""

    def __init__(self, system: KvmSystem, fd: int) -> None:
        self.system = system
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return ioctl_int(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION(vm)")

    def set_tss_addr(self, addr: int) -> None:
        ioctl_int(self.fd, KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        ioctl_buf(self.fd, KVM_SET_IDENTITY_MAP_ADDR, bytearray(struct.pack("<Q", addr)),
                  "KVM_SET_IDENTITY_MAP_ADDR")

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        buf = bytearray(MEM_REGION.pack(slot, flags, gpa, size, hva))
        ioctl_buf(self.fd, KVM_SET_USER_MEMORY_REGION, buf, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        buf = bytearray(DIRTY_LOG.pack(slot, 0, bitmap_addr))
        ioctl_buf(self.fd, KVM_GET_DIRTY_LOG, buf, "KVM_GET_DIRTY_LOG")

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap_addr: int) -> None:
        buf = bytearray(CLEAR_DIRTY_LOG.pack(slot, num_pages, first_page, bitmap_addr))
        ioctl_buf(self.fd, KVM_CLEAR_DIRTY_LOG, buf, "KVM_CLEAR_DIRTY_LOG")

    def enable_cap(self, cap: int, *args: int) -> None:
        a = list(args) + [0] * (4 - len(args))
        ioctl_buf(self.fd, KVM_ENABLE_CAP, bytearray(ENABLE_CAP.pack(cap, 0, *a)), "KVM_ENABLE_CAP")

    # -- in-kernel interrupt controllers, PIT and clock ------------------------------------
    def create_irqchip(self) -> None:
        ioctl_int(self.fd, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        ioctl_buf(self.fd, KVM_CREATE_PIT2, bytearray(struct.pack("<I60x", flags)), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        ioctl_buf(self.fd, KVM_IRQ_LINE, bytearray(struct.pack("<II", irq, level)), "KVM_IRQ_LINE")

    def get_irqchip(self, chip: int) -> bytes:
        buf = bytearray(IRQCHIP_SIZE)
        struct.pack_into("<I", buf, 0, chip)
        ioctl_buf(self.fd, KVM_GET_IRQCHIP, buf, "KVM_GET_IRQCHIP")
        return bytes(buf[8:])

    def set_irqchip(self, chip: int, state: bytes) -> None:
        buf = bytearray(struct.pack("<II", chip, 0) + bytes(state))
        ioctl_buf(self.fd, KVM_SET_IRQCHIP, buf, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> bytes:
        buf = bytearray(PIT2_SIZE)
        ioctl_buf(self.fd, KVM_GET_PIT2, buf, "KVM_GET_PIT2")
        return bytes(buf)

    def set_pit2(self, state: bytes) -> None:
        ioctl_buf(self.fd, KVM_SET_PIT2, bytearray(state), "KVM_SET_PIT2")

    def get_clock(self) -> tuple[int, int]:
        """(kvmclock ns, flags)."""
        buf = bytearray(CLOCK_SIZE)
        ioctl_buf(self.fd, KVM_GET_CLOCK, buf, "KVM_GET_CLOCK")
        return struct.unpack_from("<QI", buf)

    def set_clock(self, clock: int, flags: int = 0) -> None:
        buf = bytearray(CLOCK_SIZE)
        struct.pack_into("<QI", buf, 0, clock, flags)
        ioctl_buf(self.fd, KVM_SET_CLOCK, buf, "KVM_SET_CLOCK")

    def create_vcpu(self, index: int = 0) -> "KvmVcpu":
        fd = ioctl_int(self.fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        return KvmVcpu(self, fd, self.system.vcpu_mmap_size())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVcpu:
    """A vCPU fd and its kvm_run mapping."""

    def __init__(self, vm: KvmVm, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.run = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The kvm_run header as a ctypes view for cheap immediate_exit / exit_reason access.
        self.run_addr = buffer_address(self.run)
        self._immediate_exit = ctypes.c_uint8.from_address(self.run_addr + RUN_IMMEDIATE_EXIT)
        self._exit_reason = ctypes.c_uint32.from_address(self.run_addr + RUN_EXIT_REASON)

    # -- run ------------------------------------------------------------------------------
    def run_once(self) -> int:
        """KVM_RUN. Returns 0 on an exit, or -errno (e.g. -EINTR) on failure; never raises."""
        r = libc_ioctl(self.fd, KVM_RUN, None)
        if r < 0:
            return -ctypes.get_errno()
        return 0

    @property
    def immediate_exit(self) -> int:
        return self._immediate_exit.value

    @immediate_exit.setter
    def immediate_exit(self, v: int) -> None:
        self._immediate_exit.value = v

    @property
    def exit_reason(self) -> int:
        return self._exit_reason.value

    # -- registers ------------------------------------------------------------------------
    def get_regs(self) -> dict[str, int]:
        buf = bytearray(REGS.size)
        ioctl_buf(self.fd, KVM_GET_REGS, buf, "KVM_GET_REGS")
        return dict(zip(REG_NAMES, REGS.unpack(buf)))

    def set_regs(self, regs: dict[str, int]) -> None:
        buf = bytearray(REGS.pack(*(regs[n] for n in REG_NAMES)))
        ioctl_buf(self.fd, KVM_SET_REGS, buf, "KVM_SET_REGS")

    def get_sregs(self) -> bytearray:
        buf = bytearray(SREGS_SIZE)
        ioctl_buf(self.fd, KVM_GET_SREGS, buf, "KVM_GET_SREGS")
        return buf

    def set_sregs(self, buf: bytes | bytearray) -> None:
        ioctl_buf(self.fd, KVM_SET_SREGS, bytearray(buf), "KVM_SET_SREGS")

    def get_fpu(self) -> bytearray:
        buf = bytearray(FPU.size)
        ioctl_buf(self.fd, KVM_GET_FPU, buf, "KVM_GET_FPU")
        return buf

    def set_fpu(self, buf: bytes | bytearray) -> None:
        ioctl_buf(self.fd, KVM_SET_FPU, bytearray(buf), "KVM_SET_FPU")

    def get_msrs(self, indices: list[int] | tuple[int, ...]) -> dict[int, int]:
        """Reads the MSRs one by one semantics: unreadable ones are left out of the result."""
        out: dict[int, int] = {}
        todo = list(indices)
        while todo:
            buf = bytearray(8 + MSR_ENTRY.size * len(todo))
            struct.pack_into("<II", buf, 0, len(todo), 0)
            for i, idx in enumerate(todo):
                MSR_ENTRY.pack_into(buf, 8 + i * MSR_ENTRY.size, idx, 0, 0)
            n = ioctl_buf(self.fd, KVM_GET_MSRS, buf, "KVM_GET_MSRS")
            for i in range(n):
                idx, _, val = MSR_ENTRY.unpack_from(buf, 8 + i * MSR_ENTRY.size)
                out[idx] = val
            todo = todo[n + 1:]  # entry n failed: skip it
        return out

    def set_msrs(self, values: dict[int, int]) -> int:
        items = list(values.items())
        if not items:
            return 0
        buf = bytearray(8 + MSR_ENTRY.size * len(items))
        struct.pack_into("<II", buf, 0, len(items), 0)
        for i, (idx, val) in enumerate(items):
            MSR_ENTRY.pack_into(buf, 8 + i * MSR_ENTRY.size, idx, 0, val)
        n = ioctl_buf(self.fd, KVM_SET_MSRS, buf, "KVM_SET_MSRS")
        if n != len(items):
            raise GuestError(f"KVM_SET_MSRS: MSR {items[n][0]:#x} was refused")
        return n

    def get_mp_state(self) -> int:
        buf = bytearray(4)
        ioctl_buf(self.fd, KVM_GET_MP_STATE, buf, "KVM_GET_MP_STATE")
        return struct.unpack("<I", buf)[0]

    def set_mp_state(self, state: int) -> None:
        ioctl_buf(self.fd, KVM_SET_MP_STATE, bytearray(struct.pack("<I", state)), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> bytearray:
        buf = bytearray(64)
        ioctl_buf(self.fd, KVM_GET_VCPU_EVENTS, buf, "KVM_GET_VCPU_EVENTS")
        return buf

    def set_vcpu_events(self, buf: bytes | bytearray) -> None:
        ioctl_buf(self.fd, KVM_SET_VCPU_EVENTS, bytearray(buf), "KVM_SET_VCPU_EVENTS")

    def _get(self, req: int, size: int, what: str) -> bytes:
        buf = bytearray(size)
        ioctl_buf(self.fd, req, buf, what)
        return bytes(buf)

    def get_lapic(self) -> bytes:
        return self._get(KVM_GET_LAPIC, LAPIC_SIZE, "KVM_GET_LAPIC")

    def set_lapic(self, state: bytes) -> None:
        ioctl_buf(self.fd, KVM_SET_LAPIC, bytearray(state), "KVM_SET_LAPIC")

    def get_xsave(self) -> bytes:
        return self._get(KVM_GET_XSAVE, XSAVE_SIZE, "KVM_GET_XSAVE")

    def set_xsave(self, state: bytes) -> None:
        ioctl_buf(self.fd, KVM_SET_XSAVE, bytearray(state), "KVM_SET_XSAVE")

    def get_xcrs(self) -> bytes:
        return self._get(KVM_GET_XCRS, XCRS_SIZE, "KVM_GET_XCRS")

    def set_xcrs(self, state: bytes) -> None:
        ioctl_buf(self.fd, KVM_SET_XCRS, bytearray(state), "KVM_SET_XCRS")

    def get_debugregs(self) -> bytes:
        return self._get(KVM_GET_DEBUGREGS, DEBUGREGS_SIZE, "KVM_GET_DEBUGREGS")

    def set_debugregs(self, state: bytes) -> None:
        ioctl_buf(self.fd, KVM_SET_DEBUGREGS, bytearray(state), "KVM_SET_DEBUGREGS")

    def get_tsc_khz(self) -> int:
        return ioctl_int(self.fd, KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_int(self.fd, KVM_SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ")

    def translate(self, linear: int) -> int | None:
        """Guest-physical address of a guest-virtual one under the current paging, or None."""
        buf = bytearray(struct.pack("<QQ8x", linear, 0))
        ioctl_buf(self.fd, KVM_TRANSLATE, buf, "KVM_TRANSLATE")
        _, phys, valid = struct.unpack_from("<QQB", buf)
        return phys if valid else None

    def set_cpuid2(self, cpuid: bytes | bytearray) -> None:
        ioctl_buf(self.fd, KVM_SET_CPUID2, bytearray(cpuid), "KVM_SET_CPUID2")

    def close(self) -> None:
        self._immediate_exit = None
        self._exit_reason = None
        if self.run is not None:
            self.run.close()
            self.run = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def eintr(r: int) -> bool:
    return r == -errno.EINTR
