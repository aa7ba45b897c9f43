"""Policies: what writes the agent's next message. ``scripted``: Algorithm 1 with rule-based
refinement (the embedded default); ``vlm``: Qwen3-VL on a runtime from ``appliance.vlm``."""
