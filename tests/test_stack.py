"""`conceptguard stack`: erase → immunize → guard in one run, one output folder and model card,
resume of finished and interrupted stages, and one-line errors for bad configs.

Runs on the embedded world model with tiny step counts (seconds); the world-effect test at the end
(the stacked model resists re-learning better than the erased one) is ``-m "world and slow"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conceptguard.cli import main
from conceptguard.errors import ConceptGuardError


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    from conceptguard.world.dataset import export_folder, generate

    root = tmp_path_factory.mktemp("data")
    return {"yulbar": str(export_folder(generate(4, 0, "held_out_characters", character="yulbar"), root / "yulbar")),
            "logos": str(export_folder(generate(4, 1, "innocent", domain="logo"), root / "logos"))}


QUIET = {"progress": False, "checkpoint_every": 1}


def tiny_config(data: dict[str, str]) -> dict:
    """All three stages, a few steps each (ESD 5, IMMA 3, 3 mask updates)."""
    return {
        "erase": {"method": "esd", "concepts": ["zorblat"], "ddim_steps": 10,
                  "train": {"steps": 5, "lr": 1e-4, **QUIET}},
        # IMMA leaves the cross-attention queries to ESD, so both stages' edits show in the output.
        "immunize": {"method": "imma", "concepts": ["yulbar"], "data": [data["yulbar"]], "exclude": [r"attn2\.to_q"],
                     "train": {"steps": 3, "lr": 1e-4, **QUIET}},
        "guard": {"illegal": [data["yulbar"]], "innocent": [data["logos"]], "ratio": 0.3, "inner_steps": 1,
                  "init_steps": 2, "batch_size": 2, "train": {"steps": 3, "optimizer": "adam", "lr": 0.03, **QUIET}},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, data):
    """One stack run of all three stages through the CLI; tests treat its folders as read-only."""
    _reset_accelerate()
    root = tmp_path_factory.mktemp("stacked")
    config = write_config(root / "stack.yaml", tiny_config(data))
    assert main(["stack", "--config", str(config), "--out", str(root / "out")]) == 0
    return {"root": root, "config": config, "out": root / "out", "run": root / "out.run"}


@pytest.fixture(scope="module")
def base():
    from conceptguard.models.io import load_pipeline

    return load_pipeline("embedded")


def load(path):
    from conceptguard.models.io import load_pipeline

    return load_pipeline(path)


def stage_records(out: Path) -> list[dict]:
    return json.loads((out / "stack.json").read_text())["stages"]


def log_events(run: Path) -> list[tuple[str, str]]:
    lines = (run / "stack_log.jsonl").read_text().splitlines()
    return [(record["stage"], record["event"]) for record in map(json.loads, lines)]


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {f"unet.{name}": value for name, value in pipe.unet.state_dict().items()}


# --- one run, three stages -------------------------------------------------------------------------


def test_stages_run_in_order_each_on_the_previous_ones_weights(stacked, base):
    from conceptguard.models.io import content_hash

    assert log_events(stacked["run"])[:7] == [
        ("erase", "started"), ("erase", "finished"), ("immunize", "started"), ("immunize", "finished"),
        ("guard", "started"), ("guard", "finished"), ("stack", "wrote")]
    records = stage_records(stacked["out"])
    assert [(r["stage"], r["method"]) for r in records] == [("erase", "esd"), ("immunize", "imma"),
                                                            ("guard", "freezeasguard")]
    final = load(stacked["out"] / "pipeline")
    erase, immunize, guard = records
    # A hash chain: each stage's input is the previous one's output, the guard changes no weight.
    assert erase["input_hash"] == content_hash(base)
    assert immunize["input_hash"] == erase["output_hash"] != erase["input_hash"]
    assert guard["input_hash"] == guard["output_hash"] == immunize["output_hash"] == content_hash(final)
    assert guard["changed"] == []


def test_every_stages_changes_are_in_the_output(stacked, base):
    erase, immunize, _ = stage_records(stacked["out"])
    assert erase["changed"] and all(".attn2." in name for name in erase["changed"])  # ESD-x
    assert any(".attn1." in name for name in immunize["changed"])  # IMMA: self- and cross-attention

    final = unet_state(load(stacked["out"] / "pipeline"))
    erased = unet_state(load(stacked["run"] / "erase" / "output" / "pipeline"))
    original = unet_state(base)
    only_erased = sorted(set(erase["changed"]) - set(immunize["changed"]))
    assert only_erased and set(erase["changed"]) & set(immunize["changed"])  # disjoint and shared edits
    for name in only_erased:  # ESD's edit survives immunization untouched
        assert torch.equal(final[name], erased[name]) and not torch.equal(final[name], original[name])
    for name in immunize["changed"]:
        assert not torch.equal(final[name], erased[name])

    # The delta is against the original base: every tensor any stage changed, reproducing the output.
    delta = load_file(stacked["out"] / "delta.safetensors")
    assert sorted(delta) == sorted(set(erase["changed"]) | set(immunize["changed"]))
    for name, value in delta.items():
        assert torch.equal(value, final[name])


def test_the_delta_applied_to_the_original_base_gives_the_output(stacked):
    from conceptguard.models.io import content_hash
    from conceptguard.outputs import apply_delta, read_delta_metadata

    pipe = load("embedded")
    metadata = read_delta_metadata(stacked["out"] / "delta.safetensors")
    assert metadata["method"] == "stack" and metadata["base_model_hash"] == content_hash(pipe)
    apply_delta(pipe, stacked["out"] / "delta.safetensors")
    assert content_hash(pipe) == metadata["model_hash"] == stage_records(stacked["out"])[-1]["output_hash"]


def test_the_card_lists_every_stage(stacked):
    card = (stacked["out"] / "README.md").read_text()
    assert "conceptguard-stack" in card
    for number, record in enumerate(stage_records(stacked["out"]), 1):
        assert f"### {number}. {record['stage']}: `{record['method']}`" in card
        assert record["summary"] in card
        assert f"model hash in: `{record['input_hash']}`" in card
        assert f"model hash out: `{record['output_hash']}`" in card
    assert "ESD-x erased 'zorblat'" in card and "IMMA immunized 'yulbar'" in card
    assert "98/326 UNet tensors" in card and "guard.safetensors" in card
    assert card.index("1. erase") < card.index("2. immunize") < card.index("3. guard")


def test_the_mask_is_bound_to_the_output_not_to_the_original(stacked, base):
    from conceptguard.guard.maskfile import GuardMask

    mask = GuardMask.load(stacked["out"] / "guard.safetensors")  # verifies its payload hash
    final = load(stacked["out"] / "pipeline")
    mask.check_model(final)
    with pytest.raises(ConceptGuardError, match="was made for model"):
        mask.check_model(base)
    assert mask.manifest["method"] == "freezeasguard" and len(mask.frozen) == 98
    # The published folder's manifest covers the mask and the stage records too.
    manifest = json.loads((stacked["out"] / "manifest.json").read_text())
    assert {"guard.safetensors", "stack.json", "delta.safetensors"} <= set(manifest["files"])


# --- resume ------------------------------------------------------------------------------------------


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_resume_reuses_finished_stages(stacked, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stacked["run"], run)
    stage_files = {stage: _mtimes(run / stage) for stage in ("erase", "immunize", "guard")}
    out = tmp_path / "again"
    assert main(["stack", "--config", str(stacked["config"]), "--out", str(out), "--run-dir", str(run),
                 "--resume"]) == 0
    assert log_events(run)[-4:] == [("erase", "reused"), ("immunize", "reused"), ("guard", "reused"),
                                    ("stack", "wrote")]
    assert {stage: _mtimes(run / stage) for stage in stage_files} == stage_files  # nothing rewritten
    assert stage_records(out) == stage_records(stacked["out"])
    first, again = load_file(stacked["out"] / "delta.safetensors"), load_file(out / "delta.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert (out / "guard.safetensors").read_bytes() == (stacked["out"] / "guard.safetensors").read_bytes()


def test_a_run_killed_inside_a_stage_resumes_from_its_checkpoint(stacked, tmp_path):
    """As if killed after IMMA's step 2: its step-3 checkpoint, its output and the guard stage are gone."""
    from conceptguard.guard.maskfile import GuardMask

    run = tmp_path / "run"
    shutil.copytree(stacked["run"], run)
    (run / "immunize" / "stage.json").unlink()
    shutil.rmtree(run / "immunize" / "output")
    shutil.rmtree(run / "immunize" / "train" / "checkpoints" / "step-000003")
    shutil.rmtree(run / "guard")
    erase_files = _mtimes(run / "erase")

    out = tmp_path / "resumed"
    assert main(["stack", "--config", str(stacked["config"]), "--out", str(out), "--run-dir", str(run),
                 "--resume"]) == 0
    assert log_events(run)[-6:] == [("erase", "reused"), ("immunize", "started"), ("immunize", "finished"),
                                    ("guard", "started"), ("guard", "finished"), ("stack", "wrote")]
    assert _mtimes(run / "erase") == erase_files
    assert (run / "immunize" / "train" / "checkpoints" / "step-000003").is_dir()
    # The training loop resumes bit for bit, so the stacked model is the uninterrupted run's.
    resumed, first = stage_records(out), stage_records(stacked["out"])
    assert [r["output_hash"] for r in resumed] == [r["output_hash"] for r in first]
    mask, first_mask = (GuardMask.load(folder / "guard.safetensors") for folder in (out, stacked["out"]))
    assert mask.frozen == first_mask.frozen


