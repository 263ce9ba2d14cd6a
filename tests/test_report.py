"""The HTML report: charts, grids, recovery curves and configs in one self-contained file."""

import base64
import html
import io
import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch

from conceptguard.cli import main
from conceptguard.errors import ConceptGuardError
from conceptguard.evaluation.harness import WorldScorer, evaluate
from conceptguard.evaluation.prompts import builtin_prompt_set
from conceptguard.evaluation.sources import PipelineSource
from conceptguard.report.html import build_report, parse_attacks

ATTACK = {"kind": "relearn", "concept": "halo", "config": {"steps": 100, "lr": 1e-5},
          "curve": [{"step": 0, "detection": 0.05}, {"step": 50, "detection": 0.4}, {"step": 100, "detection": 0.7}]}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """An "erased" model (edited tiny SD1) with its base, and the base alone, scored by an untrained world scorer."""
    from transformers import CLIPModel

    from conceptguard.models.tiny import build_tiny_pipeline
    from conceptguard.world.concepts import vocabulary
    from conceptguard.world.models import MAX_TOKENS, Detector, clip_config
    from conceptguard.world.tokenizer import build_clip_tokenizer

    root = tmp_path_factory.mktemp("runs")
    tokenizer = build_clip_tokenizer(vocabulary(), root / "tok", model_max_length=MAX_TOKENS)
    torch.manual_seed(0)
    scorer = WorldScorer(Detector(width=8).eval(), CLIPModel(clip_config(len(tokenizer))).eval(), tokenizer)
    quick = builtin_prompt_set("quick", ["halo"])
    records = [r for g, n in (("target", 4), ("implicit", 3), ("preservation", 6))
               for r in [r for r in quick if r.group == g][:n]]
    base = build_tiny_pipeline("sd1")
    edited = build_tiny_pipeline("sd1")
    with torch.no_grad():
        for name, param in edited.unet.named_parameters():
            if "attn2.to_v" in name:
                param.mul_(-1.0)
    options = dict(erase=["halo"], prompt_set=records, num_inference_steps=2, scorer=scorer)
    evaluate(PipelineSource(edited, "erased"), base_source=PipelineSource(base, "base"), out_dir=root / "erased",
             **options)
    evaluate(PipelineSource(base), out_dir=root / "base-only", **options)
    (root / "erased" / "attack.json").write_text(json.dumps(ATTACK))
    return root / "erased", root / "base-only"


def _embedded_pngs(text):
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def test_report_is_self_contained_with_charts_grids_curves_and_configs(two_runs, tmp_path):
    written = build_report(list(two_runs), tmp_path / "out" / "report.html")
    assert set(written) == {"html", "detection", "preservation", "quality", "recovery"}
    for key in ("detection", "preservation", "quality", "recovery"):
        assert written[key].name == f"report-{key}.png" and written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = written["html"].read_text()
    # nothing is loaded from elsewhere: every image is inline
    assert not re.search(r"""src=['"](?!data:)""", text)
    pngs = _embedded_pngs(text)
    assert len(pngs) >= 4 + 3 * 3  # four charts + three grids of three rows (base, erased, base-only)
    for key in ("detection", "preservation", "quality", "recovery"):
        assert written[key].read_bytes() in pngs
    for heading in ("Metrics", "Images", "Attacks", "Configurations", "halo: target prompts",
                    "halo: implicit prompts", "preservation prompts"):
        assert heading in text
    unescaped = html.unescape(text)
    assert '"kind": "relearn"' in unescaped and '"num_inference_steps": 2' in unescaped
    results = json.loads((two_runs[0] / "results.json").read_text())
    assert results["images"][0]["prompt"] in text


def test_grid_rows_show_each_models_images_for_the_same_seeds(two_runs, tmp_path):
    from PIL import Image

    from conceptguard.report.html import TILE, build_grids, load_run

    runs = [load_run(two_runs[0]), load_run(two_runs[1])]
    grids = build_grids(runs)
    target = next(g for g in grids if g["title"] == "halo: target prompts")
    assert [label for label, _ in target["rows"]] == ["base", "erased", "base-only"]
    records = [r for r in runs[0].results["images"] if r["group"] == "target"]
    assert [c["seed"] for c in target["columns"]] == [r["seed"] for r in records]
    strips = {label: np.asarray(Image.open(io.BytesIO(png))) for label, png in target["rows"]}
    # the base row of the erased run and the base-only run's model row are the same images
    assert np.array_equal(strips["base"], strips["base-only"])
    assert not np.array_equal(strips["base"], strips["erased"])
    first = np.asarray(Image.open(two_runs[0] / records[0]["file"]).resize((TILE, TILE), Image.NEAREST))
    assert np.array_equal(strips["erased"][:, :TILE], first)


def test_attack_only_run_and_attack_json_shapes(tmp_path):
    folder = tmp_path / "attack"
    folder.mkdir()
    (folder / "attack.json").write_text(json.dumps({"attacks": [ATTACK, {**ATTACK, "kind": "textual-inversion"}]}))
    written = build_report([folder], tmp_path / "r.html")
    assert set(written) == {"html", "recovery"}
    attacks = parse_attacks([ATTACK], folder / "attack.json")
    assert attacks[0]["points"] == [(0.0, 0.05), (50.0, 0.4), (100.0, 0.7)]
    loss_curve = {"kind": "relearn", "metric": "clip", "curve": [{"step": 0, "clip": 20.0}]}
    assert parse_attacks(loss_curve, folder)[0]["points"] == [(0.0, 20.0)]


@pytest.mark.parametrize("data, message", [
    ({"curve": [{"step": 0, "detection": 0.1}]}, "kind"),
    ({"kind": "relearn", "curve": []}, "non-empty"),
    ({"kind": "relearn", "curve": [{"step": 0}]}, "numeric 'step' and 'detection'"),
])
def test_malformed_attack_json(data, message, tmp_path):
    with pytest.raises(ConceptGuardError, match=message):
        parse_attacks(data, tmp_path / "attack.json")


def test_report_cli(two_runs, tmp_path, capsys):
    assert main(["report", *map(str, two_runs), "--out", str(tmp_path / "r.html")]) == 0
    assert "r-detection.png" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    assert "neither results.json nor attack.json" in capsys.readouterr().err


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None,
                    reason="no chromium binary on PATH (Debian: apt-get install -y chromium); "
                           "the screenshot check needs a headless browser")
def test_report_renders_in_headless_chromium(two_runs, tmp_path):
    from PIL import Image

    html_path = build_report(list(two_runs), tmp_path / "report.html")["html"]
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1200,1600", html_path.resolve().as_uri()],
                       capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1600, 1200)
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert colours > 500, f"screenshot looks blank: {colours} distinct colours"
    # the palette's blue bars (charts) are on screen, not only text
    blue = np.all(np.abs(image.astype(int) - [0, 114, 178]) < 8, axis=-1)
    assert blue.sum() > 500
