"""Names of the procedural defect renderers, and how a defect type picks one.

Kept free of heavy imports: the knowledge base loader validates entries against ``FAMILIES``.
"""

from __future__ import annotations

FAMILIES: tuple[str, ...] = (
    "scratch",  # thin curved line, brighter or darker than the surface
    "crack",  # jagged branching fracture, dark
    "hole",  # hole, pit, blowhole, poke: dark cavity with shaded rim
    "dent",  # dent, bump, uneven surface: shading of a smooth height change
    "stain",  # liquid, oil, glue, water marks: translucent tinted blob
    "contamination",  # foreign particles, fibres, dirt specks
    "missing",  # missing or broken part, chip, break at an edge
    "discoloration",  # colour or brightness shift over an area
    "fold",  # textile fold or wrinkle: shaded ridge
    "cut",  # textile cut, tear, slit
    "perlin",  # DRAEM-style Perlin-masked texture blending (generic)
    "cutpaste_scar",  # CutPaste scar: thin rotated strip of the same image
    "poisson",  # NSA-style Poisson blending of a patch from elsewhere
)

# First matching keyword wins; order puts specific words before generic ones.
_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("scratch", "scratch"), ("abrasion", "scratch"), ("scuff", "scratch"), ("rough", "scratch"),
    ("crack", "crack"), ("fracture", "crack"), ("fray", "crack"),
    ("blowhole", "hole"), ("hole", "hole"), ("pit", "hole"), ("poke", "hole"), ("pore", "hole"),
    ("bubble", "hole"), ("melt", "hole"), ("squeeze", "dent"),
    ("dent", "dent"), ("bump", "dent"), ("uneven", "dent"), ("deform", "dent"), ("bent", "dent"),
    ("flat", "dent"), ("warp", "dent"),
    ("liquid", "stain"), ("oil", "stain"), ("glue", "stain"), ("stain", "stain"), ("spot", "stain"),
    ("water", "stain"), ("burn", "stain"),
    ("contamination", "contamination"), ("dirt", "contamination"), ("particle", "contamination"),
    ("foreign", "contamination"), ("fiber", "contamination"), ("fibre", "contamination"),
    ("thread", "contamination"), ("dust", "contamination"), ("hair", "contamination"),
    ("missing", "missing"), ("broken", "missing"), ("break", "missing"), ("chip", "missing"),
    ("damaged", "missing"), ("cut_lead", "missing"), ("cut_inner", "missing"),
    ("cut_outer", "missing"), ("split", "missing"),
    ("color", "discoloration"), ("colour", "discoloration"), ("discolor", "discoloration"),
    ("faulty_imprint", "discoloration"), ("print", "discoloration"), ("weak", "discoloration"),
    ("fold", "fold"), ("wrinkle", "fold"), ("crease", "fold"),
    ("cut", "cut"), ("tear", "cut"), ("slit", "cut"),
    ("misplaced", "poisson"), ("swap", "poisson"), ("flip", "poisson"), ("extra", "poisson"),
    ("combined", "perlin"), ("defect", "perlin"),
)


def family_for_defect(defect: str) -> str:
    """The renderer family a defect name implies when the knowledge base has no entry for it."""
    name = defect.lower().replace("-", "_").replace(" ", "_")
    for keyword, family in _KEYWORDS:
        if keyword in name:
            return family
    return "perlin"
