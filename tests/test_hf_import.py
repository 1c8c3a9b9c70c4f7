"""Import of Hugging Face Llama-family directories: random ``transformers`` models built here,
imported through the CLI, compared with ``transformers`` itself (logits within 1e-4 in fp32,
greedy tokens identical); export -> import gives the same bytes; every refusal is one line with
exit status 2; ``training.init_from`` takes an HF directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.utils.logging.disable_progress_bar()  # its bars would mix with the CLI's one-line errors

from mini_transformer.checkpoint import (load_for_inference, load_model, read_config, read_provenance,  # noqa: E402
                                         read_weights, resolve_checkpoint)
from mini_transformer.config import load_config  # noqa: E402
from mini_transformer.generation import generate  # noqa: E402
from mini_transformer.interop.hf.importer import HFWeights, is_hf_directory  # noqa: E402
from mini_transformer.interop.hf.layout import from_hf_state_dict  # noqa: E402
from mini_transformer.lora import load_adapter  # noqa: E402
from mini_transformer.safetensors_io import read_safetensors  # noqa: E402
from mini_transformer.tokenizer import load_tokenizer  # noqa: E402
from mini_transformer.training import train  # noqa: E402
from mini_transformer.weights import architecture  # noqa: E402

TEXT = ("Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, "
        "or to take arms against a sea of troubles, and by opposing end them. ") * 20
VOCAB = 300
MAX_DIFF: dict[str, float] = {}  # largest logit difference of each round trip, printed at the end


def write_tokenizer(directory: Path) -> tokenizers.Tokenizer:
    """A small byte-level BPE ``tokenizer.json`` (and the config naming its specials)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return tok


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights away from ones, so a mixed-up norm shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)


def make_llama(directory: Path, *, tied: bool = False, bias: bool = False, shard: bool = False,
               **config) -> transformers.LlamaForCausalLM:
    """A random tiny LlamaForCausalLM (GQA 4/2 heads) saved with its tokenizer in ``directory``."""
    torch.manual_seed(0)
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tied,
                    attention_bias=bias, mlp_bias=bias, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    settings.update(config)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    _randomize_norms(model)
    if bias:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.02)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, **({"max_shard_size": "100KB"} if shard else {}))
    write_tokenizer(directory)
    return model


def make_stablelm(directory: Path) -> transformers.StableLmForCausalLM:
    """A random tiny StableLmForCausalLM of the form our export writes (full rotary, zero LN biases)."""
    torch.manual_seed(1)
    config = transformers.StableLmConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128, layer_norm_eps=1e-5, partial_rotary_factor=1.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.StableLmForCausalLM(config).eval()
    _randomize_norms(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return model


def import_cli(run_cli, hf_dir: Path, out: Path, *extra: str) -> Path:
    status, stdout, stderr = run_cli("import", "--hf", str(hf_dir), "--out", str(out), *extra)
    assert status == 0, stderr
    assert "written to" in stdout
    return out


def compare(hf_model, ckpt: Path, label: str) -> None:
    """Our logits against HF's within 1e-4 (fp32), and 30 greedy tokens identical."""
    model, _, _ = load_for_inference(ckpt)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids).logits
    diff = (expected - got).abs().max().item()
    MAX_DIFF[label] = max(MAX_DIFF.get(label, 0.0), diff)
    print(f"{label}: largest logit difference {diff:.2e}")
    assert diff < 1e-4
    prompt = ids[0, :8]
    with torch.no_grad():
        hf_tokens = hf_model.generate(prompt[None], max_new_tokens=30, min_new_tokens=30, do_sample=False)[0, 8:]
    ours = generate(model, prompt.tolist(), max_new_tokens=30, temperature=0)
    assert ours == hf_tokens.tolist()


# -- HF -> ours -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_import_matches_transformers(tmp_path, run_cli, tied):
    hf_model = make_llama(tmp_path / "hf", tied=tied)
    ckpt = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt")
    config = read_config(ckpt).model
    assert (config.norm, config.n_heads, config.kv_heads, config.tie_embeddings) == ("rmsnorm", 4, 2, tied)
    assert (config.rope_base, config.norm_eps, config.block_size, config.hidden_size) == (50000.0, 1e-5, 128, 160)
    compare(hf_model, ckpt, f"HF Llama ({'tied' if tied else 'untied'}) -> import")
    # The tokenizer travels with the checkpoint and encodes as the directory's tokenizer.json does.
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    ours = load_tokenizer(ckpt)
    assert ours.encode("to take arms") == reference.encode("to take arms", add_special_tokens=False).ids
    assert ours.eos_id == reference.token_to_id("</s>")


