"""Vendored from llama.cpp (MIT): its HF -> GGUF converter classes for Qwen3-VL and its gguf-py.

Unmodified upstream files; see README.md for the source commit and what was taken. Import it only
through ``appliance.models.gguf_convert``, which runs it in a child process with the paths it
expects, so its ``gguf`` never clashes with another one in the caller.
"""
