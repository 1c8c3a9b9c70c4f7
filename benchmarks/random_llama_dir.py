"""Write a Hugging Face Llama directory with random weights, shard by shard, without holding the
model: for measuring `mini-transformer import` and fine-tuning at real shapes offline.

    python benchmarks/random_llama_dir.py /tmp/llama-1b                      # TinyLlama-1.1B shape
    python benchmarks/random_llama_dir.py /tmp/smollm --shape smollm-135m    # SmolLM-135M shape

Writes config.json, model-0000k-of-0000n.safetensors with model.safetensors.index.json, and a
byte-level BPE tokenizer.json (``--tokenizer-text``: trained on that file, e.g. Tiny
Shakespeare, to ``--tokenizer-vocab`` tokens; else a token set of 300). The weights are
N(0, 0.02), the norms ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied
    "tinyllama-1b": (2048, 22, 32, 4, 5632, 32000, False),
    "smollm-135m": (576, 30, 9, 3, 1536, 49152, True),
}


def write_tokenizer(out: Path, text_file: str | None, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if text_file:
        tokenizer.train([text_file], trainer)
    else:
        tokenizer.train_from_iterator(["hello world, a random model"] * 10, trainer)
    tokenizer.save(str(out / "tokenizer.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1b")
    parser.add_argument("--layers-per-shard", type=int, default=6)
    parser.add_argument("--tokenizer-text", help="train the tokenizer on this text file")
    parser.add_argument("--tokenizer-vocab", type=int, default=300)
    args = parser.parse_args()
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[args.shape]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rnd(kv * head_dim, hidden),
                p + "self_attn.v_proj.weight": rnd(kv * head_dim, hidden),
                p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
                p + "mlp.down_proj.weight": rnd(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden),
                p + "post_attention_layernorm.weight": torch.ones(hidden)}

    groups = [range(i, min(i + args.layers_per_shard, layers)) for i in range(0, layers, args.layers_per_shard)]
    weight_map: dict[str, str] = {}
    total = 0
    for s, group in enumerate(groups):
        tensors: dict[str, torch.Tensor] = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = rnd(vocab, hidden)
        for i in group:
            tensors.update(layer(i))
        if s == len(groups) - 1:
            tensors["model.norm.weight"] = torch.ones(hidden)
            if not tied:
                tensors["lm_head.weight"] = rnd(vocab, hidden)
        name = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": tied, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1}, indent=1))
    write_tokenizer(out, args.tokenizer_text, args.tokenizer_vocab)
    print(f"{out}: {len(weight_map)} tensors, {total / 1e9:.2f} GB, {total // 4 / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
