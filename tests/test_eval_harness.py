"""The evaluation harness: results.json, images, reproducibility, sharding over processes, the CLI.

Most tests run on the tiny random-init SD1 pipeline with an *untrained* world scorer (random
detector and CLIP of the world's architectures): they check the plumbing and the arithmetic, not
the numbers. Tests that need the world's trained models take the ``world_assets`` fixture.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptguard.cli import main
from conceptguard.errors import ConceptGuardError
from conceptguard.evaluation.harness import (
    RESULTS_FILE,
    TIMING_FILE,
    WorldScorer,
    evaluate,
    fixed_batches,
)
from conceptguard.evaluation.prompts import PromptRecord, builtin_prompt_set, preservation_prompts
from conceptguard.evaluation.sources import PipelineSource


@pytest.fixture(scope="session")
def world_assets():
    """The shipped world assets; CONCEPTGUARD_WORLD_ASSETS points elsewhere (e.g. a smoke build) in development."""
    from conceptguard.world import ASSETS_DIR

    path = Path(os.environ.get("CONCEPTGUARD_WORLD_ASSETS") or ASSETS_DIR)
    if not (path / "manifest.json").is_file():
        pytest.skip(f"the embedded world's assets are not installed in {path} "
                    f"(`conceptguard world build --install` creates them)")
    return path


@pytest.fixture(scope="module")
def untrained_scorer(tmp_path_factory):
    from transformers import CLIPModel

    from conceptguard.world.concepts import vocabulary
    from conceptguard.world.models import MAX_TOKENS, Detector, clip_config
    from conceptguard.world.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(vocabulary(), tmp_path_factory.mktemp("tok"), model_max_length=MAX_TOKENS)
    torch.manual_seed(0)
    clip = CLIPModel(clip_config(len(tokenizer))).eval()
    detector = Detector(width=8).eval()
    return WorldScorer(detector, clip, tokenizer, info={"detector_sha256": "untrained"})


def small_halo_set():
    """A few records of each group of the halo's quick set (the full set takes too long for a unit test)."""
    records = builtin_prompt_set("quick", ["halo"])
    chosen = []
    for group, n in (("target", 3), ("paraphrase", 2), ("implicit", 2), ("preservation", 5)):
        chosen += [r for r in records if r.group == group][:n]
    return chosen


def run_eval(pipe, out, scorer, *, base=True, **kwargs):
    options = dict(erase=["halo"], prompt_set=small_halo_set(), num_inference_steps=2, batch_size=4)
    options.update(kwargs)
    return evaluate(PipelineSource(pipe), base_source=PipelineSource(pipe, "base") if base else None,
                    out_dir=out, scorer=scorer, **options)


def test_fixed_batches_depend_only_on_the_records():
    records = [PromptRecord(f"p{i}", i, "prompts", i, guidance_scale=g)
               for i, g in enumerate([None, None, None, 5.0, 5.0, None, None])]
    assert fixed_batches(records, 2, 7.5) == [(7.5, [0, 1]), (7.5, [2]), (5.0, [3, 4]), (7.5, [5, 6])]


def test_results_images_and_metrics(tiny_sd1, untrained_scorer, tmp_path):
    result = run_eval(tiny_sd1, tmp_path / "run", untrained_scorer)
    on_disk = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert on_disk == result
    assert result["format"] == "conceptguard-eval"
    config = result["config"]
    assert config["erase"] == ["halo"] and config["num_inference_steps"] == 2 and config["guidance_scale"] == 7.5
    assert len(config["model"]["content_hash"]) == 64 and config["base"]["content_hash"] == config["model"]["content_hash"]
    assert config["prompt_set"]["records"] == 12 and len(config["prompt_set"]["sha256"]) == 64
    assert set(result["versions"]) >= {"conceptguard", "torch", "diffusers", "transformers"}
    assert result["scorers"]["scorer"]["kind"] == "world"
    assert result["scorers"]["metrics"] == ["clip", "detection", "fid", "lpips", "preservation"]

    groups = result["metrics"]["model"]["groups"]
    assert {g: groups[g]["n"] for g in groups} == {"target": 3, "paraphrase": 2, "implicit": 2, "preservation": 5}
    for entry in groups.values():
        assert 0.0 <= entry["detection"]["halo"] <= 1.0 and entry["clip_score"] >= 0.0
    assert set(result["metrics"]["model"]["preservation"]) >= {"shape", "colour", "style", "seen_character",
                                                               "accuracy"}
    assert result["metrics"]["model"]["fid"]["images"] == 5
    # the base model is the model itself: no distance, no drop
    comparison = result["metrics"]["comparison"]
    assert comparison["lpips"]["all"] == 0.0
    assert all(v in (0.0, None) for v in comparison["preservation_drop"].values())

    from PIL import Image

    for record in result["images"]:
        image = np.asarray(Image.open(tmp_path / "run" / record["file"]))
        assert image.shape == (16, 16, 3)
        assert hashlib.sha256(image.tobytes()).hexdigest() == record["sha256"] == record["base"]["sha256"]
        assert set(record["detected"]) >= {"shape", "colour", "halo", "character"}
    timing = json.loads((tmp_path / "run" / TIMING_FILE).read_text())
    assert timing["processes"] == 1 and timing["images"] == 24
    assert "seconds" not in json.dumps(result) and str(tmp_path) not in json.dumps(result)


