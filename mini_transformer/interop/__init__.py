"""Interoperability: models and tokenizers to and from other ecosystems (Hugging Face
``transformers``; llama.cpp's GGUF).

Uses the model, tokenizer and checkpoint modules; nothing here is imported by them.
"""
