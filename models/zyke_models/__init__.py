"""Zyke's model artifacts, in one place for the daemon and training alike.

- ``embedded``: the embedded default model (the GGUF assembled from its package), ``sha256_file``, the GGUF
  magic check;
- ``hf_checkpoint``: that GGUF converted once into a transformers checkpoint, and base fingerprints (which base
  an adapter fits);
- ``adapters``: the adapter registry, its manifests and the adapters shipped in this package
  (``shipped_adapters/``);
- ``lora_gguf``: a PEFT LoRA exported to the GGUF LoRA llama.cpp loads;
- ``files``: the atomic, fsynced write and moving an unreadable file aside;
- ``quantization``: the bitsandbytes 4-bit / 8-bit settings the transformers backend and QLoRA share;
- ``hub``: the one upload to the Hugging Face Hub (``train --hf-push`` and ``publish``);
- ``names`` and ``errors``: the adapter names and typed errors those share with the daemon.

It imports neither ``zyke_daemon`` nor ``zyke_train`` (tests/test_import_rules.py), and nothing heavy at module
level: torch, transformers and huggingface_hub are imported inside the functions that need them.
"""
