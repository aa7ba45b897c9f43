"""Knowledge retrieval: the right entry for held-out spellings, and an index cache that is reused
when nothing changed and rebuilt when the knowledge base did."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from appliance.imaging import sha256_file
from appliance.tools.interfaces import PromptRequest
from appliance.tools.knowledge.base import load_knowledge_base
from appliance.tools.knowledge.embedder import (
    BUNDLED_MODEL_NAME,
    EmbedderError,
    bundled_model_path,
    load_embedder,
)
from appliance.tools.knowledge.retrieval import EXACT_BOOST, FaissKnowledgeRetriever
from appliance.tools.prompt_gen.composer import KnowledgePromptGenerator

KB_ROOT = Path(__file__).resolve().parents[1] / "knowledge_base"

# Queries spelled the way people and dataset folders spell them, never as the file keys:
# other case and separators, aliases, paraphrases, and parts the knowledge base has never seen
# but whose material it knows. (category, defect, expected entry id)
HELD_OUT = [
    # spelling and aliases
    ("Metal Nut", "flip", "metal_nut/flip"),
    ("magnetic tile", "pore", "magnetic_tile/blowhole"),
    ("bottle", "broken large", "bottle/broken_large"),
    ("screw", "scratch head", "screw/scratch_head"),
    ("carpet", "metal contamination", "carpet/metal_contamination"),
    ("Capsule", "Faulty-Imprint", "capsule/faulty_imprint"),
    ("PCB 4", "wrong position", "pcb4/wrong_place"),
    # paraphrases
    ("metal-nut", "turned upside down", "metal_nut/flip"),
    ("Magnetic_Tile", "gas pores", "magnetic_tile/blowhole"),
    ("bottle", "big piece broken out of the mouth", "bottle/broken_large"),
    ("screw", "scratched head", "screw/scratch_head"),
    ("carpet", "metallic particles", "carpet/metal_contamination"),
    ("hazelnut", "cracked nut shell", "hazelnut/crack"),
    ("capsule", "squashed", "capsule/squeeze"),
    ("cable", "swapped wire colours", "cable/cable_swap"),
    ("cable", "punctured insulation", "cable/poke_insulation"),
    ("transistor", "bent legs", "transistor/bent_lead"),
    ("wood", "spilled liquid", "wood/liquid"),
    ("leather", "folded", "leather/fold"),
    ("grid", "bent wires", "grid/bent"),
    ("tile", "gray line", "tile/gray_stroke"),
    ("zip", "teeth broken off", "zipper/broken_teeth"),
    ("pill", "wrong colour", "pill/color"),
    ("toothbrush", "bent bristles", "toothbrush/defective"),
    ("candle", "a chunk of wax is gone", "candle/chunk_of_wax_missing"),
    ("cashew", "burned", "cashew/burnt"),
    ("chewing gum", "missing corner", "chewinggum/corner_missing"),
    ("fryum", "two stuck together", "fryum/fryum_stuck_together"),
    ("pcb1", "melted component", "pcb1/melt"),
    ("pipe fryum", "broken in the middle", "pipe_fryum/middle_breakage"),
    ("coin", "tarnished", "coin/discoloration"),
    ("brick", "salt efflorescence", "brick/stain"),
    # unknown parts: the material named in the part, or the part's own alias in a material file
    ("steel bracket", "scratch", "metal/scratch"),
    ("rubber gasket", "tear", "rubber/cut"),
    ("glass vial", "air bubble", "glass/bubble"),
    ("plastic housing", "sink marks", "plastic/dent"),
    ("aluminium housing", "rust", "metal/corrosion"),
    ("woven fabric", "snagged yarn", "textile/misweave"),
    ("porcelain insulator", "hairline crack", "ceramic/crack"),
]


@pytest.fixture(scope="module")
def kb():
    return load_knowledge_base()


@pytest.fixture(scope="module")
def retriever(kb):
    # The session cache from conftest ($APPLIANCE_CACHE): other tests reuse this index.
    built = FaissKnowledgeRetriever(kb)
    built.load()
    return built


def test_held_out_queries_find_the_right_entry(kb, retriever):
    present = {entry.id for entry in kb.entries}
    missing = [q[2] for q in HELD_OUT if q[2] not in present]
    assert not missing, f"the shipped knowledge base lost the entries {missing}"
    misses = []
    for category, defect, expected in HELD_OUT:
        found = retriever.retrieve(category, defect, k=3)
        if found.entries[0].id != expected:
            misses.append((category, defect, expected, [e.id for e in found.entries]))
    accuracy = 1 - len(misses) / len(HELD_OUT)
    print(f"\nheld-out top-1 accuracy {accuracy:.3f} over {len(HELD_OUT)} queries; misses: {misses}")
    assert accuracy >= 0.9, misses


def test_exact_entries_rank_first_and_scores_explain_it(retriever):
    found = retriever.retrieve("magnetic tile", "pore", k=3)
    assert found.query == "pore on magnetic tile (ceramic)"
    assert [e.id for e in found.entries][0] == "magnetic_tile/blowhole"
    assert found.scores[0] > EXACT_BOOST > found.scores[1]
    assert found.scores == sorted(found.scores, reverse=True)
    # The runner-up is the material's entry for the same kind of flaw, and all three are holes.
    assert found.entries[1].id == "ceramic/hole"
    assert {e.renderer for e in found.entries} == {"hole"}


def test_unknown_part_without_a_material_still_gets_related_knowledge(retriever, kb):
    found = retriever.retrieve("mystery gadget", "hairline crack", k=5)
    assert len(found.entries) == 5 and found.query == "hairline crack on mystery gadget"
    assert "crack" in found.entries[0].defect
    many = retriever.retrieve("mystery gadget", "crack", k=10_000)
    assert len(many.entries) == len(kb.entries)  # k is clamped, nothing is repeated


def test_explicit_material_is_used_for_a_new_part(retriever, kb):
    assert kb.subject("metal") is not None, "knowledge_base/materials/metal.toml is missing"
    found = retriever.retrieve("bracket", "scratch", k=1, material="steel")
    assert found.entries[0].id == "metal/scratch" and "(metal)" in found.query


def test_index_cache_is_reused(retriever, kb):
    path = Path(retriever.stats.path)
    stamp = path.stat().st_mtime_ns
    encoded = retriever.embedder.texts_encoded
    again = FaissKnowledgeRetriever(kb)
    stats = again.load()
    assert stats.source == "cache" and stats.path == str(path)
    assert path.stat().st_mtime_ns == stamp  # not rewritten
    assert retriever.embedder is again.embedder  # one model per process
    assert again.embedder.texts_encoded == encoded  # nothing was embedded to load it
    assert again.retrieve("bottle", "broken large").entries[0].id == "bottle/broken_large"


def _small_kb(tmp_path: Path) -> Path:
    root = tmp_path / "kb"
    (root / "categories").mkdir(parents=True)
    shutil.copy(KB_ROOT / "categories" / "magnetic_tile.toml", root / "categories")
    return root


def test_index_is_rebuilt_when_the_knowledge_base_changes(tmp_path):
    root, cache = _small_kb(tmp_path), tmp_path / "cache"
    first = FaissKnowledgeRetriever(root, cache_dir=cache)
    assert first.load().source == "built"
    assert FaissKnowledgeRetriever(root, cache_dir=cache).load().source == "cache"

    tile = root / "categories" / "magnetic_tile.toml"
    tile.write_text(tile.read_text(encoding="utf-8") + (
        '\n[defect.rust]\nrenderer = "stain"\n'
        'appearance = "An orange-brown corrosion bloom with a rough, powdery surface."\n'
        'location = "Near the bottom edge, where coolant collects."\n'
        'size = "Medium: about 10 percent of the tile width."\n'
        'aliases = ["oxidation"]\n'), encoding="utf-8")
    second = FaissKnowledgeRetriever(root, cache_dir=cache)
    stats = second.load()
    assert stats.source == "built" and stats.path != first.stats.path
    # The new entry is in the rebuilt index and reachable by a paraphrase.
    assert second.retrieve("magnetic tile", "orange corrosion").entries[0].id == "magnetic_tile/rust"
    assert len(list((cache / "knowledge_index").glob("*.faiss"))) == 2
    assert not list((cache / "knowledge_index").glob(".*tmp*"))  # atomic writes left no debris


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    root, cache = _small_kb(tmp_path), tmp_path / "cache"
    path = Path(FaissKnowledgeRetriever(root, cache_dir=cache).load().path)
    path.write_bytes(b"not an index")
    again = FaissKnowledgeRetriever(root, cache_dir=cache)
    assert again.load().source == "built"
    assert again.retrieve("magnetic tile", "pore").entries[0].id == "magnetic_tile/blowhole"


def test_bundled_embedder_provenance():
    embedder = load_embedder()
    assert embedder is load_embedder()  # cached per process
    assert embedder.info.name == BUNDLED_MODEL_NAME and embedder.info.dimension == 384
    weights = bundled_model_path() / "model.safetensors"
    assert embedder.info.fingerprint == sha256_file(weights)
    vectors = embedder.encode(["a crack on a tile", "a fissure in a ceramic tile", "a blue sky"])
    norms = (vectors ** 2).sum(axis=1)
    assert abs(norms - 1).max() < 1e-4
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_a_local_model_folder_can_replace_the_bundled_one(tmp_path):
    folder = tmp_path / "customer-minilm"
    # Same weights under another folder, linked rather than copied (90 MB).
    shutil.copytree(bundled_model_path(), folder,
                    copy_function=lambda src, dst: os.symlink(src, dst))
    embedder = load_embedder(folder)
    assert embedder is not load_embedder()
    assert embedder.info.name == "customer-minilm"
    assert embedder.info.fingerprint == load_embedder().info.fingerprint
    with pytest.raises(EmbedderError):
        load_embedder(tmp_path / "nowhere")


def test_prompt_generator_uses_retrieval_for_an_unknown_part(kb, retriever, texture_image):
    assert kb.subject("metal") is not None, "knowledge_base/materials/metal.toml is missing"
    generator = KnowledgePromptGenerator(kb, retriever=retriever)
    [prompt] = generator.generate_prompts(
        [PromptRequest(image=texture_image, category="steel hinge", defect="scuffing")])
    entry = retriever.retrieve("steel hinge", "scuffing", k=1).entries[0]
    assert entry.subject == "metal" and entry.appearance in prompt and "steel hinge" in prompt


def test_a_batch_s_queries_are_answered_without_loading_the_model(tmp_path):
    """Every (subject, defect) query the knowledge base lists is embedded when the index is
    built; a later retriever answers them, and bare names, from the cache alone, and a new
    query is embedded once and then stored: a batch never imports sentence-transformers."""
    root, cache = _small_kb(tmp_path), tmp_path / "cache"
    first = FaissKnowledgeRetriever(root, cache_dir=cache)
    first.load()
    expected = first.retrieve("magnetic tile", "blowhole", k=3)
    assert len(list(first.queries_dir().glob("*.npy"))) == len(first.known_queries()) > 0

    second = FaissKnowledgeRetriever(root, cache_dir=cache)
    assert second.load().source == "cache"
    found = second.retrieve("magnetic tile", "blowhole", k=3)
    assert second._embedder is None, "the model was loaded for a known query"
    assert [e.id for e in found.entries] == [e.id for e in expected.entries]
    assert found.scores == pytest.approx(expected.scores, abs=1e-4)
    assert second.provenance()["embedder"]["name"] == BUNDLED_MODEL_NAME
    assert second._embedder is None

    new = second.retrieve("mystery gadget", "hairline crack", k=2)
    assert second._embedder is not None  # a query never asked before needs the model once
    third = FaissKnowledgeRetriever(root, cache_dir=cache)
    again = third.retrieve("mystery gadget", "hairline crack", k=2)
    assert third._embedder is None and [e.id for e in again.entries] == [
        e.id for e in new.entries]
