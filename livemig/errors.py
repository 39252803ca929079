"""One error hierarchy for the whole package; every message is meant for a user."""


class MigrationError(Exception):
    """Root of livemig's errors."""


class ProtocolError(MigrationError):
    """The peer sent bytes that break the wire format."""


class TransportError(MigrationError):
    """A connection, socket or file failed."""


class GuestError(MigrationError):
    """The guest machine (KVM, devices, memory) failed."""


class LinkLost(MigrationError):
    """A connection of the migration broke (or migrate-pause cut it): postcopy can recover."""
