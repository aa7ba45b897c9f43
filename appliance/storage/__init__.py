"""The job store (SQLite through sqlite-utils, WAL) and its reconciliation with the dataset files."""

from appliance.storage.store import (DiskFullError, EpisodePlan, FINISHED, JobStore, PENDING,
                                     is_disk_full)

__all__ = ["DiskFullError", "EpisodePlan", "FINISHED", "JobStore", "PENDING", "is_disk_full"]
