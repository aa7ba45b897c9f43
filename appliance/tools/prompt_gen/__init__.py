"""PG, prompt generation: the editing instruction for one defect on one part.

Backends: ``knowledge`` (``composer``: composed from the knowledge base entry, refined by rules
from the judge's review) and ``vlm`` (``vlm``: a local VLM writes it).
"""
