"""A small byte-level GPT and a text corpus that every machine has: Python's standard library.

The one definition of the model the examples, the tests and the benchmarks (``benchmarks/quality``
too) train: they import ``examples.gpt``; the scripts beside it, run by path, import ``gpt``.
The corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, read as bytes
in sorted order (deterministic on one Python version), split 90/10 into train/val.
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_stdlib_corpus(max_bytes: Optional[int] = None) -> torch.Tensor:
    """The standard library's ``.py`` sources as one uint8 tensor (vocabulary 256).

    ``max_bytes`` caps the size (taken from the start of the sorted file list).
    """
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(directory, name), "rb") as handle:
                data = handle.read()
            chunks.append(data)
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no .py files found under {root}")
    corpus = b"".join(chunks)
    if max_bytes is not None:
        corpus = corpus[:max_bytes]
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)


class ByteBatches:
    """Random windows of a byte corpus: ``x`` of shape (batch, block), ``y`` shifted by one."""

    def __init__(self, corpus: torch.Tensor, block_size: int, val_fraction: float = 0.1):
        if block_size < 1:
            raise ValueError(f"the block size must be >= 1, got {block_size}")
        split = int(len(corpus) * (1 - val_fraction))
        self.splits = {"train": corpus[:split], "val": corpus[split:]}
        self.block_size = block_size
        shortest = min(len(part) for part in self.splits.values())
        if shortest < block_size + 2:
            raise ValueError(f"a corpus of {len(corpus)} bytes leaves a split of {shortest} bytes, too short for "
                             f"windows of {block_size} + 1 bytes: give more bytes (at least "
                             f"{math.ceil((block_size + 2) / min(val_fraction, 1 - val_fraction)) + 1}) or a smaller block")

    def get(self, split: str, batch_size: int, generator: torch.Generator, device="cpu"):
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size - 1, (batch_size,), generator=generator)
        offsets = torch.arange(self.block_size + 1)
        windows = data[starts[:, None] + offsets].long()
        return windows[:, :-1].to(device), windows[:, 1:].to(device)


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn_qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.attn_proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.attn_qkv(self.ln_1(x)).split(channels, dim=2)
        shape = (batch, time, self.n_head, channels // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_dropout(self.attn_proj(attn.transpose(1, 2).reshape(batch, time, channels)))
        return x + self.resid_dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets)`` returns (logits, mean cross-entropy)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("attn_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def param_groups(self, weight_decay: float):
        """Two groups as in nanoGPT: tensors of 2+ dimensions decay (the embeddings included), biases and norms
        do not."""
        decay, no_decay = [], []
        for param in self.parameters():
            (decay if param.dim() >= 2 else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


def main(argv=None) -> None:
    """``python examples/gpt.py``: what this module defines; training is ``pretrain_gpt.py``."""
    parser = argparse.ArgumentParser(
        description="The byte-level GPT and the standard-library corpus that the examples train. "
                    "This module only defines them; train with: python examples/pretrain_gpt.py "
                    "(--help lists its flags).")
    parser.parse_args(argv)
    config = GPTConfig()
    count = sum(p.numel() for p in GPT(config).parameters())
    print(f"GPT {config.n_layer} layers x {config.n_embd} (block {config.block_size}, vocabulary "
          f"{config.vocab_size}): {count:,} parameters. Train it: python examples/pretrain_gpt.py")


if __name__ == "__main__":
    main()
