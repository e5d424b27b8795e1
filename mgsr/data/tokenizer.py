"""A small byte-level BPE tokenizer trained offline for the embedded synthetic task.

GPT-2 conventions: byte-level pre-tokenisation without a prefix space (so ``decode(encode(x)) == x`` for
any string) and one special token, ``<|endoftext|>``, that is EOS, BOS, PAD and UNK at once. Padding is
on the left because the canonical batch layout left-pads prompts (see ``mgsr.data.collate``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    save_dir: str | None = None,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer.

    Training is deterministic for a given text sequence (the `tokenizers` BPE trainer breaks ties by
    byte order), so the same corpus always gives the same ids. Saves with ``save_pretrained`` when
    `save_dir` is given.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps each token's leading space inside its offsets, as GPT-2's tokenizer does.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no UNK ever needed
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=model_max_length,
    )
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        wrapped.save_pretrained(save_dir)
    return wrapped


def load_or_build_tokenizer(
    save_dir: str,
    texts_fn: Callable[[], Iterable[str]],
    vocab_size: int = 2048,
) -> PreTrainedTokenizerFast:
    """Load the tokenizer saved in `save_dir`, or train one on ``texts_fn()`` and save it there.

    `texts_fn` is a thunk so the corpus is only generated when a tokenizer has to be trained.
    """
    if os.path.isfile(os.path.join(save_dir, "tokenizer.json")):
        tok = AutoTokenizer.from_pretrained(save_dir)
        if len(tok) > vocab_size:
            log.warning("tokenizer in %s has %d tokens, more than vocab_size=%d", save_dir, len(tok), vocab_size)
        return tok
    log.info("training a byte-level BPE tokenizer (vocab_size=%d) into %s", vocab_size, save_dir)
    return build_tokenizer(texts_fn(), vocab_size=vocab_size, save_dir=save_dir)