def test_same_seed_gives_identical_results_json(tiny_sd1, untrained_scorer, tmp_path):
    run_eval(tiny_sd1, tmp_path / "a", untrained_scorer)
    run_eval(tiny_sd1, tmp_path / "b", untrained_scorer)
    assert (tmp_path / "a" / RESULTS_FILE).read_bytes() == (tmp_path / "b" / RESULTS_FILE).read_bytes()
    other = [r.__class__(**{**r.to_dict(), "seed": r.seed + 1}) for r in small_halo_set()]
    changed = run_eval(tiny_sd1, tmp_path / "c", untrained_scorer, prompt_set=other)
    first = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())
    assert [i["sha256"] for i in changed["images"]] != [i["sha256"] for i in first["images"]]


def test_edited_model_differs_from_base(tiny_sd1, untrained_scorer, tmp_path):
    from conceptguard.models.tiny import build_tiny_pipeline

    edited = build_tiny_pipeline("sd1")
    with torch.no_grad():
        for name, param in edited.unet.named_parameters():
            if "attn2.to_v" in name:
                param.mul_(3.0)
    result = evaluate(PipelineSource(edited), base_source=PipelineSource(tiny_sd1, "base"), erase=["halo"],
                      prompt_set=small_halo_set(), num_inference_steps=2, out_dir=tmp_path / "e",
                      scorer=untrained_scorer)
    assert result["config"]["model"]["content_hash"] != result["config"]["base"]["content_hash"]
    assert result["metrics"]["comparison"]["lpips"]["all"] > 0
    assert all(rec["lpips"] >= 0 for rec in result["images"])


class ScriptedScorer:
    """Reads whatever labels it was given, in order: checks the harness's arithmetic end to end."""

    supports = frozenset({"detection", "preservation"})

    def __init__(self, labels):
        self.script = labels

    def describe(self):
        return {"kind": "scripted"}

    def labels(self, images):
        assert len(images) == len(self.script)
        return self.script


def test_detection_and_preservation_from_detector_readings(tiny_sd1, tmp_path):
    records = small_halo_set()
    readings = []
    for k, r in enumerate(records):
        reading = dict(r.expected)
        if r.group == "target":
            reading["halo"] = "present" if k == 0 else "absent"  # 1 of 3 target images still shows it
        if r.group == "preservation" and k % 2 == 0:
            reading["shape"] = reading["character"] = "wrong"  # every other preservation image misses
        readings.append(reading)
    result = evaluate(PipelineSource(tiny_sd1), erase=["halo"], prompt_set=records, num_inference_steps=1,
                      out_dir=tmp_path / "s", scorer=ScriptedScorer(readings))
    groups = result["metrics"]["model"]["groups"]
    expected_target = round(1 / 3, 6)
    assert groups["target"]["detection"]["halo"] == expected_target
    assert groups["paraphrase"]["detection"]["halo"] == 1.0 and groups["implicit"]["detection"]["halo"] == 1.0
    assert groups["preservation"]["detection"]["halo"] == 0.0
    preservation_records = [(k, r) for k, r in enumerate(records) if r.group == "preservation"]
    per_image = []
    for k, r in preservation_records:
        miss = k % 2 == 0
        per_image.append((2 / 3 if miss else 1.0) if r.expected["subject"] == "object" else (0.0 if miss else 1.0))
    assert result["metrics"]["model"]["preservation"]["accuracy"] == round(float(np.mean(per_image)), 6)
    assert [rec["detected"] for rec in result["images"]] == readings


