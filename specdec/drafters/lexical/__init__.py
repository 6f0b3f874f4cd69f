"""The lexical-unit drafter (LUD-style spans, verified): trained placeholder embeddings ride as auxiliary nodes
in the verify forward and predict the next few tokens, so the next draft costs no forward of its own.

- `placeholders`: the weights (k placeholder vectors + the restricted head's token ids), their file format, and
  the training forward (the target's layers over a sequence and its placeholder groups in one pass).
- `drafter`: `LexicalDrafter`, the protocol v2 drafter (`--drafter lexical`).
- `train`: `specdec train lexical`, self-distillation from the target's own outputs.
"""
