"""livemig's own QMP queries of the vCPU: registers and the paravirtual areas KVM writes."""
import pytest
from qemu.qmp import ExecuteError


def test_registers_and_hypervisor_areas_need_a_stopped_vcpu(vms):
    vm = vms("vm", memory="32M", ws_mib=2)
    vm.wait_passes(1)
    for cmd in ("x-livemig-query-registers", "x-livemig-query-hypervisor-areas"):
        with pytest.raises(ExecuteError, match="must be stopped"):
            vm.cmd(cmd)
    vm.cmd("stop")
    regs = vm.cmd("x-livemig-query-registers")
    assert regs["cr0"] & 1 and regs["efer"] & 0x400  # the workload runs in long mode
    assert 0x7C00 <= regs["rip"] < 1 << 32
    assert vm.cmd("x-livemig-query-hypervisor-areas") == []  # the boot-sector guest enables none
    vm.cmd("cont")
    vm.wait_passes(vm.passes() + 1)
