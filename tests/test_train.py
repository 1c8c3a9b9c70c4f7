"""The training loop: learning, exact resume, accumulation, clipping, the NaN guard, checkpoints."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mini_transformer import checkpoint as ckpt
from mini_transformer.config import Config, TrainingConfig, ModelConfig, load_config
from mini_transformer.errors import UserError
from mini_transformer.runlock import acquire_run_lock
from mini_transformer.training import train
from mini_transformer.training.flops import flops_per_token
from mini_transformer.training.loop import Trainer
from mini_transformer.training.schedule import dropout_at, learning_rate_at

from .conftest import REPO_ROOT

CORPUS = ("To be, or not to be, that is the question:\n"
          "Whether 'tis nobler in the mind to suffer\n"
          "The slings and arrows of outrageous fortune,\n"
          "Or to take arms against a sea of troubles\n") * 40


def small_config(tmp_path: Path, **training) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "input.txt"
    if not data.exists():
        data.write_text(CORPUS)
    config = load_config(overrides=[
        "--model.d_model", "32", "--model.n_heads", "4", "--model.n_layers", "2", "--model.block_size", "16",
        "--model.dropout", "0.1",
        "--training.batch_size", "4", "--training.max_iters", "8", "--training.warmup_iters", "2",
        "--training.eval_interval", "4", "--training.eval_iters", "2", "--training.log_interval", "1",
        "--training.learning_rate", "3e-3", "--training.dtype", "fp32", "--training.device", "cpu",
        "--training.tensorboard", "false",
        "--training.out_dir", str(tmp_path / "out"), "--data.path", str(data),
        "--data.cache_dir", str(tmp_path / "cache"),
    ])
    for key, value in training.items():
        setattr(config.training, key, value)
    return config


def quiet(config: Config, **kwargs):
    return train(config, progress=False, log=None, **kwargs)


def test_loss_falls_on_a_small_corpus(tmp_path):
    config = small_config(tmp_path, max_iters=60, eval_interval=60, learning_rate=1e-2)
    result = quiet(config)
    first = sum(result.losses[:5]) / 5
    last = sum(result.losses[-5:]) / 5
    assert last < 0.75 * first
    assert result.final_val_loss is not None and result.final_val_loss < first


def test_resume_equals_uninterrupted_run(tmp_path):
    # The schedule is fixed by lr_decay_iters, so stopping at step 4 changes nothing but the stop.
    full = quiet(small_config(tmp_path / "a", max_iters=8, lr_decay_iters=8))
    first = quiet(small_config(tmp_path / "b", max_iters=4, lr_decay_iters=8))
    second = quiet(small_config(tmp_path / "b", max_iters=8, lr_decay_iters=8), resume=True)
    resumed = first.losses + second.losses
    assert len(resumed) == len(full.losses) == 8
    for a, b in zip(full.losses, resumed):
        assert abs(a - b) <= 1e-6
    # The metrics history of the resumed run reads as one run.
    records = [json.loads(line) for line in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()]
    iters = [r["iter"] for r in records if "train_loss" in r]
    assert iters == list(range(1, 9))
    a = ckpt.load_model(ckpt.resolve_checkpoint(tmp_path / "a" / "out", prefer="latest"))
    b = ckpt.load_model(ckpt.resolve_checkpoint(tmp_path / "b" / "out", prefer="latest"))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def _captured_grads(config: Config, batches):
    """Run one optimizer step on fixed batches and return the gradients the optimizer saw."""
    trainer = Trainer(config, progress=False, log=None)
    trainer.setup()
    trainer.model.set_dropout(0.0)
    batches = iter(batches)
    trainer.train_sampler.next_batch = lambda: next(batches)
    seen = {}

    def hook(optimizer, args, kwargs):
        for i, p in enumerate(trainer.model.parameters()):
            if p.grad is not None:
                seen[i] = p.grad.detach().clone()

    trainer.optimizer.register_step_pre_hook(hook)
    trainer._train_step(lr=1e-3)
    (loss, norm), = trainer._settle()
    trainer.close()
    return seen, loss, norm


def test_accumulation_gives_same_gradients_as_one_big_batch(tmp_path):
    torch.manual_seed(0)
    x = torch.randint(0, 20, (8, 16))
    y = torch.randint(0, 20, (8, 16))
    big, loss_big, _ = _captured_grads(small_config(tmp_path, batch_size=8, grad_clip=0.0), [(x, y)])
    acc, loss_acc, _ = _captured_grads(
        small_config(tmp_path, batch_size=4, gradient_accumulation_steps=2, grad_clip=0.0),
        [(x[:4], y[:4]), (x[4:], y[4:])])
    assert abs(loss_big - loss_acc) < 1e-5
    assert big.keys() == acc.keys()
    for key in big:
        torch.testing.assert_close(big[key], acc[key], rtol=1e-4, atol=1e-6)


def test_clipping_bounds_the_norm_and_logs_the_norm_before(tmp_path):
    x = torch.randint(0, 20, (4, 16))
    grads, _, norm_before = _captured_grads(small_config(tmp_path, grad_clip=0.05), [(x, x)])
    total = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()
    assert norm_before > 0.05
    assert total <= 0.05 * (1 + 1e-4)


def test_schedule_values_at_warmup_peak_and_end():
    cfg = TrainingConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000, lr_decay_iters=2000)
    assert learning_rate_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert learning_rate_at(49, cfg) == pytest.approx(1e-3 * 50 / 101)
    assert learning_rate_at(100, cfg) == pytest.approx(1e-3)  # peak right after warmup
    assert learning_rate_at(1050, cfg) == pytest.approx(5.5e-4)  # halfway: the cosine mean
    assert learning_rate_at(2000, cfg) == pytest.approx(1e-4)
    assert learning_rate_at(5000, cfg) == pytest.approx(1e-4)
    values = [learning_rate_at(s, cfg) for s in range(100, 2001)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    linear = TrainingConfig(learning_rate=1e-3, min_lr=0.0, warmup_iters=0, max_iters=100, lr_schedule="linear")
    assert learning_rate_at(50, linear) == pytest.approx(5e-4)
    constant = TrainingConfig(learning_rate=1e-3, warmup_iters=10, max_iters=100, lr_schedule="constant")
    assert learning_rate_at(99, constant) == pytest.approx(1e-3)


def test_dropout_annealing_values():
    model = ModelConfig(dropout=0.2)
    cfg = TrainingConfig(max_iters=1000, dropout_end=0.0, dropout_anneal_fraction=0.5)
    assert dropout_at(0, model, cfg) == pytest.approx(0.2)
    assert dropout_at(250, model, cfg) == pytest.approx(0.1)
    assert dropout_at(500, model, cfg) == pytest.approx(0.0)
    assert dropout_at(900, model, cfg) == pytest.approx(0.0)
    cosine = TrainingConfig(max_iters=1000, dropout_end=0.0, dropout_anneal="cosine")
    assert dropout_at(500, model, cosine) == pytest.approx(0.1)
    assert dropout_at(250, model, cosine) == pytest.approx(0.1 + 0.1 * math.cos(math.pi / 4))
    assert dropout_at(300, model, TrainingConfig(max_iters=1000)) == pytest.approx(0.2)  # off


def test_dropout_annealing_reaches_every_module_and_is_logged(tmp_path):
    config = small_config(tmp_path, max_iters=6, dropout_end=0.0, dropout_anneal_fraction=1.0)
    config.model.dropout = 0.3
    trainer = Trainer(config, progress=False, log=None)
    trainer.setup()
    trainer.run()
    trainer.close()
    expected = dropout_at(5, config.model, config.training)
    assert 0 < expected < 0.3
    assert all(m.p == pytest.approx(expected) for m in trainer.model.dropout_modules())
    records = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["dropout"] for r in records if "dropout" in r]
    assert logged[0] == pytest.approx(0.3) and logged == sorted(logged, reverse=True)


@pytest.mark.parametrize("on_device", [True, False], ids=["skip-on-device", "skip-on-host"])
def test_nan_guard_skips_steps_then_stops_with_advice(tmp_path, monkeypatch, on_device):
    """Fused AdamW skips a non-finite step on the device (no host sync); fp16 loss scaling and
    FSDP decide on the host. Either way: weights and AdamW state untouched, a warning per
    skipped step, and an error with advice after max_bad_steps in a row."""
    config = small_config(tmp_path, max_iters=10, max_bad_steps=3)
    trainer = Trainer(config, progress=False, log=None)
    trainer.setup()
    if on_device:
        assert trainer._skips_on_device  # fused AdamW, on CPU and CUDA
    trainer._skips_on_device = on_device
    trainer._train_step(lr=1e-3)  # one good step, so that AdamW has state to keep
    assert trainer._settle()[0][0] > 0
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam_before = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    real_forward = trainer.model.forward

    def nan_forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(trainer.model, "forward", nan_forward)
    trainer._train_step(lr=1e-3)
    with pytest.warns(UserWarning, match="step skipped"):
        (loss, _), = trainer._settle()
    assert math.isnan(loss)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, adam_before[k]), k  # moments and step count too
    trainer._train_step(lr=1e-3)
    trainer._train_step(lr=1e-3)
    with pytest.raises(UserError, match="lower training.learning_rate"):
        with pytest.warns(UserWarning):
            trainer._settle()
    trainer.close()


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """With fused AdamW the step queues its work and returns: no .item(), .tolist() or bool of
    a tensor, each of which would make the host wait for a GPU."""
    trainer = Trainer(small_config(tmp_path, max_iters=4), progress=False, log=None)
    trainer.setup()
    trainer._train_step(lr=1e-3)  # first step: AdamW state is created

    def refuse(*args, **kwargs):
        raise AssertionError("the training step waited for a value from the device")

    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, method, refuse)
        trainer._train_step(lr=1e-3)
    assert len(trainer._settle()) == 2
    trainer.close()


def test_losses_are_read_every_few_steps_not_every_step(tmp_path, monkeypatch):
    """The loop reads losses from the device at log and eval steps and every max_bad_steps
    steps, not after each step; a run with two non-finite steps in the middle skips them,
    warns, and goes on."""
    config = small_config(tmp_path, max_iters=12, log_interval=6, eval_interval=12, max_bad_steps=4)
    trainer = Trainer(config, progress=False, log=None)
    trainer.setup()
    settles = []
    real_settle = trainer._settle
    # The steps at which values waited to be read, each read being one device sync.
    def counting_settle():
        if trainer._pending:
            settles.append(trainer.step)
        return real_settle()

    monkeypatch.setattr(trainer, "_settle", counting_settle)
    real_forward = trainer.model.forward
    calls = []

    def sometimes_nan(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if trainer.model.training:
            calls.append(None)
            if len(calls) in (3, 4):
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(trainer.model, "forward", sometimes_nan)
    with pytest.warns(UserWarning, match="step skipped") as caught:
        result = trainer.run()
    trainer.close()
    assert settles == [4, 6, 10, 12]
    skipped = [str(w.message).split(":")[0] for w in caught if "step skipped" in str(w.message)]
    assert skipped == ["step 3", "step 4"]
    assert len(result.losses) == 12 and [i for i, x in enumerate(result.losses) if math.isnan(x)] == [2, 3]
    assert int(trainer.optimizer.state_dict()["state"][0]["step"]) == 10  # two steps skipped


def test_metrics_checkpoint_layout_and_plot(tmp_path):
    config = small_config(tmp_path, max_iters=8)
    result = quiet(config)
    out = tmp_path / "out"
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert {"iter", "train_loss", "lr", "grad_norm", "tokens_per_s"} <= steps[0].keys()
    # mfu: the model's FLOP rate over the matmul rate measured at start-up, logged beside it.
    train_flops = flops_per_token(ckpt.read_config(out).model)[1]
    assert all(r["mfu"] == pytest.approx(train_flops * r["tokens_per_s"] / r["matmul_flops_per_s"]) for r in steps)
    evals = [r for r in records if "val_loss" in r]
    assert evals and all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert records[-1].get("final") and records[-1]["final_val_loss"] == pytest.approx(result.final_val_loss)
    directory = ckpt.resolve_checkpoint(out, prefer="latest")
    for name in ("model.safetensors", "config.yaml", "train_state.pt", "checkpoint.json"):
        assert (directory / name).is_file()
    state = ckpt.read_train_state(directory)
    assert {"optimizer", "step", "best_val_loss", "rng", "sampler", "scaler"} <= state.keys()
    model, cfg, tokenizer = ckpt.load_for_inference(out)
    assert cfg.model.vocab_size == tokenizer.vocab_size

    from mini_transformer.plot import plot_run

    paths = plot_run(out)
    assert (out / "loss.png") in paths and (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every evaluation is stamped with the loop's wall time, in order: the x axis of val loss
    # against time, which the plot command draws for one run or several.
    times = [r["time_s"] for r in evals]
    assert times == sorted(times) and times[-1] <= records[-1]["time_s"]
    from mini_transformer.plot import plot_val_loss_vs_time

    png = plot_val_loss_vs_time([out, out], tmp_path / "versus.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pickled_object_in_checkpoint_is_refused(tmp_path):
    config = small_config(tmp_path, max_iters=4)
    quiet(config)
    directory = ckpt.resolve_checkpoint(tmp_path / "out", prefer="latest")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"step": 4, "payload": Evil()}, directory / "train_state.pt")
    with pytest.raises(UserError, match="refusing to load"):
        ckpt.read_train_state(directory)
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="corrupt"):
        ckpt.load_for_inference(directory)


def test_resume_with_a_different_model_shape_is_refused(tmp_path):
    quiet(small_config(tmp_path, max_iters=4))
    other = small_config(tmp_path, max_iters=8)
    other.model.n_layers = 3
    with pytest.raises(UserError, match="different model shape"):
        quiet(other, resume=True)



def test_resume_of_a_mistyped_run_directory_is_refused_without_making_it(tmp_path):
    config = small_config(tmp_path, max_iters=4)
    config.training.out_dir = str(tmp_path / "no-such-run")
    with pytest.raises(UserError, match="no run directory .*no-such-run.* to resume"):
        quiet(config, resume=True)
    assert not (tmp_path / "no-such-run").exists()  # no empty directory with a lock file left behind

KILL_SCRIPT = r"""
import sys, torch
from mini_transformer.config import Config
from mini_transformer.model import Transformer
from mini_transformer.checkpoint import save_checkpoint
config = Config()
config.model.vocab_size = 512
config.model.d_model = 256
config.model.n_layers = 4
model = Transformer(config.model)
print("ready", flush=True)
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.tok_emb.weight.fill_(float(step))
    save_checkpoint(sys.argv[1], step, model, config, None, {"step": step}, keep_last=2)
