"""Atomic, sharded safetensors output: a staging directory renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from wina.errors import WinaError
from wina.format import SAFETENSORS_METADATA

MAX_SHARD_BYTES = 4 << 30


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temp dir beside `out`; on success it replaces `out`, on failure it vanishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise WinaError(f"output directory {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_permissions(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; give the finished checkpoint ordinary ones (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _sort_metadata(path: Path) -> None:
    """safetensors serialises header metadata in hash order; rewrite it sorted so equal inputs give equal bytes.

    Same keys in another order have the same length, so the header is rewritten in place.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":")).encode()
        if len(new) > n:
            raise RuntimeError(f"{path}: unexpected safetensors header layout")
        f.seek(8)
        f.write(new.ljust(n, b" "))


class ShardWriter:
    """Collects tensors and writes them in shards of at most MAX_SHARD_BYTES, Hugging Face naming."""

    def __init__(self, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.dir, self.max = Path(directory), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise ValueError(f"duplicate tensor {name}")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() != nbytes:  # a view into a larger buffer: store only the view
            t = t.clone()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def get(self, name: str) -> torch.Tensor:
        """A tensor already added (pending, or read back from the shard it was flushed to)."""
        if name in self.pending:
            return self.pending[name]
        for i, keys in enumerate(self.shards):
            if name in keys:
                from safetensors import safe_open

                with safe_open(str(self.dir / f"shard-{i:05d}.tmp"), framework="pt") as f:
                    return f.get_tensor(name)
        raise KeyError(name)

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(path), metadata=SAFETENSORS_METADATA)
        _sort_metadata(path)
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, give shards their final names (and an index if several); return file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / name)
        if n > 1:
            weight_map = {k: names[i] for i, keys in enumerate(self.shards) for k in keys}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names
