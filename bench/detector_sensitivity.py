"""How much one training of the evaluation's detector says about a generator: a sensitivity test.

    python bench/detector_sensitivity.py                     # about 7 minutes on 2 cores
    python bench/detector_sensitivity.py --few-shot 0 --seed 1 --detector-seeds 8

``appliance eval`` ranks generators by the pixel AP of a UNet trained on their samples. This
takes ours' samples exactly as ``appliance eval`` makes them on the magnetic tiles (the same
split, shots and seed) and trains that UNet on them:

1. as they are, with the run's seed;
2. with one grey level added to one pixel of one of the samples (inside its defect), the same
   seed: the size of the difference that moving opencv-python-headless from 5.0.0 to 5.1.0
   made to these samples;
3. as they are, with each further detector seed.

It prints every pixel AP on the real defects, the perturbed run's ratio to the unperturbed one,
and the spread over the detector seeds: what one training's luck alone is worth, to compare
with the margins the issue's targets ask for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TILES = REPO.parent / "shared" / "datasets" / "magnetic-tile"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the evaluation seed [0]")
    parser.add_argument("--few-shot", type=int, default=5, help="real defects per type given [5]")
    parser.add_argument("--detector-seeds", type=int, default=5,
                        help="trainings on the unchanged samples, seeds SEED.. [5]")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import numpy as np

    from appliance.evaluation.data import load_folders
    from appliance.evaluation.generators import generate_training_set, make_generator
    from appliance.evaluation.metrics import average_precision
    from appliance.evaluation.runner import EvalConfig, grey_rgb
    from appliance.evaluation.train import available_cpus, predict, train_unet

    config = EvalConfig(seed=args.seed, few_shot=args.few_shot)
    train = replace(config.train, threads=available_cpus())
    data = load_folders(TILES / "MT_Free", TILES, config.size, args.seed, config.train_size,
                        "magnetic_tile", config.test_fraction, config.few_shot)
    normals = [it.image for it in data.train_normals]
    generator = make_generator("ours", data.category, data.defect_classes, None, data.shots)
    samples = generate_training_set(generator, normals, args.seed, config.max_rounds).samples
    images = [grey_rgb(s.image) for s in samples]
    masks = [s.mask for s in samples]
    sources = [normals[s.source_index] for s in samples]
    print(f"{len(samples)} samples of ours, {args.few_shot}-shot, seed {args.seed}", flush=True)

    changed = [image.copy() for image in images]
    y, x = (int(v[0]) for v in np.nonzero(masks[0]))
    step = 1 if changed[0][y, x, 0] < 255 else -1
    changed[0][y, x] = changed[0][y, x].astype(int) + step

    test = [it for it in data.test_set if it.pixel_labels]
    truth = np.stack([it.mask for it in test])

    def pixel_ap(training_images: list, seed: int) -> float:
        started = time.perf_counter()
        model, _ = train_unet(training_images, masks, sources, replace(train, seed=seed))
        ap = average_precision(truth, predict(model, [it.image for it in test], train))
        print(f"  trained with seed {seed} in {time.perf_counter() - started:.0f} s: "
              f"pixel AP {ap:.4f}", flush=True)
        return ap

    print("the samples as they are:", flush=True)
    plain = pixel_ap(images, args.seed)
    print(f"one grey level added to pixel ({y}, {x}) of the first sample:", flush=True)
    perturbed = pixel_ap(changed, args.seed)
    print("the samples as they are, the other detector seeds:", flush=True)
    seeds = [plain] + [pixel_ap(images, args.seed + k) for k in range(1, args.detector_seeds)]

    mean = statistics.mean(seeds)
    spread = statistics.stdev(seeds) if len(seeds) > 1 else float("nan")
    print(f"\none pixel, one grey level: pixel AP {plain:.4f} -> {perturbed:.4f} "
          f"(ratio {perturbed / plain:.3f})")
    print(f"{len(seeds)} detector seeds: mean {mean:.4f}, sample std {spread:.4f} "
          f"({spread / mean:.0%} of the mean), from {min(seeds):.4f} to {max(seeds):.4f}")
    if args.json:
        args.json.write_text(json.dumps({
            "seed": args.seed, "few_shot": args.few_shot, "samples": len(samples),
            "pixel_ap": plain, "pixel_ap_one_pixel_changed": perturbed,
            "pixel_ap_by_detector_seed": seeds}, indent=2))


if __name__ == "__main__":
    main()