def test_nudenet_extra_with_its_version_and_threshold(tiny_sd1, tmp_path, monkeypatch):
    import types

    class FakeNudeDetector:
        def detect(self, path):  # flags the even-numbered images, scores just above / at the threshold
            flagged = int(Path(path).stem) % 2 == 0
            return [{"class": "BUTTOCKS_EXPOSED", "score": 0.61 if flagged else 0.6, "box": [0, 0, 1, 1]}]

    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=FakeNudeDetector))
    records = [PromptRecord(f"a photo of a cat {i}", i, "prompts", i) for i in range(5)]
    result = evaluate(PipelineSource(tiny_sd1), prompt_set=records, num_inference_steps=1, out_dir=tmp_path / "n",
                      scorer=None, nudenet=True)
    assert result["metrics"]["model"]["groups"]["prompts"]["nude_rate"] == 0.6
    assert [rec["nude"] for rec in result["images"]] == [True, False, True, False, True]
    info = result["scorers"]["nudenet"]
    assert info["threshold"] == 0.6 and info["classes"] == "*_EXPOSED" and "version" in info


def test_nudenet_missing_fails_before_generating(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)
    records = [PromptRecord("a cat", 1, "prompts", 0)]
    with pytest.raises(ConceptGuardError, match=r"conceptguard\[nsfw\]"):
        evaluate(PipelineSource(tiny_sd1), prompt_set=records, out_dir=tmp_path / "x", scorer=None, nudenet=True)
    assert not (tmp_path / "x").exists()


def test_unsupported_metrics_are_clear_errors(tiny_sd1, untrained_scorer, tmp_path):
    records = [PromptRecord("a cat", 1, "prompts", 0)]
    with pytest.raises(ConceptGuardError, match="Inception"):
        evaluate(PipelineSource(tiny_sd1), prompt_set=records, out_dir=tmp_path / "x", scorer=None, metrics=["fid"])
    with pytest.raises(ConceptGuardError, match="--base"):
        evaluate(PipelineSource(tiny_sd1), prompt_set=records, out_dir=tmp_path / "x", scorer=untrained_scorer,
                 metrics=["lpips"])
    with pytest.raises(ConceptGuardError, match="unknown metric"):
        evaluate(PipelineSource(tiny_sd1), prompt_set=records, out_dir=tmp_path / "x", scorer=None, metrics=["iou"])


def test_existing_results_need_overwrite(tiny_sd1, tmp_path):
    records = [PromptRecord("a cat", 1, "prompts", 0), PromptRecord("a dog", 2, "prompts", 1)]
    evaluate(PipelineSource(tiny_sd1), prompt_set=records, num_inference_steps=1, out_dir=tmp_path / "r", scorer=None)
    with pytest.raises(ConceptGuardError, match="--overwrite"):
        evaluate(PipelineSource(tiny_sd1), prompt_set=records[:1], num_inference_steps=1, out_dir=tmp_path / "r",
                 scorer=None)
    evaluate(PipelineSource(tiny_sd1), prompt_set=records[:1], num_inference_steps=1, out_dir=tmp_path / "r",
             scorer=None, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "r" / "images" / "model").iterdir()) == ["00000.png"]  # no stale files


# --------------------------------------------------------------------------------------------
# The command line, one process and two
# --------------------------------------------------------------------------------------------

CSV = ("case_number,prompt,evaluation_seed,evaluation_guidance\n"
       "3,a photo of a cat,42,7.5\n5,a dog in the city,43,\n7,a painting of a church,44,5\n"
       "9,a tree by the sea,45,\n11,a bird,46,7.5\n")


def _cli_args(model_dir, prompts, out):
    return ["eval", "--model", str(model_dir), "--base", str(model_dir), "--prompts", str(prompts), "--out", str(out),
            "--steps", "2", "--batch-size", "2"]


def test_two_processes_give_the_same_results_json(tiny_sd1_dir, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(CSV)
    assert main(_cli_args(tiny_sd1_dir, prompts, tmp_path / "one")) == 0
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is part of the dependencies"
    # `--cpu` alone makes accelerate 1.x start a single process; --multi_gpu starts torchrun, and
    # `conceptguard eval --device cpu` (the default) joins the processes over gloo.
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "conceptguard",
               *_cli_args(tiny_sd1_dir, prompts, tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / TIMING_FILE).read_text())["processes"] == 2
    one = (tmp_path / "one" / RESULTS_FILE).read_bytes()
    assert one == (tmp_path / "two" / RESULTS_FILE).read_bytes()
    result = json.loads(one)
    assert [r["case_number"] for r in result["images"]] == [3, 5, 7, 9, 11]
    assert [r["guidance_scale"] for r in result["images"]] == [7.5, None, 5.0, None, 7.5]
    assert result["config"]["model"]["model"] == str(tiny_sd1_dir)


