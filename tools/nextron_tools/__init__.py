"""Python helpers for nextron's tooling (HF reference model, fixtures, comparisons).

Only the tools/ scripts import this package; the C++ system never does. Modules:

- ``hf_reference``: load / build / randomise tiny Qwen3-Next models with HF transformers (fp32, eager, offline),
  read token files, compute logits and per-sequence losses, map in-memory parameters to checkpoint tensor names.
"""
