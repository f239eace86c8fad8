"""The special tokens every part agrees on (tokenizer, shards, chat format, DeepSeek-VL export), defined once.

No imports: shard tools read it without the ``tokenizers`` package. The order of ``SPECIAL_TOKENS`` gives the ids
of a tokenizer we train ourselves (``data_tools tokenizer``): bos 0, eos 1, image 2, pad 3.
"""
from __future__ import annotations

# DeepSeek-LLM's bos/eos strings: fullwidth bar U+FF5C and U+2581 (lower one-eighth block).
BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
IMAGE_PLACEHOLDER = "<image_placeholder>"  # one per image in a sample's text; expanded to image_tokens ids
PAD = "<pad>"

SPECIAL_TOKENS: dict[str, str] = {"bos": BOS, "eos": EOS, "image": IMAGE_PLACEHOLDER, "pad": PAD}
