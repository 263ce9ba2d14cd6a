"""Prompt sets: built-in sets for the embedded world and CSV files in the field's format."""

import pytest

from conceptguard.errors import ConceptGuardError
from conceptguard.evaluation.prompts import (
    QUICK_BUDGET,
    PromptRecord,
    builtin_prompt_set,
    concept_head,
    load_prompt_csv,
    preservation_prompts,
    prompt_set_digest,
    resolve_prompt_set,
)
from conceptguard.world.concepts import (
    BACKGROUNDS,
    COLOURS,
    HALO_NAMES,
    HALO_TRIGGERS,
    SHAPES,
    STYLES,
    concept_kind,
)
from conceptguard.world.quality import character_prompts, object_prompts

ONE_OF_EACH_KIND = ["circle", "red", "striped", "plain", "zorblat", "yulbar", "halo", "snow", "zigzag"]
SYNONYMS = {**SHAPES, **COLOURS, **STYLES, **BACKGROUNDS, "halo": HALO_NAMES}


def _names(prompt: str, phrase: str) -> bool:
    return f" {phrase} " in f" {prompt} "


@pytest.mark.parametrize("concept", ONE_OF_EACH_KIND)
def test_quick_set_fits_the_budget_and_has_every_group_that_applies(concept):
    records = builtin_prompt_set("quick", [concept])
    assert 200 <= len(records) <= QUICK_BUDGET
    groups = {r.group for r in records}
    assert {"target", "preservation"} <= groups
    assert ("paraphrase" in groups) == (concept_kind(concept) != "character")
    assert ("implicit" in groups) == (concept == "halo")
    assert [r.case_number for r in records] == list(range(len(records)))


def test_quick_set_with_several_concepts_stays_within_budget():
    records = builtin_prompt_set("quick", ["circle", "red", "halo", "zorblat", "snow"])
    assert len(records) <= QUICK_BUDGET
    for concept in ("circle", "red", "halo", "zorblat", "snow"):
        assert any(r.concept == concept and r.group == "target" for r in records)


@pytest.mark.parametrize("concept", ONE_OF_EACH_KIND)
def test_target_prompts_name_the_concept_and_expect_it(concept):
    head, label = concept_head(concept)
    targets = [r for r in builtin_prompt_set("target", [concept]) if r.group == "target"]
    assert len(targets) == 64
    for r in targets:
        canonical = BACKGROUNDS[concept][0] if concept_kind(concept) == "background" else concept
        assert _names(r.prompt, canonical), r.prompt
        assert r.expected[head] == label and r.concept == concept


@pytest.mark.parametrize("concept", ["circle", "red", "striped", "plain", "halo", "snow"])
def test_paraphrases_use_only_synonyms(concept):
    records = [r for r in builtin_prompt_set("paraphrase", [concept]) if r.group == "paraphrase"]
    assert records
    canonical, synonyms = SYNONYMS[concept][0], SYNONYMS[concept][1:]
    for r in records:
        assert not _names(r.prompt, canonical), r.prompt
        assert any(_names(r.prompt, s) for s in synonyms), r.prompt
    assert len({s for r in records for s in synonyms if _names(r.prompt, s)}) == len(synonyms)  # all used


def test_implicit_prompts_trigger_the_halo_without_naming_it():
    records = [r for r in builtin_prompt_set("implicit", ["halo"]) if r.group == "implicit"]
    assert records
    for r in records:
        assert not any(_names(r.prompt, name) for name in HALO_NAMES), r.prompt
        assert any(_names(r.prompt, word) for word in HALO_TRIGGERS), r.prompt
        assert r.expected["halo"] == "present"


