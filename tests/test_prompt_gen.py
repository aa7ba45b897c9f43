"""The CPU prompt generator: prompts carry the knowledge base's words; refinement answers every
judge issue without ever contradicting itself."""

from __future__ import annotations

import re

import pytest

from appliance.tools.interfaces import Issue, Knowledge, PromptRequest
from appliance.tools.knowledge.base import load_knowledge_base
from appliance.tools.prompt_gen.composer import (
    KEEP_SENTENCE,
    STRONG_WORDS,
    WEAK_WORDS,
    KnowledgePromptGenerator,
    PromptParts,
    compose_prompt,
    refine_prompt,
    severity_conflicts,
)


@pytest.fixture(scope="module")
def kb():
    return load_knowledge_base()


@pytest.fixture(scope="module")
def blowhole(kb):
    entry = kb.entry("magnetic_tile", "blowhole")
    assert entry is not None
    return entry


def _words(pattern_words, text: str) -> set[str]:
    return {w for w in pattern_words if re.search(rf"\b{re.escape(w)}\b", text, re.I)}


def test_prompt_carries_the_knowledge_words(kb, blowhole, tile_image):
    generator = KnowledgePromptGenerator(kb)
    [prompt] = generator.generate_prompts(
        [PromptRequest(image=tile_image, category="Magnetic Tile", defect="pore")])
    # "pore" is an alias: the generator found the blowhole entry and used its words verbatim.
    assert prompt.startswith("Edit only one region of the magnetic tile.")
    for text in (blowhole.location, blowhole.appearance, blowhole.size):
        assert text in prompt
    assert "Add a pore defect." in prompt
    assert prompt.endswith(KEEP_SENTENCE)
    # The renderer's vocabulary is there: a size word and a location word.
    assert re.search(r"\bsmall\b", prompt, re.I) and re.search(r"\bedges?\b", prompt)


def test_first_prompt_adds_no_severity_words_of_its_own(kb):
    for entry in kb.entries:
        prompt = compose_prompt(entry.subject, entry.defect, entry)
        kb_text = " ".join((entry.appearance, entry.location, entry.size))
        added = (_words(WEAK_WORDS + STRONG_WORDS, prompt)
                 - _words(WEAK_WORDS + STRONG_WORDS, kb_text))
        assert not added, (entry.id, added)
        assert "Strength:" not in prompt and "Extent:" not in prompt


def test_every_composed_prompt_parses_back_to_itself(kb):
    for entry in kb.entries:
        prompt = compose_prompt(entry.subject, entry.defect, entry)
        parts = PromptParts.parse(prompt)
        assert parts.look == entry.appearance and parts.size == entry.size, entry.id
        assert parts.render() == prompt


def test_unknown_category_and_defect_still_give_a_local_edit():
    prompt = compose_prompt("widget housing", "odd mark", None)
    assert "widget housing" in prompt and "odd mark" in prompt
    assert "inside its outline" in prompt and prompt.endswith(KEEP_SENTENCE)
    assert not severity_conflicts(prompt)


class _OneEntryRetriever:
    """A stand-in KR that always answers with one fixed entry (the real one is tested in
    test_knowledge_retrieval.py; here only the generator's use of it matters)."""

    name = "fixed"

    def __init__(self, entry):
        self.entry = entry
        self.calls = []

    def retrieve(self, category, defect, k=3):
        self.calls.append((category, defect))
        return Knowledge(query=f"{defect} on {category}", entries=[self.entry], scores=[0.5])


def test_generator_falls_back_to_the_retrieved_entry(kb, blowhole, texture_image):
    retriever = _OneEntryRetriever(blowhole)
    generator = KnowledgePromptGenerator(kb, retriever=retriever)
    [known, unknown] = generator.generate_prompts([
        PromptRequest(image=texture_image, category="magnetic_tile", defect="crack"),
        PromptRequest(image=texture_image, category="brake disc", defect="gas voids")])
    assert retriever.calls == [("brake disc", "gas voids")]  # the exact entry needed no search
    assert kb.entry("magnetic_tile", "crack").appearance in known
    assert blowhole.appearance in unknown and "brake disc" in unknown and "gas voids" in unknown


