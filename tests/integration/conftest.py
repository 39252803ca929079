import os

import pytest


@pytest.fixture
def vms(tmp_path):
    """Factory of VM processes, all stopped at the end of the test."""
    from vmtools import VM
    made = []

    def make(name, **kw):
        vm = VM(tmp_path, name, **kw)
        made.append(vm)
        return vm
    yield make
    for vm in made:
        vm.close()
    if made:  # the sync qemu.qmp wrapper shares one event loop and never closes it
        import asyncio
        made[0].qmp._aloop.close()
        asyncio.set_event_loop(None)
    for vm in made:
        assert "Traceback" not in vm.stderr(), f"{vm.name} printed a traceback:\n{vm.stderr()}"
        assert "dropped arrival notes" not in vm.stderr(), f"{vm.name}: {vm.stderr()}"


def pytest_collection_modifyitems(config, items):
    if not os.path.exists("/dev/kvm"):
        skip = pytest.mark.skip(reason="needs /dev/kvm: these tests run real KVM guests")
        for item in items:
            if "integration" in str(item.fspath) or "tests/kvm" in str(item.fspath):
                item.add_marker(skip)
