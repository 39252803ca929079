"""livemig: live migration of KVM virtual machines, speaking QEMU's migration wire format."""

__version__ = "0.1.0"
