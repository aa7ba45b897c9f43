"""QE, quality evaluation: the judge's 0-5 location and quality scores and a written review.

Backends: ``heuristic`` (``heuristic``: measured on the images) and ``vlm`` (``vlm``: a local VLM
judge, with the heuristic as its fallback).
"""