def test_a_qwen_sized_vocabulary_imports(tmp_path, run_cli):
    hf_model = make_llama(tmp_path / "hf", tied=True, vocab_size=151_936)
    ckpt = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt")
    assert read_config(ckpt).model.vocab_size == 151_936
    compare(hf_model, ckpt, "HF Llama (vocab 151,936) -> import")


def test_sharded_llama_with_biases_imports(tmp_path, run_cli):
    hf_model = make_llama(tmp_path / "hf", bias=True, shard=True)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ckpt = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt")
    assert read_config(ckpt).model.bias is True
    compare(hf_model, ckpt, "HF Llama (sharded, biases) -> import")


def test_stablelm_import_matches_transformers(tmp_path, run_cli):
    hf_model = make_stablelm(tmp_path / "hf")
    ckpt = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt")
    config = read_config(ckpt).model
    assert (config.norm, config.bias, config.kv_heads) == ("layernorm", False, 1)
    compare(hf_model, ckpt, "HF StableLM -> import")


def test_dtype_and_block_size_options(tmp_path, run_cli):
    make_llama(tmp_path / "hf")
    ckpt = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt", "--dtype", "bf16", "--block_size", "32")
    weights = read_safetensors(ckpt / "model.safetensors", "weights", "")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert read_config(ckpt).model.block_size == 32
    # The model's own context is recorded, for export to write back.
    assert read_provenance(ckpt) == {"imported_from": str(tmp_path / "hf"), "hf_architecture": "LlamaForCausalLM",
                                     "max_position_embeddings": 128}


@pytest.mark.parametrize("block_size, says", [("129", "longer than the model's context"), ("0", "must be positive")])
def test_block_size_beyond_the_models_context_is_refused(tmp_path, run_cli, saved_llama, block_size, says):
    status, _, stderr = run_cli("import", "--hf", str(saved_llama), "--out", str(tmp_path / "ckpt"),
                                "--block_size", block_size)
    assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"--block_size {block_size}" in stderr or "--block_size must" in stderr, stderr
    assert says in stderr, stderr
    assert not (tmp_path / "ckpt").exists()


def test_weights_are_written_with_the_usual_file_mode(tmp_path, run_cli):
    # safetensors streams the file itself (no bytes copy of the weights) and makes it owner-only.
    import os

    make_llama(tmp_path / "hf")
    ckpt = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert (ckpt / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not list(ckpt.glob(".*.tmp"))


def test_import_is_an_inference_checkpoint_generate_runs(tmp_path, run_cli):
    make_llama(tmp_path / "hf")
    ckpt = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt")
    status, stdout, stderr = run_cli("generate", "--checkpoint", str(ckpt), "--prompt", "to be", "--max_tokens", "5",
                                     "--temperature", "0")
    assert status == 0, stderr


# -- ours -> HF -> ours -----------------------------------------------------------------------------

# MHA as the default writes it (n_kv_heads unset): an import gives the defaults' form, so that the
# architecture, and with it the fingerprint adapters are checked against, comes back equal.
@pytest.mark.parametrize("norm,kv_heads,tied", [("rmsnorm", 2, False), ("layernorm", 1, True), ("rmsnorm", None, True)])
def test_export_then_import_gives_the_same_bytes(tmp_path, run_cli, norm, kv_heads, tied):
    from mini_transformer.checkpoint import save_inference_checkpoint
    from mini_transformer.model import Transformer
    from mini_transformer.tokenizer import ByteTokenizer

    config = load_config(overrides=["--model.d_model", "64", "--model.n_heads", "4", "--model.n_layers", "2",
                                     "--model.norm", norm, "--model.tie_embeddings", str(tied).lower(),
                                     "--model.vocab_size", "257", "--model.block_size", "64",
                                     "--model.rope_base", "20000"])
    config.model.n_kv_heads = kv_heads
    torch.manual_seed(3)
    model = Transformer(config.model)
    _randomize_norms(model)
    original = save_inference_checkpoint(tmp_path / "ours", model, config, ByteTokenizer())
    status, _, stderr = run_cli("export", "--checkpoint", str(original), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert status == 0, stderr
    back = import_cli(run_cli, tmp_path / "hf", tmp_path / "back")
    before = read_safetensors(original / "model.safetensors", "weights", "")
    after = read_safetensors(back / "model.safetensors", "weights", "")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and before[name].shape == after[name].shape
        assert before[name].view(torch.uint8).equal(after[name].view(torch.uint8)), name
    # The same architecture (dropout is a training setting, 0 after an import).
    assert architecture(read_config(back).model) == architecture(read_config(original).model)
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        diff = (load_model(original).eval()(ids).logits - load_model(back).eval()(ids).logits).abs().max().item()
    MAX_DIFF["export -> import"] = max(MAX_DIFF.get("export -> import", 0.0), diff)
    assert diff == 0.0


# -- refusals ---------------------------------------------------------------------------------------

def _edit_config(**changes):
    def edit(directory: Path) -> None:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))
    return edit


