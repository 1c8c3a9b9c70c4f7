"""Perplexity of a trained checkpoint's GGUF exports in llama.cpp (f32, f16, q8_0) next to ours (fp32, int8).

Every variant is scored on the whole validation split of the data the checkpoint was trained on,
in the same non-overlapping windows of ``block_size`` tokens (the exact pass at the end of
training): ours with ``exact_val_loss`` of ``quantized_checkpoint.py``, llama.cpp with
``llama-cpp-python`` (``logits_all``), each window from an empty context. Needs the ``llamacpp``
extra. Prints a markdown table.

    .venv/bin/python benchmarks/gguf_perplexity.py out-shakespeare-char-cpu
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantized_checkpoint import exact_val_loss  # noqa: E402  (this directory's script)

from mini_transformer.checkpoint import load_model, read_config, resolve_checkpoint  # noqa: E402
from mini_transformer.data import prepare_dataset  # noqa: E402
from mini_transformer.interop.gguf import OUTTYPES, llamacpp  # noqa: E402
from mini_transformer.interop.gguf.export import export_gguf  # noqa: E402
from mini_transformer.quantize import quantize_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    directory = resolve_checkpoint(args.checkpoint)
    config = read_config(directory)
    data = prepare_dataset(config.data, progress=False)
    block = config.model.block_size
    rows = []
    model = load_model(directory, "cpu", config).eval()
    rows.append(("ours", "fp32", "fp32", exact_val_loss(model, data.val, block, torch.float32), None))
    quantize_model(model, "int8", 64)  # as the quantize command does; its kernels take bf16 activations
    rows.append(("ours", "int8 (per channel)", "bf16", exact_val_loss(model, data.val, block, torch.bfloat16), None))
    del model
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in OUTTYPES:
            path = export_gguf(directory, Path(tmp) / f"{outtype}.gguf", outtype=outtype).path
            llm = llamacpp.load_llama(path, n_ctx=block, threads=args.threads, logits_all=True)
            # Over our vocabulary (a char model's added end-of-text token would take some probability).
            loss = llamacpp.window_loss(llm, data.val, block, vocab_size=config.model.vocab_size)
            rows.append(("llama.cpp", outtype, "f32", loss, path.stat().st_size))
            if outtype == "f32" and llm.n_vocab() > config.model.vocab_size:
                rows.append(("llama.cpp, all tokens", outtype, "f32", llamacpp.window_loss(llm, data.val, block),
                             path.stat().st_size))
            llm.close()
    base = rows[0][3]
    print(f"checkpoint {directory}, {len(data.val):,} val tokens in windows of {block}\n")
    print("| runtime | weights | activations | file | val loss | val perplexity | change vs our fp32 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for runtime, weights, acts, loss, size in rows:
        file = f"{size / 2**20:.2f} MiB" if size else ""
        print(f"| {runtime} | {weights} | {acts} | {file} | {loss:.4f} | {math.exp(loss):.3f} | "
              f"{(math.exp(loss) / math.exp(base) - 1) * 100:+.2f}% |")


if __name__ == "__main__":
    main()
