"""`conceptguard reproduce`: verdicts follow from the numbers, results.md renders every claim, results
are cached and resumed, and the same seed gives the same numbers."""

from __future__ import annotations

import json
import shutil

import pytest

from conceptguard.reproduce import attacks, esd, guard, immunize, sdd
from conceptguard.reproduce.runner import experiments, judge, reproduce

# --- synthetic numbers: every verdict both ways ------------------------------------------------------


def _summary(target=None, paraphrase=None, implicit=None, preservation=None, concepts=("halo",)):
    erasure = {"target": target, "paraphrase": paraphrase, "implicit": implicit}
    return {"detection": {c: dict(erasure) for c in concepts}, "erasure": erasure, "preservation": preservation,
            "fid": 10.0, "clip": 50.0}


def esd_numbers(x_preservation, u_preservation, x_implicit, u_implicit, x_target=0.1):
    return {"halo": {"base": _summary(1.0, None, 1.0, 0.9),
                     "esd-x": _summary(x_target, None, x_implicit, x_preservation),
                     "esd-u": _summary(0.1, None, u_implicit, u_preservation)}}


def sdd_numbers(sdd_erasure, esd_erasure, sdd_preservation, esd_preservation):
    def models(esd_name, concepts):
        out = {"base": {**_summary(1.0, preservation=0.8, concepts=concepts), "erasure_mean": 1.0}}
        out[esd_name] = {**_summary(esd_erasure, preservation=esd_preservation, concepts=concepts),
                         "erasure_mean": esd_erasure}
        out["sdd"] = {**_summary(sdd_erasure, preservation=sdd_preservation, concepts=concepts),
                      "erasure_mean": sdd_erasure}
        return out

    multi = ["zorblat", "quimble"]
    return {"single": {"concepts": ["halo"], "esd": "esd-u", "models": models("esd-u", ["halo"])},
            "multi": {"concepts": multi, "esd": "esd-x", "models": models("esd-x", multi)}}


def guard_numbers(fag_illegal, random_illegal=0.5, full_illegal=0.6, fag_kept=0.95):
    def row(method, key, ratio, illegal, kept):
        return {"method": method, "key": key, "ratio": ratio, "ratio_tensors": ratio, "ratio_parameters": ratio,
                "illegal": illegal, "innocent": kept, "innocent_kept": kept}

    return {"rows": [row("Full FT", "full", 0.0, full_illegal, 1.0),
                     row("Random-30%", "random-30", 0.3, random_illegal, 0.9),
                     row("FreezeAsGuard-30%", "freezeasguard-30", 0.3, fag_illegal, fag_kept),
                     row("UCE + Full FT", "uce-full", 0.0, 0.55, 0.9),
                     row("IMMA + Full FT", "imma-full", 0.0, 0.5, 0.7)]}


GUARD_CONFIG = guard.GuardClaimConfig(table={"ratios": [0.3]})


def immunize_numbers(imma_rates, mima_rates, without=(0.0, 0.5, 0.8)):
    steps = (0, 10, 20)

    def curve(rates):
        return {"curve": [[s, r] for s, r in zip(steps, rates)], "no_attack": rates[0], "attack": rates[-1],
                "step": steps[-1]}

    out = {}
    for task in immunize.TASKS:
        concepts = ["yulbar"]
        curves = {"without": {"yulbar": curve(without)}, "imma": {"yulbar": curve(imma_rates)},
                  "mima": {"yulbar": curve(mima_rates)}}
        out[task] = {"concepts": concepts, "curves": curves, **immunize.scores(curves, concepts)}
    return out


def attack_numbers(stack_recovery, others=None):
    others = others or {"esd-x": 0.6, "uce": 0.4}
    cells = {"none": {"finetune": {"no_attack": 1.0, "attack": 1.0, "curve": [], "step": 20, "guard": "none"}}}
    for name, value in {**others, "stack": stack_recovery}.items():
        cells[name] = {"finetune": {"no_attack": 0.0, "attack": value, "curve": [], "step": 20, "guard": "none"},
                       "lora": {"no_attack": 0.0, "attack": value / 2, "curve": [], "step": 20, "guard": "none"}}
    return {"cells": cells, "preservation": {name: 0.8 for name in cells}, "errors": {}}


