"""Identity of a model's weights without reading them: checkpoint_fingerprint for a safetensors checkpoint (its
headers), random_fingerprint for the embedded random model (config, seed and init). Parity golden files and
persisted prefix caches are keyed by them."""

from __future__ import annotations

import hashlib
from pathlib import Path


def random_fingerprint(config_hash: str, seed: int, structured: bool = False) -> str:
    """Checkpoint identity of the embedded random model: it is fully determined by the config, the seed and the
    weight init (plain fingerprints are what they were before structured weights existed)."""
    init = ":structured" if structured else ""
    return hashlib.sha256(f"random-checkpoint:{config_hash}:seed={seed}{init}".encode()).hexdigest()[:16]


def checkpoint_fingerprint(path: str | Path) -> str:
    """Identity of a safetensors checkpoint (file or directory) without reading the weights: the sha256 of every
    *.safetensors JSON header (names, dtypes, shapes, byte offsets) and of the index/config JSON files. Headers do
    not hash the tensor bytes; two checkpoints of one layout with different values would also differ in file
    size, which is included."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"{p}: no *.safetensors or *.json files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            if f.suffix == ".safetensors":
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
                h.update(str(f.stat().st_size).encode())
            else:
                h.update(fh.read())
    return h.hexdigest()[:16]
