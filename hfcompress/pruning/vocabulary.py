"""Vocabulary pruning: keep only the token ids a task uses, in the embedding, the LM head and the tokenizer.

    model, tokenizer = prune_vocabulary(model, tokenizer, training_texts, min_frequency=1, keep_top=0, keep=())

Kept: every token seen at least `min_frequency` times in the texts, every special and added token, the tokens in
`keep`, the `keep_top` lowest ids (WordPiece and BPE vocabularies put their base characters and most frequent merges
first), and what the tokenizer needs to stay total: its unknown token, the 256 byte tokens of a byte-level or
byte-fallback vocabulary, and for BPE every token on the merge path of a kept token. The kept tokens are
renumbered in their old order; the tokenizer is rewritten through its `tokenizers` JSON, so a text whose pieces
were all kept encodes to the same pieces under new ids. A pruned piece is re-segmented: WordPiece falls back to
shorter kept pieces or [UNK], BPE to shorter pieces down to bytes, Unigram to the best remaining segmentation.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from torch import nn
from transformers import AutoTokenizer

from ..errors import HfCompressError

SUPPORTED_MODELS = ("WordPiece", "BPE", "Unigram")
CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
                    "mask_token_id", "decoder_start_token_id")
SLOW_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                        "sentencepiece.bpe.model", "special_tokens_map.json", "added_tokens.json")
BYTE_FALLBACK_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


def prune_vocabulary(model, tokenizer, texts: Iterable[str], min_frequency: int = 1, keep_top: int = 0,
                     keep: Sequence[str] = ()):
    """Prune `model` (in place) and `tokenizer` to the tokens `texts` use; returns (model, new tokenizer).

    Pass training texts only: whatever is evaluated later must not choose the vocabulary.
    """
    texts = list(texts)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept = select_vocabulary(tokenizer, count_tokens(encoded), min_frequency, keep_top, keep, model.config)
    new_tokenizer = apply_vocabulary(model, tokenizer, kept)
    check_same_pieces(encoded, new_tokenizer(texts, add_special_tokens=False)["input_ids"], kept)
    return model, new_tokenizer


def count_tokens(id_lists: Iterable[Sequence[int]]) -> Counter:
    counts = Counter()
    for ids in id_lists:
        counts.update(ids)
    return counts


def select_vocabulary(tokenizer, counts: Counter, min_frequency: int = 1, keep_top: int = 0,
                      keep: Sequence[str] = (), config=None) -> list[int]:
    """The old ids to keep, ascending: frequent, special, listed, lowest ids, and what the tokenizer needs."""
    spec = _tokenizer_json(tokenizer)
    vocabulary = tokenizer.get_vocab()
    size = len(vocabulary)
    kept = {token_id for token_id, count in counts.items() if count >= min_frequency}
    kept |= set(tokenizer.all_special_ids) | {token["id"] for token in spec["added_tokens"]}
    kept |= set(range(min(keep_top, size)))
    kept |= {_id_of(token, vocabulary) for token in keep}
    if config is not None:
        kept |= {token_id for token_id in _config_token_ids(config) if 0 <= token_id < size}
    tokens_of = {token_id: token for token, token_id in vocabulary.items()}
    kept_tokens = {tokens_of[token_id] for token_id in kept}
    kept_tokens |= _required_tokens(spec, kept_tokens, vocabulary)
    return sorted(vocabulary[token] for token in kept_tokens)


def check_training_tokens_kept(counts: Counter, kept_ids: Sequence[int], max_lost: float) -> None:
    """Refuse a vocabulary that prunes more than `max_lost` of the training split's token occurrences (they would
    be re-segmented into kept pieces, or become unknown)."""
    total = sum(counts.values())
    kept = set(kept_ids)
    lost = sum(count for token_id, count in counts.items() if token_id not in kept) / max(1, total)
    if lost > max_lost:
        raise HfCompressError(f"keeps {len(kept)} tokens, which prunes {100 * lost:.1f}% of the training split's "
                              f"tokens (more than max_training_tokens_lost {max_lost}): lower min_frequency")


def apply_vocabulary(model, tokenizer, kept_ids: Sequence[int]):
    """Slice the model's embeddings (and LM head) to `kept_ids`, update its config; the rewritten tokenizer."""
    _check_not_quantized(model)
    new_tokenizer = rewrite_tokenizer(tokenizer, sorted(kept_ids))
    slice_vocabulary(model, kept_ids)
    return new_tokenizer


