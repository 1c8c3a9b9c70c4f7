"""Data-parallel training under torchrun on CPU (gloo, 2 processes): DDP and FSDP2.

Two ranks with batch 4 must train exactly like one process with batch 8 (the sampler hands the
ranks disjoint rows of one global batch), resume exactly, leave the same files as one process
(rank 0 alone writes), and fail fast, never hang. The runs are tiny (a 2-layer, d_model 32
model for 6 steps, dropout 0) and shared between tests by module-scoped fixtures; each torchrun
launch costs a few seconds, mostly importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mini_transformer import checkpoint as ckpt
from mini_transformer.config import TrainingConfig, load_config
from mini_transformer.errors import UserError
from mini_transformer.training import train
from mini_transformer.training.distributed import (DistributedContext, check_fsdp_supported, gradient_sync,
                                                    resolve_global_batch)

from .conftest import REPO_ROOT
from .test_train import CORPUS

STEPS = 6  # optimizer steps of a full run; a resumed run stops at STEPS // 2 first
# The first half of a full run: a max_iters set on the command line rescales the file's schedule
# unless the schedule is set there too (training/schedule.py resolve_schedule).
FIRST_HALF = ("--training.max_iters", str(STEPS // 2), "--training.lr_decay_iters", str(STEPS),
              "--training.warmup_iters", "2")
TOL = 1e-5

CONFIG = """\
model: {{d_model: 32, n_heads: 4, n_layers: 2, block_size: 16, dropout: 0.0}}
training:
  batch_size: 4
  max_iters: {steps}
  lr_decay_iters: {steps}   # the schedule must not depend on where a run stops
  warmup_iters: 2
  eval_interval: 3
  eval_iters: 2
  log_interval: 1
  learning_rate: 3.0e-3
  dtype: fp32
  device: cpu
  tensorboard: false
  dist_timeout_s: 30