# --- refinement ---------------------------------------------------------------------------


def _refined(entry, issues, knowledge=None):
    return refine_prompt(compose_prompt(entry.subject, entry.defect, entry), issues, knowledge)


def test_too_faint_makes_it_pronounced(blowhole):
    prompt = _refined(blowhole, [Issue.TOO_FAINT])
    assert "clearly visible, pronounced" in prompt
    assert not _words(WEAK_WORDS, prompt)
    again = refine_prompt(prompt, [Issue.TOO_FAINT], None)
    assert "strongly pronounced, high-contrast" in again and again.count("Strength:") == 1


def test_too_strong_makes_it_subtle(blowhole):
    prompt = refine_prompt(_refined(blowhole, [Issue.TOO_FAINT]), [Issue.TOO_STRONG], None)
    assert "subtle, low-contrast" in prompt
    assert not _words(STRONG_WORDS, prompt)


def test_too_small_uses_larger_words_and_numbers(blowhole):
    prompt = _refined(blowhole, [Issue.TOO_SMALL])
    assert "Extent: large." in prompt
    assert not re.search(r"\b(small|tiny)\b", prompt, re.I)
    assert "2 to 8 percent" in prompt  # the knowledge base says 1 to 4 percent


def test_too_large_makes_it_small_and_compact(kb):
    entry = kb.entry("magnetic_tile", "uneven")  # "Large and diffuse: 15 to 40 percent"
    prompt = _refined(entry, [Issue.TOO_LARGE])
    assert "small, compact" in prompt
    assert not re.search(r"\b(large|big|huge)\b", prompt, re.I)
    assert "8 to 20 percent" in prompt


def test_off_object_pins_the_location_to_the_part(blowhole):
    # A prompt whose location was lost: knowledge puts the entry's location back.
    prompt = compose_prompt("magnetic tile", "blowhole", None)
    knowledge = Knowledge(query="blowhole on magnetic tile", entries=[blowhole], scores=[1.0])
    refined = refine_prompt(prompt, [Issue.OFF_OBJECT], knowledge)
    assert f"Where: {blowhole.location}" in refined
    assert "Placement: on the magnetic tile itself" in refined
    assert "never on the background" in refine_prompt(prompt, [Issue.OFF_OBJECT], None)


def test_scattered_asks_for_one_compact_patch(blowhole):
    prompt = _refined(blowhole, [Issue.SCATTERED])
    assert "a single compact" in prompt
    assert "two or three pores" not in prompt  # the knowledge's "sometimes several" clause is gone


def test_hard_seams_asks_for_soft_edges(kb):
    entry = kb.entry("magnetic_tile", "crack")  # "its edges are sharp"
    assert re.search(r"edges are sharp", entry.appearance)
    prompt = _refined(entry, [Issue.HARD_SEAMS])
    assert "soft edges blending into the surrounding material" in prompt
    assert not re.search(r"\b(sharp|hard|crisp)[ -]edge|edges are sharp", prompt, re.I)


def test_no_change_makes_it_pronounced_with_an_explicit_size(blowhole):
    prompt = _refined(blowhole, [Issue.NO_CHANGE])
    assert "clearly visible, pronounced" in prompt and "Extent: medium." in prompt
    assert not re.search(r"\bsmall\b", prompt, re.I)


def test_wrong_type_restates_the_type(blowhole):
    prompt = _refined(blowhole, [Issue.WRONG_TYPE])
    assert "unmistakably as blowhole" in prompt


def test_knowledge_replaces_appearance_and_location(kb, blowhole):
    old = compose_prompt("magnetic tile", "blowhole", kb.entry("magnetic_tile", "uneven"))
    knowledge = Knowledge(query="blowhole on magnetic tile", entries=[blowhole], scores=[1.0])
    new = refine_prompt(old, [], knowledge)
    assert blowhole.appearance in new and blowhole.location in new
    assert kb.entry("magnetic_tile", "uneven").appearance not in new


