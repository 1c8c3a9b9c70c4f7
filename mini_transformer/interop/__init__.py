"""Interoperability: models and tokenizers to and from other ecosystems (today Hugging Face
``transformers``, in :mod:`.hf`).

Uses the model, tokenizer and checkpoint modules; nothing here is imported by them.
"""
