"""The generation session (text in, text out) and the interactive conversation, with a tiny model;
and how the command line names the flag behind a setting's error."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from mini_transformer.commands.generate import with_flag
from mini_transformer.config import GenerationConfig, ModelConfig
from mini_transformer.errors import UserError
from mini_transformer.generation import PromptTruncatedWarning, generate
from mini_transformer.model import Transformer
from mini_transformer.session import Conversation, InvalidSetting, Session, Settings, check_settings
from mini_transformer.tokenizer import CharTokenizer

TEXT = "hello world\nthe quick brown fox jumps over the lazy dog\n"


@pytest.fixture(scope="module")
def session_parts():
    tokenizer = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                                    block_size=16, dropout=0.0, init_std=0.3)).eval()
    return model, tokenizer


def make_session(session_parts, **settings) -> Session:
    model, tokenizer = session_parts
    return Session(model, tokenizer, Settings(**{"temperature": 0.0, "max_tokens": 10, **settings}))


# -- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, value", [
    ("temperature", -1.0), ("top_k", 0), ("top_p", 1.5), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("max_tokens", -3), ("num_samples", 0),
])
def test_a_setting_out_of_range_names_itself(setting, value):
    with pytest.raises(InvalidSetting) as caught:
        Settings(**{setting: value})
    assert caught.value.setting == setting
    assert isinstance(caught.value, UserError)
    with pytest.raises(InvalidSetting):
        check_settings({setting: value})


def test_replace_checks_the_new_value_and_from_config_takes_the_chosen_values():
    base = Settings.from_config(GenerationConfig(max_tokens=7, temperature=0.5, stop=["\n\n"]), top_k=5,
                                temperature=None)
    assert (base.max_tokens, base.temperature, base.top_k, base.stop) == (7, 0.5, 5, ("\n\n",))
    with pytest.raises(InvalidSetting):
        dataclasses.replace(base, top_p=0.0)
    assert base.seed_for(2) is None and dataclasses.replace(base, seed=10).seed_for(2) == 12
    assert Settings() == Settings.from_config(GenerationConfig())


def test_the_command_line_names_the_flag_of_a_setting():
    assert str(with_flag(InvalidSetting("top_p", "top_p must be in (0, 1], got 2; try 0.9"))) == (
        "--top_p must be in (0, 1], got 2; try 0.9")
    assert str(with_flag(InvalidSetting("top_p", "--top_p must be in (0, 1], got 2"))) == (
        "--top_p must be in (0, 1], got 2")
    assert str(with_flag(InvalidSetting("min_p", "must be in [0, 1]"))) == "--min_p: must be in [0, 1]"


# -- prompts and generations ----------------------------------------------------------------------

def test_prompts_carry_their_notices(session_parts):
    session = make_session(session_parts)
    assert session.encode("hello").notices == []
    empty = session.encode("")
    assert empty.ids == session.tokenizer.encode("\n") and "newline" in empty.notices[0]
    long = session.encode("the quick brown fox jumps", name="prompt 2")
    assert long.notices == ["prompt 2 has 25 tokens, more than the context of 16; only its last 16 tokens are used"]


def test_a_stream_gives_the_engine_s_tokens_as_text(session_parts):
    session = make_session(session_parts, max_tokens=12)
    ids = session.encode("the").ids
    stream = session.stream(ids)
    text = "".join(stream)
    expected = generate(session.model, ids, max_new_tokens=12, temperature=0.0)
    assert stream.token_ids == expected and text == session.tokenizer.decode(expected)
    assert stream.stats is None
    batch = session.complete_batch([ids, ids])
    assert [c.token_ids for c in batch] == [expected, expected] and batch[0].text == text
    # The KV-caches are kept between generations (compiled decoding reads them at fixed addresses).
    assert len(session.cache_pool) == 2  # one of batch 1, one of batch 2
    "".join(session.stream(ids))
    assert len(session.cache_pool) == 2


def test_stop_strings_cut_streams_and_batches_alike(session_parts):
    session = make_session(session_parts, max_tokens=20)
    ids = session.encode("h").ids
    full = "".join(session.stream(ids))
    stop = full[3:5]
    session.settings = dataclasses.replace(session.settings, stop=(stop,))
    cut = full[:full.index(stop)]
    assert "".join(session.stream(ids)) == cut
    assert session.complete_batch([ids])[0].text == cut


def test_a_long_prompt_is_cropped_by_the_session_and_other_warnings_show(session_parts, monkeypatch):
    """The session words a crop itself (Prompt.notices) and hands the engine only the window, so
    the engine has no crop to warn about; no warning is silenced (torch.compile's, say, shows)."""
    import mini_transformer.session as session_module

    real = session_module.generate_stream
    seen_prompts = []

    def warning_engine(model, ids, **kwargs):
        seen_prompts.append(list(ids))
        warnings.warn("something else", RuntimeWarning)
        return real(model, ids, **kwargs)

    monkeypatch.setattr(session_module, "generate_stream", warning_engine)
    session = make_session(session_parts)
    prompt = session.encode("the quick brown fox jumps " * 40)
    assert len(prompt.ids) > session.block_size and prompt.notices
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = "".join(session.stream(prompt.ids))
    assert [type(w.message) for w in caught] == [RuntimeWarning]
    assert seen_prompts == [prompt.ids[-session.block_size:]]
    monkeypatch.setattr(session_module, "generate_stream", real)
    with warnings.catch_warnings(record=True) as uncropped:
        warnings.simplefilter("always")
        direct = generate(session.model, prompt.ids, max_new_tokens=10, temperature=0, stop_ids=session.stop_ids)
    assert [type(w.message) for w in uncropped] == [PromptTruncatedWarning]  # the engine would warn
    assert text == session.tokenizer.decode(direct)  # and would use the same window


# -- the conversation -------------------------------------------------------------------------

def test_commands_change_the_settings_and_say_so(session_parts):
    conversation = Conversation(make_session(session_parts))
    assert conversation.command("/temp 0.5") == "temperature = 0.5"
    assert conversation.command("/top_k 5") == "top_k = 5"
    assert conversation.command("/top_k off") == "top_k = None"
    assert conversation.command("/top_p 1") == "top_p = None"
    assert conversation.command("/max_tokens 8") == "max_tokens = 8"
    assert conversation.session.settings.temperature == 0.5 and conversation.session.settings.max_tokens == 8
    assert "max_tokens=8" in conversation.command("/settings")
    assert "/reset" in conversation.command("/help")
    with pytest.raises(InvalidSetting) as caught:
        conversation.command("/top_p 2")
    assert caught.value.setting == "top_p"
    assert conversation.session.settings.top_p is None  # a refused value changes nothing
    with pytest.raises(UserError, match="/temperature needs a number"):
        conversation.command("/temperature warm")
    with pytest.raises(UserError, match="unknown command /nope"):
        conversation.command("/nope")


def test_the_conversation_keeps_what_was_said_even_when_a_reply_is_stopped(session_parts):
    conversation = Conversation(make_session(session_parts, max_tokens=6))
    tokenizer = conversation.session.tokenizer
    reply = conversation.reply("hello")
    "".join(reply)
    said = tokenizer.encode("hello\n") + reply.token_ids
    assert conversation.context == said
    reply = conversation.reply("")  # an empty line continues
    next(reply)
    reply.close()  # stopped early (Ctrl-C): what it produced stays
    assert len(reply.token_ids) >= 1 and conversation.context == said + reply.token_ids
    with pytest.raises(UserError):
        conversation.reply("HELLO")  # not in the vocabulary: the conversation is unchanged
    assert conversation.context == said + reply.token_ids
    assert conversation.command("/reset") == "conversation cleared" and conversation.context == []


def test_a_model_that_expects_a_bos_gets_one_at_the_start_of_each_prompt(tmp_path):
    """An imported Llama-style tokenizer (its post-processor prepends <s>): prompts and a new
    conversation start with the BOS, as transformers encodes them; our own kinds get none."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from mini_transformer.interop.hf.tokenizer import load_hf_tokenizer

    from .test_hf_tokenizer import llama_style_dir

    llama_style_dir(tmp_path / "llama")
    tokenizer = load_hf_tokenizer(tmp_path / "llama")
    assert tokenizer.starts_with_bos and tokenizer.bos_id == 1
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=4, n_layers=2,
                                    block_size=64, dropout=0.0)).eval()
    session = Session(model, tokenizer, Settings(temperature=0.0, max_tokens=3))
    reference = AutoTokenizer.from_pretrained(tmp_path / "llama")
    for text in ("hello world", "the quick brown fox"):
        assert session.encode(text).ids == reference.encode(text) == [1, *tokenizer.encode(text)]
    assert session.encode("").ids == [1]
    conversation = Conversation(session)
    first = conversation.reply("hello")
    "".join(first)
    assert conversation.context[:1] == [1] and conversation.context.count(1) == 1 + first.token_ids.count(1)
    second = conversation.reply("world")
    "".join(second)
    assert conversation.context.count(1) == 1 + first.token_ids.count(1) + second.token_ids.count(1)
    assert not CharTokenizer.from_text(TEXT).starts_with_bos
