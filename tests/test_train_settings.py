"""What a new user's first runs depend on: a shortened run's schedule, settings that do not
apply said (or refused) in one line, evaluation's own progress, a throughput that leaves
evaluation out, and the expected time of a run."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tqdm import tqdm

from mini_transformer.config import COMMAND_LINE, Config, TrainingConfig, load_config
from mini_transformer.errors import UserError
from mini_transformer.training.loop import Trainer
from mini_transformer.training.metrics import Throughput, evaluations_left, format_duration
from mini_transformer.training.schedule import learning_rate_at, resolve_schedule
from mini_transformer.training.timing import expected_time_lines

from .conftest import REPO_ROOT
from .test_train import quiet, small_config

DEFAULT_CONFIG = Path(REPO_ROOT) / "config.yaml"
CPU_RECIPE = Path(REPO_ROOT) / "configs" / "shakespeare_char_cpu.yaml"


def resolved(path=None, overrides=(), saved=None):
    config = load_config(path, overrides=list(overrides))
    return resolve_schedule(config, saved)


# -- the config loader records who set what ---------------------------------------------------

def test_the_loader_records_which_source_set_each_key(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("training: {max_iters: 300, warmup_iters: 20}\nd_model: 64\n")
    config = load_config(file, preset="tiny", overrides=["--training.max_iters", "50"])
    assert config.set_by["training.max_iters"] == COMMAND_LINE
    assert config.set_by["training.warmup_iters"] == str(file)
    assert config.set_by["model.d_model"] == str(file)  # a flat key, filed under its section
    assert config.set_by["model.n_layers"] == "preset tiny"
    assert not config.is_set("training.lr_decay_iters") and config.is_set("training.warmup_iters")
    assert "set_by" not in config.to_dict()  # never saved with a run


def test_config_yaml_and_the_built_in_defaults_agree():
    assert load_config(DEFAULT_CONFIG) == Config()


# -- a shortened run's schedule follows max_iters ---------------------------------------------

def test_a_shortened_default_run_leaves_warmup_and_decays_to_its_end():
    t, lines = resolved(DEFAULT_CONFIG, ["--training.max_iters", "100"])
    assert (t.warmup_iters, t.lr_decay_iters) == (10, 100)
    assert learning_rate_at(10, t) == pytest.approx(3e-4)  # past warmup at step 10 (was 6e-6)
    assert learning_rate_at(99, t) == pytest.approx(3e-5, rel=0.01)
    assert lines == ["note: the lr schedule follows training.max_iters 100 (set on the command line): "
                     "warmup_iters 500 -> 10; set them on the command line too to choose otherwise"]


def test_a_shortened_recipe_decays_over_the_shorter_run():
    t, lines = resolved(CPU_RECIPE, ["--training.max_iters", "300"])
    assert (t.warmup_iters, t.lr_decay_iters) == (30, 300)
    assert learning_rate_at(299, t) == pytest.approx(1e-4, rel=0.01)
    assert len(lines) == 1 and "lr_decay_iters 2000 -> 300" in lines[0] and "warmup_iters 100 -> 30" in lines[0]


def test_schedule_keys_set_on_the_command_line_are_kept_and_a_misfit_is_said():
    t, lines = resolved(CPU_RECIPE, ["--training.max_iters", "300", "--training.lr_decay_iters", "2000"])
    assert (t.warmup_iters, t.lr_decay_iters) == (30, 2000)  # warmup still follows
    assert len(lines) == 2 and lines[1].startswith("warning: training.lr_decay_iters (2000) is far past")


def test_a_whole_recipe_and_the_defaults_run_as_written():
    for path in (None, DEFAULT_CONFIG, CPU_RECIPE, Path(REPO_ROOT) / "configs" / "gpt2.yaml"):
        config = load_config(path)
        t, lines = resolve_schedule(config)
        assert lines == [] and t.warmup_iters == config.training.warmup_iters
        assert t.lr_decay_iters == (config.training.lr_decay_iters or config.training.max_iters)


def test_a_schedule_that_cannot_work_is_warned_of_in_one_line(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("training: {max_iters: 100, warmup_iters: 500}\n")
    t, lines = resolved(file)
    assert t.warmup_iters == 500  # set with max_iters: kept as written
    assert len(lines) == 1 and lines[0].startswith("warning: training.warmup_iters (500) >= training.max_iters (100)")
    file.write_text("training: {max_iters: 1000, lr_decay_iters: 200}\n")
    t, lines = resolved(file)
    assert (t.warmup_iters, t.lr_decay_iters) == (100, 200)  # warmup, not set, follows max_iters
    assert lines[0] == (f"note: the lr schedule follows training.max_iters 1000 (set in {file}): "
                        "warmup_iters 500 -> 100; set them to choose otherwise")
    assert lines[1].startswith("warning: training.lr_decay_iters (200) is under half")


def test_a_config_built_in_python_counts_changed_values_as_set():
    config = Config()
    config.training.max_iters = 100
    t, _ = resolve_schedule(config)
    assert (t.warmup_iters, t.lr_decay_iters) == (10, 100)
    config.training.warmup_iters = 7
    assert resolve_schedule(config)[0].warmup_iters == 7


def test_a_resume_with_another_max_iters_keeps_the_runs_schedule():
    saved = TrainingConfig(max_iters=300, warmup_iters=30, lr_decay_iters=300)
    t, lines = resolved(CPU_RECIPE, ["--training.max_iters", "700"], saved=saved)
    assert (t.max_iters, t.warmup_iters, t.lr_decay_iters) == (700, 30, 300)
    assert lines[0] == ("note: resuming on the checkpoint's lr schedule (warmup_iters 30, not 70, lr_decay_iters "
                        "300, not 700); set training.warmup_iters and training.lr_decay_iters on the command line "
                        "to change it")
    assert lines[1].startswith("warning: training.lr_decay_iters (300) is under half")
    t, lines = resolved(CPU_RECIPE, ["--training.max_iters", "300"], saved=saved)  # the same run, as it started
    assert (t.warmup_iters, t.lr_decay_iters) == (30, 300)
    assert len(lines) == 1 and lines[0].startswith("note: the lr schedule follows training.max_iters 300")


def test_the_run_records_and_trains_on_the_resolved_schedule(tmp_path):
    config = small_config(tmp_path, max_iters=20)
    del config.set_by["training.warmup_iters"]  # as if never set: it follows max_iters
    config.training.warmup_iters = 500
    lines = []
    trainer = Trainer(config, progress=False, log=lines.append)
    trainer.setup()
    trainer.close()
    assert trainer.config.training.warmup_iters == 2 and trainer.config.training.lr_decay_iters == 20
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["training"]
    assert (saved["warmup_iters"], saved["lr_decay_iters"]) == (2, 20)  # what a resume reads
    assert any(line.startswith("note: the lr schedule follows training.max_iters 20") for line in lines)


# -- settings that do not apply: said, or refused ----------------------------------------------

def test_a_vocab_size_far_above_the_tokenizers_is_refused(tmp_path):
    config = small_config(tmp_path)
    config.model.vocab_size = 50257
    with pytest.raises(UserError, match=r"model.vocab_size \(50257\) is far above the char tokenizer's .*"
                                        r"data.tokenizer gpt2"):
        quiet(config)
    config.model.vocab_size = 128  # padding to a multiple of 128 is allowed
    trainer = Trainer(config, progress=False, log=None)
    trainer.setup()
    trainer.close()
    assert trainer.config.model.vocab_size == 128


def test_quantize_in_a_training_config_is_said_to_apply_when_generating(tmp_path):
    config = small_config(tmp_path)
    config.advanced.quantize = "int8"
    lines = []
    trainer = Trainer(config, progress=False, log=lines.append)
    trainer.setup()
    trainer.close()
    assert [line for line in lines if "advanced.quantize int8 applies when generating" in line]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    config = small_config(tmp, max_iters=2, eval_interval=2)
    quiet(config)
    return tmp, config


def test_a_model_section_replaced_by_init_froms_architecture_is_said(finished_run, tmp_path):
    base_tmp, _ = finished_run
    tuned = small_config(tmp_path, max_iters=1, eval_interval=1, init_from=str(base_tmp / "out"))
    tuned.model.n_layers, tuned.model.dropout = 3, 0.2
    lines = []
    trainer = Trainer(tuned, progress=False, log=lines.append)
    trainer.setup()
    trainer.close()
    [line] = [line for line in lines if "training.init_from" in line]
    assert "model section's n_layers 3 do not apply (dropout does)" in line and "d_model" not in line.split(";")[1]
    assert trainer.config.model.n_layers == 2 and trainer.config.model.dropout == 0.2


def test_resuming_a_finished_run_says_so_and_does_nothing(finished_run):
    tmp, config = finished_run
    metrics = (tmp / "out" / "metrics.jsonl").read_text()
    lines = []
    result = Trainer(config, resume=True, progress=False, log=lines.append)
    try:
        result.setup()
        outcome = result.run()
    finally:
        result.close()
    assert outcome.step == 2 and outcome.final_val_loss is None
    assert lines[-1].startswith(f"the run in {tmp / 'out'} is already finished (step 2 of training.max_iters 2)")
    assert (tmp / "out" / "metrics.jsonl").read_text() == metrics  # nothing evaluated again


def test_generate_says_when_a_config_quantizes(finished_run, tmp_path, run_cli):
    tmp, _ = finished_run
    file = tmp_path / "gen.yaml"
    file.write_text("advanced: {quantize: int8}\n")
    args = ["generate", "--checkpoint", str(tmp / "out"), "--prompt", "To", "--max_tokens", "2", "--seed", "1"]
    status, _, err = run_cli(*args, "--config", str(file))
    assert status == 0
    assert f"note: quantizing the weights to int8 on load (advanced.quantize in {file})" in err
    status, _, err = run_cli(*args, "--quantize", "int8")  # asked for on the command line: nothing to say
    assert status == 0 and "quantizing" not in err


# -- what a run shows while it runs ------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_tokens_per_s_leaves_out_the_time_spent_evaluating():
    clock = FakeClock()
    meter = Throughput(tokens_per_step=1000, step=0, clock=clock)
    clock.now = 5.0  # 10 steps in 5 s
    assert meter.tokens_per_s(10) == pytest.approx(2000)
    clock.now = 7.5  # 5 steps in 2.5 s, then a 100 s evaluation, then 5 steps in 2.5 s
    with meter.paused():
        clock.now += 100.0
    clock.now += 2.5
    assert meter.tokens_per_s(20) == pytest.approx(2000)  # not 10,000 / 105 s = 95


class CountingBar:
    def __init__(self):
        self.n, self.closed = 0, False

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_evaluation_advances_its_own_progress_bar(finished_run):
    tmp, config = finished_run
    trainer = Trainer(config, resume=True, progress=False, log=None)
    trainer.setup()
    try:
        bar = CountingBar()
        trainer.estimate_loss(progress=bar)
        assert bar.n == 2 * config.training.eval_iters and bar.closed
        exact = CountingBar()
        trainer.exact_val_loss(progress=exact)
        assert exact.n == trainer._exact_val_batches() and exact.closed  # the bar's total is right
    finally:
        trainer.close()


def test_the_expected_time_counts_steps_and_evaluations():
    config = load_config(DEFAULT_CONFIG)
    lines = expected_time_lines(config, 0, torch.device("cpu"), step_s=4.5, evaluation_batch_s=0.75, val_batches=20)
    # 10,000 x 4.5 s + 21 evaluations x 400 batches x 0.75 s + 20 x 0.75 s = 51,315 s
    assert lines == [
        "expected time: 14 h 15 min on cpu (10,000 steps of 4.5 s, 21 evaluations of 5 min; from a step timed now)",
        "note: that is long for a CPU; the CPU recipe trains a small character model in a few minutes: "
        "python train.py --config configs/shakespeare_char_cpu.yaml --data.path data/input.txt"]
    short = expected_time_lines(load_config(CPU_RECIPE), 0, torch.device("cpu"), 0.03, 0.01, 10)
    assert len(short) == 1 and short[0].startswith("expected time: 1 min 4 s on cpu (2,000 steps of 30 ms, 9 evaluations of 400 ms;")
    config.training.max_seconds = 600.0
    capped = expected_time_lines(config, 0, torch.device("cpu"), 4.5, 0.75, 20)
    assert capped == ["expected time: 10 min on cpu (10,000 steps of 4.5 s, 21 evaluations of 5 min; "
                      "from a step timed now, stopped by training.max_seconds)"]  # and no hint
    config.training.max_seconds = None
    resumed = expected_time_lines(config, 9000, torch.device("cuda"), 4.5, 0.75, 20)
    assert len(resumed) == 1 and "(1,000 steps of 4.5 s, 2 evaluations of 5 min;" in resumed[0]


def test_timing_a_step_leaves_the_run_as_it_was(tmp_path):
    lines = []
    trainer = Trainer(small_config(tmp_path), progress=False, log=lines.append)
    trainer.setup()
    try:
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        rng, sampler = torch.get_rng_state(), trainer.train_sampler.state_dict()
        trainer._say_expected_time(tqdm(disable=True))
        assert torch.equal(torch.get_rng_state(), rng) and trainer.model.training
        assert all(p.grad is None for p in trainer.model.parameters())
        assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
        assert str(trainer.train_sampler.state_dict()) == str(sampler)
    finally:
        trainer.close()
    assert lines[-1].startswith("expected time: ") and "8 steps of" in lines[-1]


def test_evaluations_left_and_durations():
    assert evaluations_left(0, 10000, 500) == 21  # step 0's and 20 more
    assert evaluations_left(0, 1050, 500) == 4  # 0, 500, 1000 and the last step
    assert evaluations_left(500, 1000, 500) == 1
    assert [format_duration(s) for s in (0.0304, 3.21, 250, 45000, 90061)] == [
        "30 ms", "3.2 s", "4 min 10 s", "12 h 30 min", "1 d 1 h"]
