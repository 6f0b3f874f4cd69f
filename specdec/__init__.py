"""specdec: speculative decoding whose output is exactly plain decoding's, faster.

`SpecDecoder` keeps a loaded model, verifier and drafter; `generate` is a drop-in for transformers'
`model.generate()`. The command line is `specdec` (specdec.cli).
"""

from specdec.api import SpecDecoder, generate
from specdec.errors import SpecdecError

__all__ = ["SpecDecoder", "generate", "SpecdecError"]