ATTACK_CONFIG = attacks.AttackMatrixConfig(defenses=("none", "esd-x", "uce", "stack"), attacks=("finetune", "lora"))


def _passed(checks):
    return [c.passed for c in checks]


def test_esd_verdicts_follow_the_numbers():
    config = esd.QUICK
    assert _passed(esd.checks(esd_numbers(0.88, 0.82, 0.9, 0.2), config)) == [True, True]
    assert _passed(esd.checks(esd_numbers(0.7, 0.8, 0.2, 0.9), config)) == [False, False]
    # An effect is 25 points or more: one image of 32 (1.0 vs 0.97) is not "stronger"; an ESD-x that
    # erased nothing is not "targeted"; a rate lowered by breaking the model (preservation -20) is not erasure.
    assert _passed(esd.checks(esd_numbers(0.88, 0.82, 1.0, 0.97), config)) == [True, False]
    assert _passed(esd.checks(esd_numbers(0.88, 0.82, 0.9, 0.2, x_target=0.9), config)) == [False, True]
    assert _passed(esd.checks(esd_numbers(0.88, 0.7, 0.9, 0.2), config)) == [True, False]
    # Ties are not "more targeted" / "stronger"; a value that was not measured never passes.
    assert _passed(esd.checks(esd_numbers(0.7, 0.7, 0.5, 0.5), config)) == [False, False]
    assert _passed(esd.checks(esd_numbers(None, 0.7, None, 0.5), config)) == [False, False]


def test_sdd_verdicts_follow_the_numbers():
    config = sdd.QUICK
    assert all(_passed(sdd.checks(sdd_numbers(0.1, 0.3, 0.8, 0.7), config)))
    assert not any(_passed(sdd.checks(sdd_numbers(0.3, 0.1, 0.7, 0.8), config)))
    assert all(_passed(sdd.checks(sdd_numbers(0.0, 0.0, 0.8, 0.8), config)))  # "at least as well": ties pass
    # ... but not when neither erased: 90% vs 95% detection (base 100%) shows nothing about erasure.
    assert _passed(sdd.checks(sdd_numbers(0.9, 0.95, 0.8, 0.8), config)) == [False, True, False, True]


def test_guard_verdicts_follow_the_numbers():
    assert _passed(guard.checks(guard_numbers(0.1), GUARD_CONFIG)) == [True, True, True]
    assert _passed(guard.checks(guard_numbers(0.5, random_illegal=0.4, fag_kept=0.5), GUARD_CONFIG)) == [
        False, False, False]
    # Beating Random (0.6) and UCE (0.55) but not IMMA (0.5): the baselines check fails alone.
    assert _passed(guard.checks(guard_numbers(0.52, random_illegal=0.6), GUARD_CONFIG)) == [True, False, True]


def test_immunize_scores_and_verdicts_follow_the_numbers():
    numbers = immunize_numbers(imma_rates=(0.0, 0.4, 0.6), mima_rates=(0.0, 0.1, 0.2))
    # SGR per checkpoint after step 0: MIMA (0.8, 0.75) -> 0.775, IMMA (0.2, 0.25) -> 0.225.
    assert numbers["personalization"]["score"]["mima"] == pytest.approx(0.775)
    assert numbers["personalization"]["score"]["imma"] == pytest.approx(0.225)
    assert _passed(immunize.checks(numbers, immunize.QUICK)) == [True, True]
    swapped = immunize_numbers(imma_rates=(0.0, 0.1, 0.2), mima_rates=(0.0, 0.4, 0.6))
    assert _passed(immunize.checks(swapped, immunize.QUICK)) == [False, False]
    # Without immunization nothing was learned: SGR is undefined, the pairs are skipped and nothing passes.
    undefined = immunize_numbers((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), without=(0.0, 0.0, 0.0))
    assert undefined["relearning"]["score"] == {"imma": None, "mima": None}
    assert undefined["relearning"]["skipped_pairs"] == {"imma": 2, "mima": 2}
    checks = immunize.checks(undefined, immunize.QUICK)
    assert _passed(checks) == [False, False] and "undefined" in checks[0].note


