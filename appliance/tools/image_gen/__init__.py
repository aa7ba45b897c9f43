"""IG, image generation: the normal photo edited to show the defect, inside a placement region.

Backends: ``procedural`` (``procedural`` with ``renderers/``: per-defect renderers, DRAEM Perlin
blending, CutPaste scars, NSA Poisson blending) and ``sdxl-inpaint`` / ``flux-fill``
(``diffusers_inpaint``). Both read the instruction's words (``prompt_params``) and place the
defect on the part (``placement``).
"""
