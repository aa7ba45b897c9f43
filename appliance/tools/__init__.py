"""The five tools of the agent, one package each, every one with a CPU backend that needs no
weights and, where there is one, a model backend:

* ``prompt_gen``: PG, the editing instruction (``composer``: from the knowledge base; ``vlm``)
* ``image_gen``: IG, the edited image (``procedural``: renderers; ``diffusers_inpaint``: SDXL
  inpainting, Flux Fill)
* ``quality_eval``: QE, the judge's 0-5 location and quality scores (``heuristic``; ``vlm``)
* ``knowledge``: KR, defect knowledge (``base``: the knowledge base; ``retrieval``: FAISS over
  MiniLM embeddings)
* ``mask_gen``: MG, the pixel mask (``difference``; ``metauas``: MetaUAS on onnxruntime)

``interfaces`` declares what each tool takes and returns; ``object_map`` finds the part in a
photo for the tools that place, judge or mask. Backends register in ``appliance.engine.registry``.
"""
