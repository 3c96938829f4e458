"""What the engine, serving, block-pool and prefix-cache tests share: the embedded tiny model in fp32 on the
reference ops with kv_fp8_sim "clamp" (so token equality does not hang on FP8 near-ties), and seeded prompts."""

from __future__ import annotations

import socket

import torch

from dsv4.common.checkpoint.load import build_random_model
from dsv4.common.model.config import load_named_config
from dsv4.common.model.reference import ReferenceOps
from dsv4.common.model.transformer import Transformer


def tiny_clamp_model() -> Transformer:
    args = load_named_config("tiny").replace(kv_fp8_sim="clamp")
    return build_random_model(args, ReferenceOps(), torch.float32, seed=0)


def rand_prompt(n: int, seed: int) -> list[int]:
    """n token ids in [2, 512), the same for the same seed."""
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def bound_socket() -> socket.socket:
    """A socket bound to a free port on 127.0.0.1, for uvicorn to serve on as it is: no port is picked here and bound
    again later (where something else could take it in between)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s
