"""Migration capabilities and parameters: QEMU's names, defaults and checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import MigrationError

CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "events", "postcopy-ram", "x-colo", "release-ram",
    "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot", "zero-copy-send",
    "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
)
# Capabilities livemig implements; the others are accepted only as "off".
SUPPORTED_CAPABILITIES = {"events", "return-path", "postcopy-ram", "postcopy-blocktime", "postcopy-preempt",
                          "late-block-activate", "multifd"}

# name -> (default, kind, minimum, maximum)
PARAMETERS: dict[str, tuple[Any, str, int | None, int | None]] = {
    "max-bandwidth": (134217728, "int", 0, None),
    "downtime-limit": (300, "int", 0, 2000000),
    "max-postcopy-bandwidth": (0, "int", 0, None),
    "avail-switchover-bandwidth": (0, "int", 0, None),
    "announce-initial": (50, "int", 1, 100000),
    "announce-max": (550, "int", 1, 100000),
    "announce-rounds": (5, "int", 0, 1000),
    "announce-step": (100, "int", 1, 10000),
    "throttle-trigger-threshold": (50, "int", 1, 100),
    "cpu-throttle-initial": (20, "int", 1, 99),
    "cpu-throttle-increment": (10, "int", 1, 99),
    "cpu-throttle-tailslow": (False, "bool", None, None),
    "max-cpu-throttle": (99, "int", 1, 99),
    "multifd-channels": (2, "int", 1, 255),
    "multifd-compression": ("none", "str", None, None),
    "xbzrle-cache-size": (67108864, "int", 0, None),
    "x-checkpoint-delay": (20000, "int", 0, None),
    "zero-page-detection": ("multifd", "str", None, None),
    "tls-creds": ("", "str", None, None),
    "tls-hostname": ("", "str", None, None),
    "tls-authz": ("", "str", None, None),
    # livemig's own: with postcopy-preempt, also re-send on the preempt channel a requested page
    # the background push already queued on the main channel (so the fault does not wait behind
    # the main channel's queue). The destination then gets that page twice: livemig keeps the
    # first copy, QEMU treats the second as an error. So the source re-sends only to a destination
    # that announced x-preempt-requests (a livemig); false: never (QEMU's rule)
    "x-preempt-resend": (True, "bool", None, None),
    # livemig's own, destination side: with postcopy-preempt, send page requests on the preempt
    # connection instead of the main one, where they wait for the socket that the bulk stream
    # holds (fault latency about halves here). The destination announces it on the return path
    # at the start, and only to a source whose stream began with livemig's machine type in its
    # CONFIGURATION section (a QEMU source would fail on the unknown message; it never gets it);
    # a livemig source then reads the preempt connection too. On by default
    "x-preempt-requests": (True, "bool", None, None),
    # livemig's own, with x-preempt-requests and no TLS: each side runs its urgent path in a
    # process of its own, away from the GIL of its bulk threads. The destination reads userfaultfd
    # and the preempt connection there (urgent_dst.py); the source answers the requests that come
    # on the preempt connection there (urgent_src.py). Off by default: each process costs ~23 MiB
    # (PSS), which takes a 4 GiB guest's extra memory past 64 MiB a side. Off: threads
    # (mig/dst/fault, mig/dst/preempt, mig/src/preempt-return) in the migration's process
    "x-urgent-process": (False, "bool", None, None),
    # livemig's switchover policy (needs postcopy-ram; 0 = off): at the end of each precopy pass,
    # switch to postcopy when the last pass's dirty rate and bandwidth say precopy will not finish
    # within this many ms since `migrate` ...
    "x-switchover-budget": (0, "int", 0, 86400000),
    # ... or once this many full precopy passes are done
    "x-postcopy-after-passes": (0, "int", 0, 1000000),
    # livemig's own: once what is left fits the downtime limit, send it while the guest still
    # runs and merge again, up to this many times while each merge finds at least a quarter less
    # (and max-bandwidth lets a pass be shorter than the one before); the copy made with the guest
    # stopped (the downtime) shrinks. 0: stop at the first fit (QEMU). See outgoing.ShrinkPasses
    "x-shrink-passes": (8, "int", 0, 1000),
}
_ENUMS = {"zero-page-detection": ("none", "legacy", "multifd"), "multifd-compression": ("none",)}
# QEMU's StrOrNull parameters: null means "" (unset)
NULLABLE = {"tls-creds", "tls-hostname", "tls-authz"}


@dataclass
class MigrationOptions:
    caps: dict[str, bool] = field(default_factory=lambda: {c: False for c in CAPABILITIES})
    params: dict[str, Any] = field(default_factory=lambda: {k: v[0] for k, v in PARAMETERS.items()})

    def cap(self, name: str) -> bool:
        return self.caps[name]

    def param(self, name: str) -> Any:
        return self.params[name]

    def set_capabilities(self, items: list[dict]) -> None:
        """Apply [{capability, state}] atomically after checking names and conflicts."""
        new = dict(self.caps)
        for item in items:
            if not isinstance(item, dict) or set(item) - {"capability", "state"}:
                raise MigrationError("Invalid parameter type for 'capabilities', expected: MigrationCapabilityStatus")
            name, state = item.get("capability"), item.get("state")
            if name not in new:
                raise MigrationError(f"Parameter 'capability' does not accept value '{name}'")
            if not isinstance(state, bool):
                raise MigrationError("Invalid parameter type for 'state', expected: boolean")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise MigrationError(f"Capability '{name}' is not supported by livemig")
            new[name] = state
        if new["postcopy-preempt"] and not new["postcopy-ram"]:
            raise MigrationError("Postcopy preempt requires postcopy-ram")
        if new["switchover-ack"] and not new["return-path"]:
            raise MigrationError("Capability 'switchover-ack' requires capability 'return-path'")
        self.caps = new

    def set_parameters(self, args: dict) -> None:
        new = dict(self.params)
        for name, value in args.items():
            spec = PARAMETERS.get(name)
            if spec is None:
                raise MigrationError(f"Parameter '{name}' is unexpected")
            _, kind, lo, hi = spec
            if kind == "int":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise MigrationError(f"Invalid parameter type for '{name}', expected: integer")
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                    raise MigrationError(f"Parameter '{name}' expects a value in range {rng}")
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise MigrationError(f"Invalid parameter type for '{name}', expected: boolean")
            else:
                if value is None and name in NULLABLE:
                    value = ""
                if not isinstance(value, str):
                    raise MigrationError(f"Invalid parameter type for '{name}', expected: "
                                         + ("StrOrNull" if name in NULLABLE else "string"))
                if name in _ENUMS and value not in _ENUMS[name]:
                    raise MigrationError(f"Parameter '{name}' does not accept value '{value}'")
                if name == "tls-authz" and value:
                    raise MigrationError("Parameter 'tls-authz' is not supported by livemig (no authz objects: "
                                         "verify-peer=on with a CA of your own decides who may connect)")
            new[name] = value
        self.params = new

    def query_capabilities(self) -> list[dict]:
        return [{"capability": c, "state": self.caps[c]} for c in CAPABILITIES]

    def query_parameters(self) -> dict:
        return dict(self.params)
