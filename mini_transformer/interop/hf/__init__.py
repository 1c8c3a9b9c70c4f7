"""Hugging Face ``transformers`` interop: export a checkpoint as a directory that
``AutoModelForCausalLM`` / ``AutoTokenizer`` load without custom code, and import a Llama-family
directory as a checkpoint of ours.

Modules: :mod:`.layout` (the config and weight-name map between the two), :mod:`.tokenizer`
(``tokenizer.json`` both ways), :mod:`.export`, :mod:`.importer`.
"""
