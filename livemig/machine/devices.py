"""Devices of the KVM machine: the vCPU state, a 16550 UART, the CMOS/RTC and port 0x92; and the
run state a migration carries (QEMU's globalstate).

Every device has ``idstr``, ``instance_id``, ``vmsd`` (a VMStateDescription whose fields are the keys
of the dict that ``save()`` returns and ``load()`` takes) and is saved/loaded only while the vCPU is
paused. Port-I/O devices also have ``ports`` (the port numbers they claim) and
``pio_read(port, size) -> int`` / ``pio_write(port, size, value)``.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from ..errors import GuestError, ProtocolError
from ..wire.vmstate import Field, VMStateDescription
from . import kvm
from .chardev import CharBackend

KiB = 1024
MiB = 1024 * KiB

# ---------------------------------------------------------------------------------------------
# vCPU


# The MSRs saved with the vCPU, in a fixed order (so the section has a fixed layout).
MSR_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_PAT = 0x277
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

CPU_MSRS: tuple[int, ...] = (
    MSR_TSC, MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP,
    MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_KERNEL_GS_BASE, MSR_PAT, MSR_IA32_MISC_ENABLE,
)
N_MSRS = len(CPU_MSRS)


def _cpu_fields() -> tuple[Field, ...]:
    f: list[Field] = [Field(n, "uint64") for n in kvm.REG_NAMES]
    for s in kvm.SEG_NAMES:
        f += [
            Field(f"{s}_base", "uint64"),
            Field(f"{s}_limit", "uint32"),
            Field(f"{s}_selector", "uint16"),
            # type, present, dpl, db, s, l, g, avl, unusable
            Field(f"{s}_attrs", "uint8", count=len(kvm.SEG_ATTRS)),
        ]
    f += [
        Field("gdt_base", "uint64"), Field("gdt_limit", "uint16"),
        Field("idt_base", "uint64"), Field("idt_limit", "uint16"),
    ]
    f += [Field(n, "uint64") for n in kvm.SREGS_CTRL_NAMES]
    f += [Field("interrupt_bitmap", "uint64", count=4)]
    f += [
        Field("fpu_st", "buffer", size=128),  # fpr[8][16]
        Field("fpu_fcw", "uint16"), Field("fpu_fsw", "uint16"), Field("fpu_ftwx", "uint8"),
        Field("fpu_last_opcode", "uint16"), Field("fpu_last_ip", "uint64"), Field("fpu_last_dp", "uint64"),
        Field("fpu_xmm", "buffer", size=256),  # xmm[16][16]
        Field("fpu_mxcsr", "uint32"),
    ]
    f += [
        Field("msr_index", "uint32", count=N_MSRS),
        Field("msr_value", "uint64", count=N_MSRS),
        Field("msr_valid", "uint8", count=N_MSRS),
    ]
    f += [Field("mp_state", "uint32"), Field("vcpu_events", "buffer", size=64)]
    f += [Field("halted", "uint8")]  # stopped in HLT (userspace halt: no in-kernel irqchip)
    return tuple(f)


CPU_VMSD = VMStateDescription("cpu", 1, _cpu_fields())

# The Linux machine (in-kernel LAPIC) saves the whole vCPU: these subsections come on top.
MAX_MSRS = 128
CPU_FULL_SUBSECTIONS = (
    VMStateDescription("cpu/tsc", 1, (Field("tsc_khz", "uint32"),)),
    VMStateDescription("cpu/xsave", 1, (Field("xsave", "buffer", size=kvm.XSAVE_SIZE),)),
    VMStateDescription("cpu/xcrs", 1, (Field("xcrs", "buffer", size=kvm.XCRS_SIZE),)),
    VMStateDescription("cpu/debugregs", 1, (Field("debugregs", "buffer", size=kvm.DEBUGREGS_SIZE),)),
    VMStateDescription("cpu/lapic", 1, (Field("lapic", "buffer", size=kvm.LAPIC_SIZE),)),
    VMStateDescription("cpu/msrs", 1, (
        Field("count", "uint32"),
        Field("index", "uint32", count=MAX_MSRS),
        Field("value", "uint64", count=MAX_MSRS),
    )),
)
CPU_FULL_VMSD = VMStateDescription("cpu", 1, _cpu_fields(), CPU_FULL_SUBSECTIONS)

# KVM's paravirtual MSRs that point at guest memory: (MSR, address mask, bytes, name); bit 0 = on,
# except for the wall clock, which KVM writes at the address as soon as the MSR is written
PV_AREA_MSRS = (
    (0x4B564D00, ~0x0, 12, "wall-clock"),     # MSR_KVM_WALL_CLOCK_NEW: pvclock_wall_clock
    (0x11, ~0x0, 12, "wall-clock-legacy"),    # MSR_KVM_WALL_CLOCK
    (0x4B564D01, ~0x1, 32, "kvmclock"),       # MSR_KVM_SYSTEM_TIME_NEW: pvclock_vcpu_time_info
    (0x12, ~0x1, 32, "kvmclock-legacy"),      # MSR_KVM_SYSTEM_TIME
    (0x4B564D03, ~0x3F, 64, "steal-time"),    # MSR_KVM_STEAL_TIME: kvm_steal_time
    (0x4B564D02, ~0x3F, 64, "async-pf"),      # MSR_KVM_ASYNC_PF_EN: kvm_vcpu_pv_apf_data
    (0x4B564D04, ~0x1, 4, "pv-eoi"),          # MSR_KVM_PV_EOI_EN
)


class CpuState:
    """The vCPU as a device: registers, special registers, FPU/SSE, a fixed MSR list, mp_state, events.

    ``msr_list`` (the host's KVM_GET_MSR_INDEX_LIST) makes it the full vCPU of the Linux machine:
    TSC frequency, XSAVE, XCRs, debug registers, LAPIC and every listed MSR go in subsections, and
    load follows the order that works (LAPIC before MSRs, events last)."""

    idstr = "cpu"

    def __init__(self, vcpu: kvm.KvmVcpu, instance_id: int = 0, msr_list: list[int] | None = None) -> None:
        self.vcpu = vcpu
        self.instance_id = instance_id
        self.halted = False  # set by the run loop on KVM_EXIT_HLT
        self.msr_list = [i for i in (msr_list or ()) if i not in CPU_MSRS][:MAX_MSRS]
        self.full = msr_list is not None
        self.vmsd = CPU_FULL_VMSD if self.full else CPU_VMSD

    def save(self) -> dict[str, Any]:
        v = self.vcpu
        d: dict[str, Any] = {}
        d["mp_state"] = v.get_mp_state()  # first: it may process pending events
        d.update(v.get_regs())
        sr = v.get_sregs()
        for i, s in enumerate(kvm.SEG_NAMES):
            base, limit, sel, *attrs = kvm.SEGMENT.unpack_from(sr, i * kvm.SEGMENT.size)
            d[f"{s}_base"], d[f"{s}_limit"], d[f"{s}_selector"] = base, limit, sel
            d[f"{s}_attrs"] = list(attrs)
        d["gdt_base"], d["gdt_limit"] = kvm.DTABLE.unpack_from(sr, kvm.SREGS_GDT)
        d["idt_base"], d["idt_limit"] = kvm.DTABLE.unpack_from(sr, kvm.SREGS_IDT)
        for i, n in enumerate(kvm.SREGS_CTRL_NAMES):
            d[n] = int.from_bytes(sr[kvm.SREGS_CTRL + 8 * i: kvm.SREGS_CTRL + 8 * i + 8], "little")
        d["interrupt_bitmap"] = [
            int.from_bytes(sr[kvm.SREGS_BITMAP + 8 * i: kvm.SREGS_BITMAP + 8 * i + 8], "little") for i in range(4)
        ]
        (d["fpu_st"], d["fpu_fcw"], d["fpu_fsw"], d["fpu_ftwx"], d["fpu_last_opcode"], d["fpu_last_ip"],
         d["fpu_last_dp"], d["fpu_xmm"], d["fpu_mxcsr"]) = kvm.FPU.unpack(v.get_fpu())
        msrs = v.get_msrs(CPU_MSRS)
        d["msr_index"] = list(CPU_MSRS)
        d["msr_value"] = [msrs.get(i, 0) for i in CPU_MSRS]
        d["msr_valid"] = [1 if i in msrs else 0 for i in CPU_MSRS]
        d["vcpu_events"] = bytes(v.get_vcpu_events())
        d["halted"] = 1 if self.halted else 0
        if self.full:
            self._save_full(d)
        return d

    def hypervisor_areas(self) -> list[tuple[int, int, str]]:
        """Guest memory that KVM itself writes for the guest's paravirtual features (kvmclock,
        steal time, async PF, PV EOI), as the guest enabled them: (gpa, bytes, name). KVM rewrites
        these when a vCPU's state is loaded, so they differ between a source and its destination."""
        vals = self.vcpu.get_msrs([m for m, _, _, _ in PV_AREA_MSRS])
        out = []
        for msr, mask, size, name in PV_AREA_MSRS:
            v = vals.get(msr, 0)
            if v and (v & 1 or name.startswith("wall-clock")):
                out.append((v & mask, size, name))
        return out

    def _save_full(self, d: dict[str, Any]) -> None:
        v = self.vcpu
        d["cpu/tsc"] = {"tsc_khz": v.get_tsc_khz()}
        d["cpu/xsave"] = {"xsave": v.get_xsave()}
        d["cpu/xcrs"] = {"xcrs": v.get_xcrs()}
        d["cpu/debugregs"] = {"debugregs": v.get_debugregs()}
        d["cpu/lapic"] = {"lapic": v.get_lapic()}
        msrs = list(v.get_msrs(self.msr_list).items())
        pad = MAX_MSRS - len(msrs)
        d["cpu/msrs"] = {"count": len(msrs), "index": [i for i, _ in msrs] + [0] * pad,
                         "value": [x for _, x in msrs] + [0] * pad}

    def load(self, d: dict[str, Any]) -> None:
        v = self.vcpu
        missing = [s.name for s in CPU_FULL_SUBSECTIONS if s.name not in d]
        if self.full and missing:
            raise GuestError(f"cpu: the stream lacks {', '.join(missing)}: the source is not a Linux "
                             "machine (--kernel) but this destination is")
        if not self.full and len(missing) < len(CPU_FULL_SUBSECTIONS):
            raise GuestError("cpu: the stream carries a Linux machine's vCPU (LAPIC, XSAVE, MSR list) "
                             "but this destination was not started with --kernel")
        if self.full:
            khz = int(d["cpu/tsc"]["tsc_khz"])
            if khz and khz != v.get_tsc_khz():
                v.set_tsc_khz(khz)
        v.set_mp_state(int(d["mp_state"]))
        v.set_regs({n: int(d[n]) for n in kvm.REG_NAMES})
        sr = bytearray(kvm.SREGS_SIZE)
        for i, s in enumerate(kvm.SEG_NAMES):
            kvm.SEGMENT.pack_into(sr, i * kvm.SEGMENT.size, int(d[f"{s}_base"]), int(d[f"{s}_limit"]),
                                  int(d[f"{s}_selector"]), *(int(a) for a in d[f"{s}_attrs"]))
        kvm.DTABLE.pack_into(sr, kvm.SREGS_GDT, int(d["gdt_base"]), int(d["gdt_limit"]))
        kvm.DTABLE.pack_into(sr, kvm.SREGS_IDT, int(d["idt_base"]), int(d["idt_limit"]))
        for i, n in enumerate(kvm.SREGS_CTRL_NAMES):
            sr[kvm.SREGS_CTRL + 8 * i: kvm.SREGS_CTRL + 8 * i + 8] = int(d[n]).to_bytes(8, "little")
        for i, w in enumerate(d["interrupt_bitmap"]):
            sr[kvm.SREGS_BITMAP + 8 * i: kvm.SREGS_BITMAP + 8 * i + 8] = int(w).to_bytes(8, "little")
        v.set_sregs(sr)
        v.set_fpu(kvm.FPU.pack(bytes(d["fpu_st"]), int(d["fpu_fcw"]), int(d["fpu_fsw"]), int(d["fpu_ftwx"]),
                               int(d["fpu_last_opcode"]), int(d["fpu_last_ip"]), int(d["fpu_last_dp"]),
                               bytes(d["fpu_xmm"]), int(d["fpu_mxcsr"])))
        if self.full:
            v.set_xsave(bytes(d["cpu/xsave"]["xsave"]))
            v.set_xcrs(bytes(d["cpu/xcrs"]["xcrs"]))
            v.set_debugregs(bytes(d["cpu/debugregs"]["debugregs"]))
            v.set_lapic(bytes(d["cpu/lapic"]["lapic"]))  # before the MSRs: TSC_DEADLINE needs LVTT
        msrs = {}
        for idx, val, ok in zip(d["msr_index"], d["msr_value"], d["msr_valid"]):
            if ok:
                msrs[int(idx)] = int(val)
        if self.full:
            m = d["cpu/msrs"]
            n = int(m["count"])
            if n > MAX_MSRS:
                raise GuestError(f"cpu/msrs: count {n} > {MAX_MSRS}")
            for idx, val in zip(m["index"][:n], m["value"][:n]):
                msrs.setdefault(int(idx), int(val))
        if msrs:
            v.set_msrs(msrs)
        ev = bytearray(d["vcpu_events"])
        if self.full:  # last, with NMI and SIPI state marked valid
            flags = int.from_bytes(ev[kvm.EVENTS_FLAGS:kvm.EVENTS_FLAGS + 4], "little")
            flags |= kvm.KVM_VCPUEVENT_VALID_NMI_PENDING | kvm.KVM_VCPUEVENT_VALID_SIPI_VECTOR
            ev[kvm.EVENTS_FLAGS:kvm.EVENTS_FLAGS + 4] = flags.to_bytes(4, "little")
        v.set_vcpu_events(ev)
        self.halted = bool(d["halted"])