def slice_vocabulary(model, kept_ids: Sequence[int]) -> None:
    """The model's half of `apply_vocabulary` (also what the plan does to a model on the meta device)."""
    _check_not_quantized(model)
    kept = torch.tensor(sorted(kept_ids), dtype=torch.long)
    old_to_new = {old: new for new, old in enumerate(kept.tolist())}
    old_size = model.get_input_embeddings().num_embeddings
    _slice_embeddings(model, kept, old_to_new.get(model.config.pad_token_id))
    _update_config(model, old_to_new, len(kept))
    stale = [name for name, tensor in model.state_dict().items() if tensor.ndim and tensor.shape[0] == old_size]
    if stale:
        raise HfCompressError(f"vocabulary pruning: {type(model).__name__} has other weights of vocabulary size "
                              f"({', '.join(stale)}) that this function does not know how to slice")


def rewrite_tokenizer(tokenizer, kept_ids: Sequence[int]):
    """The tokenizer with only `kept_ids`, renumbered 0..n-1 in their old order; loaded back with AutoTokenizer."""
    vocabulary = tokenizer.get_vocab()
    tokens_of = {token_id: token for token, token_id in vocabulary.items()}
    new_id = {tokens_of[old]: new for new, old in enumerate(sorted(kept_ids))}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tokenizer.save_pretrained(folder)
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        (folder / "tokenizer.json").write_text(json.dumps(_remapped_json(spec, new_id), ensure_ascii=False),
                                               encoding="utf-8")
        _remap_tokenizer_config(folder / "tokenizer_config.json", new_id)
        for name in SLOW_TOKENIZER_FILES:  # they would describe the old vocabulary
            (folder / name).unlink(missing_ok=True)
        rewritten = AutoTokenizer.from_pretrained(folder)
    if rewritten.pad_token is None and tokenizer.pad_token is not None:
        rewritten.pad_token = tokenizer.pad_token
    if rewritten.get_vocab() != new_id:
        raise HfCompressError(f"vocabulary pruning: {type(tokenizer).__name__} did not reload with the pruned "
                              f"vocabulary ({len(rewritten.get_vocab())} tokens instead of {len(new_id)})")
    return rewritten


def check_same_pieces(old_ids: Sequence[Sequence[int]], new_ids: Sequence[Sequence[int]], kept_ids: Sequence[int],
                      contiguous: bool = False) -> int:
    """Check that every sequence whose old pieces were all kept encodes to the same pieces under the new ids;
    the number of sequences compared. `contiguous`: sequences are cut from one token stream (language-model
    blocks), so only those before the first one with a pruned piece line up."""
    old_to_new = {old: new for new, old in enumerate(kept_ids)}
    compared = 0
    for index, (old, new) in enumerate(zip(old_ids, new_ids)):
        mapped = [old_to_new.get(token_id) for token_id in old]
        if None in mapped:
            if contiguous:
                break
            continue
        if mapped != list(new):
            raise HfCompressError(f"vocabulary pruning: sequence {index} encodes differently after pruning although "
                                  "all its pieces were kept")
        compared += 1
    return compared


