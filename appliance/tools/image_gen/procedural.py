"""The CPU image-generation backend: procedural defect rendering driven by the prompt's words.

Per request: find the object, read the prompt into ``EditParams`` (open attributes are sampled
from the request's seed), let the knowledge base say which renderer family the defect uses, place
the defect where it physically occurs (or in the policy's box), render it, and report the exact
mask together with every parameter used, so a trajectory can be replayed bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Sequence

import numpy as np

from appliance.imaging import is_grayscale
from appliance.tools.image_gen.calibration import (Calibrations, CalibrationProfile, calibrated_params,
                                                   match_contrast, plant_peak, typical_size)
from appliance.tools.image_gen.placement import (cluster_centres, foreground_bbox, instances_within,
                                                 object_extent, place)
from appliance.tools.image_gen.prompt_params import EditParams, parse_prompt
from appliance.tools.image_gen.renderers import render_instances
from appliance.tools.image_gen.transplant import transplant
from appliance.tools.interfaces import Box, EditRequest, EditResult
from appliance.tools.knowledge.base import KnowledgeBase
from appliance.tools.knowledge.families import family_for_defect
from appliance.tools.object_map import ObjectMap, find_object

# A policy's box with less of the object than this is off the part: place the defect ourselves.
MIN_REGION_FOREGROUND = 0.05
# With a calibration bank for the defect type: the share of edits that transplant a real defect
# (the rest are procedural, sized from the plant's priors), so the dataset keeps both the
# plant's real looks and shapes no photo showed.
TRANSPLANT_SHARE = 0.5


def _clip(box: Box, shape: tuple[int, ...]) -> Box:
    height, width = shape[:2]
    x0, x1 = sorted((min(max(box.x0, 0), width), min(max(box.x1, 0), width)))
    y0, y1 = sorted((min(max(box.y0, 0), height), min(max(box.y1, 0), height)))
    return Box(x0, y0, x1, y1)


def _union(boxes: list[Box], mask: np.ndarray) -> Box:
    if mask.any():
        boxes = boxes + [foreground_bbox(mask)]
    return Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes),
               max(b.x1 for b in boxes), max(b.y1 for b in boxes))


def object_summary(object_map: ObjectMap) -> dict:
    box = foreground_bbox(object_map.foreground)
    return {"is_texture": bool(object_map.is_texture),
            "background_color": [int(c) for c in object_map.background_color],
            "foreground_share": round(float(object_map.foreground.mean()), 4),
            "bbox": box.as_list()}


class ProceduralImageGenerator:
    """``ImageGenerator`` that paints defects with the procedural renderers (no model needed)."""

    name = "procedural"

    def __init__(self, kb: KnowledgeBase | None = None, calibrations: Calibrations | None = None,
                 transplant_share: float = TRANSPLANT_SHARE) -> None:
        self.kb = kb
        self.calibrations = calibrations
        self.transplant_share = transplant_share

    def family_for(self, category: str, defect: str) -> str:
        if self.kb is None:
            return family_for_defect(defect)
        return self.kb.renderer_for(category, defect)

    def typical_size(self, request: EditRequest) -> float | None:
        """What the knowledge base calls this defect's usual size (calibration reads the
        prompt's size relative to it)."""
        entry = self.kb.entry(request.category, request.defect) if self.kb is not None else None
        return typical_size(entry.size) if entry is not None else None

    def generate(self, requests: Sequence[EditRequest]) -> list[EditResult]:
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, request: EditRequest) -> EditResult:
        image = request.image
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        rng = np.random.default_rng(request.seed)
        object_map = find_object(image)
        params = parse_prompt(request.prompt, rng)
        family = self.family_for(request.category, request.defect)
        profile = self.calibrations.get(request.category) if self.calibrations else None
        priors, crops = profile.for_defect(request.defect) if profile else (None, [])
        # Draws only when calibrated: an uncalibrated engine replays its old trajectories.
        if priors is not None:
            params = calibrated_params(params, priors, rng, self.typical_size(request))
            if crops and rng.random() < self.transplant_share:
                return self._transplant(request, image, object_map, params, crops, profile, rng)

        boxes, placement_info, params = self._boxes(request, image, object_map, params, family, rng)
        render_info: dict = {}
        edited, mask = render_instances(
            family, image, object_map.foreground, params, rng, boxes,
            is_texture=object_map.is_texture, background_color=object_map.background_color,
            details=render_info)
        if priors is not None and priors.peaks and rng.random() < priors.trust():
            # The renderers' contrast is their own guess; on a calibrated category the defect
            # stands out as much as the plant's do at the severity asked (as often as the
            # profile is trusted, like every calibrated attribute).
            edited, mask, render_info["contrast"] = match_contrast(
                image, edited, mask, plant_peak(priors, params.severity))
        record = {
            "backend": self.name,
            "family": family,
            "seed": int(request.seed),
            "edit_params": asdict(params),
            "placement": placement_info,
            "render": render_info,
            "object_map": object_summary(object_map),
            "mask_area": int(mask.sum()),
        }
        if profile is not None:
            record["calibration"] = profile.digest or "unstored"
        return EditResult(image=edited, region=_union(boxes, mask), mask=mask, params=record)

    def _transplant(self, request: EditRequest, image: np.ndarray, object_map: ObjectMap,
                    params: EditParams, crops: list, profile: CalibrationProfile,
                    rng: np.random.Generator) -> EditResult:
        """A real defect from the category's bank, sized and counted as the prompt and the
        plant's priors say, placed on the part (inside the policy's box when it is on it)."""
        region = _clip(request.region, image.shape) if request.region is not None else None
        if region is not None and not (region.width > 1 and region.height > 1 and object_map.foreground[
                region.y0:region.y1, region.x0:region.x1].mean() >= MIN_REGION_FOREGROUND):
            region = None  # off the part: placed on the part instead, as for the renderers
        size_px = params.size * object_extent(object_map)
        priors = profile.priors[request.defect]
        # Near where a real one lay as often as the profile is trusted, else anywhere on the part.
        positions = priors.positions if rng.random() < priors.trust() else []
        edited, mask, details = transplant(image, object_map.foreground, crops, params.count, rng,
                                           size_px=size_px, region=region,
                                           gray=is_grayscale(image), positions=positions)
        record = {"backend": self.name, "family": "transplant", "seed": int(request.seed),
                  "edit_params": asdict(params), "render": details,
                  "object_map": object_summary(object_map), "mask_area": int(mask.sum()),
                  "calibration": profile.digest or "unstored"}
        box = foreground_bbox(mask) if mask.any() else (region or foreground_bbox(object_map.foreground))
        return EditResult(image=edited, region=box, mask=mask, params=record)

    def _boxes(self, request: EditRequest, image: np.ndarray, object_map: ObjectMap,
               params: EditParams, family: str, rng: np.random.Generator
               ) -> tuple[list[Box], dict, EditParams]:
        """The instance boxes: inside the policy's region when it is on the object, else placed."""
        if request.region is not None:
            region = _clip(request.region, image.shape)
            on_object = (object_map.foreground[region.y0:region.y1, region.x0:region.x1].mean()
                         if region.width > 1 and region.height > 1 else 0.0)
            if on_object >= MIN_REGION_FOREGROUND:
                if "orientation_deg" not in params.specified:
                    # A line-like defect runs along the long side of the box it was given.
                    if region.width >= 1.5 * region.height:
                        params = replace(params, orientation_deg=0.0)
                    elif region.height >= 1.5 * region.width:
                        params = replace(params, orientation_deg=90.0)
                allowed = cluster_centres(object_map, family)
                boxes = instances_within(region, params.count, allowed, rng)
                return boxes, {"anchor": "given", "region": region.as_list(),
                               "on_object": round(float(on_object), 3)}, params
            ignored = {"ignored_region": region.as_list(), "reason": "off the object"}
        else:
            ignored = {}
        placement = place(object_map, params, family, image.shape, rng)
        if placement.orientation_deg is not None:
            params = replace(params, orientation_deg=round(placement.orientation_deg, 2))
        info = {"anchor": placement.anchor, "center": [round(c, 1) for c in placement.center],
                "axes_px": list(placement.axes), **placement.notes, **ignored}
        return placement.boxes, info, params
