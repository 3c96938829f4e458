"""Checkpoints in the official layout: tensor names, shapes and TP split rules (layout.py), filling a model from
tensors (load.py), reading safetensors directories and model-parallel files (reader.py), the tokenizer files beside
them (tokenizer.py), writing deterministic random checkpoints (writer.py). Builds on dsv4.common.model only."""
