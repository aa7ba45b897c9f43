"""The normal train/test split and the loaders of the two real-data layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tiles
from PIL import Image

from appliance.evaluation.data import (GOOD, LabeledImage, defect_class_name, find_images,
                                       load_defect_folder, load_folders, load_mask,
                                       load_mvtec_category, mask_path_for, split_normals, take_shots)

def _paths(n: int) -> list[Path]:
    return [Path(f"/data/normal/img_{i:03d}.jpg") for i in range(n)]


def test_split_is_deterministic_for_a_seed() -> None:
    assert split_normals(_paths(50), seed=7) == split_normals(_paths(50), seed=7)


def test_split_ignores_the_listing_order() -> None:
    shuffled = list(reversed(_paths(50)))
    assert split_normals(shuffled, seed=7) == split_normals(_paths(50), seed=7)


def test_split_changes_with_the_seed() -> None:
    assert split_normals(_paths(50), seed=1)[1] != split_normals(_paths(50), seed=2)[1]


def test_split_is_a_partition_with_the_requested_share() -> None:
    train, test = split_normals(_paths(50), seed=0, test_fraction=0.2)
    assert len(test) == 10 and len(train) == 40
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(_paths(50))


def test_split_keeps_one_image_on_each_side() -> None:
    train, test = split_normals(_paths(2), seed=0, test_fraction=0.01)
    assert len(train) == 1 and len(test) == 1
    with pytest.raises(ValueError):
        split_normals(_paths(1), seed=0)
    with pytest.raises(ValueError):
        split_normals(_paths(5), seed=0, test_fraction=1.0)


def test_defect_class_names() -> None:
    assert defect_class_name("MT_Crack") == "crack"
    assert defect_class_name("broken_large") == "broken_large"
    assert defect_class_name("Color Stain") == "color_stain"


def _copy_tiles(root: Path, per_class: int = 3) -> Path:
    """A small copy of the magnetic tile layout: MT_Free and two defect classes."""
    for folder, count in (("MT_Free", 8), ("MT_Crack", per_class), ("MT_Blowhole", per_class)):
        target = root / folder / "Imgs"
        target.mkdir(parents=True)
        for photo in sorted(require_tiles(folder, "Imgs").glob("*.jpg"))[:count]:
            shutil.copy(photo, target / photo.name)
            shutil.copy(photo.with_suffix(".png"), target / photo.with_suffix(".png").name)
    return root


def test_find_images_skips_the_masks_beside_photos(tmp_path: Path) -> None:
    root = _copy_tiles(tmp_path)
    found = find_images(root / "MT_Crack")
    assert len(found) == 3
    assert all(p.suffix == ".jpg" for p in found)
    assert mask_path_for(found[0]) == found[0].with_suffix(".png")


def test_magnetic_tile_layout_loads_classes_and_thresholded_masks(tmp_path: Path) -> None:
    root = _copy_tiles(tmp_path)
    items = load_defect_folder(root, 64, exclude=[root / "MT_Free"])
    assert sorted({it.defect for it in items}) == ["blowhole", "crack"]
    assert len(items) == 6
    for item in items:
        assert item.image.shape == (64, 64, 3) and item.image.dtype == np.uint8
        assert item.mask.shape == (64, 64) and item.mask.dtype == bool
    # The soft mask is thresholded at 128: compare with the file itself.
    source = Path(items[0].source).with_suffix(".png")
    grey = np.asarray(Image.open(source).convert("L").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(items[0].mask, grey >= 128)
    assert any(it.mask.any() for it in items)
    # A single class folder given directly is one class.
    single = load_defect_folder(root / "MT_Crack", 64)
    assert {it.defect for it in single} == {"crack"} and len(single) == 3


def test_load_folders_splits_normals_and_excludes_them_from_defects(tmp_path: Path) -> None:
    root = _copy_tiles(tmp_path)
    data = load_folders(root / "MT_Free", root, 64, seed=3, train_size=4, category="magnetic_tile")
    assert len(data.test_normals) == 2 and data.train_pool_size == 6 and len(data.train_normals) == 4
    assert all(it.defect == GOOD and not it.mask.any() for it in data.test_normals)
    assert data.defect_classes == ["blowhole", "crack"]
    train_sources = {it.source for it in data.train_normals}
    assert not train_sources & {it.source for it in data.test_normals}
    again = load_folders(root / "MT_Free", root, 64, seed=3, train_size=4, category="magnetic_tile")
    assert [it.source for it in again.train_normals] == [it.source for it in data.train_normals]


def test_defect_photo_without_mask_is_an_error(tmp_path: Path) -> None:
    root = _copy_tiles(tmp_path)
    next((root / "MT_Crack" / "Imgs").glob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="without a mask"):
        load_defect_folder(root, 64, exclude=[root / "MT_Free"])


def test_a_class_without_any_mask_is_tested_on_image_labels_only(tmp_path: Path) -> None:
    root = _copy_tiles(tmp_path)
    for mask in (root / "MT_Crack" / "Imgs").glob("*.png"):
        mask.unlink()
    # Never assumed: a mask saved under another name must not quietly become "no masks".
    with pytest.raises(FileNotFoundError, match="none of its 3 defect photos has a mask.*"
                                                "--image-labels"):
        load_defect_folder(root, 64, exclude=[root / "MT_Free"])
    with pytest.raises(FileNotFoundError, match="none of its 3 defect photos has a mask"):
        load_folders(root / "MT_Free", root, 64, seed=0, train_size=4, category="tiles")
    items = load_defect_folder(root, 64, exclude=[root / "MT_Free"], image_labels=True)
    cracks = [it for it in items if it.defect == "crack"]
    assert len(cracks) == 3 and not any(it.pixel_labels or it.mask.any() for it in cracks)
    assert all(it.image.shape == (64, 64, 3) for it in cracks)
    blowholes = [it for it in items if it.defect == "blowhole"]
    assert all(it.pixel_labels for it in blowholes) and any(it.mask.any() for it in blowholes)

    data = load_folders(root / "MT_Free", root, 64, seed=0, train_size=4, category="tiles",
                        image_labels=True)
    assert data.image_level_classes == ["crack"] and data.defect_classes == ["blowhole", "crack"]
    # Few-shot calibration needs the shots' masks.
    with pytest.raises(ValueError, match="these defect types have none: crack"):
        load_folders(root / "MT_Free", root, 64, seed=0, train_size=4, category="tiles",
                     few_shot=1, image_labels=True)
    # Retrain's lenient read lists every photo of the class as left out, with the reason.
    skipped = []
    kept = load_defect_folder(root, 64, exclude=[root / "MT_Free"], skipped=skipped)
    assert {it.defect for it in kept} == {"blowhole"}
    assert len(skipped) == 3 and all("without a mask" in s.reason for s in skipped)


def test_a_class_with_some_masks_missing_is_still_an_error(tmp_path: Path) -> None:
    root = _copy_tiles(tmp_path)
    next((root / "MT_Crack" / "Imgs").glob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="without a mask"):
        load_defect_folder(root, 64, exclude=[root / "MT_Free"], image_labels=True)


def test_mvtec_layout(tmp_path: Path) -> None:
    root = tmp_path / "tile"
    photos = sorted(require_tiles("MT_Free", "Imgs").glob("*.jpg"))
    cracks = sorted(require_tiles("MT_Crack", "Imgs").glob("*.jpg"))
    for folder, sources in (("train/good", photos[:5]), ("test/good", photos[5:7]),
                            ("test/crack", cracks[:2])):
        (root / folder).mkdir(parents=True)
        for index, photo in enumerate(sources):
            Image.open(photo).save(root / folder / f"{index:03d}.png")
            if folder == "test/crack":
                (root / "ground_truth/crack").mkdir(parents=True, exist_ok=True)
                Image.open(photo.with_suffix(".png")).save(root / f"ground_truth/crack/{index:03d}_mask.png")
    data = load_mvtec_category(root, 32, seed=0, train_size=3)
    assert data.category == "tile"
    assert len(data.train_normals) == 3 and data.train_pool_size == 5
    assert len(data.test_normals) == 2
    assert [it.defect for it in data.test_defects] == ["crack", "crack"]
    expected = load_mask(root / "ground_truth/crack/000_mask.png", 32)
    assert np.array_equal(data.test_defects[0].mask, expected)


def _defects(counts: dict[str, int]) -> list[LabeledImage]:
    pixels, mask = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool)
    return [LabeledImage(pixels, mask, defect, f"/data/{defect}/{i:02d}.png")
            for defect, n in counts.items() for i in range(n)]


def test_few_shot_split_is_deterministic_and_keeps_a_test_image_of_every_type() -> None:
    defects = _defects({"crack": 6, "stain": 3, "pit": 1})
    shots, test = take_shots(defects, 3, seed=4)
    count = {d: sum(it.defect == d for it in shots) for d in ("crack", "stain", "pit")}
    assert count == {"crack": 3, "stain": 2, "pit": 0}  # stain and pit keep one for testing
    assert {it.defect for it in test} == {"crack", "stain", "pit"}
    assert not {it.source for it in shots} & {it.source for it in test}
    assert len(shots) + len(test) == len(defects)
    # Same seed, any listing order: the same shots; the test set keeps the loader's order.
    def sources(items: list[LabeledImage]) -> list[str]:
        return [it.source for it in items]

    assert sources(take_shots(list(reversed(defects)), 3, seed=4)[0]) == sources(shots)
    assert sources(test) == [s for s in sources(defects) if s not in sources(shots)]
    assert any(sources(take_shots(defects, 3, seed=s)[0]) != sources(shots) for s in range(5, 10))
    no_shots, everything = take_shots(defects, 0, seed=4)
    assert no_shots == [] and sources(everything) == sources(defects)
    with pytest.raises(ValueError):
        take_shots(defects, -1, seed=4)


def test_few_shot_loaders_take_the_shots_out_of_the_test_set(tmp_path: Path) -> None:
    root = _copy_tiles(tmp_path)
    data = load_folders(root / "MT_Free", root, 32, seed=1, train_size=4, category="tile",
                        few_shot=2)
    assert sorted(it.defect for it in data.shots) == ["blowhole", "blowhole", "crack", "crack"]
    assert sorted(it.defect for it in data.test_defects) == ["blowhole", "crack"]
    assert not {it.source for it in data.shots} & {it.source for it in data.test_defects}
    again = load_folders(root / "MT_Free", root, 32, seed=1, train_size=4, category="tile",
                         few_shot=2)
    assert [it.source for it in again.shots] == [it.source for it in data.shots]
    zero_shot = load_folders(root / "MT_Free", root, 32, seed=1, train_size=4, category="tile")
    assert zero_shot.shots == [] and len(zero_shot.test_defects) == 6
