"""The shipped knowledge base: it loads, covers the benchmark categories, and the loader guards it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from appliance.names import normalize_name
from appliance.tools.knowledge.base import KnowledgeBase, KnowledgeBaseError, load_knowledge_base
from appliance.tools.knowledge.families import FAMILIES

KB_ROOT = Path(__file__).resolve().parents[1] / "knowledge_base"

# The official MVTec-AD test folder names (minus "good"): the benchmark compares against these.
MVTEC_AD = {
    "bottle": ["broken_large", "broken_small", "contamination"],
    "cable": ["bent_wire", "cable_swap", "combined", "cut_inner_insulation",
              "cut_outer_insulation", "missing_cable", "missing_wire", "poke_insulation"],
    "capsule": ["crack", "faulty_imprint", "poke", "scratch", "squeeze"],
    "carpet": ["color", "cut", "hole", "metal_contamination", "thread"],
    "grid": ["bent", "broken", "glue", "metal_contamination", "thread"],
    "hazelnut": ["crack", "cut", "hole", "print"],
    "leather": ["color", "cut", "fold", "glue", "poke"],
    "metal_nut": ["bent", "color", "flip", "scratch"],
    "pill": ["color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"],
    "screw": ["manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"],
    "tile": ["crack", "glue_strip", "gray_stroke", "oil", "rough"],
    "toothbrush": ["defective"],
    "transistor": ["bent_lead", "cut_lead", "damaged_case", "misplaced"],
    "wood": ["color", "combined", "hole", "liquid", "scratch"],
    "zipper": ["broken_teeth", "combined", "fabric_border", "fabric_interior", "rough",
               "split_teeth", "squeezed_teeth"],
}

VISA = ["candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"]

SAMPLES = {
    "brick": ("ceramic", ["crack", "chip", "stain", "hole"]),
    "coin": ("metal", ["scratch", "dent", "stain", "discoloration"]),
    "gravel": ("stone", ["stain", "crack", "contamination"]),
}

MATERIALS = ["metal", "plastic", "glass", "rubber", "textile", "ceramic", "pcb", "food", "stone"]

# The procedural renderer reads these words from the size field; a size also needs a number.
SIZE_WORDS = re.compile(r"\b(small|medium|large|thin|long|narrow|elongated)\b", re.IGNORECASE)
SIZE_NUMBER = re.compile(r"\d|\b(one|two|three|half|third)\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return load_knowledge_base(KB_ROOT)


def test_whole_base_loads_with_the_real_loader(kb: KnowledgeBase) -> None:
    assert 150 <= len(kb.entries) <= 300
    assert len({e.id for e in kb.entries}) == len(kb.entries)
    for path in KB_ROOT.rglob("*.toml"):
        expected_kind = {"categories": "category", "materials": "material"}[path.parent.name]
        subject = next(s for s in kb.subjects.values() if s.source == str(path.relative_to(KB_ROOT)))
        assert subject.kind == expected_kind, path
        assert subject.name == path.stem, f"{path}: subject should match the file name"


@pytest.mark.parametrize("category", sorted(MVTEC_AD))
def test_mvtec_category_lists_exactly_its_official_defects(kb: KnowledgeBase, category: str) -> None:
    assert sorted(kb.defects_for(category)) == sorted(MVTEC_AD[category])
    for defect in MVTEC_AD[category]:
        entry = kb.entry(category, defect)
        assert entry is not None and entry.subject == category and entry.defect == defect


@pytest.mark.parametrize("category", VISA)
def test_visa_category_is_present(kb: KnowledgeBase, category: str) -> None:
    subject = kb.subject(category)
    assert subject is not None and subject.kind == "category"
    defects = kb.defects_for(category)
    assert len(defects) >= 4
    assert all(d == normalize_name(d) for d in defects)
    assert all(kb.entry(category, d).subject == category for d in defects)


def test_visa_taxonomy_spot_checks(kb: KnowledgeBase) -> None:
    for board in ("pcb1", "pcb2", "pcb3"):
        assert sorted(kb.defects_for(board)) == ["bent", "melt", "missing", "scratch"]
    assert "wrong_place" in kb.defects_for("pcb4")
    assert "fryum_stuck_together" in kb.defects_for("fryum")
    assert "chunk_of_wax_missing" in kb.defects_for("candle")
    assert "leak" in kb.defects_for("capsules")


@pytest.mark.parametrize("category", sorted(SAMPLES))
def test_sample_inbox_categories(kb: KnowledgeBase, category: str) -> None:
    material, defects = SAMPLES[category]
    assert kb.material_of(category) == material
    assert kb.defects_for(category) == defects


def test_brick_chip_renders_as_missing(kb: KnowledgeBase) -> None:
    assert kb.renderer_for("brick", "chip") == "missing"
    assert kb.entry("brick", "missing").defect == "chip"


@pytest.mark.parametrize("material", MATERIALS)
def test_material_files(kb: KnowledgeBase, material: str) -> None:
    subject = kb.subject(material, kind="material")
    assert subject.kind == "material" and subject.material == material
    assert subject.source == f"materials/{material}.toml"
    assert len(subject.defects) >= 6


def test_every_category_material_resolves(kb: KnowledgeBase) -> None:
    for subject in kb.subjects.values():
        target = kb.subject(subject.material, kind="material") or kb.subject(subject.material)
        assert target is not None, f"{subject.source}: material {subject.material!r} has no file"
        assert target.material == subject.material


def test_leather_and_wood_double_as_materials(kb: KnowledgeBase) -> None:
    # Unlisted tables in the category files are the material fallback for customer parts.
    assert "scratch" not in kb.defects_for("leather")
    assert kb.entry("leather", "scratch").source == "categories/leather.toml"
    assert "crack" not in kb.defects_for("wood")
    assert kb.entry("wood", "crack").renderer == "crack"


def test_every_renderer_is_a_family(kb: KnowledgeBase) -> None:
    assert {e.renderer for e in kb.entries} <= set(FAMILIES)


def test_entries_are_concrete_and_distinct(kb: KnowledgeBase) -> None:
    appearances: dict[str, str] = {}
    for entry in kb.entries:
        assert SIZE_WORDS.search(entry.size), f"{entry.id}: size needs small/medium/large/thin/long"
        assert SIZE_NUMBER.search(entry.size), f"{entry.id}: size needs a number"
        assert len(entry.appearance) >= 40, entry.id
        assert entry.appearance not in appearances, f"{entry.id} repeats {appearances[entry.appearance]}"
        appearances[entry.appearance] = entry.id
    scratches = [kb.entry(c, "scratch") for c in ("metal_nut", "pill", "wood", "capsule")]
    assert len({e.appearance for e in scratches}) == 4
    assert len({e.location for e in scratches}) == 4


def test_names_resolve_to_one_thing(kb: KnowledgeBase) -> None:
    owners: dict[str, str] = {}
    for subject in kb.subjects.values():
        for name in [subject.name, *(normalize_name(a) for a in subject.aliases)]:
            assert owners.setdefault(name, subject.name) == subject.name, \
                f"subject alias {name!r} used by {owners[name]} and {subject.name}"
        seen: dict[str, str] = {}
        for entry in (e for e in kb.entries if e.subject == subject.name):
            for name in entry.names():
                assert seen.setdefault(name, entry.defect) == entry.defect, \
                    f"{subject.source}: {name!r} names both {seen[name]} and {entry.defect}"


def test_entry_resolves_aliases(kb: KnowledgeBase) -> None:
    assert kb.entry("bottle", "chip").defect == "broken_small"
    assert kb.entry("Metal Nut", "Upside Down").defect == "flip"
    assert kb.entry("candle", "extra wax").defect == "extra_wax_in_candle"
    assert kb.entry("candle", "foreign particles on candle").defect == "foreign_particals_on_candle"
    assert kb.entry("tea-light", "weird candle wick").subject == "candle"


def test_entry_falls_back_to_the_material(kb: KnowledgeBase) -> None:
    bubble = kb.entry("bottle", "bubble")  # bottle has no bubble entry; glass does
    assert bubble is not None and (bubble.subject, bubble.defect) == ("glass", "bubble")
    rust = kb.entry("screw", "rust")
    assert rust is not None and (rust.subject, rust.defect) == ("metal", "corrosion")
    assert kb.renderer_for("pcb1", "burnt") == "discoloration"  # from materials/pcb.toml
    assert kb.entry("bottle", "no_such_defect") is None
    assert kb.entry("unknown_part", "scratch") is None


def test_new_customer_category_falls_back_to_its_material(tmp_path: Path) -> None:
    (tmp_path / "materials").mkdir()
    shutil.copy(KB_ROOT / "materials" / "metal.toml", tmp_path / "materials" / "metal.toml")
    _write(tmp_path / "categories" / "bracket.toml", _category("bracket", renderer="scratch"))
    kb = load_knowledge_base(tmp_path)
    assert kb.entry("bracket", "scratch").subject == "bracket"
    assert kb.entry("bracket", "dent").subject == "metal"
    assert kb.defects_for("bracket") == ["scratch"]


def test_digest_changes_when_a_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "categories" / "bracket.toml"
    _write(path, _category("bracket", renderer="scratch"))
    before = load_knowledge_base(tmp_path)
    _write(path, _category("bracket", renderer="dent"))
    after = load_knowledge_base(tmp_path)
    assert before.digest != after.digest
    assert after.renderer_for("bracket", "scratch") == "dent"


def test_loader_rejects_unknown_key(tmp_path: Path) -> None:
    text = _category("bracket", renderer="scratch") + 'colour = "red"\n'
    _write(tmp_path / "categories" / "bracket.toml", text)
    with pytest.raises(KnowledgeBaseError, match=r"categories/bracket\.toml.*\[defect\.scratch\].*colour"):
        load_knowledge_base(tmp_path)


def test_loader_rejects_unknown_file_key(tmp_path: Path) -> None:
    text = 'owner = "someone"\n' + _category("bracket", renderer="scratch")
    _write(tmp_path / "categories" / "bracket.toml", text)
    with pytest.raises(KnowledgeBaseError, match=r"categories/bracket\.toml.*owner"):
        load_knowledge_base(tmp_path)


def test_loader_rejects_bad_renderer(tmp_path: Path) -> None:
    _write(tmp_path / "categories" / "bracket.toml", _category("bracket", renderer="sparkles"))
    with pytest.raises(KnowledgeBaseError, match=r"categories/bracket\.toml.*\[defect\.scratch\].*sparkles"):
        load_knowledge_base(tmp_path)


def test_loader_rejects_missing_field(tmp_path: Path) -> None:
    text = _category("bracket", renderer="scratch").replace('size = "Small: 5 percent."\n', "")
    _write(tmp_path / "categories" / "bracket.toml", text)
    with pytest.raises(KnowledgeBaseError, match=r"categories/bracket\.toml.*\[defect\.scratch\].*'size'"):
        load_knowledge_base(tmp_path)


def test_loader_rejects_listed_defect_without_table(tmp_path: Path) -> None:
    text = _category("bracket", renderer="scratch").replace(
        'defects = ["scratch"]', 'defects = ["scratch", "rust"]')
    _write(tmp_path / "categories" / "bracket.toml", text)
    with pytest.raises(KnowledgeBaseError, match=r"categories/bracket\.toml.*rust"):
        load_knowledge_base(tmp_path)


def _category(name: str, renderer: str) -> str:
    return (f'subject = "{name}"\nkind = "category"\nmaterial = "metal"\n'
            'defects = ["scratch"]\n\n[defect.scratch]\n'
            f'renderer = "{renderer}"\n'
            'appearance = "A thin bright line."\n'
            'location = "On the flat legs."\n'
            'size = "Small: 5 percent."\n')


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