# ---------------------------------------------------------------------------------------------
# 16550 UART

UART_LCR_DLAB = 0x80
UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IER_MSI = 0x08
UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_FE = 0xC0
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_BI = 0x10
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_LSR_INT_ANY = 0x1E
UART_MCR_LOOP = 0x10
UART_MCR_OUT2 = 0x08
UART_MSR_DCD = 0x80
UART_MSR_DSR = 0x20
UART_MSR_CTS = 0x10
UART_MSR_ANY_DELTA = 0x0F
UART_FCR_FE = 0x01
UART_FCR_RFR = 0x02
UART_FCR_XFR = 0x04
RX_FIFO_SIZE = 16

SERIAL_VMSD = VMStateDescription("serial", 1, (
    Field("divider", "uint16"),
    Field("rbr", "uint8"),
    Field("ier", "uint8"),
    Field("iir", "uint8"),
    Field("lcr", "uint8"),
    Field("mcr", "uint8"),
    Field("lsr", "uint8"),
    Field("msr", "uint8"),
    Field("scr", "uint8"),
    Field("fcr", "uint8"),
    Field("thr_ipending", "uint8"),
    Field("irq_level", "uint8"),
    Field("rx_count", "uint8"),
    Field("rx_fifo", "buffer", size=RX_FIFO_SIZE),
))


