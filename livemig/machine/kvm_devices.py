"""KVM's in-kernel devices of the Linux machine as migratable devices: the two 8259 PICs, the
IOAPIC, the 8254 PIT and the KVM clock. Their state is KVM's own structs, carried as vmstate buffers.

Load order matters (``KvmMachine.devices()`` lists them so): PIT, clock, PICs, IOAPIC, then the vCPU.
"""
from __future__ import annotations

from typing import Any

from ..errors import GuestError
from ..wire.vmstate import Field, VMStateDescription
from . import kvm

CHIP_STATE = kvm.IRQCHIP_SIZE - 8

PIC_VMSD = VMStateDescription("kvm-i8259", 1, (Field("state", "buffer", size=CHIP_STATE),))
IOAPIC_VMSD = VMStateDescription("kvm-ioapic", 1, (Field("state", "buffer", size=CHIP_STATE),))
PIT_VMSD = VMStateDescription("kvm-pit", 1, (Field("state", "buffer", size=kvm.PIT2_SIZE),))
CLOCK_VMSD = VMStateDescription("kvmclock", 1, (Field("clock", "uint64"),))


class KvmIrqchipDevice:
    """One chip of KVM_GET/SET_IRQCHIP: PIC master (instance 0), PIC slave (1) or the IOAPIC."""

    def __init__(self, vm: kvm.KvmVm, chip: int) -> None:
        self.vm = vm
        self.chip = chip
        if chip == kvm.KVM_IRQCHIP_IOAPIC:
            self.idstr, self.vmsd, self.instance_id = "kvm-ioapic", IOAPIC_VMSD, 0
        else:
            self.idstr, self.vmsd, self.instance_id = "kvm-i8259", PIC_VMSD, chip

    def save(self) -> dict[str, Any]:
        return {"state": self.vm.get_irqchip(self.chip)}

    def load(self, d: dict[str, Any]) -> None:
        self.vm.set_irqchip(self.chip, bytes(d["state"]))


class KvmPit:
    idstr = "kvm-pit"
    vmsd = PIT_VMSD
    instance_id = 0

    def __init__(self, vm: kvm.KvmVm) -> None:
        self.vm = vm

    def save(self) -> dict[str, Any]:
        return {"state": self.vm.get_pit2()}

    def load(self, d: dict[str, Any]) -> None:
        self.vm.set_pit2(bytes(d["state"]))


class KvmClock:
    """kvmclock's nanoseconds: restored as saved, so guest time does not jump over the downtime."""

    idstr = "kvmclock"
    vmsd = CLOCK_VMSD
    instance_id = 0

    def __init__(self, vm: kvm.KvmVm) -> None:
        self.vm = vm

    def save(self) -> dict[str, Any]:
        clock, _flags = self.vm.get_clock()
        return {"clock": clock}

    def load(self, d: dict[str, Any]) -> None:
        try:
            self.vm.set_clock(int(d["clock"]), 0)
        except GuestError as e:
            raise GuestError(f"kvmclock: {e}") from None


def vm_devices(vm: kvm.KvmVm) -> list:
    return [KvmPit(vm), KvmClock(vm), KvmIrqchipDevice(vm, kvm.KVM_IRQCHIP_PIC_MASTER),
            KvmIrqchipDevice(vm, kvm.KVM_IRQCHIP_PIC_SLAVE), KvmIrqchipDevice(vm, kvm.KVM_IRQCHIP_IOAPIC)]
