"""GGUF, llama.cpp's model file: export a checkpoint as one ``.gguf`` file that llama.cpp (and the
tools built on it: ``llama-cli``, ``llama-server``, ollama) runs with the same weights and the same
tokenization as ours.

Modules: :mod:`.layout` (architecture, metadata and the weight map, reusing the Hugging Face
layout), :mod:`.vocab` (our tokenizers as llama.cpp's byte-level BPE vocabulary), :mod:`.export`
(the writer, with the ``gguf`` package), :mod:`.llamacpp` (running a file with
``llama-cpp-python``: the checks and the benchmark peer).
"""

# Tensor types of an export (the ``--outtype`` choices). Here, not in .export, so that the command
# line's parser has them without importing torch or gguf.
OUTTYPES = ("f32", "f16", "q8_0")
