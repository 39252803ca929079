"""Compatibility with kvm_pvm, a software hypervisor that runs a normal guest kernel's CPL0 code in
KVM's instruction emulator (see ../shared/notes/linux-guest-on-kvm.md). Nothing here is used on a
host with VT-x/AMD-V:

* ``host_is_pvm()`` is true only when the kvm_pvm module is loaded and the CPU has no vmx/svm flag;
  only then does the machine clear CPUID.1:ECX.CX16 (CMPXCHG16B is not emulated) and add
  ``PVM_CMDLINE`` (no XSAVE/XRSTOR, no POPCNT and friends) to the kernel command line.
* ``EmulationFixups.handle()`` runs only on a KVM_EXIT_INTERNAL_ERROR with the emulation suberror:
  it completes the few instructions the emulator gives up on (INT3, UD2, FWAIT, LDMXCSR, STMXCSR)
  the way a CPU would.

What no VMM can fix: kvm_pvm delivers a system call from guest user mode as a PVM event to the
entry point a PVM-aware guest kernel registers (MSR_PVM_EVENT_ENTRY). A normal kernel registers
none, so its user processes die at their first system call: SYSCALL lands at the kernel's entry
address still in user mode (a page fault: SIGSEGV) and INT 0x80 raises #UD (measured with Debian's
6.1 kernel, a 64-bit and a 32-bit /init). A normal guest boots to ``Run /init as init process``
here and no further; its user space needs VT-x/AMD-V or a PVM-aware guest kernel.
"""
from __future__ import annotations

import ctypes
import os
import struct
from typing import Callable

from . import kvm

KVM_INTERNAL_ERROR_EMULATION = 1
CPUID_1_ECX_CX16 = 1 << 13

# noxsave: XRSTOR is not emulated; clearcpuid: nor are POPCNT and friends, nor the SSE moves of the
# kernel's SIMD crypto (blake2s, crc32c, AES-NI... fall back to plain C without these flags).
# The guest kernel runs ~1000x slower than native, so: its lockup and RCU stall detectors would
# fire (turn them off); and boot-time work that only costs time is skipped: the crypto self-tests
# (run all at once in the late initcall crypto_algapi_init: more than 4 minutes here), ftrace's check
# of its 40,000 call sites and the kprobe-events setup (kallsyms lookups: minutes each), two more
# self-tests (kdf108, blake2s), the speculation mitigations (return thunks on every call) and,
# with rodata=off, the write-protection of kernel text whose W+X page-table walk takes 4 minutes.
PVM_CMDLINE = ("noxsave clearcpuid=popcnt,smap,smep,fsgsbase,pcid,invpcid,rdpid,rdtscp,bmi1,bmi2,abm,"
               "ssse3,sse4_1,sse4_2,avx,avx2,avx512f,aes,pclmulqdq,sha_ni,fma,f16c,adx "
               "nowatchdog rcupdate.rcu_cpu_stall_suppress=1 cryptomgr.notests mitigations=off rodata=off "
               "initcall_blacklist=ftrace_check_for_weak_functions,init_kprobe_trace,crypto_kdf108_init,blake2s_mod_init")