def test_attack_matrix_verdicts_follow_the_numbers():
    numbers = attack_numbers(0.2)
    assert attacks.strongest_attack(numbers, ATTACK_CONFIG.attacks)[0] == "finetune"
    (check,) = attacks.checks(numbers, ATTACK_CONFIG)
    assert check.passed
    (check,) = attacks.checks(attack_numbers(0.5), ATTACK_CONFIG)
    assert not check.passed and "uce 40.0% (preservation 80.0%)" in check.note  # the data that explains why not
    # Every row recovering fully ties at the top: lowest, but no defense at all.
    (check,) = attacks.checks(attack_numbers(1.0, {"esd-x": 1.0, "uce": 1.0}), ATTACK_CONFIG)
    assert not check.passed and "not 25 points below the undefended model's 100.0%" in check.note
    missing = attack_numbers(0.2)
    del missing["cells"]["stack"]
    missing["errors"]["stack"] = "conceptguard.stack is not available"
    (check,) = attacks.checks(missing, ATTACK_CONFIG)
    assert not check.passed and "not available" in check.note


def test_a_mask_that_freezes_all_an_attack_trains_blocks_it(tiny_sd1):
    from types import SimpleNamespace

    kv = [n for n, _ in tiny_sd1.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
    patterns = attacks._frozen_patterns(SimpleNamespace(frozen=set(kv)))
    assert attacks._blocked(tiny_sd1, "custom", patterns)  # Custom Diffusion trains only attn2 k/v
    assert not attacks._blocked(tiny_sd1, "finetune", patterns)
    assert not attacks._blocked(tiny_sd1, "custom", patterns[1:])
    assert not attacks._blocked(tiny_sd1, "lora", patterns)  # LoRA still adapts q, out and self-attention
    projections = [n for n, _ in tiny_sd1.unet.named_parameters()
                   if any(f".{t}.weight" in n for t in ("to_q", "to_k", "to_v", "to_out.0"))]
    assert attacks._blocked(tiny_sd1, "lora", attacks._frozen_patterns(SimpleNamespace(frozen=set(projections))))


def test_results_md_renders_every_claim(tmp_path):
    from conceptguard.reproduce.markdown import render_results

    synthetic = {"esd": (esd_numbers(0.8, 0.7, 0.9, 0.2), esd.QUICK),
                 "sdd": (sdd_numbers(0.3, 0.1, 0.7, 0.8), sdd.QUICK),
                 "guard": (guard_numbers(0.1), GUARD_CONFIG),
                 "immunize": (immunize_numbers((0.0, 0.4, 0.6), (0.0, 0.1, 0.2)), immunize.QUICK),
                 "attacks": (attack_numbers(0.2), ATTACK_CONFIG)}
    found = experiments()
    assert list(found) == list(synthetic)
    results = {}
    for name, (numbers, config) in synthetic.items():
        results[name] = {**judge(found[name], config, numbers), "profile": "quick", "seed": 3, "base_model_hash": "abc",
                         "config": {"steps": 1}}
    text = render_results(found, results, profile="quick", seed=3, run_seconds=12.0,
                          experiment_seconds={n: {"seconds": 2.0, "cpu_seconds": 1.5} for n in results}, machine={
                              "system": "Linux x86_64", "cpu_cores": 2, "torch_threads": 1, "python": "3.11",
                              "torch": "2", "device": "cpu"}, out_dir=tmp_path)
    for experiment in found.values():
        assert f"## {experiment.title}" in text
        assert experiment.claim in text
    assert "--quick --seed 3" in text and "Profile: **quick**" in text and "2 CPU cores" in text
    assert text.count("✅ reproduced") >= 4 and "❌ not reproduced" in text  # sdd's synthetic numbers fail
    assert "| esd-x | 10.0% |" in text  # a table cell, as a percentage
    partial = render_results(found, {"esd": results["esd"]}, profile="full", seed=0, run_seconds=1.0,
                             experiment_seconds={"esd": {}}, machine={
                                 "system": "x", "cpu_cores": 1, "torch_threads": 1, "python": "3", "torch": "2",
                                 "device": "cpu"}, out_dir=tmp_path)
    assert partial.count("Not run with this profile") == 4


def test_report_groups_recovery_curves_by_chart(tmp_path):
    from conceptguard.report.html import build_charts, load_run

    for name, chart in (("a", "lora attack"), ("b", "lora attack"), ("c", "ti attack")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "attack.json").write_text(json.dumps({
            "kind": "lora", "concept": "zorblat", "chart": chart, "label": f"defense {name}",
            "curve": [{"step": 0, "detection": 0.1}, {"step": 10, "detection": 0.5}]}))
    charts = build_charts([load_run(tmp_path / n) for n in "abc"])
    assert set(charts) == {"recovery-lora-attack", "recovery-ti-attack"}


def test_cli_lists_the_command_and_rejects_unknown_claims(capsys):
    from conceptguard.cli import main
    from conceptguard.commands.reproduce import CLAIMS

    assert list(CLAIMS) == list(experiments())  # the CLI's choices (kept import-free for --help) match

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["reproduce", "--only", "bogus"])