data: {{path: {data}, cache_dir: {cache}}}
"""

# A test-only entry point: `mini-transformer train ...` with faults injected on one rank, and
# every file write or directory creation under MT_TEST_OUT_DIR by a rank other than 0 recorded.
LAUNCHER = r'''
import builtins, io, json, os, signal, sys, time

rank = int(os.environ.get("RANK", "0"))
writes = []
if rank != 0 and os.environ.get("MT_TEST_OUT_DIR"):
    root = os.path.realpath(os.environ["MT_TEST_OUT_DIR"])
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def inside(path):
        if isinstance(path, int):
            return False
        p = os.path.realpath(os.fspath(path))
        return p == root or p.startswith(root + os.sep)

    def audited_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            writes.append(["open", os.fspath(file), mode])
        return real_open(file, mode, *args, **kwargs)

    def audited_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            writes.append(["os.open", os.fspath(path), flags])
        return real_os_open(path, flags, *args, **kwargs)

    def audited_mkdir(path, *args, **kwargs):
        if inside(path):
            writes.append(["mkdir", os.fspath(path)])
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = audited_open
    os.open, os.mkdir = audited_os_open, audited_mkdir

fault, fault_step = os.environ.get("MT_TEST_FAULT"), int(os.environ.get("MT_TEST_FAULT_STEP", "0"))
if fault == "out_of_time" and rank == 1:  # this rank's clock alone says training.max_seconds is spent
    from mini_transformer.training.timing import TimeBudget

    checks = [0]

    def spent_from_fault_step(self, step_s, due_to_evaluate):
        checks[0] += 1
        return checks[0] >= fault_step

    TimeBudget.must_stop = spent_from_fault_step
elif fault and rank == 1:
    from mini_transformer.training.loop import Trainer

    original = Trainer._train_step

    def faulty_step(self, lr):
        if self.step + 1 == fault_step:
            if fault in ("SIGINT", "SIGTERM"):  # this rank alone is asked to stop
                os.kill(os.getpid(), getattr(signal, fault))
                return original(self, lr)
            if fault == "hang":
                time.sleep(3600)
            raise RuntimeError(f"injected failure on rank {rank} at step {fault_step}")
        return original(self, lr)

    Trainer._train_step = faulty_step

from mini_transformer.cli import main

try:
    status = main(["train", *sys.argv[1:]])
finally:
    if os.environ.get("MT_TEST_AUDIT"):
        with open(f"{os.environ['MT_TEST_AUDIT']}.rank{rank}.json", "w") as f:
            json.dump(writes, f)
sys.exit(status)
'''


# -- helpers ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 script args``; its whole process group
    is killed if it outlives ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), script, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def curve(out_dir: Path, key: str) -> dict[int, float]:
    return {r["iter"]: r[key] for r in records(out_dir) if key in r}


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.resolve_checkpoint(out_dir, prefer="latest") / ckpt.WEIGHTS_FILE))


def files(out_dir: Path) -> set[str]:
    return {str(p.relative_to(out_dir)) for p in out_dir.rglob("*")}


def assert_same_run(a: Path, b: Path, iters=None) -> None:
    """Same train and eval loss curves (over ``iters`` if given) and the same final weights."""
    for key in ("train_loss", "val_loss"):
        ca, cb = curve(a, key), curve(b, key)
        keys = sorted(set(ca) & set(iters)) if iters is not None else sorted(ca)
        assert keys and (iters is not None or set(ca) == set(cb)), (key, ca, cb)
        for i in keys:
            assert abs(ca[i] - cb[i]) <= TOL, (key, i, ca[i], cb[i])
    # A resumed run also has its first half's final exact val loss: compare the last ones.
    fa, fb = curve(a, "final_val_loss"), curve(b, "final_val_loss")
    assert max(fa) == max(fb) and abs(fa[max(fa)] - fb[max(fb)]) <= TOL
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=TOL, msg=name)


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        (root / "input.txt").write_text(CORPUS)
        self.config = root / "config.yaml"
        self.config.write_text(CONFIG.format(steps=STEPS, data=root / "input.txt", cache=root / "cache"))
        self.launcher = root / "launch.py"
        self.launcher.write_text(LAUNCHER)

    def single(self, out: str, *overrides: str, resume: bool = False) -> Path:
        """One process, in this one, with the global batch of two ranks (batch 8)."""
        config = load_config(self.config, overrides=["--training.batch_size", "8",
                                                      "--training.out_dir", str(self.root / out), *overrides])
        train(config, progress=False, log=None, resume=resume)
        return self.root / out

    def launch(self, out: str, *args: str, script: str | None = None, env: dict | None = None,
               check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {"MT_TEST_OUT_DIR": str(self.root / out), "MT_TEST_AUDIT": str(self.root / f"audit-{out}"),
               **(env or {})}
        result = torchrun(script or str(self.launcher), "--config", str(self.config), "--quiet",
                          "--training.out_dir", str(self.root / out), *args, env=env, timeout=timeout)
        return _ok(result) if check else result

    def audit(self, out: str) -> list:
        return json.loads((self.root / f"audit-{out}.rank1.json").read_text())


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def single_run(ws) -> Path:
    return ws.single("single")


@pytest.fixture(scope="module")
def ddp_run(ws) -> tuple[Path, subprocess.CompletedProcess]:
    # The real entry point: torchrun ... train.py --config FILE
    result = ws.launch("ddp", script="train.py")
    return ws.root / "ddp", result


@pytest.fixture(scope="module")
def ddp_resumed(ws) -> Path:
    ws.launch("ddp_resume", *FIRST_HALF)
    first = ws.audit("ddp_resume")
    ws.launch("ddp_resume", "--resume")
    return ws.root / "ddp_resume", first + ws.audit("ddp_resume")


@pytest.fixture(scope="module")
def fsdp_resumed(ws) -> tuple[Path, Path]:
    ws.launch("fsdp", "--training.distributed", "fsdp", *FIRST_HALF)
    half = ws.root / "fsdp_half"
    shutil.copytree(ws.root / "fsdp", half)  # kept for a single-process resume
    ws.launch("fsdp", "--training.distributed", "fsdp", "--resume")
    return ws.root / "fsdp", half


# -- DDP ------------------------------------------------------------------------------------------

@pytest.mark.slow  # torchrun
def test_ranks_stop_together_when_one_rank_runs_out_of_time(ws):
    # Each rank reads its own clock against training.max_seconds; one that is out of time stops
    # them all at that step (a rank stopping alone would leave the others waiting in a collective).
    ws.launch("late", "--training.max_seconds", "3600", env={"MT_TEST_FAULT": "out_of_time",
                                                               "MT_TEST_FAULT_STEP": "2"}, timeout=90)
    final = [r for r in records(ws.root / "late") if r.get("final")]
    assert [r["iter"] for r in final] == [2]


@pytest.mark.slow  # torchrun
def test_ddp_equals_one_process_with_the_same_global_batch(ws, single_run, ddp_run):
    out_dir, result = ddp_run
    assert_same_run(out_dir, single_run)
    assert sorted(curve(out_dir, "train_loss")) == list(range(1, STEPS + 1))
    # Rank 0 alone logs; the startup line states the global batch.
    assert result.stdout.count("global batch 8 sequences (batch 4 x accumulation 1 x 2 processes)") == 1
    assert result.stdout.count("final: exact val loss") == 1


@pytest.mark.slow  # torchrun
def test_ddp_leaves_the_same_files_as_one_process(single_run, ddp_run):
    assert files(ddp_run[0]) == files(single_run)


@pytest.mark.slow  # torchrun
def test_ddp_resume_continues_exactly(ddp_run, ddp_resumed):
    out_dir, _ = ddp_resumed
    assert sorted(curve(out_dir, "train_loss")) == list(range(1, STEPS + 1))  # one history, no repeats
    assert_same_run(out_dir, ddp_run[0])


@pytest.mark.slow  # torchrun
def test_only_rank_0_writes(single_run, ddp_resumed):
    out_dir, rank1_writes = ddp_resumed
    assert rank1_writes == []  # neither the fresh run nor the resumed one
    assert files(out_dir) == files(single_run)


@pytest.fixture(scope="module")
def single_accum_run(ws) -> Path:
    return ws.single("single_accum", "--training.global_batch_size", "16", "--training.max_iters", "3")


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_accumulation_under_torchrun_equals_one_process(ws, single_accum_run, mode):
    # global_batch_size 16 = batch 4 x accumulation 2 x 2 ranks = batch 8 x accumulation 2 x 1.
    result = ws.launch(f"{mode}_accum", "--training.distributed", mode, "--training.global_batch_size", "16",
                       "--training.max_iters", "3")
    assert f"x2 processes ({mode}): global batch 16 sequences (batch 4 x accumulation 2 x 2 processes)" \
        in result.stdout
    assert_same_run(ws.root / f"{mode}_accum", single_accum_run)


def test_gradient_sync_is_skipped_on_all_but_the_last_micro_step():
    class FakeDDP:
        skipped = 0

        @contextlib.contextmanager
        def no_sync(self):
            self.skipped += 1
            yield

    class FakeFSDP:
        def __init__(self):
            self.calls = []

        def set_requires_gradient_sync(self, value):
            self.calls.append(value)

    accum = 4
    ddp, fsdp = FakeDDP(), FakeFSDP()
    for micro in range(accum):
        with gradient_sync(ddp, DistributedContext(world_size=2, mode="ddp"), enabled=micro == accum - 1):
            pass
        with gradient_sync(fsdp, DistributedContext(world_size=2, mode="fsdp"), enabled=micro == accum - 1):
            pass
    assert ddp.skipped == accum - 1
    assert fsdp.calls == [False, True] * (accum - 1)  # off for the micro-step, then back on
    with gradient_sync(FakeDDP(), DistributedContext(), enabled=False):  # one process: nothing to skip
        pass


# -- FSDP -----------------------------------------------------------------------------------------

@pytest.mark.slow  # torchrun
def test_fsdp_trains_resumes_and_saves_single_process_checkpoints(ws, single_run, fsdp_resumed):
    """FSDP2 runs on CPU with gloo (PyTorch 2.13): 3 + 3 resumed steps equal 6 in one process."""
    out_dir, half = fsdp_resumed
    assert_same_run(out_dir, single_run)
    # The checkpoint is the ordinary single-process format: full weights, id-keyed optimizer state.
    model = ckpt.load_model(ckpt.resolve_checkpoint(out_dir, prefer="latest"))
    assert model.lm_head.weight is model.tok_emb.weight
    fsdp_opt = ckpt.read_train_state(ckpt.resolve_checkpoint(out_dir, prefer="latest"))["optimizer"]
    single_opt = ckpt.read_train_state(ckpt.resolve_checkpoint(single_run, prefer="latest"))["optimizer"]
    assert fsdp_opt["param_groups"] == single_opt["param_groups"]
    for i, state in single_opt["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(fsdp_opt["state"][i][key], value, rtol=0, atol=TOL)
    # And a single process resumes an FSDP checkpoint exactly.
    resumed = ws.single(half.name, resume=True)
    assert_same_run(resumed, single_run, iters=range(STEPS // 2 + 1, STEPS + 1))


# -- failures -------------------------------------------------------------------------------------

@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_failing_rank_fails_the_job_quickly(ws, fault):
    # A rank that raises is noticed by torchrun; one that hangs makes the others' collectives time
    # out after training.dist_timeout_s. Either way the job exits non-zero, never hangs: a job that
    # waited for the default timeout (300 s) would overrun the launch's 150 s and raise
    # TimeoutExpired. (No tighter wall-clock bound: two torchrun start-ups on a busy 2-core CI
    # machine take most of a minute.)
    result = ws.launch(f"fail-{fault}", "--training.dist_timeout_s", "5", check=False, timeout=150,
                       env={"MT_TEST_FAULT": fault, "MT_TEST_FAULT_STEP": "2"})
    assert result.returncode != 0
    if fault == "raise":
        assert "injected failure on rank 1 at step 2" in result.stderr
    else:
        assert "Timed out" in result.stderr  # rank 0's collective gave up after dist_timeout_s


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_to_one_rank_stops_all_at_one_step_with_a_checkpoint(ws, signame):
    # Rank 1 alone is signalled during its step 2 (as when a scheduler's signal reaches the ranks
    # at different times): its request rides on step 3's loss all-reduce, so both ranks stop
    # after step 3, rank 0 saves, and the job exits 0 instead of hanging in mismatched collectives.
    out = f"stop-{signame}"
    result = ws.launch(out, "--training.max_iters", "100", "--training.lr_decay_iters", "100",
                       "--training.eval_interval", "100", check=False, timeout=90,
                       env={"MT_TEST_FAULT": signame, "MT_TEST_FAULT_STEP": "2"})
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "interrupted at step 3;" in result.stdout, result.stdout[-2000:]
    directory = ckpt.resolve_checkpoint(ws.root / out, prefer="latest")
    assert ckpt.read_train_state(directory)["step"] == 3


@pytest.mark.slow  # torchrun
def test_resume_with_another_model_shape_fails_under_ddp(ws, ddp_run):
    shutil.copytree(ddp_run[0], ws.root / "ddp_shape")
    result = ws.launch("ddp_shape", "--resume", "--model.d_model", "64", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: the checkpoint to resume")]
    assert len(errors) == 2 and "different model shape" in errors[0], result.stderr[-3000:]  # one line per rank
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr


# -- bad input ------------------------------------------------------------------------------------

def _one_line_error(run_cli, *argv) -> str:
    status, out, err = run_cli("train", "--quiet", *argv)
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def as_rank_0_of_2(monkeypatch):
    """This process looks like rank 0 of a torchrun job of 2 (the checks run before joining)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_global_batch_must_divide_by_batch_times_world_size(ws, run_cli, as_rank_0_of_2):
    line = _one_line_error(run_cli, "--config", str(ws.config), "--training.global_batch_size", "12")
    assert "training.global_batch_size (12)" in line and "4 x 2 = 8" in line and "use global_batch_size 16" in line
    given = TrainingConfig(batch_size=4, global_batch_size=48)
    cfg = resolve_global_batch(given, world_size=2)
    assert cfg.gradient_accumulation_steps == 6
    assert given.gradient_accumulation_steps == 1  # a resolved copy; the given config is left alone
    cfg = resolve_global_batch(TrainingConfig(batch_size=4, global_batch_size=48), world_size=1)
    assert cfg.gradient_accumulation_steps == 12
    with pytest.raises(UserError, match="world size = 4 x 5 = 20"):
        resolve_global_batch(TrainingConfig(batch_size=4, global_batch_size=48), world_size=5)


def test_fsdp_where_it_cannot_run_is_one_line(ws, run_cli, as_rank_0_of_2):
    line = _one_line_error(run_cli, "--config", str(ws.config), "--training.distributed", "fsdp",
                           "--training.dtype", "fp16")
    assert "fsdp does not support fp16" in line
    line = _one_line_error(run_cli, "--config", str(ws.config), "--training.backend", "nccl")
    assert "nccl needs CUDA" in line
    line = _one_line_error(run_cli, "--config", str(ws.config), "--training.distributed", "none")
    assert "independent copies" in line
    with pytest.raises(UserError, match="needs the nccl backend"):
        check_fsdp_supported("cuda", "gloo", "bf16")
    with pytest.raises(UserError, match="not on mps"):
        check_fsdp_supported("mps", "gloo", "fp32")
    check_fsdp_supported("cpu", "gloo", "fp32")
    check_fsdp_supported("cuda", "nccl", "bf16")
