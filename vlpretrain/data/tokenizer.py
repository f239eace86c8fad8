"""HF ``tokenizers`` wrapper with the special tokens the chat format and the image splicing need."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer

from vlpretrain.data.special_tokens import BOS, EOS, PAD
from vlpretrain.data.special_tokens import IMAGE_PLACEHOLDER as IMAGE
from vlpretrain.errors import UserError


class TextTokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"tokenizer {path}: not a tokenizers JSON file ({why})") from None
        ids = {}
        for name, text in (("bos", BOS), ("eos", EOS), ("image", IMAGE), ("pad", PAD)):
            tid = self.tok.token_to_id(text)
            if tid is None:
                raise UserError(f"tokenizer {path} lacks the special token {text!r}")
            ids[name] = tid
        self.bos_id, self.eos_id, self.image_id, self.pad_id = ids["bos"], ids["eos"], ids["image"], ids["pad"]
        # names this tokenizer in the sample-size indexes (vlpretrain/data/sizes.py): a change rebuilds them
        self.fingerprint = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in the text map to their ids, no BOS/EOS added."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)
