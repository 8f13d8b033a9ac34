"""runtime.tokenizer against transformers 5.23, the reference it must reproduce id for id."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from converter.tokenizer import write_tokenizer
from formats.errors import FormatError, TpDeployError
from runtime.engine.tokenizer import ChatTemplateError, IncrementalDecoder, Tokenizer
from tests.fixtures.tiny import TRAIN_TEXT, make_tiny

TEXTS = [
    "Hello world", "", " leading space", "trailing space ", "a  b\n\n\tc   \n",
    "The capital of France is Paris.",
    "héllo wörld — naïve café", "emoji 😀👍🏽 family 👨‍👩‍👧", "日本語のテキスト、中文字符", "한국어 텍스트",
    "<|im_start|>user\nhi<|im_end|>\n", "text<|im_end|>more<|endoftext|>", "don't . , ! ? 's 're",
    "def f(x):\n    return x ** 2  # code", "\u200b zero width \ufeff bom",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 😀 日本"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three\n\n  spaced  "}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
     {"role": "assistant", "content": "a", "tool_calls": None}, {"role": "user", "content": ""}],
]


def workspace_tokenizer(src: Path, dst: Path) -> Path:
    """The tokenizer dir exactly as ``tpconv convert`` writes it."""
    write_tokenizer(src, dst / "tokenizer", json.loads((src / "config.json").read_text()))
    return dst / "tokenizer"


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def hf_chat_ids(hf, messages, add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    dec = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [dec.add(i) for i in ids] + [dec.finish()]


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    return Tokenizer(workspace_tokenizer(smollm2, tmp_path_factory.mktemp("smol"))), hf_tokenizer(smollm2)


# --- SmolLM2, the real tokenizer -------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_decode_match_transformers(smol, text):
    ours, hf = smol
    ids = hf(text)["input_ids"]
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_smollm2_special_tokens(smol):
    ours, hf = smol
    assert 2 in ours.eos_token_ids and ours.token_to_id("<|im_end|>") == 2
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.pad_token_id == hf.pad_token_id == 2
    assert ours.vocab_size == len(hf) == 49152
    assert ours.encode("hi")[0] != 1  # SmolLM2's post-processor adds no BOS


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_smollm2_chat_template_matches_transformers(smol, messages, add_generation_prompt):
    ours, hf = smol
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.encode_chat(messages, add_generation_prompt) == hf_chat_ids(hf, messages, add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("text", [t for t in TEXTS if t] + ["Paris 😀" * 3 + "日本語" * 2])
def test_smollm2_incremental_decoder(smol, text):
    ours, _ = smol
    ids = ours.encode(text)
    for skip in (True, False):
        deltas = stream(ours, ids, skip)
        assert "".join(deltas) == ours.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)  # partial characters are held back
    if any(ord(c) > 0xFFFF for c in text):  # 4-byte characters span tokens: some steps must wait
        assert "" in stream(ours, ids)[:-1]


def test_incremental_decoder_flushes_an_incomplete_character(smol):
    ours, _ = smol
    ids = ours.encode("ok 😀")
    partial = ids[:-1]  # the emoji's last byte token is missing
    deltas = stream(ours, partial)
    assert deltas[-1].endswith("\ufffd") and "".join(deltas) == ours.decode(partial)


def test_smollm2_chat_stream_of_generated_ids(smol):
    ours, _ = smol
    prompt = ours.encode_chat(CONVERSATIONS[1])
    reply = ours.encode("Le capital est Paris 🇫🇷.<|im_end|>", add_special_tokens=False)
    dec = IncrementalDecoder(ours)
    text = "".join(dec.add(i) for i in reply) + dec.finish()
    assert text == ours.decode(reply) == "Le capital est Paris 🇫🇷."
    assert dec.token_ids == reply and prompt[-1] != reply[0]


# --- tiny checkpoints written in both transformers generations -------------------------------

@pytest.mark.parametrize("style", ["v4", "v5"])
def test_tiny_chat_template_matches_transformers(tmp_path, style):
    src = make_tiny(tmp_path / "m", style=style, vocab=300)
    ours, hf = Tokenizer(workspace_tokenizer(src, tmp_path / "ws")), hf_tokenizer(src)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, gen) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)
            assert ours.encode_chat(messages, gen) == hf_chat_ids(hf, messages, gen)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)
    assert ours.eos_token_ids == {2}


def test_continue_final_message_matches_transformers(tmp_path):
    src = make_tiny(tmp_path / "m", vocab=300)
    ours, hf = Tokenizer(workspace_tokenizer(src, tmp_path / "ws")), hf_tokenizer(src)
    for final in ("The answer is", "  padded answer  ", "two\nlines"):
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": final}]
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      continue_final_message=True)
        got = ours.apply_chat_template(messages, False, continue_final_message=True)
        assert got == want and got.rstrip().endswith(final.strip())
    with pytest.raises(TpDeployError, match="text to continue"):
        ours.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
                                 False, continue_final_message=True)


def test_from_workspace_reads_manifest_eos(tmp_path):
    from converter.convert import ConvertOptions, convert

    src = make_tiny(tmp_path / "m", style="v4")
    convert(ConvertOptions(src, tmp_path / "ws", 1))
    tok = Tokenizer.from_workspace(tmp_path / "ws")
    assert tok.eos_token_ids == {2} and tok.bos_token == "<|im_start|>"
    assert Tokenizer(tmp_path / "ws" / "tokenizer", eos_token_ids=(7, 9)).eos_token_ids == {2, 7, 9}


# --- a Llama-style SentencePiece tokenizer: BOS post-processor, byte fallback, leading space -

def llama_style(path: Path, tok_cfg: dict, **tokenizer_json) -> Path:
    tok = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    data = {**json.loads(tok.to_str()), **tokenizer_json}
    vocab = data["model"]["vocab"]
    for b in range(256):  # SentencePiece's <0xNN> byte tokens, for characters outside the vocab
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps(data))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **tok_cfg}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    return path


@pytest.mark.parametrize("add_bos_token", [None, False])
def test_llama_style_bos_and_byte_fallback_match_transformers(tmp_path, add_bos_token):
    cfg = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    path = llama_style(tmp_path / "tok", {"tokenizer_class": "PreTrainedTokenizerFast", **cfg})
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    for text in TEXTS + ["<s>x</s> y"]:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids and ids[0] == 1  # tokenizer.json wins over add_bos_token
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        gen = ids[1:]
        assert "".join(stream(ours, gen)) == ours.decode(gen)
    assert ours.eos_token_ids == {2, 5} and ours.bos_token == "<s>"


def test_tokenizer_json_padding_truncation_and_missing_specials_as_transformers(tmp_path):
    padding = {"strategy": {"Fixed": 48}, "direction": "Right", "pad_to_multiple_of": None,
               "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"}
    truncation = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    cfg = {"pad_token": "<pad>", "additional_special_tokens": ["<tool>"]}
    path = llama_style(tmp_path / "tok", cfg, padding=padding, truncation=truncation)
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    text = "The capital<pad>of<tool> France"
    ids = hf(text)["input_ids"]
    assert ours.encode(text) == ids and len(ids) < 48  # neither padded nor truncated
    assert ours.token_to_id("<pad>") in ids and ours.token_to_id("<tool>") in ids  # atomic
    assert ours.vocab_size == len(hf) and ours.pad_token_id == hf.pad_token_id == ours.token_to_id("<pad>")
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("model", ["BPE", "WordLevel"])
def test_clean_up_tokenization_spaces_as_transformers(tmp_path, model):
    """transformers 5 honours clean_up_tokenization_spaces, except for BPE, where it would corrupt."""
    path = tmp_path / "tok"
    if model == "BPE":
        llama_style(path, {"clean_up_tokenization_spaces": True})
    else:
        words = ["[UNK]", "hello", ".", "world", ",", "don", "'", "t", "!"]
        tok = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        path.mkdir()
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": True,
                                                                "unk_token": "[UNK]"}))
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    ids = hf("hello . world , don't !")["input_ids"]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert (" ." in ours.decode(ids)) == (model == "BPE")


def test_llama_style_stream_keeps_leading_spaces(tmp_path):
    ours = Tokenizer(llama_style(tmp_path / "tok", {}))
    ids = ours.encode("The capital 日本 is x", add_special_tokens=False)
    deltas = stream(ours, ids)
    assert "".join(deltas) == ours.decode(ids) == "The capital 日本 is x"
    assert any(d.startswith(" ") for d in deltas)  # a lone-token decode would strip these


# --- incremental detokenization: the stream's concatenation is decode(ids), whatever the ids -

@pytest.mark.slow
def test_smollm2_incremental_decoder_on_generated_ids(smol, smol_generated):
    ours, hf = smol
    for _, ids in smol_generated:
        for skip in (True, False):
            deltas = stream(ours, ids, skip)
            whole = ours.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == whole == hf.decode(ids, skip_special_tokens=skip), ids
            if "\ufffd" not in whole:
                assert not any("\ufffd" in d for d in deltas)


def tiny_tokenizers(tmp_path: Path) -> dict[str, Tokenizer]:
    byte_level = make_tiny(tmp_path / "m", vocab=300)  # all 256 bytes: non-ASCII text is byte tokens
    return {"byte-level": Tokenizer(workspace_tokenizer(byte_level, tmp_path / "ws")),
            "sentencepiece": Tokenizer(llama_style(tmp_path / "sp", {}))}


def random_ids(tok: Tokenizer, rng: random.Random, byte_fallback: bool) -> list[int]:
    """Random ids, special tokens anywhere. Byte-level: any id, so also partial and invalid UTF-8.
    Byte fallback (SentencePiece) decodes an invalid run of byte tokens as one U+FFFD per byte, taking
    back valid bytes before it that a stream has already shown; so there, bytes come as whole characters."""
    if not byte_fallback:
        return [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
    byte_ids = {tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    ids: list[int] = []
    while len(ids) < 30:
        if rng.random() < 0.3:
            ids += tok.encode(chr(rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0x3000),
                                              rng.randrange(0x1F300, 0x1F600)])), add_special_tokens=False)
        else:
            ids.append(rng.choice([i for i in range(tok.vocab_size) if i not in byte_ids]))
    return ids


def test_tiny_incremental_decoder_on_random_ids(tmp_path):
    rng = random.Random(0)
    for name, tok in tiny_tokenizers(tmp_path).items():
        for _ in range(20):
            ids = random_ids(tok, rng, byte_fallback=name == "sentencepiece")
            for skip in (True, False):
                whole = tok.decode(ids, skip_special_tokens=skip)
                assert "".join(stream(tok, ids, skip)) == whole, (name, ids, skip)


@pytest.mark.parametrize("text", ["é", "naïve café", "日本語", "😀👍🏽 family 👨\u200d👩\u200d👧", "a😀b"])
def test_tiny_incremental_decoder_waits_for_a_character_split_over_tokens(tmp_path, text):
    for name, tok in tiny_tokenizers(tmp_path).items():
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > len(text), name  # some characters are split over byte tokens
        for skip in (True, False):
            deltas = stream(tok, ids, skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == text, name
            assert not any("\ufffd" in d for d in deltas), name
            assert "" in deltas[:-1], name  # steps inside a character emit nothing


# --- chat template environment and errors ----------------------------------------------------

def tiny_with_template(tmp_path: Path, template) -> Tokenizer:
    """A tiny checkpoint whose tokenizer_config.json holds ``template`` (None: no template)."""
    src = make_tiny(tmp_path / "m", style="v4", vocab=300)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    if template is None:
        cfg.pop("chat_template")
    else:
        cfg["chat_template"] = template
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(workspace_tokenizer(src, tmp_path / "ws"))


HELPERS_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
  {% if m.role == 'stop' %}{% break %}{% endif %}
  {% if m.tool_calls is defined %}[calls {{ m.tool_calls | length }}]{% endif %}
{{ m | tojson }}|{{ m | tojson(indent=2) }}
{% endfor %}
{{ tools | tojson }}{{ custom }}{{ strftime_now('%Y') }}
{%- if add_generation_prompt %}<gen>{% endif %}"""


