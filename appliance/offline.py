"""The appliance never downloads anything at run time; this makes the HF libraries agree."""

import os

OFFLINE_VARIABLES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    # torch.load refuses pickled code: weights load only as tensors (or through safetensors).
    "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
}


def enforce() -> None:
    """Force offline mode for every Hugging Face library imported after this call."""
    for key, value in OFFLINE_VARIABLES.items():
        os.environ[key] = value
