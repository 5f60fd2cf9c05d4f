"""The quality suite's tasks: small, offline, seeded.

Every task builds its model from ``torch.manual_seed(seed)`` and its training batches from a
``torch.Generator`` seeded with ``seed``, so every optimizer starts from the same weights
and sees the same batches in the same order. Sizes: ``"tiny"`` (tests), ``"cpu"`` (400
steps, where the presets were chosen), ``"mid"`` (larger models, 1000 steps: does the choice
carry over on the CPU), ``"gpu"`` (issue 5's size).

- ``gpt``: the byte-level GPT of ``examples/gpt.py`` on Python's standard library (next-byte
  cross-entropy).
- ``digits``: scikit-learn's 8x8 digits, an MLP classifier (cross-entropy with label
  smoothing 0.1, so the loss has a floor above zero and ratios of losses mean something).
- ``seqcls``: a small transformer encoder classifying synthetic token sequences by their
  most frequent marker token, with 10% of labels flipped (fresh data every step).
- ``teacher``: regression on fresh samples from a fixed random teacher network (an MLP student).
- ``diabetes``: scikit-learn's diabetes regression (ships with the package), an MLP on
  standardized features and target (mean squared error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt import GPT, ByteBatches, GPTConfig, load_stdlib_corpus

SIZES = ("tiny", "cpu", "mid", "gpu")


def _split_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Matrices decay, vectors (biases, norms) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@dataclass
class Task:
    """A model, its training batches and its losses, all fixed by ``seed``."""

    name: str
    steps: int
    device: torch.device
    build: Callable[[], nn.Module]
    batches: List[Tuple[torch.Tensor, ...]]
    loss_fn: Callable[[nn.Module, Tuple[torch.Tensor, ...]], torch.Tensor]
    val_batches: List[Tuple[torch.Tensor, ...]]
    autocast: bool = False

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().to(self.device)

    def param_groups(self, model: nn.Module, weight_decay: float) -> List[dict]:
        return _split_groups(model, weight_decay)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        if self.autocast:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                return self.loss_fn(model, batch).float()
        return self.loss_fn(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was_training = model.training
        model.eval()
        total = sum(float(self.loss(model, b)) for b in self.val_batches) / len(self.val_batches)
        model.train(was_training)
        return total


# ---------------------------------------------------------------------------- gpt
_GPT_SIZES = {
    "tiny": dict(n_layer=1, n_embd=32, n_head=2, block=32, batch=8, steps=30, corpus=300_000),
    "cpu": dict(n_layer=2, n_embd=64, n_head=2, block=64, batch=16, steps=400, corpus=4_000_000),
    "mid": dict(n_layer=4, n_embd=96, n_head=4, block=64, batch=16, steps=1000, corpus=8_000_000),
    "gpu": dict(n_layer=6, n_embd=384, n_head=6, block=256, batch=32, steps=1500, corpus=None),
}


def gpt_task(size: str, seed: int, device: torch.device, steps: int = None) -> Task:
    cfg = _GPT_SIZES[size]
    steps = steps or cfg["steps"]
    corpus = load_stdlib_corpus(cfg["corpus"])
    data = ByteBatches(corpus, cfg["block"])
    gen = torch.Generator().manual_seed(seed)
    batches = [data.get("train", cfg["batch"], gen, device) for _ in range(steps)]
    val_gen = torch.Generator().manual_seed(10_000 + seed)
    val = [data.get("val", cfg["batch"], val_gen, device) for _ in range(8 if size != "tiny" else 2)]
    config = GPTConfig(block_size=cfg["block"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                       n_embd=cfg["n_embd"], dropout=0.0)
    return Task("gpt", steps, device, lambda: GPT(config), batches,
                lambda model, batch: model(batch[0], batch[1])[1], val,
                autocast=(size == "gpu" and device.type == "cuda"))


# ---------------------------------------------------------------------------- digits
_DIGITS_SIZES = {"tiny": dict(width=32, batch=32, steps=30), "cpu": dict(width=128, batch=32, steps=400),
                 "mid": dict(width=256, batch=32, steps=1000), "gpu": dict(width=512, batch=64, steps=1500)}


def digits_task(size: str, seed: int, device: torch.device, steps: int = None) -> Task:
    from sklearn.datasets import load_digits

    cfg = _DIGITS_SIZES[size]
    steps = steps or cfg["steps"]
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one fixed split
    n_val = len(x) // 5
    x_val, y_val, x_tr, y_tr = x[order[:n_val]], y[order[:n_val]], x[order[n_val:]], y[order[n_val:]]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        idx = torch.randint(len(x_tr), (cfg["batch"],), generator=gen)
        batches.append((x_tr[idx].to(device), y_tr[idx].to(device)))
    val = [(x_val.to(device), y_val.to(device))]
    width = cfg["width"]

    def build():
        return nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                             nn.Linear(width, 10))

    return Task("digits", steps, device, build, batches,
                lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], label_smoothing=0.1), val)


# ---------------------------------------------------------------------------- seqcls
_SEQ_SIZES = {"tiny": dict(width=16, layers=1, length=16, batch=16, steps=30),
              "cpu": dict(width=48, layers=2, length=32, batch=32, steps=400),
              "mid": dict(width=64, layers=3, length=32, batch=32, steps=1000),
              "gpu": dict(width=256, layers=4, length=128, batch=64, steps=1500)}
_SEQ_VOCAB, _SEQ_CLASSES, _SEQ_NOISE = 16, 4, 0.1


def _sequences(count: int, length: int, gen: torch.Generator):
    """Tokens uniform over the vocabulary; label = the most frequent of tokens 0..3 (lowest on a tie),
    replaced by a uniform label with probability 0.1."""
    tokens = torch.randint(_SEQ_VOCAB, (count, length), generator=gen)
    counts = F.one_hot(tokens, _SEQ_VOCAB)[..., :_SEQ_CLASSES].sum(1)
    labels = counts.argmax(1)
    flip = torch.rand(count, generator=gen) < _SEQ_NOISE
    labels = torch.where(flip, torch.randint(_SEQ_CLASSES, (count,), generator=gen), labels)
    return tokens, labels


class SequenceClassifier(nn.Module):
    """Token + position embeddings, a pre-norm transformer encoder, mean pooling, a linear head."""

    def __init__(self, width: int, layers: int, length: int):
        super().__init__()
        self.tokens = nn.Embedding(_SEQ_VOCAB, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, _SEQ_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.tokens(tokens) + self.positions[: tokens.shape[1]])
        return self.head(self.norm(hidden.mean(1)))


def seqcls_task(size: str, seed: int, device: torch.device, steps: int = None) -> Task:
    cfg = _SEQ_SIZES[size]
    steps = steps or cfg["steps"]
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        tokens, labels = _sequences(cfg["batch"], cfg["length"], gen)
        batches.append((tokens.to(device), labels.to(device)))
    val_tokens, val_labels = _sequences(512, cfg["length"], torch.Generator().manual_seed(10_000))
    val = [(val_tokens.to(device), val_labels.to(device))]
    return Task("seqcls", steps, device, lambda: SequenceClassifier(cfg["width"], cfg["layers"], cfg["length"]),
                batches, lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]), val)


# ---------------------------------------------------------------------------- diabetes
_DIABETES_SIZES = {"tiny": dict(width=16, batch=16, steps=30), "cpu": dict(width=64, batch=32, steps=400),
                   "mid": dict(width=128, batch=32, steps=1000), "gpu": dict(width=256, batch=32, steps=1500)}


def diabetes_task(size: str, seed: int, device: torch.device, steps: int = None) -> Task:
    from sklearn.datasets import load_diabetes

    cfg = _DIABETES_SIZES[size]
    steps = steps or cfg["steps"]
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = len(x) // 5
    val_idx, tr_idx = order[:n_val], order[n_val:]
    mean, std = x[tr_idx].mean(0), x[tr_idx].std(0)
    y_mean, y_std = y[tr_idx].mean(), y[tr_idx].std()
    x, y = (x - mean) / std, (y - y_mean) / y_std
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        idx = tr_idx[torch.randint(len(tr_idx), (cfg["batch"],), generator=gen)]
        batches.append((x[idx].to(device), y[idx].to(device)))
    val = [(x[val_idx].to(device), y[val_idx].to(device))]
    width = cfg["width"]

    def build():
        return nn.Sequential(nn.Linear(10, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                             nn.Linear(width, 1), nn.Flatten(0))

    return Task("diabetes", steps, device, build, batches,
                lambda model, batch: F.mse_loss(model(batch[0]), batch[1]), val)


# ---------------------------------------------------------------------------- teacher
_TEACHER_SIZES = {"tiny": dict(width=16, batch=32, steps=30), "cpu": dict(width=64, batch=64, steps=400),
                  "mid": dict(width=128, batch=64, steps=1000), "gpu": dict(width=512, batch=256, steps=1500)}
_TEACHER_INPUTS, _TEACHER_NOISE = 16, 0.1


def teacher_task(size: str, seed: int, device: torch.device, steps: int = None) -> Task:
    """Regression on fresh samples: ``y = teacher(x) + 0.1*noise``, ``x ~ N(0, I_16)``; the
    teacher is a fixed random tanh MLP (seed 0), the student a GELU MLP. The loss floor is the
    noise variance 0.01, and with fresh data the train loss measures optimization, not memorization."""
    cfg = _TEACHER_SIZES[size]
    steps = steps or cfg["steps"]
    gen0 = torch.Generator().manual_seed(0)
    w1 = torch.randn(_TEACHER_INPUTS, 32, generator=gen0) / math.sqrt(_TEACHER_INPUTS)
    w2 = torch.randn(32, 1, generator=gen0) / math.sqrt(32) * 2

    def sample(count, gen):
        x = torch.randn(count, _TEACHER_INPUTS, generator=gen)
        y = (torch.tanh(x @ w1 * 2) @ w2).flatten() + _TEACHER_NOISE * torch.randn(count, generator=gen)
        return x.to(device), y.to(device)

    gen = torch.Generator().manual_seed(seed)
    batches = [sample(cfg["batch"], gen) for _ in range(steps)]
    val = [sample(2048, torch.Generator().manual_seed(10_000))]
    width = cfg["width"]

    def build():
        return nn.Sequential(nn.Linear(_TEACHER_INPUTS, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                             nn.Linear(width, 1), nn.Flatten(0))

    return Task("teacher", steps, device, build, batches,
                lambda model, batch: F.mse_loss(model(batch[0]), batch[1]), val)


TASKS: Dict[str, Callable[..., Task]] = {"gpt": gpt_task, "digits": digits_task, "seqcls": seqcls_task,
                                         "teacher": teacher_task, "diabetes": diabetes_task}


def make_task(name: str, size: str, seed: int = 0, device=None, steps: int = None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    if device is None:
        device = torch.device("cuda" if size == "gpu" and torch.cuda.is_available() else "cpu")
    return TASKS[name](size, seed, torch.device(device), steps)
