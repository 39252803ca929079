"""MigrationStatus values (QEMU's names) and the legal transitions, as a table."""
from __future__ import annotations

import threading
from typing import Callable

NONE, SETUP, CANCELLING, CANCELLED, ACTIVE = "none", "setup", "cancelling", "cancelled", "active"
POSTCOPY_DEVICE, POSTCOPY_ACTIVE, POSTCOPY_PAUSED = "postcopy-device", "postcopy-active", "postcopy-paused"
POSTCOPY_RECOVER_SETUP, POSTCOPY_RECOVER = "postcopy-recover-setup", "postcopy-recover"
COMPLETED, FAILED, PRE_SWITCHOVER, DEVICE = "completed", "failed", "pre-switchover", "device"

TRANSITIONS: dict[str, set[str]] = {
    NONE: {SETUP},
    SETUP: {ACTIVE, FAILED, CANCELLING},
    ACTIVE: {DEVICE, PRE_SWITCHOVER, COMPLETED, FAILED, CANCELLING, POSTCOPY_DEVICE, POSTCOPY_ACTIVE},
    PRE_SWITCHOVER: {DEVICE, FAILED, CANCELLING},
    DEVICE: {COMPLETED, FAILED, CANCELLING, POSTCOPY_DEVICE, POSTCOPY_ACTIVE},
    POSTCOPY_DEVICE: {POSTCOPY_ACTIVE, POSTCOPY_PAUSED, FAILED},
    POSTCOPY_ACTIVE: {COMPLETED, POSTCOPY_PAUSED, FAILED},
    POSTCOPY_PAUSED: {POSTCOPY_RECOVER_SETUP, POSTCOPY_RECOVER, FAILED},
    POSTCOPY_RECOVER_SETUP: {POSTCOPY_RECOVER, POSTCOPY_PAUSED, FAILED},
    POSTCOPY_RECOVER: {POSTCOPY_ACTIVE, POSTCOPY_PAUSED, FAILED},
    # COMPLETED: the cancel came after the destination's SHUT(0); DEVICE: it came after the stream
    # (or the postcopy package) was queued whole, so it does not take (the destination decides)
    CANCELLING: {CANCELLED, FAILED, COMPLETED, DEVICE},
    COMPLETED: set(),
    FAILED: set(),
    CANCELLED: set(),
}
RUNNING = {SETUP, ACTIVE, PRE_SWITCHOVER, DEVICE, CANCELLING, POSTCOPY_DEVICE, POSTCOPY_ACTIVE,
           POSTCOPY_PAUSED, POSTCOPY_RECOVER_SETUP, POSTCOPY_RECOVER}
IN_POSTCOPY = {POSTCOPY_DEVICE, POSTCOPY_ACTIVE, POSTCOPY_PAUSED, POSTCOPY_RECOVER_SETUP, POSTCOPY_RECOVER}
FINISHED = {COMPLETED, FAILED, CANCELLED}


class MigrationState:
    """The status of one migration; every change is a checked compare-and-set that notifies listeners."""

    def __init__(self, on_change: Callable[[str], None] | None = None):
        self._status = NONE
        self._cond = threading.Condition()
        self._on_change = on_change
        self._order = threading.Lock()  # changes are announced in the order they happen

    @property
    def status(self) -> str:
        return self._status

    def set(self, old: str | set[str], new: str) -> bool:
        """Move to `new` if the current status is `old` (or in it); False if it is not. The
        listener hears of it before another change can happen (it must not change the state)."""
        with self._order:
            with self._cond:
                olds = {old} if isinstance(old, str) else old
                if self._status not in olds:
                    return False
                if new not in TRANSITIONS[self._status]:
                    raise AssertionError(f"illegal migration transition {self._status} -> {new}")
                self._status = new
                self._cond.notify_all()
            if self._on_change:
                self._on_change(new)
        return True

    def wait_for(self, statuses: set[str], timeout: float | None = None) -> str:
        with self._cond:
            self._cond.wait_for(lambda: self._status in statuses, timeout)
            return self._status