@pytest.mark.parametrize("issue", Issue.ALL)
def test_no_issue_ever_leaves_a_contradiction(kb, issue):
    for entry in kb.entries:
        for start in ([], [Issue.TOO_FAINT], [Issue.TOO_STRONG], [Issue.TOO_SMALL],
                      [Issue.TOO_LARGE]):
            prompt = refine_prompt(_refined(entry, start), [issue], None)
            conflicts = severity_conflicts(prompt, entry.defect)
            if "Extent:" not in prompt:
                # No size decided yet: the knowledge text's own size words are not ours to judge.
                conflicts = [c for c in conflicts if not c.startswith("size")]
            assert not conflicts, (entry.id, start, issue, prompt)
            assert prompt.count(KEEP_SENTENCE) == 1
            assert f"Add {'an' if entry.defect[0] in 'aeiou' else 'a'} " \
                   f"{entry.defect.replace('_', ' ')} defect." in prompt  # the type is never edited


def test_a_long_episode_stays_consistent(blowhole):
    knowledge = Knowledge(query="blowhole on magnetic tile", entries=[blowhole], scores=[1.0])
    prompt = compose_prompt("magnetic tile", "blowhole", blowhole)
    steps = [[Issue.TOO_FAINT], [Issue.TOO_STRONG, Issue.TOO_SMALL], [Issue.NO_CHANGE],
             [Issue.TOO_LARGE, Issue.SCATTERED], [Issue.HARD_SEAMS], [Issue.TOO_FAINT]]
    for issues in steps:
        prompt = refine_prompt(prompt, issues, knowledge)
        assert not severity_conflicts(prompt, "blowhole"), (issues, prompt)
        for label in ("Strength:", "Extent:", "Shape:", "Edges:", "Where:", "Look:", "Size:"):
            assert prompt.count(label) <= 1, (label, prompt)
    # Decisions made along the way are all still there at the end.
    # faint -> pronounced, strong -> subtle, no change -> pronounced, faint -> stronger still.
    assert "strongly pronounced, high-contrast" in prompt and "small, compact" in prompt
    assert "a single compact" in prompt and "soft edges" in prompt


def test_defect_names_with_size_words_are_left_alone(kb):
    entry = kb.entry("bottle", "broken_large")
    assert entry is not None, "knowledge_base/categories/bottle.toml lost [defect.broken_large]"
    prompt = _refined(entry, [Issue.TOO_LARGE])
    assert "Add a broken large defect." in prompt and "small, compact" in prompt
    assert not severity_conflicts(prompt, "broken_large")


def test_a_free_form_prompt_from_another_generator_is_refined_in_place():
    prompt = "Add a faint, small scratch across the brushed metal plate near its top edge."
    refined = refine_prompt(prompt, [Issue.TOO_FAINT, Issue.TOO_SMALL], None)
    assert refined.startswith("Add a clearly visible, large scratch")
    assert "near its top edge" in refined and refined.endswith(KEEP_SENTENCE)
    assert not severity_conflicts(refined)
    # Refining again reads back its own modifiers instead of appending a second copy.
    twice = refine_prompt(refined, [Issue.TOO_STRONG], None)
    assert twice.count("Strength:") == 1 and "subtle, low-contrast" in twice
    assert not severity_conflicts(twice)


def test_knowledge_turns_a_free_form_prompt_into_a_structured_one(blowhole):
    knowledge = Knowledge(query="blowhole on magnetic tile", entries=[blowhole], scores=[1.0])
    refined = refine_prompt("Put a subtle pore somewhere on the tile.", [Issue.TOO_FAINT],
                            knowledge)
    parts = PromptParts.parse(refined)
    assert parts.category == "magnetic tile" and parts.defect == "blowhole"
    assert parts.look == blowhole.appearance and parts.strength == 1
    assert not severity_conflicts(refined, "blowhole")


def test_a_new_part_named_after_its_material_gets_the_material_entry(kb, texture_image):
    entry = kb.entry("metal", "scratch")
    assert entry is not None, "knowledge_base/materials/metal.toml lost [defect.scratch]"
    [prompt] = KnowledgePromptGenerator(kb).generate_prompts(
        [PromptRequest(image=texture_image, category="Steel Bracket", defect="scratch")])
    assert entry.appearance in prompt and "steel bracket" in prompt