class Serial16550:
    """A 16550A UART. Transmit is instantaneous (LSR always reports THR empty).

    All interrupt logic lives in ``_update_irq``; the line level is reported to ``irq_handler``
    (``None`` until the machine has an interrupt controller).
    """

    idstr = "serial"
    vmsd = SERIAL_VMSD

    def __init__(self, chardev: CharBackend, base: int = 0x3F8, instance_id: int = 0,
                 irq_handler: Callable[[int], None] | None = None) -> None:
        self.base = base
        self.ports = range(base, base + 8)
        self.instance_id = instance_id
        self.chardev = chardev
        self.irq_handler = irq_handler
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when the guest frees FIFO space
        self._write = chardev.write
        self.reset()
        chardev.set_input_handler(self.receive, self.room)

    def reset(self) -> None:
        self.divider = 0x0C
        self.rbr = 0
        self.ier = 0
        self.iir = UART_IIR_NO_INT
        self.lcr = 0
        self.mcr = UART_MCR_OUT2
        self.lsr = UART_LSR_TEMT | UART_LSR_THRE
        self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        self.scr = 0
        self.fcr = 0
        self.thr_ipending = 0
        self.irq_level = 0
        self.rx: deque[int] = deque()

    # -- interrupt line: the one place that decides it --------------------------------------
    def _update_irq(self) -> None:
        lsr, ier = self.lsr, self.ier
        if (ier & UART_IER_RLSI) and (lsr & UART_LSR_INT_ANY):
            iid = UART_IIR_RLSI
        elif (ier & UART_IER_RDI) and (lsr & UART_LSR_DR):
            iid = UART_IIR_RDI
        elif (ier & UART_IER_THRI) and self.thr_ipending:
            iid = UART_IIR_THRI
        elif (ier & UART_IER_MSI) and (self.msr & UART_MSR_ANY_DELTA):
            iid = UART_IIR_MSI
        else:
            iid = UART_IIR_NO_INT
        self.iir = iid | (self.iir & 0xF0)
        level = 0 if iid == UART_IIR_NO_INT else 1
        if level != self.irq_level:
            self.irq_level = level
            h = self.irq_handler
            if h is not None:
                h(level)

    # -- receive side (called from backend threads) ----------------------------------------
    def room(self, timeout: float = 0.0) -> int:
        """Bytes the receive FIFO takes now (QEMU's serial_can_receive), after waiting up to
        `timeout` s for the guest to read some. Backends feed no more than this, so input the
        guest is slow to read waits in the backend instead of overrunning the FIFO."""
        with self._room:
            self._room.wait_for(lambda: self._room_locked() > 0, timeout)
            return self._room_locked()

    def _room_locked(self) -> int:
        cap = RX_FIFO_SIZE if self.fcr & UART_FCR_FE else 1
        return max(0, cap - len(self.rx))

    def receive(self, data: bytes) -> None:
        with self._lock:
            self._receive_locked(data)

    def _receive_locked(self, data: bytes) -> None:
        cap = RX_FIFO_SIZE if self.fcr & UART_FCR_FE else 1
        for b in data:
            if len(self.rx) >= cap:
                self.lsr |= UART_LSR_OE
                continue
            self.rx.append(b)
        if self.rx:
            self.lsr |= UART_LSR_DR
        self._update_irq()

    # -- port I/O -------------------------------------------------------------------------
    def pio_write(self, port: int, size: int, val: int) -> None:
        off = port - self.base
        val &= 0xFF
        if off == 0 and not self.lcr & UART_LCR_DLAB:
            # THR: fast path
            if self.mcr & UART_MCR_LOOP:
                with self._lock:
                    self._receive_locked(bytes((val,)))
            else:
                self._write(bytes((val,)))
            if self.ier & UART_IER_THRI or self.thr_ipending:
                # QEMU semantics: the THR-empty interrupt drops on the write and comes back
                # once the character is gone (immediately here), giving the line an edge. Under
                # the lock: the input thread's receive() must not set the line in between
                with self._lock:
                    self.thr_ipending = 0
                    self._update_irq()
                    self.thr_ipending = 1
                    self._update_irq()
            return
        with self._lock:
            if off == 0:
                self.divider = (self.divider & 0xFF00) | val
            elif off == 1:
                if self.lcr & UART_LCR_DLAB:
                    self.divider = (self.divider & 0x00FF) | (val << 8)
                else:
                    changed = (self.ier ^ val) & 0x0F
                    self.ier = val & 0x0F
                    if changed & UART_IER_THRI:
                        self.thr_ipending = 1 if (self.ier & UART_IER_THRI and self.lsr & UART_LSR_THRE) else 0
                    self._update_irq()
            elif off == 2:
                if val & UART_FCR_RFR:
                    self.rx.clear()
                    self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
                self.fcr = val & 0xC9
                self._room.notify_all()  # the FIFO was emptied or switched on
                self.iir = (self.iir & 0x0F) | (UART_IIR_FE if val & UART_FCR_FE else 0)
                self._update_irq()
            elif off == 3:
                self.lcr = val
            elif off == 4:
                self.mcr = val & 0x1F
            elif off == 5:
                pass  # LSR is read-only (factory test only)
            elif off == 6:
                pass
            elif off == 7:
                self.scr = val

    def pio_read(self, port: int, size: int) -> int:
        off = port - self.base
        with self._lock:
            if off == 0:
                if self.lcr & UART_LCR_DLAB:
                    return self.divider & 0xFF
                if self.rx:
                    self.rbr = self.rx.popleft()
                    self._room.notify_all()
                if not self.rx:
                    self.lsr &= ~(UART_LSR_DR | UART_LSR_BI)
                self._update_irq()
                return self.rbr
            if off == 1:
                if self.lcr & UART_LCR_DLAB:
                    return (self.divider >> 8) & 0xFF
                return self.ier
            if off == 2:
                ret = self.iir
                if (ret & 0x0F) == UART_IIR_THRI:
                    self.thr_ipending = 0
                    self._update_irq()
                return ret
            if off == 3:
                return self.lcr
            if off == 4:
                return self.mcr
            if off == 5:
                ret = self.lsr
                if ret & (UART_LSR_BI | UART_LSR_OE):
                    self.lsr &= ~(UART_LSR_BI | UART_LSR_OE)
                    self._update_irq()
                return ret
            if off == 6:
                if self.mcr & UART_MCR_LOOP:
                    m = self.mcr
                    return ((m & 0x0C) << 4) | ((m & 0x02) << 3) | ((m & 0x01) << 5)
                ret = self.msr
                if self.msr & UART_MSR_ANY_DELTA:
                    self.msr &= 0xF0
                    self._update_irq()
                return ret
            return self.scr

    # -- state ----------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        with self._lock:
            rx = bytes(self.rx)[:RX_FIFO_SIZE]
            return {
                "divider": self.divider, "rbr": self.rbr, "ier": self.ier, "iir": self.iir,
                "lcr": self.lcr, "mcr": self.mcr, "lsr": self.lsr, "msr": self.msr, "scr": self.scr,
                "fcr": self.fcr, "thr_ipending": self.thr_ipending, "irq_level": self.irq_level,
                "rx_count": len(rx), "rx_fifo": rx.ljust(RX_FIFO_SIZE, b"\0"),
            }

    def load(self, d: dict[str, Any]) -> None:
        with self._lock:
            for k in ("divider", "rbr", "ier", "iir", "lcr", "mcr", "lsr", "msr", "scr", "fcr", "thr_ipending"):
                setattr(self, k, int(d[k]))
            n = min(int(d["rx_count"]), RX_FIFO_SIZE)
            self.rx = deque(bytes(d["rx_fifo"])[:n])
            self._room.notify_all()
            # re-drive the line from the loaded state
            self.irq_level = 0
            if self.irq_handler is not None:
                self.irq_handler(0)
            self._update_irq()


