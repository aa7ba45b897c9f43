"""What the files and folders of a dataset are called (the store's, the exports', the samples')."""

from __future__ import annotations

import re

from appliance.names import DATASET_FOLDERS

STATE_DIR = ".appliance"  # the job store and what reconcile moves aside, inside the dataset
DB_NAME = "jobs.db"
MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
NORMALS = "normals.jsonl"
# Folders at the dataset root that are not categories.
NOT_CATEGORIES = {STATE_DIR, *DATASET_FOLDERS}
# ``imaging.write_atomic`` writes ``.NAME.tmp-PID`` before renaming to NAME.
TEMP_NAME = re.compile(r"^\..+\.tmp-\d+$")
NUMBERED = re.compile(r"^(\d{3,})\.png$")
NUMBERED_MASK = re.compile(r"^(\d{3,})_mask\.png$")
