"""The VLM runtime: local vision-language models that continue conversations, many at a time.

``chat``: the request, the runtime interface and message conversion; ``chat_template``: the
Qwen3-VL chat template; ``transformers_runtime`` and ``llamacpp_runtime``: the two runtimes;
``resident``: one loaded copy of each model, shared by the policy and the VLM tools. It knows
nothing of tools, agents or policies: they import it.
"""
