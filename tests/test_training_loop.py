"""The shared training loop: training, exact resume after SIGKILL, mixed precision, accumulation, divergence."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptguard.config import add_dataclass_arguments, build_config
from conceptguard.errors import ConceptGuardError
from conceptguard.training import TrainConfig, latest_checkpoint, list_checkpoints, load_trainable_parameters, train
from conceptguard.training.checkpoint import TRAINABLE

SCRIPT = Path(__file__).with_name("_resumable_train_script.py")
_spec = importlib.util.spec_from_file_location("_resumable_train_script", SCRIPT)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)
ToyRecipe = toy.ToyRecipe


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide state (e.g. the mixed precision); give every test a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy models are tiny; threads would only contend on a busy machine
    reset()
    yield
    reset()
    torch.set_num_threads(threads)


def small_config(**overrides) -> TrainConfig:
    values = dict(steps=30, lr=3e-2, optimizer="adam", seed=7, checkpoint_every=10, keep_checkpoints=2,
                  log_every=1, max_grad_norm=None, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def summary_line(output: str) -> dict:
    """The JSON summary the training script prints last (warnings may follow it on stderr)."""
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


def params_of(recipe) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in recipe.trainable_parameters().items()}


def test_toy_recipe_trains_and_writes_the_run_folder(tmp_path):
    recipe = ToyRecipe(dropout=0.0)
    config = small_config(steps=40, lr_schedule="cosine", warmup_steps=4)
    result = train(recipe, config, tmp_path / "run", resolved_config={"method": "toy", "concept": "cats"})

    assert result.steps_done == 40 and result.start_step == 0 and len(result.losses) == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert recipe.optimizer_steps == list(range(1, 41))

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == "toy" and saved["concept"] == "cats"
    assert saved["train"]["lr"] == 3e-2 and saved["train"]["betas"] == [0.9, 0.999]

    log = read_log(tmp_path / "run")
    assert [line["step"] for line in log] == list(range(1, 41))
    assert all({"loss", "lr", "grad_norm", "time"} <= line.keys() for line in log)
    assert [line["loss"] for line in log] == pytest.approx(result.losses)
    lrs = [line["lr"] for line in log]
    assert lrs[:4] == pytest.approx([7.5e-3, 1.5e-2, 2.25e-2, 3e-2])  # linear warmup to the peak
    assert lrs[4] == pytest.approx(3e-2) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay
    assert 0 < lrs[-1] < 3e-4

    # Only the newest two checkpoints are kept; the final one holds the final weights.
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [30, 40]
    assert result.checkpoint == latest_checkpoint(tmp_path / "run")
    final = load_trainable_parameters(result.checkpoint)
    for name, value in params_of(recipe).items():
        assert torch.equal(final[name], value)


@pytest.fixture
def processes():
    """Subprocesses a test started; any still running when it ends (e.g. on a failure) are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_killed_run_resumes_bit_identical(tmp_path, processes):
    seed = int(os.environ.get("CONCEPTGUARD_KILL_SEED", secrets.randbelow(10**6)))
    kill_after = random.Random(seed).randint(8, 40)
    print(f"kill seed {seed}: SIGKILL after step {kill_after} of 60 (reproduce with CONCEPTGUARD_KILL_SEED={seed})")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(run: str, *extra: str) -> subprocess.Popen:
        with open(tmp_path / f"{run}.stdout", "a") as out:  # the child keeps its own handle
            processes.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), str(tmp_path / run), str(tmp_path / f"{run}.safetensors"), *extra],
                stdout=out, stderr=subprocess.STDOUT, env=env))
        return processes[-1]

    def output(run: str) -> str:
        return (tmp_path / f"{run}.stdout").read_text()

    # The uninterrupted reference run goes alongside the one that gets killed.
    reference, victim = start("reference"), start("victim")
    victim_log = tmp_path / "victim" / "log.jsonl"
    deadline = time.monotonic() + 60
    last_step = 0
    while last_step < kill_after:
        assert victim.poll() is None, f"victim ended before the kill:\n{output('victim')}"
        assert time.monotonic() < deadline, "victim made no progress"
        if victim_log.is_file():
            steps = [json.loads(line)["step"] for line in victim_log.read_text().splitlines()[:-1]]
            last_step = max(steps, default=0)
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "victim.safetensors").exists(), "the victim finished before the kill landed"
    assert reference.wait(timeout=120) == 0, output("reference")

    # Leftovers of a checkpoint being written when a run died: never to be loaded.
    checkpoints = tmp_path / "victim" / "checkpoints"
    assert list_checkpoints(tmp_path / "victim"), "no checkpoint before the kill"
    (checkpoints / ".tmp-step-000999-4242").mkdir()
    (checkpoints / ".tmp-step-000999-4242" / TRAINABLE).write_bytes(b"half a file")
    (checkpoints / "step-000998").mkdir()  # no state.json: incomplete
    (checkpoints / "step-000998" / TRAINABLE).write_bytes(b"half a file")

    resumed = start("victim", "--resume")
    assert resumed.wait(timeout=120) == 0, output("victim")
    summary = summary_line(output("victim"))
    print(f"killed after logging step {last_step}; resumed from step {summary['start_step']}")
    assert 7 <= summary["start_step"] <= 60 and summary["start_step"] % 7 == 0

    expected, got = load_file(tmp_path / "reference.safetensors"), load_file(tmp_path / "victim.safetensors")
    assert expected.keys() == got.keys() and any(name.startswith("ema.") for name in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"
    assert [line["step"] for line in read_log(tmp_path / "victim")] == list(range(1, 61))
    assert [line["loss"] for line in read_log(tmp_path / "victim")] == [
        line["loss"] for line in read_log(tmp_path / "reference")]
    assert not (checkpoints / ".tmp-step-000999-4242").exists()  # swept up by the resumed run


@pytest.mark.slow
def test_two_process_ddp_resume_is_bit_identical(tmp_path):
    """Two CPU processes (gloo) under torchrun: one writer, per-process RNG states, exact resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}

    def torchrun(run_dir: Path, out: Path, *extra: str) -> dict:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(SCRIPT), str(run_dir), str(out), "--steps", "21", "--sleep", "0", *extra]
        # Its own session, so a hang can be ended together with the workers torchrun started.
        launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        try:
            output, _ = launcher.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
            raise
        assert launcher.returncode == 0, output
        return summary_line(output)

    assert torchrun(tmp_path / "full", tmp_path / "full.safetensors")["num_processes"] == 2
    assert len(torch.load(latest_checkpoint(tmp_path / "full") / "rng.pt", weights_only=True)["processes"]) == 2
    assert [line["step"] for line in read_log(tmp_path / "full")] == list(range(1, 22))

    # The same run as if it had died after step 14: resume it and compare.
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000021")
    assert torchrun(tmp_path / "cut", tmp_path / "cut.safetensors", "--resume")["start_step"] == 14
    expected, got = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "cut.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    class Recording(ToyRecipe):
        def setup(self, accelerator):
            super().setup(accelerator)
            self.activation_dtypes = {"trained": set(), "frozen": set()}
            # The prepared model's own output is cast back to fp32, so look inside it.
            hidden = accelerator.unwrap_model(self.model)[0]
            hidden.register_forward_hook(lambda module, args, out: self.activation_dtypes["trained"].add(out.dtype))
            # A frozen module is never prepared (like a text encoder): only the loop's autocast reaches it.
            self.frozen = torch.nn.Linear(self.dim, self.dim).requires_grad_(False)
            self.frozen.register_forward_hook(lambda module, args, out: self.activation_dtypes["frozen"].add(out.dtype))

        def _batch_loss(self, generator):
            self.frozen(torch.zeros(1, self.dim))
            return super()._batch_loss(generator)

    recipe = Recording(dropout=0.0)
    result = train(recipe, small_config(mixed_precision="bf16"), tmp_path / "run")
    assert recipe.activation_dtypes == {"trained": {torch.bfloat16}, "frozen": {torch.bfloat16}}
    assert all(p.dtype == torch.float32 for p in recipe.trainable_parameters().values())
    assert all(t.dtype == torch.float32 for t in load_trainable_parameters(result.checkpoint).values())
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])


def test_trainable_parameters_must_be_fp32(tmp_path):
    class HalfRecipe(ToyRecipe):
        def setup(self, accelerator):
            super().setup(accelerator)
            self.model.to(torch.bfloat16)

    with pytest.raises(ConceptGuardError, match="fp32"):
        train(HalfRecipe(), small_config(steps=2), tmp_path / "run")


def test_gradient_accumulation_matches_one_combined_batch(tmp_path):
    class Recording(ToyRecipe):
        def loss(self, step, generator):
            self.seen.append((step, self.model[0].weight.detach().clone()))
            return super().loss(step, generator)

    def run(name, grad_accum, micro_batches):
        recipe = Recording(dropout=0.1, micro_batches=micro_batches, batch=4)
        recipe.seen = []
        config = small_config(steps=3, optimizer="sgd", lr=0.1, grad_accum=grad_accum, max_grad_norm=5.0)
        train(recipe, config, tmp_path / name)
        return recipe

    accumulated = run("accumulated", grad_accum=2, micro_batches=1)
    combined = run("combined", grad_accum=1, micro_batches=2)

    # Three optimizer steps of two micro-batches each; weights change only between steps.
    assert [step for step, _ in accumulated.seen] == [1, 1, 2, 2, 3, 3]
    assert accumulated.optimizer_steps == [1, 2, 3]
    weights = [w for _, w in accumulated.seen]
    for i in (0, 2, 4):
        assert torch.equal(weights[i], weights[i + 1])
    for i in (1, 3):
        assert not torch.equal(weights[i], weights[i + 1])
    # Same samples, same dropout masks, same update as one batch of twice the size.
    for (name, a), b in zip(params_of(accumulated).items(), params_of(combined).values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.allclose(weights[0], accumulated.model[0].weight)


def test_nonfinite_loss_stops_without_applying_the_step(tmp_path):
    class Diverging(ToyRecipe):
        def loss(self, step, generator):
            loss = super().loss(step, generator)
            return loss * float("nan") if step == 7 else loss

    recipe = Diverging()
    run_dir = tmp_path / "run"
    expected = r"loss became nan at step 7; last good checkpoint: .*step-000006"
    with pytest.raises(ConceptGuardError, match=expected) as err:
        train(recipe, small_config(steps=20, checkpoint_every=3, max_grad_norm=1.0), run_dir)
    assert "--resume" in str(err.value)
    assert recipe.optimizer_steps == list(range(1, 7))

    # The last good checkpoint is on disk and loads; its weights are finite and are the weights the
    # model still has, i.e. the diverging step was never applied. Nothing newer was written.
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 6]
    saved = load_trainable_parameters(latest_checkpoint(run_dir))
    for name, value in params_of(recipe).items():
        assert torch.isfinite(saved[name]).all() and torch.equal(saved[name], value), name
    log = read_log(run_dir)
    assert log[-1]["event"] == "nonfinite" and log[-1]["step"] == 7 and log[-1]["loss"] == "nan"
    assert [line["step"] for line in log[:-1]] == list(range(1, 7))

    # Resuming (with the loss back to normal) continues from the checkpoint and drops the event line.
    result = train(ToyRecipe(), small_config(steps=9, checkpoint_every=3, max_grad_norm=1.0), run_dir, resume=True)
    assert result.start_step == 6 and [line["step"] for line in read_log(run_dir)] == list(range(1, 10))


def test_nonfinite_gradient_norm_also_stops(tmp_path):
    class InfiniteGradient(ToyRecipe):
        def loss(self, step, generator):
            loss = super().loss(step, generator)
            return loss + _InfGrad.apply(self.model[0].bias.sum()) if step == 2 else loss

    recipe = InfiniteGradient()
    with pytest.raises(ConceptGuardError, match="gradient norm became inf at step 2; no checkpoint was written yet"):
        train(recipe, small_config(steps=5), tmp_path / "run")
    assert recipe.optimizer_steps == [1]


class _InfGrad(torch.autograd.Function):
    """Identity forward (times zero), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_resume_checks_the_config(tmp_path):
    run_dir = tmp_path / "run"
    train(ToyRecipe(), small_config(steps=4, checkpoint_every=2), run_dir, resolved_config={"method": "toy"})

    with pytest.raises(ConceptGuardError, match=r"changed: train\.lr \(saved 0\.03, now 0\.001\)"):
        train(ToyRecipe(), small_config(steps=6, lr=1e-3, checkpoint_every=2), run_dir, resume=True,
              resolved_config={"method": "toy"})
    with pytest.raises(ConceptGuardError, match=r"method .*train\.seed"):
        train(ToyRecipe(), small_config(steps=6, seed=8, checkpoint_every=2), run_dir, resume=True,
              resolved_config={"method": "other"})
    with pytest.raises(ConceptGuardError, match="already holds checkpoints"):
        train(ToyRecipe(), small_config(steps=6, checkpoint_every=2), run_dir, resolved_config={"method": "toy"})
    assert read_log(run_dir)[-1]["step"] == 4, "a refused resume must not touch the run"

    # Extending a run is allowed; so is a new lr when asked for explicitly, and it takes effect.
    train(ToyRecipe(), small_config(steps=6, checkpoint_every=2), run_dir, resume=True,
          resolved_config={"method": "toy"})
    result = train(ToyRecipe(), small_config(steps=8, lr=1e-3, checkpoint_every=2), run_dir, resume=True,
                   resolved_config={"method": "toy"}, allow_config_changes={"lr"})
    assert result.start_step == 6
    log = read_log(run_dir)
    assert [line["step"] for line in log] == list(range(1, 9))
    assert [line["lr"] for line in log] == [3e-2] * 6 + [1e-3] * 2
    assert json.loads((run_dir / "config.json").read_text())["train"]["lr"] == 1e-3


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, caplog, capsys):
    result = train(ToyRecipe(), small_config(steps=3, progress=True), tmp_path / "run", resume=True)
    assert result.start_step == 0 and [line["step"] for line in read_log(tmp_path / "run")] == [1, 2, 3]
    assert "no checkpoint" in caplog.text and "starting from scratch" in caplog.text
    bar = capsys.readouterr().err
    assert "3/3" in bar and "loss=" in bar and "lr=" in bar