def test_an_interrupted_stack_writes_no_output_and_resume_skips_the_finished_stage(data, tmp_path, monkeypatch):
    """Through the Python API, with UCE (a closed-form edit: nothing to train) before the guard."""
    from conceptguard.guard import mask as guard_mask
    from conceptguard.stack import GuardStage, MethodStage, StackConfig, stack

    config = StackConfig(
        erase=MethodStage("uce", {"concepts": ["zorblat"]}),
        guard=GuardStage(illegal=[data["yulbar"]], innocent=[data["logos"]],
                         config={"inner_steps": 1, "init_steps": 1, "batch_size": 2},
                         train={"steps": 2, "optimizer": "adam", "lr": 0.03, "progress": False}))
    learn_mask = guard_mask.learn_mask

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(guard_mask, "learn_mask", killed)
    out, run = tmp_path / "out", tmp_path / "out.run"
    with pytest.raises(KeyboardInterrupt):
        stack(None, config, out)
    assert not out.exists() and (run / "erase" / "stage.json").is_file()
    assert not (run / "guard" / "stage.json").exists()
    erase_files = _mtimes(run / "erase")

    monkeypatch.setattr(guard_mask, "learn_mask", learn_mask)
    with pytest.raises(ConceptGuardError, match="already holds a stack run"):
        stack(None, config, out)  # without resume a used run folder is refused
    result = stack(None, config, out, resume=True)
    assert [(r["stage"], r["reused"]) for r in result.stages] == [("erase", True), ("guard", False)]
    assert _mtimes(run / "erase") == erase_files
    assert result.mask.base_model_hash == result.model_hash == result.stages[0]["output_hash"]
    assert (out / "pipeline").is_dir() and (out / "guard.safetensors").is_file()


