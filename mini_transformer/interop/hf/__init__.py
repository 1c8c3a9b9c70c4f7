"""Hugging Face ``transformers`` interop: export a checkpoint as a directory that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load without custom code, and import a Llama-family
directory as a checkpoint of ours.

Modules: :mod:`.layout` (the config and weight-name map between the two), :mod:`.tokenizer`
(``tokenizer.json`` both ways), :mod:`.export`, :mod:`.importer`.
"""

# How export writes a LoRA adapter: folded into the weights, or as a PEFT adapter directory. Here,
# not in .export, so that the command line's parser has the choices without importing torch.
ADAPTER_FORMATS = ("merged", "peft")
