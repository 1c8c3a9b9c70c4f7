"""Chat messages to prompt ids: a checkpoint's own template renders and tokenizes as in
``transformers``, in a sandbox; without one, the plain documented template."""

from __future__ import annotations

import json

import pytest

from mini_transformer.errors import UserError
from mini_transformer.serve.chat import PLAIN_STOPS, ChatFormatter
from mini_transformer.tokenizer import CharTokenizer

pytest.importorskip("jinja2")

CHATML = ("{{ bos_token }}{% for m in messages %}"
          "{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}"
          "{% if loop.index0 > 5 %}{% break %}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello <b>there</b>, 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3 + 3 ?"}]


def chatml_dir(directory, template=CHATML):
    tk = pytest.importorskip("tokenizers")
    specials = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(m["content"] for m in MESSAGES) * 20, "system user assistant"],
                            trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "unk_token": None, "pad_token": None, "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_a_checkpoint_template_gives_the_ids_transformers_gives(tmp_path):
    from mini_transformer.interop.hf.tokenizer import load_hf_tokenizer

    directory = chatml_dir(tmp_path / "tok")
    ours = ChatFormatter(load_hf_tokenizer(directory))
    assert ours.uses_checkpoint_template and ours.extra_stops == ()
    text = ours.render(MESSAGES)
    assert text.startswith("<s><|im_start|>system\nYou are terse.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    expected = theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ours.encode(MESSAGES) == list(expected)


def test_the_template_runs_sandboxed_and_its_refusals_are_user_errors(tmp_path):
    from mini_transformer.interop.hf.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(chatml_dir(tmp_path / "tok"))
    with pytest.raises(UserError, match="tools are not supported"):
        ChatFormatter(tokenizer).encode([{"role": "tool", "content": "x"}])
    for template in ["{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}",
                     "{{ ''.__class__.__subclasses__() }}"]:
        tokenizer.hf_config["chat_template"] = template
        with pytest.raises(UserError, match="chat template"):
            ChatFormatter(tokenizer).encode(MESSAGES)


def test_without_a_template_the_plain_one_is_used():
    tokenizer = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz :\n")
    formatter = ChatFormatter(tokenizer)
    assert not formatter.uses_checkpoint_template and formatter.extra_stops == PLAIN_STOPS
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    assert formatter.render(messages) == "system: be kind\nuser: hi\nassistant:"
    assert formatter.encode(messages) == tokenizer.encode("system: be kind\nuser: hi\nassistant:")