# --- one tiny real experiment: structure, determinism, resume --------------------------------------

TINY_ESD = {"steps": 2, "ddim_steps": 2, "n_target": 2, "n_implicit": 2, "eval_steps": 2}


@pytest.fixture(scope="module")
def world():
    from conceptguard.reproduce.common import World
    from conceptguard.world import ASSETS_DIR

    if not (ASSETS_DIR / "manifest.json").is_file():
        pytest.skip("the embedded world's weights are not installed")
    return World()


def _run(out, world, **kwargs):
    logs = []
    summary = reproduce(out, profile="quick", seed=1, only=["esd"], overrides={"esd": TINY_ESD}, world=world,
                        log=logs.append, **kwargs)
    return summary, logs


def test_tiny_experiment_is_deterministic_resumable_and_rendered(tmp_path, world):
    summary, _ = _run(tmp_path / "a", world, results_md=tmp_path / "results.md", report=True)
    result = summary["results"]["esd"]
    assert result["format"] == "conceptguard-reproduce" and result["experiment"] == "esd"
    assert result["profile"] == "quick" and result["seed"] == 1 and result["config"]["steps"] == 2
    assert result["verdict"] in ("reproduced", "not reproduced")
    assert [c["passed"] for c in result["checks"]] == [c.passed for c in esd.checks(result["numbers"], esd.QUICK)]
    assert set(result["numbers"]["halo"]) == {"base", "esd-x", "esd-u"}
    for check in result["checks"]:
        assert set(check) == {"claim", "criterion", "values", "passed", "note"}
        assert all(v is None or 0 <= v <= 1 for v in check["values"].values())
    assert all((tmp_path / "a" / "esd" / run / "results.json").is_file() for run in result["runs"])
    assert (tmp_path / "a" / "report.html").is_file() and (tmp_path / "a" / "esd" / "report.html").is_file()
    text = (tmp_path / "results.md").read_text()
    assert "## ESD-x vs ESD-u" in text and "Not run with this profile" in text

    # Same seed, another folder: the same bytes (result.json holds no timings and no paths).
    _run(tmp_path / "b", world, results_md=None, report=False)
    first = (tmp_path / "a" / "esd" / "result.json").read_bytes()
    assert (tmp_path / "b" / "esd" / "result.json").read_bytes() == first

    # Resume reuses a finished experiment with the same config...
    stamp = (tmp_path / "a" / "esd" / "result.json").stat().st_mtime_ns
    summary, logs = _run(tmp_path / "a", world, results_md=None, report=False, resume=True)
    assert any("reusing" in line for line in logs)
    assert (tmp_path / "a" / "esd" / "result.json").stat().st_mtime_ns == stamp
    assert summary["results"]["esd"] == result
    # ...and runs it again when the config changed.
    logs = []
    reproduce(tmp_path / "a", profile="quick", seed=1, only=["esd"], overrides={"esd": {**TINY_ESD, "steps": 1}},
              world=world, log=logs.append, results_md=None, report=False, resume=True)
    assert not any("reusing" in line for line in logs)
    assert json.loads((tmp_path / "a" / "esd" / "result.json").read_text())["config"]["steps"] == 1


TINY_ATTACKS = {"defenses": ("none", "uce"), "attacks": ("finetune",), "attacker_images": 4, "publisher_images": 4,
                "steps": 2, "checkpoints": (0, 2), "preservation_per_concept": 1}