def unknown_rate(id_lists: Iterable[Sequence[int]], tokenizer) -> float | None:
    """Share of the non-special tokens that are the unknown token (None when the tokenizer has none)."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return None
    special = set(tokenizer.all_special_ids) - {unknown}
    counts = count_tokens(id_lists)
    total = sum(count for token_id, count in counts.items() if token_id not in special)
    return counts[unknown] / total if total else 0.0


# ------------------------------------------------------------------------------------------------ tokenizer


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HfCompressError(f"vocabulary pruning needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    kind = spec["model"].get("type")
    if kind not in SUPPORTED_MODELS:
        raise HfCompressError(f"vocabulary pruning supports {', '.join(SUPPORTED_MODELS)} tokenizers, "
                              f"not a {kind or 'untyped'} tokenizer")
    return spec


def _id_of(token: str, vocabulary: dict[str, int]) -> int:
    if token not in vocabulary:
        raise HfCompressError(f"vocabulary.keep: {token!r} is not a token of this tokenizer's vocabulary")
    return vocabulary[token]


def _config_token_ids(config) -> list[int]:
    ids = []
    for name in CONFIG_TOKEN_IDS:
        value = getattr(config, name, None)
        ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def _required_tokens(spec: dict, kept_tokens: set[str], vocabulary: dict[str, int]) -> set[str]:
    """Tokens the tokenizer needs so every text stays encodable and every kept BPE token can still form."""
    model, required = spec["model"], set()
    if model["type"] == "Unigram":
        if model.get("unk_id") is not None:
            required.add(model["vocab"][model["unk_id"]][0])
    elif model.get("unk_token"):
        required.add(model["unk_token"])
    if model.get("byte_fallback"):
        required |= set(BYTE_FALLBACK_TOKENS)
    if _uses_byte_level(spec):
        required |= set(pre_tokenizers.ByteLevel.alphabet())
    required &= vocabulary.keys()
    if model["type"] == "BPE":
        required |= _merge_closure(kept_tokens | required, _merges(model), model.get("continuing_subword_prefix"))
    return required


def _uses_byte_level(spec: dict) -> bool:
    text = json.dumps({key: spec.get(key) for key in ("pre_tokenizer", "decoder")})
    return '"ByteLevel"' in text


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]


def _merge_result(left: str, right: str, prefix: str | None) -> str:
    return left + (right[len(prefix):] if prefix and right.startswith(prefix) else right)


def _merge_closure(tokens: set[str], merges: list[tuple[str, str]], prefix: str | None) -> set[str]:
    """`tokens` plus both parts of every merge that forms one of them, recursively."""
    parts_of: dict[str, list[tuple[str, str]]] = {}
    for left, right in merges:
        parts_of.setdefault(_merge_result(left, right, prefix), []).append((left, right))
    closed, pending = set(tokens), list(tokens)
    while pending:
        for pair in parts_of.get(pending.pop(), []):
            for part in pair:
                if part not in closed:
                    closed.add(part)
                    pending.append(part)
    return closed


def _remapped_json(spec: dict, new_id: dict[str, int]) -> dict:
    """The tokenizers JSON with only the tokens in `new_id`, under their new ids."""
    model = spec["model"]
    if model["type"] == "Unigram":
        old_unk = model["vocab"][model["unk_id"]][0] if model.get("unk_id") is not None else None
        model["vocab"] = sorted((entry for entry in model["vocab"] if entry[0] in new_id), key=lambda e: new_id[e[0]])
        model["unk_id"] = new_id[old_unk] if old_unk is not None else None
    else:
        model["vocab"] = new_id
    if model["type"] == "BPE":
        prefix = model.get("continuing_subword_prefix")
        model["merges"] = [merge for merge, (left, right) in zip(model["merges"], _merges(model))
                           if left in new_id and right in new_id and _merge_result(left, right, prefix) in new_id]
    for token in spec["added_tokens"]:
        token["id"] = new_id[token["content"]]
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_id.get(spec["padding"]["pad_token"], spec["padding"]["pad_id"])
    spec["post_processor"] = _remap_special_ids(spec.get("post_processor"), new_id)
    return spec


def _remap_special_ids(node, new_id: dict[str, int]):
    """Post-processors name their special tokens with ids: TemplateProcessing's {"ids", "tokens"}, and
    BertProcessing/RobertaProcessing's ["[SEP]", 102] pairs; Sequence nests them."""
    if isinstance(node, list):
        if len(node) == 2 and isinstance(node[0], str) and isinstance(node[1], int) and node[0] in new_id:
            return [node[0], new_id[node[0]]]
        return [_remap_special_ids(item, new_id) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _remap_special_ids(value, new_id) for key, value in node.items()}
    if isinstance(node.get("ids"), list) and isinstance(node.get("tokens"), list):
        node["ids"] = [new_id[token] for token in node["tokens"]]
    return node


def _remap_tokenizer_config(path: Path, new_id: dict[str, int]) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    decoder = config.get("added_tokens_decoder")
    if decoder:
        config["added_tokens_decoder"] = {str(new_id[entry["content"]]): entry for entry in decoder.values()}
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ model


def _check_not_quantized(model) -> None:
    modules = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    for side, module in modules.items():
        if module is None and side == "output":
            continue
        plain = isinstance(module, (nn.Embedding, nn.Linear)) and type(module.weight) is nn.Parameter \
            and module.weight.dtype.is_floating_point
        if not plain:
            raise HfCompressError(f"vocabulary pruning: the {side} embedding is quantized ({type(module).__name__}): "
                                  "prune the vocabulary first, quantize after")


def _slice_embeddings(model, kept: torch.Tensor, new_pad_id: int | None) -> None:
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    embedding.weight = _sliced(embedding.weight, kept)
    embedding.num_embeddings = len(kept)
    if embedding.padding_idx is not None:
        embedding.padding_idx = new_pad_id
    if output is None:
        return
    output.weight = embedding.weight if tied else _sliced(output.weight, kept)
    if output.bias is not None:
        output.bias = _sliced(output.bias, kept)
    output.out_features = len(kept)


def _sliced(parameter: nn.Parameter, kept: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(parameter.detach()[kept.to(parameter.device)].clone(), requires_grad=parameter.requires_grad)


def _update_config(model, old_to_new: dict[int, int], size: int) -> None:
    model.config.vocab_size = size
    targets = [model.config]
    if getattr(model, "generation_config", None) is not None:
        targets.append(model.generation_config)
    for target in targets:
        for name in CONFIG_TOKEN_IDS:
            value = getattr(target, name, None)
            if value is None:
                continue
            missing = [token_id for token_id in (value if isinstance(value, list) else [value]) if token_id not in old_to_new]
            if missing:
                raise HfCompressError(f"vocabulary pruning: {type(target).__name__}.{name} = {missing[0]} is not an id "
                                      "of the tokenizer's vocabulary")
            setattr(target, name, [old_to_new[i] for i in value] if isinstance(value, list) else old_to_new[value])