def host_is_pvm() -> bool:
    if not os.path.isdir("/sys/module/kvm_pvm"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "vmx" not in flags and "svm" not in flags
    except OSError:
        pass
    return True


def adjust_cpuid(cpuid: bytearray) -> bytearray:
    """Clear CX16 in leaf 1 (struct kvm_cpuid2 as KVM_GET_SUPPORTED_CPUID returns it)."""
    (n,) = struct.unpack_from("<I", cpuid, 0)
    for i in range(n):
        off = 8 + i * kvm.CPUID_ENTRY_SIZE
        function, index, flags, eax, ebx, ecx, edx = struct.unpack_from("<7I", cpuid, off)
        if function == 1:
            struct.pack_into("<I", cpuid, off + 20, ecx & ~CPUID_1_ECX_CX16)
    return cpuid


# vector and whether RIP moves past the instruction first (a trap) or stays on it (a fault)
_FIXUPS: tuple[tuple[bytes, str, int | None, bool], ...] = (
    (b"\xcc", "int3", 3, True),    # #BP is a trap: RIP after the INT3
    (b"\x0f\x0b", "ud2", 6, False),  # #UD is a fault: RIP stays on the UD2
    (b"\x9b", "fwait", None, True),  # no x87 exception pending here: just skip it
)

# ModRM register numbers -> kvm_regs names
GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
       "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1


def _sext(v: int, bits: int) -> int:
    return v - (1 << bits) if v & (1 << (bits - 1)) else v


def decode_mxcsr_insn(code: bytes, regs: dict[str, int], seg_base: dict[str, int]) -> tuple[str, int, int] | None:
    """LDMXCSR/STMXCSR m32 (0F AE /2, /3) in 64-bit mode: ("ldmxcsr"|"stmxcsr", linear address,
    instruction length), or None for anything else (register forms, 0x67, F2/F3 forms...)."""
    i, seg, rex = 0, None, 0
    while i < len(code) and code[i] in (0x64, 0x65, 0x2E, 0x3E, 0x26, 0x36):
        seg = {0x64: "fs", 0x65: "gs"}.get(code[i], seg)
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex = code[i]
        i += 1
    if code[i:i + 2] != b"\x0f\xae" or len(code) < i + 3:
        return None
    modrm = code[i + 2]
    i += 3
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3 or reg not in (2, 3):
        return None
    base: int | None
    addr, riprel = 0, False
    if rm == 4:  # SIB
        if len(code) < i + 1:
            return None
        sib = code[i]
        i += 1
        index = ((sib >> 3) & 7) | ((rex & 2) << 2)
        if index != 4:
            addr += regs[GPR[index]] << (sib >> 6)
        base = (sib & 7) | ((rex & 1) << 3)
        if (sib & 7) == 5 and mod == 0:
            base = None
            mod = 2  # a disp32 follows
    elif rm == 5 and mod == 0:
        base, riprel, mod = None, True, 2
    else:
        base = rm | ((rex & 1) << 3)
    if base is not None:
        addr += regs[GPR[base]]
    if mod == 1:
        if len(code) < i + 1:
            return None
        addr += _sext(code[i], 8)
        i += 1
    elif mod == 2:
        if len(code) < i + 4:
            return None
        addr += _sext(int.from_bytes(code[i:i + 4], "little"), 32)
        i += 4
    if riprel:
        addr += regs["rip"] + i
    if seg is not None:
        addr += seg_base[seg]
    return ("ldmxcsr" if reg == 2 else "stmxcsr"), addr & 0xFFFFFFFFFFFFFFFF, i


XSTATE_BV = 512  # offset of the XSAVE header's state-component bitmap
XFEATURE_SSE = 1 << 1


class EmulationFixups:
    """Finishes instructions kvm_pvm's emulator cannot run. ``host_address(gpa)`` maps guest RAM.

    Guest memory is read and written with ctypes.memmove, which drops the GIL: in postcopy a page
    may still be missing, and a fault taken while holding the GIL would deadlock the process."""

    def __init__(self, vcpu: kvm.KvmVcpu, host_address: Callable[[int], int],
                 wrote: Callable[[int], None] = lambda gpa: None) -> None:
        """`wrote(gpa)`: told of every guest byte written here (KVM's dirty log never sees it)."""
        self.vcpu = vcpu
        self.host_address = host_address
        self.wrote = wrote
        self.counts: dict[str, int] = {}

    def _copy(self, linear: int, data: bytearray, write: bool) -> bool:
        for k in range(len(data)):  # byte by byte across pages is fine for <= 16 bytes
            gpa = self.vcpu.translate(linear + k)
            if gpa is None:
                return False
            cell = (ctypes.c_char * 1).from_buffer(data, k)
            if write:
                ctypes.memmove(self.host_address(gpa), cell, 1)
                self.wrote(gpa)
            else:
                ctypes.memmove(cell, self.host_address(gpa), 1)
            del cell
        return True

    def _insn(self, run, rip: int) -> bytes | None:
        flags = int.from_bytes(run[kvm.RUN_UNION + 8:kvm.RUN_UNION + 16], "little")
        if flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            n = min(run[kvm.RUN_UNION + 16], 15)
            if n:
                return bytes(run[kvm.RUN_UNION + 17:kvm.RUN_UNION + 17 + n])
        n = min(15, 0x1000 - (rip & 0xFFF))
        buf = bytearray(n)
        return bytes(buf) if self._copy(rip, buf, False) else None

    def handle(self, run) -> bool:
        """True when the INTERNAL_ERROR exit in ``run`` was one of ours and the guest can go on."""
        sub, _ = kvm.RUN_INTERNAL.unpack_from(run, kvm.RUN_UNION)
        if sub != KVM_INTERNAL_ERROR_EMULATION:
            return False
        regs = self.vcpu.get_regs()
        rip = regs["rip"]
        insn = self._insn(run, rip)
        if not insn:
            return False
        for prefix, name, vector, skip in _FIXUPS:
            if not insn.startswith(prefix):
                continue
            if skip:
                regs["rip"] = rip + len(prefix)
                self.vcpu.set_regs(regs)
            if vector is not None:
                ev = bytearray(self.vcpu.get_vcpu_events())
                ev[0:8] = struct.pack("<BBBBI", 1, vector, 0, 0, 0)  # exception: injected, nr
                struct.pack_into("<I", ev, kvm.EVENTS_FLAGS, 0)
                self.vcpu.set_vcpu_events(ev)
            return self._count(name)
        return self._mxcsr(insn, regs)

    def _mxcsr(self, insn: bytes, regs: dict[str, int]) -> bool:
        sr = self.vcpu.get_sregs()
        seg_base = {n: kvm.SEGMENT.unpack_from(sr, i * kvm.SEGMENT.size)[0]
                    for i, n in enumerate(kvm.SEG_NAMES) if n in ("fs", "gs")}
        op = decode_mxcsr_insn(insn, regs, seg_base)
        if op is None:
            return False
        name, linear, length = op
        # MXCSR lives at byte 24 of the XSAVE area's legacy (FXSAVE) region; KVM_GET_FPU does not
        # report it on every host, KVM_GET_XSAVE does
        xsave = bytearray(self.vcpu.get_xsave())
        cell = bytearray(4)
        if name == "ldmxcsr":
            if not self._copy(linear, cell, False):
                return False
            xsave[24:28] = cell
            # KVM takes MXCSR from the buffer only if the header's XSTATE_BV marks SSE (or AVX)
            # state present; a vCPU that never used SSE has it clear (all-init), and the write
            # would be dropped. Zeroed XMM registers are their init state, so marking SSE is safe.
            bv = int.from_bytes(xsave[XSTATE_BV:XSTATE_BV + 8], "little") | XFEATURE_SSE
            xsave[XSTATE_BV:XSTATE_BV + 8] = bv.to_bytes(8, "little")
            self.vcpu.set_xsave(bytes(xsave))
        else:
            cell[:] = xsave[24:28]
            if not self._copy(linear, cell, True):
                return False
        regs["rip"] += length
        self.vcpu.set_regs(regs)
        return self._count(name)

    def _count(self, name: str) -> bool:
        self.counts[name] = self.counts.get(name, 0) + 1
        return True