def _run_matrix(out, world, **kwargs):
    """The tiny attack matrix (rows none and uce); returns the main process's log lines."""
    from conceptguard.reproduce.common import CurveSettings

    logs = []
    overrides = {"attacks": {**TINY_ATTACKS, "curve": CurveSettings(prompts=2, steps=2)}}
    reproduce(out, profile="quick", seed=1, only=["attacks"], overrides=overrides, world=world, log=logs.append,
              results_md=None, report=False, **kwargs)
    return logs


@pytest.fixture(scope="module")
def whole_matrix(tmp_path_factory, world):
    """result.json of the tiny matrix run in one process, uninterrupted."""
    out = tmp_path_factory.mktemp("whole")
    _run_matrix(out, world)
    assert not (out / "attacks" / "stages").exists()  # a finished experiment keeps result.json only
    return (out / "attacks" / "result.json").read_bytes()


def test_an_interrupted_attack_matrix_resumes_by_row_with_the_numbers_of_an_uninterrupted_run(
        tmp_path, world, whole_matrix, monkeypatch):
    def run(out, **kwargs):
        return _run_matrix(out, world, **kwargs)

    whole = whole_matrix
    real_attack = attacks._attack

    def killed_in_the_second_row(ctx, defended, kind, config, defense, base):
        if defense == "uce":
            raise KeyboardInterrupt
        return real_attack(ctx, defended, kind, config, defense, base)

    monkeypatch.setattr(attacks, "_attack", killed_in_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    assert not (tmp_path / "cut" / "attacks" / "result.json").exists()
    assert (tmp_path / "cut" / "attacks" / "stages" / "defense-none.json").is_file()
    monkeypatch.setattr(attacks, "_attack", real_attack)

    # Without --resume the finished row is not trusted: everything runs again.
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-again")
    again = run(tmp_path / "cut-again")
    assert not any("reusing" in line for line in again) and any("[attacks] none × finetune" in line for line in again)
    # Resumed where no part had finished: it runs whole, and its time is not marked as a part's.
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-early")
    (tmp_path / "cut-early" / "attacks" / "stages" / "defense-none.json").unlink()
    run(tmp_path / "cut-early", resume=True)
    assert json.loads((tmp_path / "cut-early" / "attacks" / "timing.json").read_text())["resumed"] is False
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-parallel")
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-untimed")
    first_row = json.loads((tmp_path / "cut" / "attacks" / "stages" / "defense-none.json").read_text())
    # Resumed, the first row is reused and only the second runs; the numbers are those of the whole run.
    logs = run(tmp_path / "cut", resume=True)
    assert [line for line in logs if "reusing" in line] == [
        f"[attacks] defense-none: reusing the finished part in {tmp_path / 'cut' / 'attacks' / 'stages'}"
        "/defense-none.json"]
    assert any("[attacks] uce × finetune" in line for line in logs)
    assert not any("[attacks] none × finetune" in line for line in logs)
    assert (tmp_path / "cut" / "attacks" / "result.json").read_bytes() == whole
    # Its times add the reused row's, saved with it, to those of the row run now.
    timing = json.loads((tmp_path / "cut" / "attacks" / "timing.json").read_text())
    assert timing["resumed"] is False and timing["cpu_seconds"] > first_row["cpu_seconds"] > 0
    # A row saved without its times (an older version) is reused as well, and the timing says it is left out.
    stage = tmp_path / "cut-untimed" / "attacks" / "stages" / "defense-none.json"
    stage.write_text(json.dumps({k: first_row[k] for k in ("value", "runs")}))
    run(tmp_path / "cut-untimed", resume=True)
    assert (tmp_path / "cut-untimed" / "attacks" / "result.json").read_bytes() == whole
    timing = json.loads((tmp_path / "cut-untimed" / "attacks" / "timing.json").read_text())
    assert timing["resumed"] is True and timing["untimed_parts"] == 1
    # Resumed with worker processes: only the missing row is computed, in a worker.
    logs = run(tmp_path / "cut-parallel", resume=True, jobs=2)
    assert _finished_parts(logs) == ["defense-uce"]
    assert (tmp_path / "cut-parallel" / "attacks" / "result.json").read_bytes() == whole


def _finished_parts(logs):
    return sorted(line.rsplit(" ", 1)[1] for line in logs if "finished part" in line)


def test_attack_matrix_rows_computed_by_separate_processes_give_the_numbers_of_one_process(
        tmp_path, world, whole_matrix):
    # Both rows at once, in two worker processes sharing the data folders; then assembled from their stages.
    logs = _run_matrix(tmp_path / "two", world, jobs=2)
    assert _finished_parts(logs) == ["defense-none", "defense-uce"]
    assert (tmp_path / "two" / "attacks" / "result.json").read_bytes() == whole_matrix
    assert not (tmp_path / "two" / "attacks" / "stages").exists()
    timing = json.loads((tmp_path / "two" / "attacks" / "timing.json").read_text())
    assert timing["resumed"] is False and timing["cpu_seconds"] > 0


def test_a_part_process_shares_data_folders_and_computes_only_its_own_stage(tmp_path):
    from conceptguard.errors import ConceptGuardError
    from conceptguard.reproduce.common import Context

    (tmp_path / "stages").mkdir()
    part = Context(None, tmp_path, seed=0, name="x", stages=tmp_path / "stages", resuming=True, only="row-a")
    folder = part.data_folder("d", 2, 5, "pretrain", character="zorblat")
    (folder / "00000.txt").write_text("left by the process that rendered it\n")
    # Asked again with the same settings (another part), the folder is reused as it is, not rendered again.
    assert part.data_folder("d", 2, 5, "pretrain", character="zorblat") == folder
    assert (folder / "00000.txt").read_text() == "left by the process that rendered it\n"
    # Other settings would re-render a folder another part may be reading: refused.
    with pytest.raises(ConceptGuardError, match="different settings"):
        part.data_folder("d", 2, 6, "pretrain", character="zorblat")
    # One process alone renders it again with the new settings.
    Context(None, tmp_path, seed=0, name="x").data_folder("d", 2, 6, "pretrain", character="zorblat")
    assert (folder / "00000.txt").read_text() != "left by the process that rendered it\n"

    assert part.skips("row-b") and not part.skips("row-a")
    assert part.stage("row-a", lambda: {"value": 1}) == {"value": 1}
    saved = json.loads((tmp_path / "stages" / "row-a.json").read_text())
    assert saved["value"] == {"value": 1} and saved["cpu_seconds"] >= 0 and saved["seconds"] >= 0
    with pytest.raises(ConceptGuardError, match="belongs to another process"):
        part.stage("row-b", lambda: {"value": 2})
    assert not (tmp_path / "stages" / "row-b.json").exists()


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path, capsys):
    from conceptguard.cli import main

    assert main(["reproduce", "--quick", "--jobs", "2", "--out", str(tmp_path / "run"),
                 "--results-md", str(tmp_path / "results.md")]) == 0
    out = capsys.readouterr().out
    text = (tmp_path / "results.md").read_text()
    for experiment in experiments().values():
        assert f"## {experiment.title}" in text
        assert f"{experiment.name}: " in out
    assert "not run" not in text.split("## Summary")[1].split("<a id")[0]
    assert (tmp_path / "run" / "report.html").is_file()


def test_full_immunize_profile_pins_the_prior_on_seen_characters_that_are_not_targets(tmp_path):
    from conceptguard.world.concepts import SEEN_CHARACTERS
    from conceptguard.world.dataset import load_folder

    class FolderContext:
        seed, work_dir = 0, tmp_path

        def data_folder(self, name, n, seed, split, **fixed):
            from conceptguard.reproduce.common import Context

            return Context.data_folder(self, name, n, seed, split, **fixed)

    config = immunize.FULL
    targets = list(config.relearning_concepts)
    folders = immunize._prior_folders(config, targets, FolderContext())
    captions = [caption for folder in folders for _, caption in load_folder(folder)]
    assert len(captions) == config.prior_images == 63 and config.ascent_cap > 0
    named = {c for c in SEEN_CHARACTERS if any(c in caption for caption in captions)}
    assert named == set(SEEN_CHARACTERS) - set(targets)
