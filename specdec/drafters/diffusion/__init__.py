"""The diffusion-LM drafter (DiffuSpec) and what it drafts with.

- `backend`: the `Lattice` a diffusion LM gives for k masked positions, and the `DLMBackend` protocol.
- `dlm`: real masked diffusion LMs from a directory (Dream / LLaDA conventions), run through the lean forward
  with bidirectional attention.
- `dflash`: the small block-diffusion drafter conditioned on the target's hidden states (trained here).
- `cps`: the token lattice's top sets, the n-gram model, and causal-consistency path search.
- `adl`: the adaptive draft-length controller.
- `drafter`: `DiffusionDrafter`, the protocol-v2 drafter tying them together.
- `prompts`, `data`, `train`: training prompts (never a benchmark's), the target's outputs on them, training.
"""
