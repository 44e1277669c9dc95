"""Attribute conditioning for classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).

Labels are a (B, n_attributes) long tensor of class indices into each attribute's vocabulary, with -1
meaning "unspecified". Each attribute has its own embedding table whose row 0 is the learned
"unspecified" entry; the embeddings of all attributes are summed and added to the time embedding.
Training replaces each label by "unspecified" independently with probability p (`drop_labels`), so at
sampling time any subset of attributes can be set and the rest left free; all unspecified is the
unconditional model that guidance needs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

UNSPECIFIED = -1


class AttributeEmbedding(nn.Module):
    def __init__(self, vocab_sizes: list[int], dim: int):
        super().__init__()
        self.vocab_sizes = list(vocab_sizes)
        self.tables = nn.ModuleList(nn.Embedding(n + 1, dim) for n in vocab_sizes)   # + row 0, "unspecified"
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim != 2 or labels.shape[1] != len(self.tables):
            raise ValueError(f"labels must be (batch, {len(self.tables)}), got {tuple(labels.shape)}")
        labels = labels.long()      # values are checked where users give them (encode_attributes); a check
        # here would make the GPU wait for the host at every step
        return sum(table(labels[:, i] + 1) for i, table in enumerate(self.tables))

    def unspecified(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.full((batch, len(self.tables)), UNSPECIFIED, dtype=torch.long, device=device)


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label independently replaced by UNSPECIFIED with probability p (labels already unknown stay so)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return labels.masked_fill(drop.to(labels.device), UNSPECIFIED)


def encode_attributes(vocab: dict[str, list[str]], attributes: list[str], wanted: dict[str, str | None],
                      batch: int) -> torch.Tensor:
    """(batch, n_attributes) labels for the values asked for by name; attributes not asked for are unspecified.

    Raises ValueError naming the attribute and the valid values when a value or an attribute is unknown.
    """
    row = []
    unknown = [name for name, value in wanted.items() if value is not None and name not in attributes]
    if unknown:
        raise ValueError(f"this model is not conditioned on {', '.join(unknown)}; it knows: "
                         f"{', '.join(attributes) if attributes else 'no attributes (an unconditional model)'}")
    for name in attributes:
        value = wanted.get(name)
        if value is None:
            row.append(UNSPECIFIED)
            continue
        values = vocab[name]
        match = [i for i, v in enumerate(values) if v.lower() == str(value).strip().lower()]
        if not match:
            raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(repr(v) for v in values)}")
        row.append(match[0])
    return torch.tensor([row] * batch, dtype=torch.long).reshape(batch, len(attributes))


def count_combinations(labels: torch.Tensor, vocab_sizes: list[int]) -> list[int]:
    """How many rows of `labels` (N, n_attributes) carry each combination of values, for rows with every
    attribute known: a flat list in row-major order over the attributes (the first attribute varies slowest)."""
    labels = torch.as_tensor(labels).long().reshape(-1, len(vocab_sizes))
    known = labels[(labels >= 0).all(1)]
    flat = torch.zeros(len(known), dtype=torch.long)
    for i, size in enumerate(vocab_sizes):
        flat = flat * size + known[:, i]
    return torch.bincount(flat, minlength=math.prod(vocab_sizes)).tolist()


def draw_unasked(counts: list[int], vocab_sizes: list[int], asked: torch.Tensor,
                 generators: list[torch.Generator]) -> torch.Tensor:
    """(len(generators), n_attributes) labels: the attributes `asked` (a row, UNSPECIFIED where not asked)
    keeps, and every other one drawn, one row per generator, from `counts` (count_combinations) restricted to
    the combinations that agree with the asked values, i.e. from the data's distribution given what was asked.
    Where no counted combination agrees, the unasked attributes stay UNSPECIFIED."""
    table = torch.tensor(counts, dtype=torch.float64).reshape(vocab_sizes)
    agrees = torch.zeros_like(table, dtype=torch.bool)
    agrees[tuple(slice(None) if v == UNSPECIFIED else v for v in asked.tolist())] = True
    weights = (table * agrees).flatten()
    if float(weights.sum()) <= 0:
        return asked.long().reshape(1, -1).repeat(len(generators), 1)
    flat = torch.cat([torch.multinomial(weights, 1, generator=g) for g in generators])
    return torch.stack(torch.unravel_index(flat, tuple(vocab_sizes)), 1).long()