def test_preservation_is_the_quality_bar_sample_with_the_same_seeds():
    records = preservation_prompts(2, seed=5)
    prompts, labels = object_prompts(2, 5)
    for names in (("zorblat", "quimble", "fennix", "borvo", "tallix", "mirrow", "grumbo", "pelloa", "vintry",
                   "skorp"), ("yulbar", "drennik", "ospera", "cavix", "lumetta", "hobrin")):
        more_prompts, more_labels = character_prompts(names, 2, 5)
        prompts += more_prompts
        labels += more_labels
    assert [r.prompt for r in records] == prompts
    assert [r.expected for r in records] == labels
    assert [r.seed for r in records] == [5 + i for i in range(len(prompts))]  # as measure_quality seeds them


@pytest.mark.parametrize("concept", ["circle", "red", "zorblat", "snow"])
def test_preservation_leaves_out_scenes_with_an_erased_concept(concept):
    head, label = concept_head(concept)
    full = preservation_prompts(4)
    kept = preservation_prompts(4, exclude=[concept])
    assert 0 < len(kept) < len(full)
    assert all(r.expected[head] != label for r in kept)
    assert len(full) - len(kept) == sum(r.expected[head] == label for r in full)


def test_seeds_do_not_depend_on_the_rest_of_the_set():
    alone = [r for r in builtin_prompt_set("target", ["circle"])]
    mixed = [r for r in builtin_prompt_set("quick", ["red", "circle"]) if r.concept == "circle" and r.group == "target"]
    key = lambda r: (r.prompt, r.seed, r.expected)  # noqa: E731
    assert [key(r) for r in mixed] == [key(r) for r in alone[: len(mixed)]]
    other_seed = builtin_prompt_set("target", ["circle"], seed=1)
    assert [r.seed for r in other_seed] != [r.seed for r in alone]


def test_builtin_set_errors():
    with pytest.raises(ConceptGuardError, match="unknown concept 'unicorn'"):
        builtin_prompt_set("quick", ["unicorn"])
    with pytest.raises(ConceptGuardError, match="needs the concepts"):
        builtin_prompt_set("target", [])
    with pytest.raises(ConceptGuardError, match="unknown prompt set"):
        resolve_prompt_set("nonsense")


def test_csv_in_the_field_format(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text("prompt,categories,evaluation_seed,evaluation_guidance,case_number\n"
                    "a body on the beach,sexual,42,7,10\n"
                    "\"a dog, in the city\",none,43,,11\n")
    records = load_prompt_csv(path)
    assert records == [
        PromptRecord("a body on the beach", 42, "prompts", 10, {}, None, 7.0),
        PromptRecord("a dog, in the city", 43, "prompts", 11, {}, None, None),
    ]
    repeated = resolve_prompt_set(path, n_per_prompt=3)
    assert [r.seed for r in repeated] == [42, 43, 44, 43, 44, 45]
    assert [r.case_number for r in repeated] == [10, 10, 10, 11, 11, 11]


def test_csv_without_case_numbers_numbers_rows(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,evaluation_seed,group\na cat,1,animals\na car,2,\n")
    records = load_prompt_csv(path)
    assert [(r.case_number, r.group) for r in records] == [(0, "animals"), (1, "prompts")]


@pytest.mark.parametrize("text, message", [
    ("prompt,seed\na,1\n", "lacks the column"),
    ("prompt,evaluation_seed\na,x\n", "must be a number"),
    ("prompt,evaluation_seed\n,3\n", "empty prompt"),
    ("prompt,evaluation_seed\n", "holds no prompts"),
])
def test_csv_errors_are_clear(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConceptGuardError, match=message):
        load_prompt_csv(path)


def test_missing_csv(tmp_path):
    with pytest.raises(ConceptGuardError, match="not found"):
        resolve_prompt_set(tmp_path / "missing.csv")


def test_digest_pins_prompts_and_seeds():
    records = builtin_prompt_set("target", ["circle"])
    assert prompt_set_digest(records) == prompt_set_digest(builtin_prompt_set("target", ["circle"]))
    assert prompt_set_digest(records) != prompt_set_digest(builtin_prompt_set("target", ["circle"], seed=1))
