"""Migration counters and the MigrationStats ('ram') dict of query-migrate."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

TPS = 4096


@dataclass
class RamStats:
    total: int = 0
    transferred: int = 0
    duplicate: int = 0
    normal: int = 0
    remaining: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    postcopy_requests: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    mbps: float = 0.0
    pages_per_second: int = 0
    multifd_bytes: int = 0
    # bookkeeping
    _window_start: float = field(default_factory=time.monotonic)
    _window_bytes: int = 0
    _window_pages: int = 0

    def as_qmp(self) -> dict:
        return {
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "normal": self.normal,
            "normal-bytes": self.normal * TPS,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps, 6),
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": self.postcopy_requests,
            "page-size": TPS,
            "multifd-bytes": self.multifd_bytes,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": self.postcopy_bytes,
            "dirty-sync-missed-zero-copy": 0,
        }
