"""The appliance never downloads anything at run time; this makes the HF libraries agree.

It also keeps them quiet: an overnight service log should hold our lines (what ran, what failed
and why), not per-call library chatter and progress bars of models that load from disk in
seconds. ``APPLIANCE_DEBUG=1`` lets them speak again.
"""

import logging
import os

OFFLINE_VARIABLES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    # transformers >= 5.2x swaps layers for Hub kernels by default when `kernels` is installed (a
    # dependency of transformers itself); on CUDA that fetches them from the Hub, so offline every
    # from_pretrained fails. Measured on an H200 with transformers 5.25 (bench/RESULTS.md).
    "USE_HUB_KERNELS": "0",
    # torch.load refuses pickled code: weights load only as tensors (or through safetensors).
    "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
}


# Defaults only: a variable the operator set wins.
QUIET_VARIABLES = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also turns off transformers' "Loading weights" bar
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def enforce() -> None:
    """Force offline mode for every Hugging Face library imported after this call."""
    for key, value in OFFLINE_VARIABLES.items():
        os.environ[key] = value
    if not os.environ.get("APPLIANCE_DEBUG"):
        for key, value in QUIET_VARIABLES.items():
            os.environ.setdefault(key, value)
        # bitsandbytes, and the kernels package behind it, warn through the root handler that
        # they could not reach the Hub for an optional kernel (which they must not do here).
        for name in ("bitsandbytes", "kernels"):
            logging.getLogger(name).setLevel(logging.ERROR)