def test_template_environment_matches_transformers(tmp_path):
    """Whitespace control, loop controls, tojson, None-dropping, reasoning aliases, extra kwargs."""
    ours = tiny_with_template(tmp_path, HELPERS_TEMPLATE)
    hf = hf_tokenizer(tmp_path / "m")
    messages = [{"role": "user", "content": "<b>é\"😀</b>", "tool_calls": None},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}], "reasoning": "why"},
                {"role": "stop", "content": "x"}, {"role": "user", "content": "never"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"q": "ü"}}}]
    for gen in (True, False):
        rendered = ours.apply_chat_template(messages, gen, tools=tools, custom=[1, "ß"])
        assert rendered == hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=gen, custom=[1, "ß"])
    assert "<b>é" in rendered and "never" not in rendered and "[calls 1]" in rendered
    assert '"reasoning_content": "why"' in rendered and "null" not in rendered


def test_encode_chat_adds_no_second_bos(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
    path = llama_style(tmp_path / "tok", {"chat_template": template})
    ours, hf = Tokenizer(path), hf_tokenizer(path)
    for gen in (True, False):
        ids = ours.encode_chat(CONVERSATIONS[2], gen)
        assert ids == hf_chat_ids(hf, CONVERSATIONS[2], gen) and ids[:2] != [1, 1] and ids[0] == 1


def test_named_template_list_uses_default(tmp_path):
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    ours = tiny_with_template(tmp_path, templates)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == "D"
    assert ours.apply_chat_template(CONVERSATIONS[0], tools=[{"name": "f"}]) == "T"


def test_template_list_without_default_is_an_error(tmp_path):
    ours = tiny_with_template(tmp_path, [{"name": "rag", "template": "R"}])
    with pytest.raises(FormatError, match=r"none is named \"default\""):
        ours.apply_chat_template(CONVERSATIONS[0])


def test_missing_template_is_a_clear_error(tmp_path):
    ours = tiny_with_template(tmp_path, None)
    assert not ours.has_chat_template
    with pytest.raises(FormatError, match=r"no chat template in .*tokenizer_config\.json.*plain prompt"):
        ours.encode_chat(CONVERSATIONS[0])
    assert ours.encode("plain prompt")  # plain prompts still work


@pytest.mark.parametrize("messages, where", [
    ([{"role": "user", "content": "ok"}, {"content": "no role"}], r"messages\[1\].*'role'"),
    ([{"role": "user", "content": "ok"}, "just a string"], r"messages\[1\] must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user"}],
     r"messages\[2\].*'content'"),
    ([{"role": "user", "content": 42}], r"messages\[0\].*'content'"),
    ([], r"non-empty list"),
    ("hello", r"non-empty list"),
])
def test_malformed_messages_name_the_index(tmp_path, messages, where):
    ours = tiny_with_template(tmp_path, "{{ messages }}")
    with pytest.raises(TpDeployError, match=where):
        ours.apply_chat_template(messages)


def test_raise_exception_in_template_surfaces_its_message(tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversation must start with user') }}"
                "{% endif %}{{ messages[0]['content'] }}")
    ours = tiny_with_template(tmp_path, template)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == CONVERSATIONS[0][0]["content"]
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        ours.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_broken_template_is_a_format_error(tmp_path):
    ours = tiny_with_template(tmp_path, "{% for m in messages %}unclosed")
    with pytest.raises(FormatError, match=r"tokenizer_config\.json: chat_template is not valid Jinja"):
        ours.apply_chat_template(CONVERSATIONS[0])


def test_missing_tokenizer_json_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match=r"tokenizer\.json is missing.*tpconv convert"):
        Tokenizer(tmp_path)
