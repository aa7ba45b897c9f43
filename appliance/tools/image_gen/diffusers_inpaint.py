"""IG backends on diffusers inpainting: SDXL inpainting and Flux Fill, from local folders only.

One ``generate`` call inpaints every request of the batch in one pipeline call (per-request
generators seeded from ``EditRequest.seed``), so many episodes share one GPU pass.

Per request:
1. The region is the policy's box when it gave one, else the placement module's choice (the
   part is found with ``object_map.find_object``, the prompt read with ``parse_prompt``).
2. Inside the region a footprint (a rotated ellipse per defect instance, widened to a few latent
   cells so the model has room to paint) is the inpainting mask.
3. A square window around the region is cropped and resized to the model's resolution, so a
   small defect on a large photo is painted at the model's native scale.
4. The result is resized back and alpha-blended into the photo with a feathered footprint that
   is zero outside it: every pixel outside the region is the input pixel, bit for bit (the VAE
   round trip changes the whole crop slightly, and none of that is let through).

``EditResult.mask`` is None: the inpainting mask is where the model was *allowed* to paint, not
where it painted, and handing it to mask generation as a footprint hint would turn an attempt
where the model drew nothing into a full-region mask. MG works from the pixels (and MetaUAS).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from appliance.tools.image_gen.text_prompt import (
    fit_caption,
    fit_prompts,
    pipeline_encoders,
)
from appliance.tools.interfaces import Box, EditRequest, EditResult

if TYPE_CHECKING:
    from appliance.tools.knowledge.base import KnowledgeBase

NEGATIVE_PROMPT = "blurry, cartoon, drawing, text, watermark, frame, distorted, low quality"
# Reverse synthesis (``restore``): the region of a real defect painted back as intact surface.
RESTORE_PROMPT = ("the intact surface of a good part: the same material, grain and lighting as "
                  "around it, flawless")
RESTORE_NEGATIVE = ("crack, scratch, hole, pit, pore, stain, dent, chip, break, fray, defect, "
                    "damage, " + NEGATIVE_PROMPT)


@dataclass(frozen=True)
class InpaintSettings:
    resolution: int = 1024  # the square side the pipeline paints at
    steps: int = 20
    guidance: float = 8.0
    strength: float = 0.99
    context: float = 2.5  # crop side as a multiple of the region's longer side ...
    min_crop: float = 0.5  # ... and at least this share of the resolution (never upscale > 2x)
    feather: float = 0.08  # blend edge softness as a share of the region's shorter side
    max_batch: int = 4  # requests per pipeline call
    max_sequence_length: int = 512  # Flux's T5 prompt length
    negative_prompt: str = NEGATIVE_PROMPT  # SDXL only; Flux takes no negative prompt
    variant: str | None = None  # e.g. "fp16" when the bundle holds only fp16 weight files
    offload: bool = False  # accelerate's model CPU offload: idle sub-models leave the GPU
    dtype: str | None = None  # "float16" / "bfloat16" / "float32"; None picks per device


@dataclass(frozen=True)
class PipelineKind:
    backend: str
    pipeline: str  # diffusers class name
    defaults: InpaintSettings
    gpu_dtype: str
    latent_cell: int  # photo pixels per latent token at model resolution


KINDS: dict[str, PipelineKind] = {
    "sdxl-inpaint": PipelineKind("sdxl-inpaint", "StableDiffusionXLInpaintPipeline",
                                 InpaintSettings(), "float16", 8),
    # Flux runs in bf16 on GPU: its T5 encoder overflows in fp16 (black or NaN images).
    "flux-fill": PipelineKind("flux-fill", "FluxFillPipeline",
                              InpaintSettings(steps=28, guidance=30.0, strength=1.0),
                              "bfloat16", 16),
}


@dataclass
class Plan:
    """Where one request is painted."""

    region: Box
    region_source: str
    footprint: np.ndarray  # bool (H, W): the inpainting mask, inside ``region``
    crop: Box
    alpha: np.ndarray  # float32 (crop h, crop w): blend weight, 0 outside the footprint
    notes: dict = field(default_factory=dict)


class DiffusersInpaintGenerator:
    """ImageGenerator on a local diffusers inpainting pipeline folder."""

    def __init__(self, model_dir: Path, backend: str = "sdxl-inpaint",
                 settings: InpaintSettings | dict | None = None,
                 knowledge_base: "KnowledgeBase | None" = None, device: str | None = None,
                 model_id: str | None = None):
        if backend not in KINDS:
            raise ValueError(f"unknown inpainting backend {backend!r}; known: {', '.join(KINDS)}")
        self.kind = KINDS[backend]
        self.name = backend
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "model_index.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a diffusers pipeline folder "
                                    "(no model_index.json)")
        if isinstance(settings, dict):
            settings = replace(self.kind.defaults, **settings)
        self.settings = settings or self.kind.defaults
        self.knowledge_base = knowledge_base
        self.model_id = model_id or self.model_dir.name
        self.pipeline, self.device, self.dtype = self._load(device)
        scale = getattr(self.pipeline, "vae_scale_factor", 8)
        # Flux packs 2x2 latents into one token, so its cell is twice the VAE factor.
        self.latent_cell = scale * (2 if backend == "flux-fill" else 1)

    @classmethod
    def from_pipeline(cls, pipeline, backend: str, settings: InpaintSettings | dict | None = None,
                      knowledge_base: "KnowledgeBase | None" = None, model_id: str = "in-memory",
                      device: str = "cpu", dtype: str = "float32") -> "DiffusersInpaintGenerator":
        """Wrap an already built pipeline (benchmarks on random full-size weights)."""
        self = cls.__new__(cls)
        self.kind = KINDS[backend]
        self.name = backend
        self.model_dir = Path(model_id)
        if isinstance(settings, dict):
            settings = replace(self.kind.defaults, **settings)
        self.settings = settings or self.kind.defaults
        self.knowledge_base = knowledge_base
        self.model_id = model_id
        self.pipeline, self.device, self.dtype = pipeline, device, dtype
        pipeline.set_progress_bar_config(disable=True)
        self.latent_cell = getattr(pipeline, "vae_scale_factor", 8) * (2 if backend == "flux-fill" else 1)
        return self

    # -- loading --------------------------------------------------------------------------------

    def _load(self, device: str | None):
        import appliance.offline

        appliance.offline.enforce()  # before diffusers/transformers/huggingface_hub import
        import diffusers
        import torch

        quiet_progress()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = self.settings.dtype or (self.kind.gpu_dtype if device.startswith("cuda")
                                             else "float32")
        dtype = getattr(torch, dtype_name)
        cls = getattr(diffusers, self.kind.pipeline)
        kwargs = {"torch_dtype": dtype, "local_files_only": True}
        if self.settings.variant:
            kwargs["variant"] = self.settings.variant
        with warnings.catch_warnings():
            # diffusers >= 0.40 renames torch_dtype to dtype; older releases know only torch_dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipeline = cls.from_pretrained(str(self.model_dir), **kwargs)
        # Decode the batch one image at a time: SDXL's VAE runs in fp32 and would otherwise
        # need ~4 GB per 1024 px image at once (see appliance/models/memory.py).
        pipeline.vae.enable_slicing()
        if device.startswith("cuda") and self.settings.offload:
            pipeline.enable_model_cpu_offload()
        elif device != "cpu":  # from_pretrained already placed it on the CPU
            pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline, device, dtype_name

    def close(self) -> None:
        self.pipeline = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    # -- ImageGenerator -------------------------------------------------------------------------

    def generate(self, requests: Sequence[EditRequest]) -> list[EditResult]:
        results: list[EditResult] = []
        for start in range(0, len(requests), self.settings.max_batch):
            results.extend(self._generate_batch(requests[start:start + self.settings.max_batch]))
        return results

    def _generate_batch(self, requests: Sequence[EditRequest]) -> list[EditResult]:
        plans = [self.plan(r) for r in requests]
        painted, texts, seconds = self._paint(requests, plans, self.settings.negative_prompt)
        res = self.settings.resolution
        results = []
        for request, plan, text, out in zip(requests, plans, texts, painted):
            edited = blend(request.image, out, plan)
            params = {"backend": self.name, "model": self.model_id, "seed": int(request.seed),
                      "steps": self.settings.steps, "guidance": self.settings.guidance,
                      "strength": self.settings.strength, "resolution": res,
                      "crop": plan.crop.as_list(), "region_source": plan.region_source,
                      "footprint_pixels": int(plan.footprint.sum()), "device": self.device,
                      "dtype": self.dtype, "batch_size": len(requests),
                      "batch_seconds": round(seconds, 3), "text_prompt": text.prompt,
                      "text_prompt_2": text.prompt_2, **plan.notes}
            results.append(EditResult(image=edited, region=plan.region, mask=None, params=params))
        return results

    def restore(self, image: np.ndarray, hole: np.ndarray, category: str, seed: int) -> np.ndarray:
        """Reverse synthesis: ``image`` with the pixels of ``hole`` (bool, the real defect's mask
        grown past its halo) painted as the part's intact surface. Replaced fully inside the
        hole and feathered a little outside it, as ``reverse_synthesis`` blends its other
        sources; the rest of the photo is kept bit for bit."""
        if image.shape[:2] != hole.shape:
            raise ValueError(f"image {image.shape[:2]} and hole {hole.shape} differ in size")
        if not hole.any():
            return image.copy()
        from appliance.tools.image_gen.placement import foreground_bbox

        region = foreground_bbox(hole)
        crop = self._crop(region, image.shape)
        inside = hole[crop.y0:crop.y1, crop.x0:crop.x1].astype(np.float32)
        sigma = max(1.0, self.settings.feather * min(region.width, region.height))
        alpha = np.maximum(cv2.GaussianBlur(inside, (0, 0), sigmaX=sigma), inside)
        # The model paints latent cells: a hairline crack's hole must span a few of them, or
        # the pipeline keeps the crack's own latents there.
        cell = self.latent_cell * max(crop.width, crop.height) / self.settings.resolution
        reach = max(int(math.ceil(cell)), 1)
        footprint = cv2.dilate(hole.astype(np.uint8), np.ones((2 * reach + 1, 2 * reach + 1),
                                                              np.uint8)).astype(bool)
        plan = Plan(region, "reverse-synthesis", footprint, crop, alpha.astype(np.float32))
        # No defect named: the caption leads with the part alone.
        request = EditRequest(image, category, "", RESTORE_PROMPT, int(seed), region=region)
        painted, _, _ = self._paint([request], [plan], RESTORE_NEGATIVE)
        return blend(image, painted[0], plan)

    def _paint(self, requests: Sequence[EditRequest], plans: Sequence[Plan], negative: str):
        """One pipeline call over the requests' crops: (painted crops uint8 at the model's
        resolution, the fitted prompts, seconds)."""
        import torch
        from PIL import Image

        res = self.settings.resolution
        images, masks = [], []
        for request, plan in zip(requests, plans):
            crop = request.image[plan.crop.y0:plan.crop.y1, plan.crop.x0:plan.crop.x1]
            mask = plan.footprint[plan.crop.y0:plan.crop.y1, plan.crop.x0:plan.crop.x1]
            images.append(Image.fromarray(_resize(crop, res, res)))
            masks.append(Image.fromarray(
                cv2.resize(mask.astype(np.uint8) * 255, (res, res), interpolation=cv2.INTER_NEAREST)))
        # CPU generators: the same seed gives the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in requests]
        # The instruction is far longer than CLIP's window: each encoder gets its own fitted
        # caption, so the library truncates nothing (see text_prompt.py).
        t5_length = self.settings.max_sequence_length if self.name == "flux-fill" else None
        encoders = pipeline_encoders(self.pipeline, t5_length)
        texts = [fit_prompts(r.prompt, r.category, r.defect, *encoders) for r in requests]
        call = dict(prompt=[t.prompt for t in texts], prompt_2=[t.prompt_2 for t in texts],
                    image=images, mask_image=masks,
                    height=res, width=res, num_inference_steps=self.settings.steps,
                    guidance_scale=self.settings.guidance, strength=self.settings.strength,
                    generator=generators, output_type="np")
        if self.name == "flux-fill":
            call["max_sequence_length"] = self.settings.max_sequence_length
        else:
            call["negative_prompt"] = [fit_caption(negative, *encoders)] * len(requests)
        started = time.perf_counter()
        with torch.inference_mode():
            painted = self.pipeline(**call).images  # float (N, res, res, 3) in [0, 1]
        seconds = time.perf_counter() - started
        painted = np.nan_to_num(np.asarray(painted, dtype=np.float32), nan=0.0)
        crops = [(np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8) for out in painted]
        return crops, texts, seconds

    # -- placement and blending -----------------------------------------------------------------

    def plan(self, request: EditRequest) -> Plan:
        image = request.image
        shape = image.shape
        notes: dict = {}
        if request.region is not None:
            region = _clip_box(request.region, shape)
            source = "policy"
            centers = [((region.x0 + region.x1) / 2.0, (region.y0 + region.y1) / 2.0)]
            axes = (float(region.width), float(region.height))
            theta = 0.0
        else:
            placement = self._placement(request)
            boxes = placement.boxes
            region = Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes),
                         max(b.x1 for b in boxes), max(b.y1 for b in boxes))
            source = f"placement:{placement.anchor}"
            centers = [((b.x0 + b.x1) / 2.0, (b.y0 + b.y1) / 2.0) for b in boxes]
            axes = placement.axes
            theta = placement.orientation_deg or 0.0
            notes["placement"] = {"family": placement.notes.get("family"),
                                  "axes": list(placement.axes), "orientation_deg": theta,
                                  "instances": len(boxes)}
        crop = self._crop(region, shape)
        footprint = self._footprint(region, centers, axes, theta, crop, shape)
        alpha = _alpha(footprint[crop.y0:crop.y1, crop.x0:crop.x1], region, self.settings.feather)
        return Plan(region, source, footprint, crop, alpha, notes)

    def _placement(self, request: EditRequest):
        from appliance.tools.image_gen.placement import place
        from appliance.tools.image_gen.prompt_params import parse_prompt
        from appliance.tools.knowledge.families import family_for_defect
        from appliance.tools.object_map import find_object

        rng = np.random.default_rng(int(request.seed))
        params = parse_prompt(request.prompt, rng)
        family = (self.knowledge_base.renderer_for(request.category, request.defect)
                  if self.knowledge_base is not None else family_for_defect(request.defect))
        placement = place(find_object(request.image), params, family, request.image.shape, rng)
        placement.notes["family"] = family
        return placement

    def _crop(self, region: Box, shape: tuple[int, ...]) -> Box:
        """A window around the region: square when the photo allows, inside the photo."""
        height, width = shape[:2]
        wanted = max(self.settings.context * max(region.width, region.height),
                     self.settings.min_crop * self.settings.resolution)
        side = int(min(wanted, height, width))
        if side >= max(region.width, region.height):
            side_x = side_y = side
        else:
            # The region is longer than the photo's short side: a non-square window, stretched
            # to the square resolution and back.
            side_x = int(min(width, max(side, region.width)))
            side_y = int(min(height, max(side, region.height)))
        cx, cy = (region.x0 + region.x1) / 2.0, (region.y0 + region.y1) / 2.0
        x0 = int(round(min(max(cx - side_x / 2.0, 0), width - side_x)))
        y0 = int(round(min(max(cy - side_y / 2.0, 0), height - side_y)))
        return Box(x0, y0, x0 + side_x, y0 + side_y)

    def _footprint(self, region: Box, centers, axes, theta: float, crop: Box,
                   shape: tuple[int, ...]) -> np.ndarray:
        """Rotated ellipses at the instance centres, at least a few latent cells wide."""
        height, width = shape[:2]
        # Photo pixels per latent cell at this crop's scale; the mask must span >= 2 cells.
        cell = self.latent_cell * max(crop.width, crop.height) / self.settings.resolution
        major = max(axes[0], 2.0 * cell)
        minor = max(axes[1], 2.0 * cell)
        mask = np.zeros((height, width), dtype=np.uint8)
        for cx, cy in centers:
            cv2.ellipse(mask, (int(round(cx)), int(round(cy))),
                        (max(int(math.ceil(major / 2.0)), 1), max(int(math.ceil(minor / 2.0)), 1)),
                        theta, 0, 360, 1, thickness=-1)
        inside = np.zeros_like(mask)
        inside[region.y0:region.y1, region.x0:region.x1] = 1
        footprint = (mask & inside).astype(bool)
        if not footprint.any():  # a degenerate region: paint the whole box
            footprint = inside.astype(bool)
        return footprint


def quiet_progress() -> None:
    """No tqdm bars from diffusers/transformers loading: they garble service logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def blend(normal: np.ndarray, painted_crop: np.ndarray, plan: Plan) -> np.ndarray:
    """The painted crop resized back and blended in; pixels with alpha 0 are left as they were."""
    crop = plan.crop
    back = _resize(painted_crop, crop.width, crop.height)
    region = normal[crop.y0:crop.y1, crop.x0:crop.x1]
    alpha = plan.alpha[..., None]
    mixed = region.astype(np.float32) * (1.0 - alpha) + back.astype(np.float32) * alpha
    mixed = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    out = normal.copy()
    window = out[crop.y0:crop.y1, crop.x0:crop.x1]
    touched = plan.alpha > 0
    window[touched] = mixed[touched]
    return out


def _alpha(footprint: np.ndarray, region: Box, feather: float) -> np.ndarray:
    """Feathered footprint: soft inside, exactly 0 outside it."""
    sigma = max(1.0, feather * min(region.width, region.height))
    hard = footprint.astype(np.uint8)
    radius = int(math.ceil(2 * sigma))
    eroded = cv2.erode(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                       (2 * radius + 1, 2 * radius + 1)))
    core = eroded if eroded.any() else hard
    soft = cv2.GaussianBlur(core.astype(np.float32), (0, 0), sigmaX=sigma)
    soft = np.maximum(soft, core.astype(np.float32))
    return (soft * hard).astype(np.float32)


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrink = width < image.shape[1] or height < image.shape[0]
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _clip_box(box: Box, shape: tuple[int, ...]) -> Box:
    height, width = shape[:2]
    x0, y0 = max(0, min(box.x0, width - 1)), max(0, min(box.y0, height - 1))
    return Box(x0, y0, max(x0 + 1, min(box.x1, width)), max(y0 + 1, min(box.y1, height)))
