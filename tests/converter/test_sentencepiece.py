"""Checkpoints with only a sentencepiece tokenizer.model: tpconv writes tokenizer.json, and the runtime's
tokenizer agrees with sentencepiece itself on a few hundred varied strings."""
import json
import random
import sys

import pytest
from click.testing import CliRunner

from converter.cli import main as tpconv
from converter.convert import ConvertOptions, convert
from formats.errors import FormatError
from runtime.engine.tokenizer import Tokenizer
from tests.fixtures.tiny import TRAIN_TEXT

spm = pytest.importorskip("sentencepiece")
VOCAB = 420


def _checkpoint(tiny, tmp_path, model_type: str = "bpe", **train) -> tuple:
    src = tiny("llama", vocab=VOCAB)
    (src / "tokenizer.json").unlink()
    lines = [line for line in TRAIN_TEXT.splitlines() if line.strip()] * 20
    options = dict(model_type=model_type, vocab_size=VOCAB, byte_fallback=True, character_coverage=1.0,
                   normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                   minloglevel=2, bos_id=1, eos_id=2, unk_id=0, user_defined_symbols=["<|im_start|>"])
    options.update(train)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(src / "tokenizer"), **options)
    (src / "tokenizer.vocab").unlink()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k != "added_tokens_decoder"} | {"add_bos_token": True}
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    return src, spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))


def _strings(n: int = 300) -> list[str]:
    rng = random.Random(7)
    words = TRAIN_TEXT.split() + ["naïve", "Ünïcödé", "中文", "😀", "x²", "\t", "tab\there", "--", "...", "3.14159"]
    out = ["", " ", "  ", "a", " a", "a ", "\n", "Hello,  world!", "  leading and trailing  ", "new\nline\n\n"]
    while len(out) < n:
        k = rng.randint(1, 8)
        sep = rng.choice([" ", "  ", "\n", "", " \n "])
        out.append(sep.join(rng.choice(words) for _ in range(k)))
    return out


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_json_from_sentencepiece_agrees_with_sentencepiece(tiny, tmp_path, model_type):
    src, sp = _checkpoint(tiny, tmp_path, model_type)
    convert(ConvertOptions(src, tmp_path / "ws", 1))
    tok = Tokenizer.from_workspace(tmp_path / "ws")
    for s in _strings():
        ids = tok.encode(s, add_special_tokens=False)
        assert ids == sp.encode(s), repr(s)
        assert tok.decode(ids) == sp.decode(ids), repr(s)
    assert tok.encode("Hello") == [sp.bos_id(), *sp.encode("Hello")]
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == sp.piece_to_id("<|im_start|>")


def test_unreproducible_or_missing_pieces_are_refused(tiny, tmp_path, monkeypatch):
    src, _ = _checkpoint(tiny, tmp_path, remove_extra_whitespaces=True)
    out = CliRunner().invoke(tpconv, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert out.exit_code == 3 and "collapses repeated spaces" in out.output, out.output
    assert not (tmp_path / "ws").exists()
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(FormatError, match=r"ships only tokenizer.model \(sentencepiece\).*tpdeploy\[sentencepiece\]"):
        convert(ConvertOptions(src, tmp_path / "ws", 1))
    (src / "tokenizer.model").unlink()
    with pytest.raises(FormatError, match="has neither tokenizer.json nor tokenizer.model"):
        convert(ConvertOptions(src, tmp_path / "ws", 1))


def test_tprun_on_a_checkpoint_says_convert_it_first(tiny):
    from runtime.worker.workspace import open_workspace

    src = tiny("llama")
    with pytest.raises(FormatError, match=r"is a checkpoint, not a workspace: convert it first with `tpconv convert"):
        open_workspace(src)
