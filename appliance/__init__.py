"""Offline anomaly synthesis appliance (AnomalyAgent, rebuilt to run air-gapped)."""

from appliance import offline as _offline

# Must happen before anything imports huggingface_hub: it reads these at import time.
_offline.enforce()

__version__ = "0.1.0"