def test_cli_errors_are_one_line(tiny_sd1_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(CSV)
    assert main(["eval", "--prompts", "quick", "--erase", "unicorn", "--out", str(tmp_path / "a")]) == 2
    assert "unknown concept 'unicorn'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_sd1_dir), "--prompts", str(prompts), "--metrics", "fid",
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: metric 'fid' needs") and err.count("\n") == 1
    assert main(["eval", "--model", str(tiny_sd1_dir), "--prompts", str(prompts), "--scorer", "external",
                 "--metrics", "clip", "--out", str(tmp_path / "c")]) == 2
    assert "--clip PATH" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# With the world's models
# --------------------------------------------------------------------------------------------

def test_base_model_preservation_reports_the_quality_bar_figures(world_assets, tmp_path):
    """The preservation set is the quality bar's sample: the same prompts, seeds and readings."""
    from conceptguard.world import load_detector, load_embedded_pipeline
    from conceptguard.world.quality import measure_quality

    pipe = load_embedded_pipeline(assets=world_assets)
    result = evaluate(PipelineSource(pipe), prompt_set=preservation_prompts(1), num_inference_steps=3,
                      out_dir=tmp_path / "q", scorer=WorldScorer.from_assets(world_assets))
    quality = measure_quality(pipe, load_detector(world_assets), n_per_concept=1, num_inference_steps=3)
    preservation = result["metrics"]["model"]["preservation"]
    assert {k: preservation[k] for k in quality} == {k: round(v, 6) for k, v in quality.items()}
    assert result["scorers"]["scorer"]["manifest_sha256"]


@pytest.mark.world
@pytest.mark.slow
def test_base_model_meets_the_quality_bar_on_the_builtin_sets(world_assets, tmp_path):
    from conceptguard.world import load_embedded_pipeline
    from conceptguard.world.quality import meets_bar

    pipe = load_embedded_pipeline(assets=world_assets)
    result = evaluate(PipelineSource(pipe), erase=["circle", "red", "zorblat"], prompt_set="quick",
                      num_inference_steps=50, out_dir=tmp_path / "w", world_assets=world_assets)
    model = result["metrics"]["model"]
    verdict = meets_bar({k: v for k, v in model["preservation"].items() if k != "accuracy"})
    assert all(verdict.values()), model["preservation"]
    # an unedited model draws what it is asked for: the "erasure" rates are the quality bar's rates.
    # The bar (90% for shapes and colours) is a rate over all shapes or colours; one concept's 39
    # target images carry a standard error of about 4.5 points (one image is 2.6), so a single
    # concept is held to the bar less one such error. Measured: circle 89.7%, red 89.7%, zorblat
    # 100%, paraphrased circle 92.3%.
    print(model["groups"]["target"]["detection"], model["groups"]["paraphrase"]["detection"])
    assert model["groups"]["target"]["detection"]["circle"] >= 0.85
    assert model["groups"]["target"]["detection"]["red"] >= 0.85
    assert model["groups"]["target"]["detection"]["zorblat"] >= 0.8
    assert model["groups"]["paraphrase"]["detection"]["circle"] >= 0.8


def test_external_scorer_with_a_local_clip_folder(tiny_sd1, tmp_path):
    """Real models: CLIP score and the LPIPS-like distance from a transformers CLIP folder on disk."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from conceptguard.evaluation.harness import ExternalScorer
    from conceptguard.models.tiny import build_tiny_pipeline
    from conceptguard.world.concepts import vocabulary
    from conceptguard.world.models import MAX_TOKENS, clip_config
    from conceptguard.world.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(vocabulary(), tmp_path / "tok", model_max_length=MAX_TOKENS)
    torch.manual_seed(0)
    CLIPModel(clip_config(len(tokenizer))).save_pretrained(tmp_path / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "clip")

    edited = build_tiny_pipeline("sd1", seed=1)
    records = [PromptRecord(p, 10 + i, "prompts", i) for i, p in enumerate(["a red circle", "a blue star", "zorblat"])]
    scorer = ExternalScorer(clip_path=tmp_path / "clip")
    result = evaluate(PipelineSource(edited), base_source=PipelineSource(tiny_sd1, "base"), prompt_set=records,
                      num_inference_steps=2, out_dir=tmp_path / "x", scorer=scorer)
    assert result["scorers"]["metrics"] == ["clip", "lpips"]
    assert len(result["scorers"]["scorer"]["clip"]["sha256"]) == 64
    scores = [r["clip_score"] for r in result["images"]]
    assert all(0 <= s <= 100 for s in scores) and len(set(scores)) == 3
    assert result["metrics"]["model"]["groups"]["prompts"]["clip_score"] == pytest.approx(np.mean(scores), abs=1e-5)
    assert result["metrics"]["comparison"]["lpips"]["all"] > 0
    same = scorer.distances(np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 16, 3), np.uint8))
    assert np.all(same == 0)
    with pytest.raises(ConceptGuardError, match="Inception weights not found"):
        ExternalScorer(inception_path=tmp_path / "missing.pth")
