"""Checkpoints that ship only ``tokenizer.model`` (sentencepiece: Llama-1/2, Baichuan, InternLM2): write the
equivalent ``tokenizer.json`` at conversion, so the runtime keeps one tokenizer library.

The model file is read with sentencepiece's own protobuf schema and rebuilt with the `tokenizers`
library the way transformers' Llama converter does (legacy mode): the vocabulary and scores, BPE merges
ordered by the merged piece's score (or the unigram table), byte fallback, ``▁`` for spaces and the
dummy prefix, control and user-defined pieces as added tokens, BOS/EOS as ``tokenizer_config.json``
asks. The test suite checks the result against sentencepiece itself on several hundred strings. Needs
the optional ``sentencepiece`` and ``protobuf`` packages (``pip install tpdeploy[sentencepiece]``);
without them, or for a model this cannot reproduce, the error says what to do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE, Unigram

from formats.errors import FormatError

_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece piece types
_UNIGRAM, _BPE = 1, 2


def sentencepiece_to_json(model: Path, tok_cfg: dict[str, Any]) -> str:
    """tokenizer.json text equivalent to ``model`` (a sentencepiece ``tokenizer.model``)."""
    proto = _load(model)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.remove_extra_whitespaces:
        raise FormatError(f"{model}: the sentencepiece model collapses repeated spaces (remove_extra_whitespaces), "
                          "which tokenizer.json cannot reproduce exactly; write tokenizer.json with the model's own "
                          "tokenizer (transformers, trust_remote_code) and convert again")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    tok = Tokenizer(_model(pieces, spec, model))
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, t in pieces if t in (_CONTROL, _UNKNOWN)])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == _USER])
    tok.post_processor = _post_processor(pieces, spec, tok_cfg)
    return tok.to_str(pretty=True)


def _load(model: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise FormatError(f"{model.parent} ships only tokenizer.model (sentencepiece); tpconv writes tokenizer.json "
                          f"from it with the optional packages sentencepiece and protobuf ({e}): "
                          "pip install 'tpdeploy[sentencepiece]', or save tokenizer.json with transformers") from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model.read_bytes())
    except Exception as e:
        raise FormatError(f"{model} is not a sentencepiece model ({e})") from e
    if not proto.pieces:
        raise FormatError(f"{model} holds no pieces; is it a sentencepiece model?")
    return proto


def _model(pieces: list[tuple[str, float, int]], spec, where: Path):
    byte_fallback = any(t == _BYTE for _, _, t in pieces)
    unk = next((p for p, _, t in pieces if t == _UNKNOWN), None)
    if spec.model_type == _UNIGRAM:
        return Unigram([(p, s) for p, s, _ in pieces], unk_id=spec.unk_id, byte_fallback=byte_fallback)
    if spec.model_type != _BPE:
        raise FormatError(f"{where}: sentencepiece model type {spec.model_type} (word or char) is not supported; "
                          "BPE and unigram are")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    return BPE(vocab, _merges(pieces, vocab), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)


def _merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces, earlier merges first: sentencepiece BPE merges the pair
    whose result scores highest, so merges are ranked by the merged piece's score, then by the parts' ids."""
    found = []
    for piece, score, kind in pieces:
        if kind != _NORMAL or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                found.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def _post_processor(pieces: list[tuple[str, float, int]], spec, tok_cfg: dict[str, Any]):
    """BOS/EOS around a single sequence as tokenizer_config.json asks (sentencepiece Llama default: BOS only)."""
    special = []
    if tok_cfg.get("add_bos_token", True) and spec.bos_id >= 0:
        special.append((pieces[spec.bos_id][0], spec.bos_id))
    eos = [(pieces[spec.eos_id][0], spec.eos_id)] if tok_cfg.get("add_eos_token", False) and spec.eos_id >= 0 else []
    single = " ".join([*(s for s, _ in special), "$A:0", *(s for s, _ in eos)])
    pair = " ".join([*(s for s, _ in special), "$A:0", *(s for s, _ in eos),
                     *(f"{s}:1" for s, _ in special), "$B:1", *(f"{s}:1" for s, _ in eos)])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[*special, *eos])