def test_resume_refuses_a_finished_stage_with_another_config(stacked, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stacked["run"], run)
    config = tiny_config(data)
    config["erase"]["train"]["steps"] = 6
    path = write_config(tmp_path / "changed.yaml", config)
    before = _mtimes(run)
    assert main(["stack", "--config", str(path), "--out", str(tmp_path / "X"), "--run-dir", str(run),
                 "--resume"]) == 2
    assert "stage erase finished with another config" in capsys.readouterr().err
    assert _mtimes(run) == before and not (tmp_path / "X").exists()


def test_resume_refuses_other_stages(stacked, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stacked["run"], run)
    config = tiny_config(data)
    del config["immunize"]
    path = write_config(tmp_path / "fewer.yaml", config)
    assert main(["stack", "--config", str(path), "--out", str(tmp_path / "X"), "--run-dir", str(run),
                 "--resume"]) == 2
    assert "with other stages: saved erase (esd), immunize (imma), guard (freezeasguard); now erase (esd), " \
           "guard (freezeasguard)" in capsys.readouterr().err


# --- bad input -------------------------------------------------------------------------------------


def _esd(**extra) -> dict:
    return {"method": "esd", "concepts": ["zorblat"], **extra}


BAD_CONFIGS = {
    "no stage": ({}, "names no stage"),
    "only a model": ({"model": "embedded"}, "names no stage"),
    "not a mapping": (["erase"], "must hold a mapping"),
    "unknown top-level key": ({"erase": _esd(), "finetune": {}}, "unknown key(s) in config file"),
    "unknown method": ({"erase": {"method": "nope", "concepts": ["a"]}}, "unknown method 'nope'; erase methods: esd"),
    "immunize method in the erase slot": ({"erase": {"method": "imma", "concepts": ["a"], "data": ["."]}},
                                          "imma is an immunize method, not an erase method"),
    "erase method in the immunize slot": ({"immunize": _esd()}, "esd is an erase method, not an immunize method"),
    "stage without method": ({"erase": {"concepts": ["a"]}}, "the erase section needs a method"),
    "unknown method option": ({"erase": _esd(etaa=2)}, "unknown option 'etaa' for ESDConfig"),
    "unknown train option": ({"erase": _esd(train={"stepz": 3})}, "unknown option 'stepz' for TrainConfig"),
    "invalid value": ({"erase": _esd(variant="z")}, "variant must be"),
    "train for a method that does not train": ({"erase": {"method": "uce", "concepts": ["a"], "train": {"steps": 3}}},
                                               "uce does not train"),
    "erase without concepts": ({"erase": {"method": "esd"}}, "needs concepts"),
    "missing data folder": ({"immunize": {"method": "imma", "concepts": ["yulbar"], "data": ["no/such/folder"]}},
                            "data folder not found: no/such/folder"),
    "guard without innocent data": ({"guard": {"illegal": ["."]}}, "guard stage needs innocent"),
    "unknown guard method": ({"guard": {"method": "random", "illegal": ["."], "innocent": ["."]}},
                             "unknown method 'random'; guard methods: freezeasguard"),
    "unknown guard option": ({"guard": {"illegal": ["."], "innocent": ["."], "rato": 0.3}},
                             "unknown option 'rato' for GuardConfig"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_configs_are_one_error_line_and_write_nothing(name, tmp_path, monkeypatch, capsys):
    config, expected = BAD_CONFIGS[name]
    work = tmp_path / "work"
    work.mkdir()
    path = write_config(tmp_path / "stack.yaml", config)
    monkeypatch.chdir(work)
    assert main(["stack", "--config", str(path), "--out", "X"]) == 2
    lines = capsys.readouterr().err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0]
    assert list(work.iterdir()) == []


def test_a_missing_config_file_and_the_cli_in_a_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "conceptguard", "stack", "--config", "nope.yaml", "--out", "X"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: config file not found: nope.yaml"]
    assert list(tmp_path.iterdir()) == []


def test_the_example_config_is_valid(tmp_path, monkeypatch):
    from conceptguard.stack import load_stack_config, resolve_stages

    example = Path(__file__).resolve().parents[1] / "examples" / "stack-world.yaml"
    for name in ("zorblat", "yulbar", "drennik", "ospera", "logos"):
        (tmp_path / "data" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    stages = resolve_stages(load_stack_config(example))
    assert [(s.name, s.method) for s in stages] == [("erase", "esd"), ("immunize", "imma"), ("guard", "freezeasguard")]


def test_help_describes_the_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stack", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--config", "--resume", "erase:", "immunize:", "guard:", "illegal:", "guard.safetensors"):
        assert expected in text


# --- world effect (needs the trained embedded world) -----------------------------------------------


@pytest.mark.world
@pytest.mark.slow
def test_world_the_stacked_model_resists_relearning_better_than_the_erased_one(tmp_path):
    """ESD-x erases zorblat, IMMA immunizes it against fine-tuning; an attacker then fine-tunes both
    the erase stage's output and the stacked model on other zorblat images (200 steps, Adam 2e-4).

    Measured (detection of zorblat at attack steps 0, 50, 100, 200): erased 0.22, 0.91, 0.59, 1.00;
    stacked 0.00, 0.38, 0.34, 0.53.
    """
    from conceptguard.attacks.curves import world_detector, world_prompts
    from conceptguard.attacks.relearn import RelearnConfig, default_train_config, relearn_attack
    from conceptguard.stack import stack, stack_config_from_dict
    from conceptguard.world.dataset import export_folder, generate

    immunize_data = export_folder(generate(64, seed=1, split="all", character="zorblat"), tmp_path / "zorblat")
    attack_data = export_folder(generate(64, seed=2, split="all", character="zorblat"), tmp_path / "attacker")
    quiet = {"progress": False, "checkpoint_every": 1000}
    config = stack_config_from_dict({
        "erase": {"method": "esd", "concepts": ["zorblat"], "ddim_steps": 20,
                  "train": {"steps": 150, "lr": 5e-4, **quiet}},
        "immunize": {"method": "imma", "concepts": ["zorblat"], "data": [str(immunize_data)],
                     "adaptation": "finetune", "inner_lr": 2e-4, "inner_batch_size": 4, "prior_weight": 1.0,
                     "train": {"steps": 100, "lr": 1e-3, **quiet}}})
    result = stack(None, config, tmp_path / "stacked")

    curves = {}
    for name, model in (("erased", result.run_dir / "erase" / "output" / "pipeline"),
                        ("stacked", result.out / "pipeline")):
        _, record = relearn_attack(
            load(model), str(attack_data), "zorblat", tmp_path / "attack" / name,
            config=RelearnConfig(kind="finetune", batch_size=8),
            train_config=default_train_config("finetune", {"steps": 200, "lr": 2e-4, **quiet}),
            checkpoints=[0, 50, 100, 200], prompts=world_prompts("zorblat", n=32), detector=world_detector("zorblat"))
        curves[name] = [point["detection"] for point in record["curve"]]
    print(f"zorblat detection under re-learning: {curves}")
    erased, stacked = curves["erased"], curves["stacked"]
    assert stacked[-1] < erased[-1]
    assert sum(stacked[1:]) / 3 <= sum(erased[1:]) / 3 - 0.2, curves
