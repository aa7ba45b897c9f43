"""Procedural defect renderers, one module per family of ``families.FAMILIES``.

``render_defect`` is the entry point: it places the defect (unless given a region), paints every
instance in a small window around its box, and returns the edited image with the exact mask of
the pixels it changed. The contract every family obeys (enforced in ``base.finalize``):

* pixels outside the mask are bit-identical to the input;
* the mask lies inside ``foreground``;
* the mask is the changed pixels: IoU with ``imaging.changed_pixels`` is >= 0.9 per instance;
* a grayscale input stays grayscale.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from appliance.imaging import is_grayscale
from appliance.tools.image_gen.placement import MaskObjectMap, cluster_centres, instances_within, place
from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers import (
    contamination,
    crack,
    cut,
    cutpaste_scar,
    dent,
    discoloration,
    fold,
    hole,
    missing,
    perlin,
    poisson,
    scratch,
    stain,
)
from appliance.tools.image_gen.renderers.base import Canvas, Rendered, finalize, make_canvas
from appliance.tools.interfaces import Box
from appliance.tools.knowledge.families import FAMILIES

Renderer = Callable[[Canvas, EditParams, np.random.Generator], Rendered]

RENDERERS: dict[str, Renderer] = {
    "scratch": scratch.render,
    "crack": crack.render,
    "hole": hole.render,
    "dent": dent.render,
    "stain": stain.render,
    "contamination": contamination.render,
    "missing": missing.render,
    "discoloration": discoloration.render,
    "fold": fold.render,
    "cut": cut.render,
    "perlin": perlin.render,
    "cutpaste_scar": cutpaste_scar.render,
    "poisson": poisson.render,
}
assert set(RENDERERS) == set(FAMILIES), "every family needs a renderer"

# Light from the upper left, as in most inspection setups, give or take.
LIGHT_DEG = 225.0
LIGHT_SPREAD_DEG = 35.0


def _check(image: np.ndarray, foreground: np.ndarray, family: str) -> None:
    if family not in RENDERERS:
        raise ValueError(f"unknown renderer family {family!r}; known: {sorted(RENDERERS)}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    if foreground.shape != image.shape[:2]:
        raise ValueError(f"foreground {foreground.shape} does not match image {image.shape[:2]}")


def render_instances(family: str, image: np.ndarray, foreground: np.ndarray, params: EditParams,
                     rng: np.random.Generator, boxes: list[Box], *, is_texture: bool = False,
                     background_color: tuple[int, int, int] | None = None,
                     details: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint one instance of ``family`` in each box; returns (edited, mask)."""
    _check(image, foreground, family)
    foreground = foreground.astype(bool, copy=False)
    gray = is_grayscale(image)
    light_deg = LIGHT_DEG + float(rng.uniform(-LIGHT_SPREAD_DEG, LIGHT_SPREAD_DEG))
    edited = image.copy()
    mask = np.zeros(foreground.shape, dtype=bool)
    instances = []
    windows: list[Box] = []
    for box in boxes:
        if box.width < 2 or box.height < 2:
            continue
        canvas = make_canvas(edited, foreground, box, gray, light_deg, is_texture, background_color)
        rendered = RENDERERS[family](canvas, params, rng)
        w = canvas.window
        view = (slice(w.y0, w.y1), slice(w.x0, w.x1))
        window, window_mask, notes = finalize(canvas, rendered, image[view], mask[view])
        windows.append(w)
        edited[view] = window
        mask[view] = window_mask
        instances.append({"box": box.as_list(), **rendered.details, **notes})
    # Belt and braces for overlapping windows: nothing outside the mask may differ.
    for w in windows:
        view = (slice(w.y0, w.y1), slice(w.x0, w.x1))
        np.copyto(edited[view], image[view], where=~mask[view][..., None])
    if details is not None:
        details.update({"family": family, "light_deg": round(light_deg, 1),
                        "instances": instances})
    return edited, mask


def render_defect(family: str, image: np.ndarray, foreground: np.ndarray, params: EditParams,
                  rng: np.random.Generator, region: Box | None = None, *,
                  background_color: tuple[int, int, int] | None = None,
                  details: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a ``family`` defect on the object; returns (edited uint8 RGB, exact bool mask).

    Without ``region`` the defect is placed by ``placement.place`` from the foreground; with
    one, the defect fills that box (several instances share it).
    ``details``, when given, receives the placement and every sampled rendering parameter.
    """
    _check(image, foreground, family)
    foreground = foreground.astype(bool, copy=False)
    if not foreground.any():
        if details is not None:
            details["skipped"] = "empty foreground"
        return image.copy(), np.zeros(foreground.shape, dtype=bool)
    object_map = MaskObjectMap.from_mask(image, foreground)
    if background_color is not None:
        object_map.background_color = background_color
    if region is None:
        placement = place(object_map, params, family, image.shape, rng)
        boxes = placement.boxes
        if placement.orientation_deg is not None:
            params = replace(params, orientation_deg=round(placement.orientation_deg, 2))
        if details is not None:
            details["placement"] = {"anchor": placement.anchor, "axes": list(placement.axes),
                                    "orientation_deg": params.orientation_deg}
    else:
        height, width = foreground.shape
        region = Box(max(region.x0, 0), max(region.y0, 0), min(region.x1, width),
                     min(region.y1, height))
        boxes = instances_within(region, params.count, cluster_centres(object_map, family), rng)
    return render_instances(family, image, foreground, params, rng, boxes,
                            is_texture=object_map.is_texture,
                            background_color=object_map.background_color, details=details)


__all__ = ["RENDERERS", "render_defect", "render_instances"]