def test_fp16_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; see test_fp16_on_gpu")
    with pytest.raises(ConceptGuardError, match="fp16.*needs a GPU"):
        train(ToyRecipe(), small_config(steps=2, mixed_precision="fp16"), tmp_path / "run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and the grad scaler need a GPU")
def test_fp16_on_gpu(tmp_path):
    recipe = ToyRecipe(dropout=0.0)
    result = train(recipe, small_config(mixed_precision="fp16", checkpoint_every=15), tmp_path / "run")
    assert all(p.dtype == torch.float32 and p.is_cuda for p in recipe.trainable_parameters().values())
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    saved = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 0
    resumed = train(ToyRecipe(dropout=0.0), small_config(mixed_precision="fp16", checkpoint_every=15, steps=35),
                    tmp_path / "run", resume=True)
    assert resumed.start_step == 30 and len(resumed.losses) == 5


def test_tensorboard_is_optional(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConceptGuardError, match=r"conceptguard\[tensorboard\]"):
            train(ToyRecipe(), small_config(steps=2, tensorboard=True), tmp_path / "run")
        assert not (tmp_path / "run").exists(), "nothing may be written before the check"
    else:
        train(ToyRecipe(), small_config(steps=2, tensorboard=True), tmp_path / "run")
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_config_validation_and_cli_flags():
    for bad in (dict(steps=0), dict(grad_accum=0), dict(lr=-1.0), dict(betas=(0.9,)), dict(optimizer="lion"),
                dict(warmup_steps=2000), dict(max_grad_norm=-1.0), dict(seed=-1), dict(checkpoint_every=0)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    assert TrainConfig(lr="1e-5").lr == 1e-5  # YAML reads 1e-5 as a string

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    args = parser.parse_args(["--betas", "0.8", "0.95", "--mixed-precision", "bf16", "--max-grad-norm", "0",
                              "--tensorboard", "false", "--lr-schedule", "cosine", "--steps", "12"])
    config = build_config(TrainConfig, {"lr": "3e-4"}, vars(args))
    assert config.betas == (0.8, 0.95) and config.mixed_precision == "bf16" and config.max_grad_norm == 0.0
    assert config.lr == 3e-4 and config.steps == 12 and config.tensorboard is False
    with pytest.raises(ConceptGuardError, match="betas"):
        build_config(TrainConfig, {}, vars(parser.parse_args(["--betas", "0.9"])))
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "lion"])


def test_lr_schedules():
    from conceptguard.training import lr_multiplier

    linear = TrainConfig(steps=10, warmup_steps=2, lr_schedule="linear")
    assert [lr_multiplier(s, linear) for s in range(1, 11)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    cosine = TrainConfig(steps=5, lr_schedule="cosine")
    assert [lr_multiplier(s, cosine) for s in range(1, 6)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)])
