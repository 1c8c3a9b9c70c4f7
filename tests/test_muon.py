"""training.optimizer muon: which parameters Muon takes, its update against an explicit reference,
the grad scaler, exact resume, and the settings it is refused with."""

from __future__ import annotations

import math

import pytest
import torch

from mini_transformer import checkpoint as ckpt
from mini_transformer.config import Config, ModelConfig, TrainingConfig, load_config
from mini_transformer.errors import UserError
from mini_transformer.model import Transformer
from mini_transformer.training import optim
from mini_transformer.training.muon import BlockwiseMuon, MuonWithAdamW
from mini_transformer.training.optim import build_optimizer, set_learning_rates

from .test_train import quiet, small_config

CPU = torch.device("cpu")


def tiny_model(**model) -> Transformer:
    """One layer, grouped-query attention (q, k, v of different heights), a narrow SwiGLU."""
    torch.manual_seed(0)
    settings = dict(vocab_size=16, d_model=32, n_heads=4, n_kv_heads=2, n_layers=1, block_size=8,
                    ffn_hidden_size=48, dropout=0.0)
    return Transformer(ModelConfig(**{**settings, **model}))


def group_names(model: torch.nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in groups]


# -- which parameters go where ------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tie):
    model = tiny_model(n_layers=2, tie_embeddings=tie, bias=True)
    optimizer = build_optimizer(model, TrainingConfig(optimizer="muon"), CPU)
    assert isinstance(optimizer, MuonWithAdamW)
    (muon,) = group_names(model, optimizer.muon.param_groups)
    decay, no_decay = group_names(model, optimizer.adamw.param_groups)
    matrices = ("attn.qkv.weight", "attn.proj.weight", "ffn.gate_up.weight", "ffn.down.weight")
    assert muon == {f"blocks.{i}.{name}" for i in range(2) for name in matrices}
    # The embedding and an untied head decay under AdamW; a tied head is the embedding itself.
    assert decay == ({"tok_emb.weight"} if tie else {"tok_emb.weight", "lm_head.weight"})
    assert no_decay == {name for name, p in model.named_parameters() if p.dim() == 1}
    assert any(name.endswith("qkv.bias") for name in no_decay) and "norm.weight" in no_decay
    assert optimizer.adamw.param_groups[1]["weight_decay"] == 0.0
    # Every trainable parameter exactly once; with adamw, AdamW alone holds them all.
    everything = {name for name, _ in model.named_parameters()}
    assert len(muon) + len(decay) + len(no_decay) == len(everything)
    plain = build_optimizer(model, TrainingConfig(), CPU)
    assert isinstance(plain, torch.optim.AdamW) and set.union(*group_names(model, plain.param_groups)) == everything


def test_the_schedule_scales_each_optimizer_from_its_own_peak():
    cfg = TrainingConfig(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02)
    optimizer = build_optimizer(tiny_model(), cfg, CPU)
    set_learning_rates(optimizer, 2.5e-4, cfg)  # a quarter of the way up, or down
    assert [g["lr"] for g in optimizer.adamw.param_groups] == [2.5e-4, 2.5e-4]
    assert [g["lr"] for g in optimizer.muon.param_groups] == [pytest.approx(0.005, rel=1e-12)]
    assert len(optimizer.param_groups) == 3  # what the loop and the grad scaler iterate


# -- one Muon update against the explicit math ------------------------------------------------

NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration, in float64: X <- a X + (b X X^T + c (X X^T)^2) X, on the wide
    orientation, from X = G / |G|_F."""
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = NS_A * x + (NS_B * gram + NS_C * gram @ gram) @ x
    return x.T if tall else x


def reference_muon(w: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float, momentum: float,
                   heights: tuple[int, ...]) -> torch.Tensor:
    """``len(grads)`` Muon steps on ``w``, each row block of ``heights`` orthogonalised alone."""
    w, buf = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g  # momentum as an average
        update = (1 - momentum) * g + momentum * buf  # Nesterov: a step further along it
        w = w * (1 - lr * weight_decay)  # decoupled weight decay, at the unadjusted lr
        top = 0
        for h in heights:
            block = update[top:top + h]
            scale = math.sqrt(max(1.0, block.shape[0] / block.shape[1]))  # rows / columns, if taller
            w[top:top + h] -= lr * scale * newton_schulz(block)
            top += h
    return w


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float32, 1e-5)])
def test_two_muon_steps_match_the_reference(split, dtype, tolerance):
    # Weights of std 0.1 and weight_decay 1.0 make the decay about half of the change, and two
    # steps with different gradients tell Nesterov from plain momentum. A bf16 run's Newton-Schulz
    # is PyTorch's, in bf16; against the float64 reference it agrees to about 1% of the change
    # (an fp32 run's to 1e-6). Leaving out Nesterov, the shape adjustment, the decay, or
    # (un)splitting the fused matrices moves some matrix by 16% or more (checked by changing
    # the reference).
    model = tiny_model(bias=True)
    cfg = TrainingConfig(optimizer="muon", muon_split_fused=split, muon_learning_rate=0.05,
                         muon_weight_decay=1.0, muon_momentum=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    optimizer = build_optimizer(model, cfg, CPU, dtype)
    assert optimizer.muon.ns_dtype is dtype
    set_learning_rates(optimizer, cfg.learning_rate, cfg)
    params = dict(model.named_parameters())
    start = {name: p.detach().clone() for name, p in params.items()}
    adamw_reference = torch.nn.Parameter(start["tok_emb.weight"].clone())
    adamw = torch.optim.AdamW([adamw_reference], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              weight_decay=cfg.weight_decay)
    torch.manual_seed(1)
    grads = [{name: torch.randn_like(p) for name, p in params.items()} for _ in range(2)]
    for step in grads:
        for name, p in params.items():
            p.grad = step[name].clone()
        adamw_reference.grad = step["tok_emb.weight"].clone()
        optimizer.step()
        adamw.step()
    q, kv, hidden = 32, 16, 48  # 4 query heads and 2 key/value heads of 8
    blocks = {"attn.qkv.weight": (q, kv, kv), "ffn.gate_up.weight": (hidden, hidden),
              "attn.proj.weight": (32,), "ffn.down.weight": (32,)}
    for name, heights in blocks.items():
        name = f"blocks.0.{name}"
        expected = reference_muon(start[name], [g[name] for g in grads], 0.05, 1.0, 0.9,
                                  heights if split else (sum(heights),))
        change = (expected - start[name].double()).norm()
        error = (params[name].detach().double() - expected).norm()
        assert error < tolerance * change, (name, (error / change).item())
    # The embedding is AdamW's, stepped with the same two gradients.
    torch.testing.assert_close(params["tok_emb.weight"], adamw_reference, rtol=0, atol=1e-6)


def test_blockwise_muon_without_blocks_in_bf16_is_torch_muon_exactly():
    a, b = tiny_model(), tiny_model()
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.95)
    mine = BlockwiseMuon([p for p in a.blocks.parameters() if p.dim() == 2], row_blocks={}, **kwargs)
    theirs = torch.optim.Muon([p for p in b.blocks.parameters() if p.dim() == 2], **kwargs)
    for _ in range(2):
        for pa, pb in zip(a.blocks.parameters(), b.blocks.parameters()):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        mine.step()
        theirs.step()
    for pa, pb in zip(a.blocks.parameters(), b.blocks.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(mine.state_dict()["state"][0]["momentum_buffer"],
                       theirs.state_dict()["state"][0]["momentum_buffer"])


def test_the_grad_scaler_unscales_and_skips_for_both_optimizers():
    # fp16 training steps through torch.amp.GradScaler: it must unscale Muon's gradients too,
    # and skip both optimizers' step when a gradient is not finite.
    scaled, plain = tiny_model(), tiny_model()
    cfg = TrainingConfig(optimizer="muon")
    opt_scaled, opt_plain = build_optimizer(scaled, cfg, CPU), build_optimizer(plain, cfg, CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randint(0, 16, (2, 8))
    scaler.scale(scaled(x, x).loss).backward()
    plain(x, x).loss.backward()
    scaler.unscale_(opt_scaled)
    scaler.step(opt_scaled)
    scaler.update()
    opt_plain.step()
    for (name, a), b in zip(scaled.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    before = [p.detach().clone() for p in scaled.parameters()]
    opt_scaled.zero_grad()
    scaler.scale(scaled(x, x).loss).backward()
    scaled.blocks[0].attn.qkv.weight.grad[0, 0] = float("inf")
    scaler.step(opt_scaled)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))
    assert scaler.get_scale() == 512.0


# -- checkpoints and exact resume -----------------------------------------------------------

@pytest.mark.parametrize("split", [True, pytest.param(False, marks=pytest.mark.slow)])  # the default, fast
def test_resume_with_muon_equals_uninterrupted_run(tmp_path, split):
    muon = dict(optimizer="muon", muon_split_fused=split, lr_decay_iters=8)
    full = quiet(small_config(tmp_path / "a", max_iters=8, **muon))
    quiet(small_config(tmp_path / "b", max_iters=4, **muon))
    second = quiet(small_config(tmp_path / "b", max_iters=8, **muon), resume=True)
    assert second.losses == full.losses[4:]  # bit for bit: the same operations in the same order
    state = ckpt.read_train_state(ckpt.resolve_checkpoint(tmp_path / "b" / "out", prefer="latest"))
    assert set(state["optimizer"]) == {"adamw", "muon"}
    assert all("momentum_buffer" in s for s in state["optimizer"]["muon"]["state"].values())
    a = ckpt.read_weights(ckpt.resolve_checkpoint(tmp_path / "a" / "out", prefer="latest") / ckpt.WEIGHTS_FILE)
    b = ckpt.read_weights(ckpt.resolve_checkpoint(tmp_path / "b" / "out", prefer="latest") / ckpt.WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_an_adamw_checkpoint_resumes_with_adamw_and_is_refused_with_muon(tmp_path):
    quiet(small_config(tmp_path, max_iters=4))
    # A checkpoint written before training.optimizer existed: its config has no such key.
    directory = ckpt.resolve_checkpoint(tmp_path / "out", prefer="latest")
    config_file = directory / ckpt.CONFIG_FILE
    config_file.write_text("\n".join(line for line in config_file.read_text().splitlines()
                                     if "optimizer" not in line and "muon_" not in line))
    with pytest.raises(UserError, match="trained with training.optimizer adamw, not muon; resume with "
                                        "training.optimizer adamw, or start a new run"):
        quiet(small_config(tmp_path, max_iters=6, optimizer="muon"), resume=True)
    assert quiet(small_config(tmp_path, max_iters=6), resume=True).step == 6


# -- settings that are refused -------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    (("--training.optimizer", "sgd"), "training.optimizer must be one of 'adamw', 'muon'"),
    (("--training.muon_learning_rate", "0"), "training.muon_learning_rate must be positive"),
    (("--training.muon_weight_decay", "-0.1"), "training.muon_weight_decay must be >= 0"),
    (("--training.muon_momentum", "1.0"), r"training.muon_momentum must be in \[0, 1\)"),
    (("--training.muon_split_fused", "maybe"), "training.muon_split_fused must be true or false"),
])
def test_bad_muon_settings_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides=list(override))


def _one_line_error(run_cli, *argv) -> str:
    status, out, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, (out, err)
    return lines[0]


def test_muon_is_refused_under_fsdp_before_joining(run_cli, tmp_path, monkeypatch):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):  # rank 0 of a torchrun job
        monkeypatch.setenv(name, value)
    config = small_config(tmp_path)
    config.save(tmp_path / "config.yaml")
    line = _one_line_error(run_cli, "train", "--quiet", "--config", str(tmp_path / "config.yaml"),
                           "--training.distributed", "fsdp", "--training.optimizer", "muon")
    assert "training.optimizer muon does not work with training.distributed fsdp" in line
    assert "set training.distributed to ddp, or training.optimizer to adamw" in line


def test_muon_is_refused_where_pytorch_lacks_it(monkeypatch):
    config = Config(training=TrainingConfig(optimizer="muon"))
    optim.check_optimizer_supported(config)
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"training.optimizer muon needs torch.optim.Muon \(PyTorch >= 2.9; this "
                                        r"is .*\); upgrade PyTorch or set training.optimizer adamw"):
        optim.check_optimizer_supported(config)
    config.training.optimizer = "adamw"
    optim.check_optimizer_supported(config)


def test_muon_is_refused_with_lora(run_cli, tmp_path):
    line = _one_line_error(run_cli, "finetune", "--quiet", "--checkpoint", str(tmp_path / "base"),
                           "--data.path", str(tmp_path / "input.txt"), "--training.optimizer", "muon")
    assert line == ("error: training.optimizer muon trains whole weight matrices, not LoRA adapters; set "
                    "training.optimizer adamw for LoRA, or train all the weights without LoRA")


# -- DDP ------------------------------------------------------------------------------------------

@pytest.mark.slow  # torchrun
def test_ddp_with_muon_equals_one_process_accumulating_the_same_batches(tmp_path):
    # Two ranks of batch 4 against one process of batch 4 x accumulation 2: the same rows, and
    # the same sum of two half-batch gradients. (Against one batch of 8, the gradients differ in
    # the last bits, and Muon's bf16 Newton-Schulz turns that into weights ~3% apart.)
    from .test_distributed import TOL, Workspace, curve, weights

    ws = Workspace(tmp_path)
    muon = ("--training.optimizer", "muon", "--training.muon_split_fused", "true")
    single = ws.single("single", *muon, "--training.batch_size", "4", "--training.gradient_accumulation_steps", "2")
    ws.launch("ddp", *muon)
    ddp_curve, single_curve = curve(tmp_path / "ddp", "train_loss"), curve(single, "train_loss")
    assert ddp_curve.keys() == single_curve.keys() and len(ddp_curve) == 6
    assert all(abs(ddp_curve[i] - single_curve[i]) <= TOL for i in ddp_curve), (ddp_curve, single_curve)
    ddp_weights, single_weights = weights(tmp_path / "ddp"), weights(single)
    assert ddp_weights.keys() == single_weights.keys()
    for name, tensor in ddp_weights.items():
        torch.testing.assert_close(tensor, single_weights[name], rtol=0, atol=TOL, msg=name)