"""


@pytest.mark.slow  # runs training as a process
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    for delay in (0.9, 1.3, 1.7):
        proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, cwd=REPO_ROOT)
        assert proc.stdout.readline().strip() == b"ready"
        # Kill during a later save, once one has completed: before the first one there is
        # nothing to keep (on a busy machine the first save can take longer than the delay).
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "latest.json").exists():
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        directory = ckpt.resolve_checkpoint(out, prefer="latest")
        model = ckpt.load_model(directory)
        step = json.loads((directory / "checkpoint.json").read_text())["step"]
        assert torch.all(model.tok_emb.weight == float(step))
        assert ckpt.read_train_state(directory)["step"] == step


@pytest.mark.slow  # runs training as a process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    """Ctrl-C, and how schedulers (SLURM, Kubernetes, systemd) stop a job: SIGTERM or SIGHUP."""
    config = small_config(tmp_path, max_iters=100000, eval_interval=100000)
    config.save(tmp_path / "run.yaml")
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(tmp_path / "run.yaml"), "--quiet"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "interrupted at step" in stdout
    directory = ckpt.resolve_checkpoint(tmp_path / "out", prefer="latest")
    assert ckpt.read_train_state(directory)["step"] >= 3


def test_a_fresh_run_never_overwrites_an_earlier_runs_checkpoints(tmp_path):
    quiet(small_config(tmp_path, max_iters=4))
    with pytest.raises(UserError, match="already holds checkpoints.*resume the run"):
        quiet(small_config(tmp_path, max_iters=4))


@pytest.mark.skipif(sys.platform == "win32", reason="the run lock is a no-op without fcntl")
def test_a_run_directory_in_use_by_another_run_is_refused_in_one_line(tmp_path, run_cli):
    config = small_config(tmp_path, max_iters=2, eval_interval=2)
    config.save(tmp_path / "run.yaml")
    with acquire_run_lock(tmp_path / "out"):  # as another run holding out_dir would
        status, out, err = run_cli("train", "--config", str(tmp_path / "run.yaml"), "--quiet")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"in use by another run (pid {os.getpid()})" in lines[0], err
    assert "training.out_dir" in lines[0]
    assert not any((tmp_path / "out").glob(f"{ckpt.CHECKPOINT_PREFIX}*"))


def test_a_run_releases_its_directory_and_cleans_a_killed_runs_pointer_temps(tmp_path):
    config = small_config(tmp_path, max_iters=2, eval_interval=2)
    quiet(config)
    leftover = tmp_path / "out" / ".latest.json.abc123.tmp"  # as a kill during a pointer write leaves
    leftover.write_text("{")
    config.training.max_iters = 4
    result = quiet(config, resume=True)  # the first run released the lock
    assert result.step == 4
    assert not leftover.exists()
    with acquire_run_lock(tmp_path / "out"):  # and so did the second
        pass


def test_the_callers_config_is_left_as_it_was(tmp_path):
    """What a run derives (accumulation from a global batch, the vocabulary from the tokenizer, a
    fine-tuning run's architecture from its base) goes into trainer.config, a copy."""
    config = small_config(tmp_path / "base", max_iters=2, eval_interval=2, global_batch_size=8)
    before = copy.deepcopy(config)
    trainer = Trainer(config, progress=False, log=None)
    trainer.setup()
    result = trainer.run()
    trainer.close()
    assert config == before and config.model.vocab_size is None
    assert result.config is trainer.config and trainer.config is not config
    assert trainer.config.training.gradient_accumulation_steps == 2
    assert trainer.config.model.vocab_size == trainer.tokenizer.vocab_size
    assert ckpt.read_config(tmp_path / "base" / "out").model == trainer.config.model  # what was recorded

    tuned = small_config(tmp_path / "tuned", max_iters=2, eval_interval=2, init_from=str(tmp_path / "base" / "out"))
    tuned.model.n_layers, tuned.model.dropout = 3, 0.2
    before = copy.deepcopy(tuned)
    result = quiet(tuned)
    assert tuned == before
    assert result.config.model.n_layers == 2 and result.config.model.dropout == 0.2  # the base's shape


def test_lora_without_a_base_is_refused(tmp_path):
    config = small_config(tmp_path, max_iters=4)
    config.advanced.use_lora = True
    with pytest.raises(UserError, match="init_from"):
        quiet(config)


def test_max_seconds_ends_the_whole_run_within_its_budget(tmp_path, monkeypatch):
    # The budget counts from set-up and holds the last evaluation, save and final val pass: the
    # loop stops early by what those will take, timed on the evaluations before. Evaluation is
    # made slow here (50 ms a batch), so that ending at the budget and only then evaluating would
    # overrun it by about a second.
    batch_s = 0.05
    estimate, exact = Trainer.estimate_loss, Trainer.exact_val_loss

    def slow_estimate(self, *args, **kwargs):
        time.sleep(batch_s * 2 * self.t.eval_iters)
        return estimate(self, *args, **kwargs)

    def slow_exact(self, *args, **kwargs):
        time.sleep(batch_s * self._exact_val_batches())
        return exact(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "estimate_loss", slow_estimate)
    monkeypatch.setattr(Trainer, "exact_val_loss", slow_exact)
    budget = 7.0  # set-up takes a few seconds of it
    config = small_config(tmp_path, max_iters=10**6, max_seconds=budget, eval_interval=5)
    started = time.perf_counter()
    result = quiet(config)
    elapsed = time.perf_counter() - started
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < result.step < 10**6 and result.final_val_loss is not None
    assert records[-1]["final"] and records[-1]["time_s"] <= budget + 0.3  # one step's and the clock's noise
    assert elapsed <= budget + 1.0  # the caller's view: set-up to return


def test_time_budget_stops_at_the_last_step_that_leaves_room_for_the_end():
    from mini_transformer.training.timing import TimeBudget

    now = [0.0]
    budget = TimeBudget(100.0, clock=lambda: now[0])
    with budget.timing_evaluation(batches=40, final_pass_batches=200):
        now[0] += 2.0  # an evaluation of 40 batches and its save: 2 s, so the final pass is 10 s
    assert (budget.evaluation_s, budget.final_pass_s) == (2.0, 10.0)
    # Going on from t: [evaluation due] + next step (1 s) + the end (2 s + 10 s) must fit in 100 s.
    now[0] = 87.0
    assert not budget.must_stop(1.0, due_to_evaluate=False)  # 87 + 1 + 12 = 100
    assert budget.must_stop(1.0, due_to_evaluate=True)  # 87 + 2 + 1 + 12 > 100
    now[0] = 87.5
    assert budget.must_stop(1.0, due_to_evaluate=False)
    assert not TimeBudget(None, clock=lambda: now[0]).must_stop(1e9, due_to_evaluate=True)
    # The train command's clock starts with the command (imports and all), not at set-up.
    assert TimeBudget(100.0, clock=lambda: now[0], started=80.0).elapsed() == 7.5