def _pytorch_bin_only(directory: Path) -> None:
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")


def _no_tokenizer(directory: Path) -> None:
    (directory / "tokenizer.json").unlink()


def _stablelm(**changes):
    def edit(directory: Path) -> None:
        _edit_config(architectures=["StableLmForCausalLM"], model_type="stablelm", layer_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **changes)(directory)
    return edit


REFUSALS = {
    "rope_scaling": (_edit_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    "rope_type llama3": (_edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
                         "rope_type"),
    "sliding_window": (_edit_config(sliding_window=64), "sliding_window"),
    "hidden_act gelu": (_edit_config(hidden_act="gelu"), "hidden_act"),
    "attention_bias only": (_edit_config(attention_bias=True), "attention_bias"),
    "mlp_bias only": (_edit_config(mlp_bias=True), "mlp_bias"),
    "head_dim": (_edit_config(head_dim=32), "head_dim"),
    "partial rotary": (_edit_config(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "quantized": (_edit_config(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
    "unknown architecture": (_edit_config(architectures=["MistralForCausalLM"], model_type="mistral"),
                             "MistralForCausalLM"),
    "model_type mismatch": (_edit_config(model_type="mistral"), "model_type"),
    "layer_types": (_edit_config(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    "stablelm partial rotary by default": (_stablelm(), "partial_rotary_factor"),
    "stablelm qk_layernorm": (_stablelm(partial_rotary_factor=1.0, qk_layernorm=True), "qk_layernorm"),
    "stablelm parallel residual": (_stablelm(partial_rotary_factor=1.0, use_parallel_residual=True),
                                   "use_parallel_residual"),
    "stablelm qkv bias": (_stablelm(partial_rotary_factor=1.0, use_qkv_bias=True), "use_qkv_bias"),
    "tie setting": (_edit_config(tie_word_embeddings="yes"), "tie_word_embeddings"),
    "tied, with its own head": (_edit_config(tie_word_embeddings=True), "tie_word_embeddings"),
    # One line naming the weight (checkpoint.load_weights_into's check).
    "weights of another shape": (_edit_config(intermediate_size=192), "ffn.gate_up.weight has shape (320, 64)"),
    "pytorch_model.bin only": (_pytorch_bin_only, "safetensors"),
    "missing tokenizer.json": (_no_tokenizer, "tokenizer.json"),
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    make_llama(directory)
    return directory


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_with_status_2(tmp_path, run_cli, saved_llama, case):
    edit, needle = REFUSALS[case]
    directory = tmp_path / "hf"
    shutil.copytree(saved_llama, directory)
    edit(directory)
    status, stdout, stderr = run_cli("import", "--hf", str(directory), "--out", str(tmp_path / "ckpt"))
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert needle in stderr, stderr
    assert not (tmp_path / "ckpt").exists()


def test_stablelm_with_nonzero_layernorm_bias_is_refused(tmp_path, run_cli):
    from safetensors.torch import load_file, save_file

    make_stablelm(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    weights = load_file(path)
    weights["model.layers.1.input_layernorm.bias"] = torch.full((64,), 0.1)
    save_file(weights, path, metadata={"format": "pt"})
    status, _, stderr = run_cli("import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert "input_layernorm.bias" in stderr


def test_missing_directory_is_one_line(tmp_path, run_cli):
    status, _, stderr = run_cli("import", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ckpt"))
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert "nowhere" in stderr


# -- training.init_from -----------------------------------------------------------------------------

def _train_overrides(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "input.txt").write_text(TEXT)
    return ["--model.block_size", "32", "--training.batch_size", "2", "--training.warmup_iters", "0",
            "--training.eval_iters", "1", "--training.dtype", "fp32", "--training.device", "cpu",
            "--training.tensorboard", "false", "--training.out_dir", str(tmp_path / "out"),
            "--data.path", str(tmp_path / "input.txt"), "--data.cache_dir", str(tmp_path / "cache"), *extra]


def _exported_context(run_cli, checkpoint: Path, out: Path) -> tuple[int, int]:
    """``(max_position_embeddings, model_max_length)`` of the export of ``checkpoint``."""
    status, _, stderr = run_cli("export", "--checkpoint", str(checkpoint), "--out", str(out))
    assert status == 0, stderr
    config = json.loads((out / "config.json").read_text())
    return config["max_position_embeddings"], transformers.AutoTokenizer.from_pretrained(out).model_max_length


def test_init_from_an_hf_directory_trains(tmp_path):
    make_llama(tmp_path / "hf")
    assert is_hf_directory(tmp_path / "hf") and not is_hf_directory(tmp_path)
    # One step too small to move an fp32 weight (no weight decay): the saved weights are the start.
    config = load_config(overrides=_train_overrides(
        tmp_path, "--training.init_from", str(tmp_path / "hf"), "--training.max_iters", "1",
        "--training.eval_interval", "1", "--training.learning_rate", "1e-30", "--training.weight_decay", "0"))
    result = train(config, progress=False, log=None)
    assert result.step == 1 and all(torch.isfinite(torch.tensor(result.losses)))
    trained = read_config(result.checkpoint).model
    # The directory's architecture, with the run's (shorter) context.
    assert (trained.norm, trained.kv_heads, trained.vocab_size, trained.block_size) == ("rmsnorm", 2, VOCAB, 32)
    # It started from the HF weights, as the layout maps them.
    expected = from_hf_state_dict(HFWeights(tmp_path / "hf"), trained)
    saved = read_weights(result.checkpoint / "model.safetensors")
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
    # The directory's own context is kept (the run trained on 32-token windows of a 128-token model).
    assert read_provenance(result.checkpoint)["max_position_embeddings"] == 128


def test_finetune_lora_on_an_hf_directory(tmp_path, run_cli):
    make_llama(tmp_path / "hf")
    status, _, stderr = run_cli("finetune", "--checkpoint", str(tmp_path / "hf"), "--quiet",
                                *_train_overrides(tmp_path, "--training.max_iters", "2",
                                                  "--training.eval_interval", "2"))
    assert status == 0, stderr
    # The adapter loads onto the checkpoint that `import` gives (at the run's context: the adapter
    # records its base's block_size), and computes what the run's checkpoint does.
    imported = import_cli(run_cli, tmp_path / "hf", tmp_path / "ckpt", "--block_size", "32")
    model = load_adapter(tmp_path / "out" / "adapter", load_model(imported)).eval()
    run = load_model(resolve_checkpoint(tmp_path / "out", prefer="best")).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, run(ids).logits)
    # Export writes the model's own context back, not the 32 tokens the run trained on: from the
    # run, the import and a quantized copy of the import (derived checkpoints keep the record).
    assert _exported_context(run_cli, tmp_path / "out", tmp_path / "hf-run") == (128, 128)
    assert _exported_context(run_cli, imported, tmp_path / "hf-import") == (128, 128)
    status, _, stderr = run_cli("quantize", "--checkpoint", str(imported), "--mode", "int8", "--out",
                                str(tmp_path / "q"))
    assert status == 0, stderr
    assert read_provenance(tmp_path / "q")["max_position_embeddings"] == 128


def teardown_module(module) -> None:
    for label, diff in sorted(MAX_DIFF.items()):
        print(f"largest logit difference, {label}: {diff:.2e}")
