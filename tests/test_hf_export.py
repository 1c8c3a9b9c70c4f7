"""``mini-transformer export --format hf``: transformers loads the directory and computes what we do.

Tiny random models of ours (weights, norms and biases all perturbed, so that a misplaced row or
a missing bias shows) are saved as checkpoints, exported through the CLI, loaded with
``AutoModelForCausalLM`` in fp32 and compared: logits within 1e-4, 30 greedy tokens identical.
LoRA runs export merged or as a PEFT adapter; quantized checkpoints are refused or dequantized;
every refusal is one line with exit status 2 and leaves no directory behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mini_transformer.checkpoint import load_model, load_tokenizer_from, save_inference_checkpoint
from mini_transformer.config import Config, ModelConfig
from mini_transformer.generation import generate
from mini_transformer.lora import apply_lora, lora_layers, merge_lora, save_adapter
from mini_transformer.model import Transformer
from mini_transformer.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n" * 4
PROMPT = "ROMEO: But soft"
ATOL = 1e-4
NEW_TOKENS = 30


def make_tokenizer(kind: str):
    if kind == "char":
        return CharTokenizer.from_text(TEXT)
    if kind == "byte":
        return ByteTokenizer()
    return BPETokenizer.train([TEXT], vocab_size=300)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and O(0.1-1): norms away from 1, biases away from 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5 if param.dim() > 1 else 0.1 * noise)


def make_checkpoint(directory: Path, *, norm="rmsnorm", n_kv_heads=None, tie=True, bias=False, tokenizer="char",
                    lora_targets=None, seed=0, extra_meta=None) -> tuple[Path, Config]:
    tok = make_tokenizer(tokenizer)
    model_config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2,
                               block_size=64, dropout=0.0, ffn_hidden_size=64, norm=norm, norm_eps=1e-6,
                               rope_base=5000.0, tie_embeddings=tie, bias=bias)
    config = Config(model=model_config)
    torch.manual_seed(seed)
    model = Transformer(model_config)
    perturb(model, seed)
    if lora_targets:
        a = config.advanced
        a.use_lora, a.lora_rank, a.lora_alpha, a.lora_targets = True, 4, 12.0, list(lora_targets)
        apply_lora(model, rank=4, alpha=12.0, targets=lora_targets)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # B starts at zero: give the adapters something to do
            for layer in lora_layers(model).values():
                layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator))
    save_inference_checkpoint(directory, model, config, tok, extra_meta=extra_meta)
    return directory, config


def export(run_cli, checkpoint: Path, out: Path, *flags: str) -> str:
    status, stdout, stderr = run_cli("export", "--checkpoint", str(checkpoint), "--format", "hf", "--out", str(out),
                                     *flags)
    assert status == 0, stderr
    return stdout


def hf_model(directory: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def prompt_ids(checkpoint: Path) -> list[int]:
    return load_tokenizer_from(checkpoint).encode(PROMPT)


def max_logit_difference(ours: torch.nn.Module, theirs: torch.nn.Module, ids: list[int]) -> float:
    batch = torch.tensor([ids, list(reversed(ids))])
    with torch.no_grad():
        return (ours(batch).logits - theirs(batch).logits).abs().max().item()


def hf_greedy(model, ids: list[int]) -> list[int]:
    model.generation_config.eos_token_id = None  # ours runs all 30 tokens; so must theirs
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(ids):].tolist()


# -- the architectures ---------------------------------------------------------------------------

CASES = {
    "llama-mha-tied-char": dict(norm="rmsnorm", n_kv_heads=None, tie=True, bias=False, tokenizer="char"),
    "llama-gqa-untied-bias-byte": dict(norm="rmsnorm", n_kv_heads=2, tie=False, bias=True, tokenizer="byte"),
    "llama-mqa-tied-bias-bpe": dict(norm="rmsnorm", n_kv_heads=1, tie=True, bias=True, tokenizer="bpe"),
    "stablelm-gqa-tied-bpe": dict(norm="layernorm", n_kv_heads=2, tie=True, tokenizer="bpe"),
    "stablelm-mha-untied-char": dict(norm="layernorm", n_kv_heads=None, tie=False, tokenizer="char"),
    "stablelm-mqa-untied-byte": dict(norm="layernorm", n_kv_heads=1, tie=False, tokenizer="byte"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_and_computes_the_same(run_cli, tmp_path, case):
    settings = CASES[case]
    checkpoint, config = make_checkpoint(tmp_path / "ckpt", **settings)
    out = tmp_path / "hf"
    stdout = export(run_cli, checkpoint, out)
    expected_class = "LlamaForCausalLM" if settings["norm"] == "rmsnorm" else "StableLmForCausalLM"
    assert f"{expected_class} written to {out}" in stdout
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}

    ours = load_model(checkpoint).eval()
    theirs = hf_model(out)
    assert type(theirs).__name__ == expected_class
    hf_config = theirs.config
    assert (hf_config.num_key_value_heads, hf_config.tie_word_embeddings) == (config.model.kv_heads, settings["tie"])
    assert hf_config.rope_parameters["rope_theta"] == 5000.0
    assert hf_config.max_position_embeddings == config.model.block_size
    ids = prompt_ids(checkpoint)
    assert max_logit_difference(ours, theirs, ids) < ATOL
    ours_greedy = generate(ours, ids, max_new_tokens=NEW_TOKENS, temperature=0)
    assert len(ids) + NEW_TOKENS <= config.model.block_size  # no sliding window on our side
    assert hf_greedy(theirs, ids) == ours_greedy

    # The tokenizer's own round trips are tests/test_hf_tokenizer.py's; here: the export carries it.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_tokenizer_from(checkpoint)
    assert hf_tok.model_max_length == config.model.block_size
    assert hf_tok(PROMPT)["input_ids"] == ours_tok.encode(PROMPT)
    assert hf_tok.decode(ours_tok.encode(TEXT)) == TEXT


def test_config_carries_the_token_ids_and_sampling_defaults(run_cli, tmp_path):
    checkpoint, _ = make_checkpoint(tmp_path / "ckpt", tokenizer="byte")
    export(run_cli, checkpoint, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (256, 256)  # byte: <|endoftext|>
    assert config["rms_norm_eps"] == 1e-6 and config["head_dim"] == 8
    assert generation["eos_token_id"] == 256 and generation["do_sample"] is True
    assert generation["temperature"] == 0.8 and generation["top_k"] == 0  # not HF's default 50
    char_ckpt, _ = make_checkpoint(tmp_path / "char")
    export(run_cli, char_ckpt, tmp_path / "hf-char")
    config = json.loads((tmp_path / "hf-char" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None  # not Llama's 1 and 2


@pytest.mark.parametrize("recorded, written", [(256, 256), (16, 64)])
def test_an_imported_models_context_is_written_back(run_cli, tmp_path, recorded, written):
    # An imported model trained on shorter windows (block_size 64) keeps the context its
    # checkpoint.json records; never less than block_size.
    checkpoint, _ = make_checkpoint(tmp_path / "ckpt", extra_meta={"max_position_embeddings": recorded})
    export(run_cli, checkpoint, tmp_path / "hf")
    theirs = hf_model(tmp_path / "hf")
    assert theirs.config.max_position_embeddings == written
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").model_max_length == written
    assert max_logit_difference(load_model(checkpoint).eval(), theirs, prompt_ids(checkpoint)) < ATOL


# -- LoRA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, n_kv_heads, targets", [
    ("rmsnorm", 2, ("attention", "ffn")),
    ("layernorm", 1, ("attention",)),
])
def test_lora_run_exports_merged_and_as_a_peft_adapter(run_cli, tmp_path, norm, n_kv_heads, targets):
    checkpoint, _ = make_checkpoint(tmp_path / "run", norm=norm, n_kv_heads=n_kv_heads, lora_targets=targets)
    lora_model = load_model(checkpoint).eval()
    assert lora_layers(lora_model)
    ids = prompt_ids(checkpoint)

    stdout = export(run_cli, checkpoint, tmp_path / "merged")
    assert "merged" in stdout
    merged_ours = merge_lora(load_model(checkpoint)).eval()
    merged_theirs = hf_model(tmp_path / "merged")
    assert max_logit_difference(merged_ours, merged_theirs, ids) < ATOL
    assert max_logit_difference(lora_model, merged_theirs, ids) < ATOL

    stdout = export(run_cli, checkpoint, tmp_path / "peft", "--adapter-format", "peft")
    adapter = tmp_path / "peft" / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    expected = {"q_proj", "k_proj", "v_proj", "o_proj"} | ({"gate_proj", "up_proj", "down_proj"}
                                                         if "ffn" in targets else set())
    assert set(adapter_config["target_modules"]) == expected
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 12)
    base = hf_model(tmp_path / "peft")
    with torch.no_grad():  # the base export is the base: the adapters are not in it
        plain = Transformer(lora_model.config)
        plain.load_state_dict({k.replace(".base.", "."): v for k, v in lora_model.state_dict().items()
                               if ".lora_" not in k})
    assert max_logit_difference(plain.eval(), base, ids) < ATOL
    with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert max_logit_difference(lora_model, with_adapter, ids) < ATOL


def test_separate_adapter_directory_exports_as_peft_to_its_own_directory(run_cli, tmp_path):
    run, config = make_checkpoint(tmp_path / "run", n_kv_heads=2, lora_targets=("attention", "ffn"))
    lora_model = load_model(run)
    base_dir = tmp_path / "base"
    save_adapter(tmp_path / "adapter", lora_model)
    base = Transformer(config.model)
    base.load_state_dict({k.replace(".base.", "."): v for k, v in lora_model.state_dict().items() if ".lora_" not in k})
    plain_config = Config(model=config.model)
    save_inference_checkpoint(base_dir, base, plain_config, load_tokenizer_from(run))
    export(run_cli, base_dir, tmp_path / "hf", "--adapter", str(tmp_path / "adapter"), "--adapter-format", "peft",
           "--adapter-out", str(tmp_path / "hf-adapter"))
    assert not (tmp_path / "hf" / "adapter").exists()
    with_adapter = peft.PeftModel.from_pretrained(hf_model(tmp_path / "hf"), tmp_path / "hf-adapter").eval()
    assert max_logit_difference(lora_model.eval(), with_adapter, prompt_ids(run)) < ATOL


# -- quantized checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode, flags", [("int8", ()), ("int4", ("--embedding",))])  # int4: the tied table too
def test_quantized_checkpoint_is_refused_or_dequantized(run_cli, tmp_path, mode, flags):
    checkpoint, _ = make_checkpoint(tmp_path / "ckpt", n_kv_heads=2)
    status, _, stderr = run_cli("quantize", "--checkpoint", str(checkpoint), "--mode", mode, "--group_size", "32",
                                *flags, "--out", str(tmp_path / "q"))
    assert status == 0, stderr
    status, _, stderr = run_cli("export", "--checkpoint", str(tmp_path / "q"), "--format", "hf",
                                "--out", str(tmp_path / "hf"))
    assert status == 2 and "--dequantize" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()

    stdout = export(run_cli, tmp_path / "q", tmp_path / "hf", "--dequantize")
    assert "dequantized" in stdout and "float32" in stdout
    quantized = load_model(tmp_path / "q").eval()
    theirs = hf_model(tmp_path / "hf")
    assert theirs.dtype == torch.float32
    assert max_logit_difference(quantized, theirs, prompt_ids(checkpoint)) < ATOL


# -- refusals ---------------------------------------------------------------------------------------

def _refused(run_cli, tmp_path, *argv: str, says: str) -> None:
    status, stdout, stderr = run_cli("export", *argv)
    assert status == 2, (stdout, stderr)
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert says in stderr, stderr


def test_refusals_are_one_line_and_write_nothing(run_cli, tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt")
    hf = str(tmp_path / "hf")
    layernorm_bias, _ = make_checkpoint(tmp_path / "ln-bias", norm="layernorm", bias=True)
    _refused(run_cli, tmp_path, "--checkpoint", str(layernorm_bias), "--out", hf,
             says="norm: rmsnorm (LlamaForCausalLM")  # names what would export
    _refused(run_cli, tmp_path, "--checkpoint", str(ckpt), "--out", hf, "--adapter_format", "peft",
             says="no LoRA adapter")
    _refused(run_cli, tmp_path, "--checkpoint", str(ckpt), "--out", hf, "--adapter_out", str(tmp_path / "a"),
             says="--adapter_format peft")
    _refused(run_cli, tmp_path, "--checkpoint", str(tmp_path / "missing"), "--out", hf, says="not found")
    _refused(run_cli, tmp_path, "--checkpoint", str(ckpt), "--out", str(ckpt / "hf"), says="overlaps the checkpoint")
    assert not (tmp_path / "hf").exists() and not (ckpt / "hf").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    _refused(run_cli, tmp_path, "--checkpoint", str(ckpt), "--out", str(tmp_path / "notes"),
             says="not written by export")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]
    # A downloaded model looks like an export (config.json, shards, a README) but is not one.
    downloaded = tmp_path / "SmolLM-135M"
    downloaded.mkdir()
    for name, text in [("config.json", '{"architectures": ["LlamaForCausalLM"]}'),
                       ("model-00001-of-00002.safetensors", "weights"), ("README.md", "model card")]:
        (downloaded / name).write_text(text)
    _refused(run_cli, tmp_path, "--checkpoint", str(ckpt), "--out", str(downloaded), says="not written by export")
    assert sorted(p.name for p in downloaded.iterdir()) == ["README.md", "config.json",
                                                             "model-00001-of-00002.safetensors"]


def test_a_failed_export_leaves_nothing_and_a_new_one_replaces_an_old_export(run_cli, tmp_path, monkeypatch):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt")
    export(run_cli, ckpt, tmp_path / "hf")
    first = (tmp_path / "hf" / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mini_transformer.interop.hf.export.save_hf_tokenizer", broken)
    with pytest.raises(OSError):
        run_cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "new"))
    with pytest.raises(OSError):
        run_cli("export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary directories left
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == first

    other, _ = make_checkpoint(tmp_path / "other", seed=1)
    monkeypatch.undo()
    export(run_cli, other, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != first
