"""The CUDA-only paths: flash-attn, CUDA-graph decoding, NCCL, bitsandbytes, fused AdamW's
device-side step skip.

Every test here is marked ``gpu``: tests/conftest.py skips them where CUDA is unavailable (CI, a
laptop), and they run with ``make test`` or ``make test-gpu`` wherever a GPU is (the ones that
compile or start torchrun are also ``slow``). Tests of an optional package (flash-attn,
bitsandbytes) also skip when it is not installed, and the two-rank NCCL test needs two GPUs
(NCCL refuses two ranks on one device). Each mirrors a CPU test elsewhere in the suite; the
module imports nothing CUDA-specific, so it collects anywhere.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from mini_transformer import checkpoint as ckpt
from mini_transformer.config import ModelConfig, load_config
from mini_transformer.errors import UserError
from mini_transformer.generation import KVCachePool, generate, generate_stream
from mini_transformer.model import Transformer, flash_attn_available
from mini_transformer.training import train

from .conftest import REPO_ROOT
from .test_distributed import CONFIG as CPU_CONFIG
from .test_distributed import _free_port
from .test_train import CORPUS, small_config

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    # init_std 0.3: varied greedy output (a default-init random model repeats one token), so
    # token-for-token equality means something.
    fields = dict(vocab_size=61, d_model=64, n_heads=4, n_layers=2, block_size=32, dropout=0.0, init_std=0.3)
    fields.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**fields)).eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- flash-attn -----------------------------------------------------------------------------------

@pytest.mark.skipif(not flash_attn_available(), reason="the flash-attn package is not installed")
@pytest.mark.parametrize("n_kv_heads", [None, 2], ids=["mha", "gqa"])
def test_flash_attn_equals_sdpa_and_the_explicit_softmax(monkeypatch, n_kv_heads):
    """attention: flash (and auto, which picks it for half precision on CUDA) gives the logits
    and gradients of the SDPA and explicit-softmax paths with the same weights, within bf16."""
    import mini_transformer.model as model_module

    calls = []
    real_flash = model_module._flash_attn_func

    def counting_flash(*args, **kwargs):
        calls.append(args[0].shape)
        return real_flash(*args, **kwargs)

    monkeypatch.setattr(model_module, "_flash_attn_func", counting_flash)
    idx = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(1)).to(CUDA)
    targets = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(2)).to(CUDA)
    reference = tiny_model(attention="math", n_kv_heads=n_kv_heads, init_std=0.02).to(CUDA, torch.bfloat16)
    results = {}
    for attention in ("math", "sdpa", "flash", "auto"):
        model = tiny_model(attention=attention, n_kv_heads=n_kv_heads, init_std=0.02).to(CUDA, torch.bfloat16)
        model.load_state_dict(reference.state_dict())
        model.train()  # dropout is 0: training mode only makes the gradients flow
        out = model(idx, targets)
        out.loss.backward()
        results[attention] = (out.logits.detach(), model.blocks[0].attn.qkv.weight.grad)
    assert len(calls) == 2 * 2  # flash and auto, each through both layers
    ref_logits, ref_grad = results["math"]
    for attention in ("sdpa", "flash", "auto"):
        logits, grad = results[attention]
        assert rel_error(logits, ref_logits) < 2e-2, attention
        assert rel_error(grad, ref_grad) < 5e-2, attention


# -- CUDA-graph decoding --------------------------------------------------------------------------

@pytest.mark.slow  # compiles
def test_compiled_decoding_replays_a_cuda_graph_and_gives_the_eager_tokens(monkeypatch):
    """generate(compile=True) on CUDA records the decode step as a CUDA graph and replays it per
    token. Greedy tokens equal eager decoding: past the context window (re-prefills), for
    generations that reuse a KVCachePool's cache (the addresses the graph reads), for two
    generations interleaved on one model, and for a second model without a pool."""
    torch._dynamo.reset()
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay

    def counting_replay(self):
        replays.append(None)
        return real_replay(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counting_replay)
    model, other = tiny_model().to(CUDA), tiny_model(seed=1).to(CUDA)
    n = 2 * model.config.block_size
    prompts = [[3, 14, 15, 9, 26], [7, 1]]
    eager = [generate(model, p, max_new_tokens=n, temperature=0) for p in prompts]
    assert all(len(set(tokens)) > 3 for tokens in eager)

    pool = KVCachePool()
    compiled = [generate(model, p, max_new_tokens=n, temperature=0, compile=True, cache_pool=pool)
                for p in prompts]
    assert compiled == eager
    # Most decode steps were replays (a new shape's first calls warm up and record).
    assert len(replays) >= n // 2, len(replays)

    # Two generations at once on one model, a step of each in turn, each with its own cache.
    streams = [generate_stream(model, p, max_new_tokens=n, temperature=0, compile=True, cache_pool=pool)
               for p in prompts]
    steps = list(zip(*streams))  # a token of each per step, pulled in turn
    assert [[first for first, _ in steps], [second for _, second in steps]] == eager

    assert generate(other, prompts[0], max_new_tokens=12, temperature=0, compile=True) == \
        generate(other, prompts[0], max_new_tokens=12, temperature=0)


# -- fused AdamW skips a non-finite step on the device ---------------------------------------------

def test_fused_adamw_skips_a_non_finite_step_on_the_device(tmp_path, monkeypatch):
    """On CUDA (fp32, no loss scaling) a step with a NaN loss still calls the fused AdamW step,
    whose found_inf input makes it leave weights, moments and step count alone: the skip is
    decided on the device, with no host sync. Two bad steps are skipped and the run goes on
    (the CPU version: tests/test_train.py)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    config = small_config(tmp_path, device="cuda", max_iters=8, log_interval=4, eval_interval=8, max_bad_steps=4)
    bad_forwards = (3, 4)  # the 3rd and 4th training forwards (one micro-step per optimizer step)
    forwards = []
    real_forward = Transformer.forward

    def sometimes_nan(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            forwards.append(None)
            if len(forwards) in bad_forwards:
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(Transformer, "forward", sometimes_nan)
    before: dict[str, object] = {}
    checked = []
    optimizers = []

    def snapshot(optimizer, args, kwargs):
        optimizers.append(optimizer)
        if len(forwards) in bad_forwards:
            assert optimizer.defaults.get("fused"), "the step is not fused AdamW"
            before["params"] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
            before["state"] = [{k: v.clone() for k, v in optimizer.state[p].items()}
                               for g in optimizer.param_groups for p in g["params"]]

    def compare(optimizer, args, kwargs):
        if len(forwards) not in bad_forwards:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for p, old in zip(params, before["params"]):
            assert p.is_cuda and torch.equal(p.detach(), old)
        for p, old in zip(params, before["state"]):
            assert optimizer.state[p].keys() == old.keys()
            for key, value in optimizer.state[p].items():
                assert torch.equal(value, old[key]), key  # moments and step count too
        checked.append(len(forwards))

    handles = [register_optimizer_step_pre_hook(snapshot), register_optimizer_step_post_hook(compare)]
    try:
        with pytest.warns(UserWarning, match="step skipped") as caught:
            result = train(config, progress=False, log=None)
    finally:
        for handle in handles:
            handle.remove()
    assert checked == list(bad_forwards)  # the bad steps reached the optimizer, which skipped them
    skipped = [str(w.message).split(":")[0] for w in caught if "step skipped" in str(w.message)]
    assert skipped == ["step 3", "step 4"]
    assert [i for i, x in enumerate(result.losses) if math.isnan(x)] == [2, 3]
    assert len(result.losses) == 8 and result.final_val_loss is not None
    optimizer = optimizers[-1]
    first = optimizer.param_groups[0]["params"][0]
    assert int(optimizer.state[first]["step"]) == 8 - len(bad_forwards)


# -- NCCL -----------------------------------------------------------------------------------------

STEPS = 6
TOL = 1e-4  # fp32 on CUDA: summation order differs between one batch of 8 and two of 4

# The CPU tests' run (tests/test_distributed.py), on CUDA over NCCL, with a longer timeout.
CONFIG = CPU_CONFIG.replace("  device: cpu\n", "  device: cuda\n  backend: nccl\n").replace(
    "dist_timeout_s: 30", "dist_timeout_s: 60")
assert "backend: nccl" in CONFIG and "dist_timeout_s: 60" in CONFIG, "tests/test_distributed.py's CONFIG changed"

# `mini-transformer train ...`, recording the process group each rank joins: its backend, its
# size and the result of one all-reduce of (rank + 1) over it.
LAUNCHER = r'''
import os, sys
import torch
import torch.distributed as dist

real_init = dist.init_process_group

def recording_init(*args, **kwargs):
    real_init(*args, **kwargs)
    value = torch.tensor([float(dist.get_rank() + 1)], device="cuda")
    dist.all_reduce(value)
    with open(f"{os.environ['MT_TEST_GROUP']}.rank{dist.get_rank()}", "w") as f:
        f.write(f"{dist.get_backend()} {dist.get_world_size()} {value.item():g}")

dist.init_process_group = recording_init

from mini_transformer.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
'''


def _torchrun(nproc: int, *args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N args``; killed whole if it hangs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _curve(out_dir: Path, key: str) -> dict[int, float]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iter"]: r[key] for r in map(json.loads, lines) if key in r}


def _assert_same_run(a: Path, b: Path) -> None:
    for key in ("train_loss", "val_loss", "final_val_loss"):
        ca, cb = _curve(a, key), _curve(b, key)
        assert ca and ca.keys() == cb.keys(), (key, ca, cb)
        for i in ca:
            assert abs(ca[i] - cb[i]) <= TOL, (key, i, ca[i], cb[i])
    wa, wb = (load_file(str(ckpt.resolve_checkpoint(d, prefer="latest") / ckpt.WEIGHTS_FILE)) for d in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=TOL, msg=name)


class _Workspace:
    def __init__(self, root: Path):
        self.root = root
        (root / "input.txt").write_text(CORPUS)
        self.config = root / "config.yaml"
        self.config.write_text(CONFIG.format(steps=STEPS, data=root / "input.txt", cache=root / "cache"))
        self.launcher = root / "launch.py"
        self.launcher.write_text(LAUNCHER)

    def single(self, out: str, batch_size: int) -> Path:
        """One process, in this one, with the global batch of the torchrun job."""
        config = load_config(self.config, overrides=["--training.batch_size", str(batch_size),
                                                      "--training.out_dir", str(self.root / out)])
        train(config, progress=False, log=None)
        return self.root / out

    def launch(self, out: str, nproc: int, *args: str) -> list[str]:
        """torchrun the CLI; returns each rank's "backend world_size all_reduce_sum" line."""
        group = self.root / f"group-{out}"
        _torchrun(nproc, str(self.launcher), "--config", str(self.config), "--quiet",
                  "--training.out_dir", str(self.root / out), *args, env={"MT_TEST_GROUP": str(group)})
        return [Path(f"{group}.rank{rank}").read_text() for rank in range(nproc)]


@pytest.mark.slow  # torchrun
def test_torchrun_on_one_gpu_joins_an_nccl_group_and_trains_like_one_process(tmp_path):
    """One rank under torchrun (all a one-GPU machine allows NCCL): the job joins an NCCL group,
    all-reduces over it, and trains exactly like a plain single process."""
    ws = _Workspace(tmp_path)
    assert ws.launch("torchrun", 1) == ["nccl 1 1"]
    _assert_same_run(ws.root / "torchrun", ws.single("single", batch_size=4))


@pytest.mark.slow  # torchrun
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="two ranks over NCCL need two GPUs")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_over_nccl_train_like_one_process_with_their_global_batch(tmp_path, mode):
    """Two GPUs with batch 4 each train like one with batch 8 (tests/test_distributed.py does
    the same on CPU over gloo), with DDP's all-reduce and FSDP2's all-gather/reduce-scatter."""
    ws = _Workspace(tmp_path)
    assert ws.launch(mode, 2, "--training.distributed", mode) == ["nccl 2 3", "nccl 2 3"]
    _assert_same_run(ws.root / mode, ws.single("single", batch_size=8))


# -- bitsandbytes ---------------------------------------------------------------------------------

def _bitsandbytes_or_skip() -> None:
    try:
        import bitsandbytes  # noqa: F401  (optional; on a broken install the library falls back too)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes is not usable here ({type(exc).__name__}: {exc})")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bitsandbytes_quantization_is_as_close_as_ours_and_generates(mode, tmp_path):
    """backend bitsandbytes (LLM.int8 / nf4 on CUDA) swaps every Linear but the tied head for
    its layers; the logits stay within twice the error of our own int8 / int4 (group 64) on the
    same weights; the model generates; it cannot be saved; QLoRA trains on it but won't merge."""
    _bitsandbytes_or_skip()
    from mini_transformer.lora import apply_lora, merge_lora
    from mini_transformer.quantize import quantization_meta, quantize_model, save_quantized

    model = tiny_model(init_std=0.02).to(CUDA)
    idx = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(1)).to(CUDA)
    with torch.no_grad():
        expected = model(idx).logits
        ours = quantize_model(copy.deepcopy(model), mode, group_size=64, backend="native")
        ours_error = rel_error(ours(idx).logits, expected)
        bnb = quantize_model(copy.deepcopy(model), mode, group_size=64, backend="bitsandbytes")
        bnb_error = rel_error(bnb(idx).logits, expected)
    linears = [m for m in bnb.modules() if isinstance(m, nn.Linear) and m is not bnb.lm_head]
    assert linears and all(type(m).__module__.startswith("bitsandbytes") for m in linears)
    assert bnb.lm_head.weight is bnb.tok_emb.weight  # tied, full precision
    assert quantization_meta(bnb)["backend"] == "bitsandbytes" and quantization_meta(bnb)["mode"] == mode
    assert bnb_error < 2 * ours_error + 0.01, (bnb_error, ours_error)
    assert len(generate(bnb, [3, 14, 15], max_new_tokens=8, temperature=0)) == 8
    with pytest.raises(UserError, match="can't be saved"):
        save_quantized(tmp_path / "q", bnb)
    # QLoRA: adapters on the bitsandbytes base get gradients; merging into it is refused.
    apply_lora(bnb, rank=4)
    bnb.train()
    bnb(idx, idx).loss.backward()
    grads = [p.grad for p in bnb.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(UserError, match="cannot merge"):
        merge_lora(bnb)
