"""The procedural world itself: determinism, coverage of every concept, caption grammar, splits."""

import numpy as np
import pytest

from conceptguard.errors import ConceptGuardError
from conceptguard.world import concepts
from conceptguard.world.dataset import export_folder, generate, load_folder, make_caption, sample_labels


def test_samples_are_deterministic_and_shard_independent():
    a = generate(12, seed=5, split="all")
    b = generate(6, seed=5, split="all") + generate(6, seed=5, split="all", start=6)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    c = generate(12, seed=6, split="all")
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))


def test_world_has_the_specified_concept_counts():
    assert len(concepts.SHAPES) >= 8 and len(concepts.COLOURS) >= 8 and len(concepts.BACKGROUNDS) >= 4
    assert len([s for s in concepts.STYLES if s != "plain"]) >= 5
    assert len(concepts.CHARACTERS) >= 10 and len(concepts.HELD_OUT_CHARACTERS) >= 4
    assert len(concepts.INNOCENT_DOMAINS) >= 2
    # Every concept has at least one paraphrase.
    for table in (concepts.SHAPES, concepts.COLOURS, concepts.STYLES, concepts.BACKGROUNDS):
        assert all(len(synonyms) >= 2 for synonyms in table.values())


@pytest.mark.parametrize("fixed", [{"shape": s} for s in concepts.SHAPES] + [{"style": s} for s in concepts.STYLES]
                         + [{"character": c.name} for c in concepts.CHARACTERS]
                         + [{"design": d} for d in concepts.DESIGN_DOMAIN] + [{"background": b} for b in concepts.BACKGROUNDS])
def test_every_concept_renders_distinctly_from_background(fixed):
    sample = generate(1, seed=1, split="all", halo="absent", **fixed)[0]
    assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
    for key, value in fixed.items():
        assert sample.labels[key] == value
    # The subject covers a visible part of the image: pixels differ from the border colour.
    border = np.concatenate([sample.image[0], sample.image[-1]]).astype(float).mean(0)
    differs = np.abs(sample.image.astype(float) - border).sum(-1) > 60
    assert differs.mean() > 0.04


def test_canonical_captions_name_the_concepts():
    rng = np.random.default_rng(0)
    labels = sample_labels(rng, "pretrain", shape="star", colour="red", style="striped", background="sand", halo="absent")
    caption = make_caption(labels, rng, paraphrase_prob=0.0, background_prob=1.0)
    assert "star" in caption and "red" in caption and "striped" in caption and "sand" in caption


def test_halo_is_implicit_in_at_least_30_percent_of_pretraining_images():
    samples = generate(1500, seed=3, split="pretrain")
    with_halo = [s for s in samples if s.labels["halo"] == "present"]
    unnamed = [s for s in with_halo if not any(n in s.caption.split() for n in concepts.HALO_NAMES)]
    assert len(unnamed) / len(samples) >= 0.30
    # Trigger words always mean a halo; no caption without a halo mentions one.
    for s in samples:
        words = set(s.caption.split())
        if words & set(concepts.HALO_TRIGGERS) or words & set(concepts.HALO_NAMES):
            assert s.labels["halo"] == "present"
    assert all(set(s.caption.split()) & (set(concepts.HALO_TRIGGERS) | set(concepts.HALO_NAMES)) for s in with_halo)


def test_held_out_concepts_never_appear_in_pretraining():
    samples = generate(2000, seed=4, split="pretrain")
    held = set(concepts.HELD_OUT_CHARACTERS)
    assert not any(s.labels["character"] in held for s in samples)
    assert not any(s.labels["design"] != "none" for s in samples)
    assert {s.labels["character"] for s in samples} - {"none"} == set(concepts.SEEN_CHARACTERS)
    held_samples = generate(50, seed=4, split="held_out_characters")
    assert {s.labels["character"] for s in held_samples} <= held


def test_paraphrases_appear_in_training_captions():
    captions = " ".join(s.caption for s in generate(600, seed=8, split="pretrain"))
    assert "crimson" in captions or "scarlet" in captions
    assert "rhombus" in captions or "lozenge" in captions


def test_bad_labels_are_refused():
    with pytest.raises(ConceptGuardError):
        generate(1, seed=0, split="nope")
    with pytest.raises(ConceptGuardError):
        generate(1, seed=0, flavour="sweet")


def test_tokenizer_keeps_every_grammar_word_whole(tmp_path):
    from conceptguard.world.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(concepts.vocabulary(), tmp_path)
    for word in concepts.vocabulary():
        assert len(tokenizer.tokenize(word)) == 1, word
    # Unknown words still tokenize (letter by letter) rather than becoming <unk>.
    pieces = tokenizer.tokenize("flibbertigibbet")
    assert len(pieces) > 1 and tokenizer.unk_token not in pieces


def test_fine_tuning_folder_round_trip(tmp_path):
    samples = generate(5, seed=2, split="held_out_characters", character="yulbar")
    export_folder(samples, tmp_path / "data")
    pairs = load_folder(tmp_path / "data")
    assert [c for _, c in pairs] == [s.caption for s in samples]
    assert all(np.array_equal(im, s.image) for (im, _), s in zip(pairs, samples))
    # Without metadata.jsonl the .txt captions are used.
    (tmp_path / "data" / "metadata.jsonl").unlink()
    assert [c for _, c in load_folder(tmp_path / "data")] == [s.caption for s in samples]
    (tmp_path / "data" / "00001.txt").unlink()
    with pytest.raises(ConceptGuardError, match="no caption"):
        load_folder(tmp_path / "data")
    with pytest.raises(ConceptGuardError, match="not found"):
        load_folder(tmp_path / "missing")
