"""KR, knowledge retrieval, and the knowledge base it reads.

``base``: the knowledge base loader (``knowledge_base/*.toml``); ``families``: which renderer
family a defect type belongs to; ``embedder``: the bundled MiniLM sentence embedder;
``retrieval``: the ``faiss-minilm`` backend, a FAISS index over the entries.
"""
