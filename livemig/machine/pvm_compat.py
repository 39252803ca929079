"""Compatibility with kvm_pvm, a software hypervisor that runs a normal guest kernel's CPL0 code in
KVM's instruction emulator (see ../shared/notes/linux-guest-on-kvm.md). Nothing here is used on a
host with VT-x/AMD-V:

* ``host_is_pvm()`` is true only when the kvm_pvm module is loaded and the CPU has no vmx/svm flag;
  only then does the machine clear CPUID.1:ECX.CX16 (CMPXCHG16B is not emulated) and add
  ``PVM_CMDLINE`` (no XSAVE/XRSTOR, no POPCNT and friends) to the kernel command line.
* ``EmulationFixups.handle()`` runs only on a KVM_EXIT_INTERNAL_ERROR with the emulation suberror:
  it completes the few instructions the emulator gives up on (INT3, UD2, FWAIT) the way a CPU would.
"""
from __future__ import annotations

import os
import struct
from typing import Callable

from . import kvm

KVM_INTERNAL_ERROR_EMULATION = 1
CPUID_1_ECX_CX16 = 1 << 13

# noxsave: XRSTOR is not emulated; clearcpuid: nor are POPCNT and friends. The guest kernel runs
# ~1000x slower than native, so its lockup and RCU stall detectors would fire: turn them off; and
# skip ftrace's boot-time check of its 40,000 call sites (a kallsyms lookup each: minutes here).
PVM_CMDLINE = ("noxsave clearcpuid=popcnt,smap,smep,fsgsbase,pcid,invpcid,rdpid,rdtscp,bmi1,bmi2,abm "
               "nowatchdog rcupdate.rcu_cpu_stall_suppress=1 initcall_blacklist=ftrace_check_for_weak_functions")


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


class EmulationFixups:
    """Finishes instructions kvm_pvm's emulator cannot run. ``read_guest(gpa, n)`` reads guest RAM."""

    def __init__(self, vcpu: kvm.KvmVcpu, read_guest: Callable[[int, int], bytes]) -> None:
        self.vcpu = vcpu
        self.read_guest = read_guest
        self.counts: dict[str, int] = {}

    def handle(self, run) -> bool:
        """True when the INTERNAL_ERROR exit in ``run`` was one of ours and the guest can go on."""
        sub, _ = kvm.RUN_INTERNAL.unpack_from(run, kvm.RUN_UNION)
        if sub != KVM_INTERNAL_ERROR_EMULATION:
            return False
        regs = self.vcpu.get_regs()
        rip = regs["rip"]
        gpa = self.vcpu.translate(rip)
        if gpa is None:
            return False
        # the emulator just fetched these bytes, so the page is present (also during postcopy)
        insn = self.read_guest(gpa, min(2, 0x1000 - (gpa & 0xFFF)))
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
            self.counts[name] = self.counts.get(name, 0) + 1
            return True
        return False