# ---------------------------------------------------------------------------------------------
# CMOS / RTC (mc146818)

RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32
RTC_IBM_PS2_CENTURY = 0x37
REG_B_DM = 0x04  # binary mode
REG_B_24H = 0x02
CMOS_SIZE = 128

RTC_VMSD = VMStateDescription("mc146818rtc", 1, (
    Field("cmos_data", "buffer", size=CMOS_SIZE),
    Field("cmos_index", "uint8"),
    Field("nmi_disabled", "uint8"),
    Field("rtc_offset", "int64"),  # guest RTC seconds - host UTC seconds
))


def cmos_memory_bytes(below_4g: int, above_4g: int) -> dict[int, int]:
    """The memory-size CMOS bytes QEMU's pc machine stores (pc_cmos_init)."""
    out: dict[int, int] = {}
    val = min(below_4g // KiB, 640)
    out[0x15], out[0x16] = val & 0xFF, (val >> 8) & 0xFF
    val = (below_4g - MiB) // KiB if below_4g > MiB else 0
    val = min(val, 65535)
    out[0x17], out[0x18] = val & 0xFF, val >> 8
    out[0x30], out[0x31] = val & 0xFF, val >> 8
    val = (below_4g - 16 * MiB) // (64 * KiB) if below_4g > 16 * MiB else 0
    val = min(val, 65535)
    out[0x34], out[0x35] = val & 0xFF, val >> 8
    val = above_4g // 65536
    out[0x5B], out[0x5C], out[0x5D] = val & 0xFF, (val >> 8) & 0xFF, (val >> 16) & 0xFF
    return out


class CmosRtc:
    """CMOS RAM with an RTC whose time registers follow host UTC (plus a settable offset)."""

    idstr = "mc146818rtc"
    vmsd = RTC_VMSD
    ports = range(0x70, 0x72)

    def __init__(self, below_4g: int, above_4g: int, instance_id: int = 0) -> None:
        self.instance_id = instance_id
        self.cmos = bytearray(CMOS_SIZE)
        self.index = 0
        self.nmi_disabled = 0
        self.rtc_offset = 0
        self.cmos[RTC_REG_A] = 0x26
        self.cmos[RTC_REG_B] = REG_B_24H
        self.cmos[RTC_REG_C] = 0
        self.cmos[RTC_REG_D] = 0x80
        for k, v in cmos_memory_bytes(below_4g, above_4g).items():
            self.cmos[k] = v

    def _enc(self, v: int) -> int:
        if self.cmos[RTC_REG_B] & REG_B_DM:
            return v
        return ((v // 10) << 4) | (v % 10)

    def _time_reg(self, reg: int) -> int:
        t = time.gmtime(time.time() + self.rtc_offset)
        if reg == RTC_SECONDS:
            return self._enc(t.tm_sec)
        if reg == RTC_MINUTES:
            return self._enc(t.tm_min)
        if reg == RTC_HOURS:
            h = t.tm_hour
            if self.cmos[RTC_REG_B] & REG_B_24H:
                return self._enc(h)
            pm = 0x80 if h >= 12 else 0
            return self._enc(h % 12 or 12) | pm
        if reg == RTC_DAY_OF_WEEK:
            return self._enc((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        if reg == RTC_DAY_OF_MONTH:
            return self._enc(t.tm_mday)
        if reg == RTC_MONTH:
            return self._enc(t.tm_mon)
        if reg == RTC_YEAR:
            return self._enc(t.tm_year % 100)
        # century
        return self._enc(t.tm_year // 100)

    def pio_write(self, port: int, size: int, val: int) -> None:
        val &= 0xFF
        if port == 0x70:
            self.index = val & 0x7F
            self.nmi_disabled = val >> 7
            return
        reg = self.index
        if reg in (RTC_REG_C, RTC_REG_D):
            return  # read-only
        if reg == RTC_REG_A:
            self.cmos[reg] = (val & 0x7F) | (self.cmos[reg] & 0x80)
            return
        self.cmos[reg] = val

    def pio_read(self, port: int, size: int) -> int:
        if port == 0x70:
            return 0xFF  # the index register is write-only
        reg = self.index
        if reg in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH,
                   RTC_YEAR, RTC_CENTURY, RTC_IBM_PS2_CENTURY):
            return self._time_reg(reg)
        if reg == RTC_REG_A:
            return self.cmos[reg] & 0x7F  # UIP never set
        if reg == RTC_REG_C:
            v = self.cmos[reg]
            self.cmos[reg] = 0
            return v
        return self.cmos[reg]

    def save(self) -> dict[str, Any]:
        return {"cmos_data": bytes(self.cmos), "cmos_index": self.index,
                "nmi_disabled": self.nmi_disabled, "rtc_offset": self.rtc_offset}

    def load(self, d: dict[str, Any]) -> None:
        data = bytes(d["cmos_data"])
        if len(data) != CMOS_SIZE:
            raise GuestError(f"mc146818rtc: cmos_data is {len(data)} bytes")
        self.cmos[:] = data
        self.index = int(d["cmos_index"]) & 0x7F
        self.nmi_disabled = int(d["nmi_disabled"]) & 1
        self.rtc_offset = int(d["rtc_offset"])


# ---------------------------------------------------------------------------------------------
# port 0x92 (fast A20 / reset)

PORT92_VMSD = VMStateDescription("port92", 1, (Field("outport", "uint8"),))


class Port92:
    """System control port A: bit 1 = A20 gate (kept and read back), bit 0 = reset request."""

    idstr = "port92"
    vmsd = PORT92_VMSD
    ports = range(0x92, 0x93)

    def __init__(self, instance_id: int = 0, on_reset: Callable[[], None] | None = None) -> None:
        self.instance_id = instance_id
        self.outport = 0x02  # A20 enabled after BIOS hand-over, as QEMU's SeaBIOS leaves it
        self.on_reset = on_reset

    @property
    def a20(self) -> bool:
        return bool(self.outport & 0x02)

    def pio_write(self, port: int, size: int, val: int) -> None:
        self.outport = val & 0xFE
        if val & 1 and self.on_reset is not None:
            self.on_reset()

    def pio_read(self, port: int, size: int) -> int:
        return self.outport

    def save(self) -> dict[str, Any]:
        return {"outport": self.outport}

    def load(self, d: dict[str, Any]) -> None:
        self.outport = int(d["outport"]) & 0xFE


# ---------------------------------------------------------------------------------------------
# The run state the guest had on the source (QEMU's "globalstate" section, 7.2 layout)

GLOBALSTATE_VMSD = VMStateDescription("globalstate", 1, (Field("size", "uint32"), Field("runstate", "buffer", size=100)))
RUNSTATES = frozenset(("debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
                       "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended",
                       "watchdog", "guest-panicked", "colo"))


class GlobalState:
    """Not hardware: the run state the source's guest had when the migration began, so that a
    guest stopped there stays stopped on the destination. Optional on load: a stream without it
    comes from a running guest, as QEMU assumes."""

    idstr = "globalstate"
    vmsd = GLOBALSTATE_VMSD
    optional = True

    def __init__(self, instance_id: int = 0) -> None:
        self.instance_id = instance_id
        self.runstate = "running"
        self.received = False

    def save(self) -> dict[str, Any]:
        name = self.runstate.encode("ascii")
        return {"size": len(name) + 1, "runstate": name.ljust(100, b"\0")}

    def load(self, d: dict[str, Any]) -> None:
        size, raw = int(d["size"]), bytes(d["runstate"])
        name = raw[:max(size - 1, 0)].split(b"\0")[0].decode("ascii", "replace")
        if not 0 < size <= len(raw) or name not in RUNSTATES:
            raise ProtocolError(f"globalstate: invalid runstate {name!r} (size {size})")
        self.runstate, self.received = name, True
