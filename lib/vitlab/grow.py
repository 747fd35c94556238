"""Grow a trained ViT into a wider and deeper one that starts out computing the same function.

vitlab's own ViT-S recipe model (trained on the same split) becomes the start of a ViT-L: training a large
model from a smaller one instead of from noise is how bert2BERT (Chen et al., 2022) and LiGO (Wang et al.,
2023) save most of a transformer's training compute. Width grows exactly: the residual stream x of width d
becomes Q x of width D, with Q (D x d) built so that LayerNorm commutes with it,
LayerNorm_D(Q x) = Q LayerNorm_d(x), eps included; the LayerNorms' scales and shifts move into the linear
that reads them. New heads and MLP units start at the large model's own init with a zero output, so they
change nothing until trained. Depth grows by `copies` (each small layer used D_layers / d_layers times, its
residual branches divided by that count: the same residual ODE in smaller steps, an approximation that
training repairs; the ViT-S recipe model grown to 24 layers so scores 75.3% on test before training, against
its own 85.7%) or by `identity` (the small layers spread out, new layers between them whose outputs start at
zero: exact, but half the layers start doing nothing).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import models
from .errors import ModelError

DEPTHS = ("copies", "identity")


def embedding(small: int, large: int) -> torch.Tensor:
    """Q (large x small) with Q^T Q = (large / small) I, mapping the all-ones vector to a multiple of itself
    and mean-zero vectors to mean-zero vectors, so LayerNorm_large(Q x) = Q LayerNorm_small(x).

    Block-diagonal: with p / q = small / large in lowest terms, each group of p small features spreads over
    its own q large features only (an integer ratio, p = 1, is plain duplication), so a feature stays local
    rather than smeared over the whole width."""
    g = math.gcd(small, large)
    p, q = small // g, large // g
    basis = lambda n: torch.linalg.qr(torch.cat([torch.ones(n, 1), torch.eye(n)[:, : p - 1]], 1).double())[0]  # noqa: E731
    big, little = basis(q), basis(p)  # first column +-1/sqrt(n), the rest orthonormal and mean-zero
    big[:, 0], little[:, 0] = 1 / math.sqrt(q), 1 / math.sqrt(p)
    block = big[:, :p] @ little.T  # q x p, orthonormal columns
    return math.sqrt(large / small) * torch.block_diag(*[block] * g)


def _parts(layer: nn.Module) -> dict[str, nn.Module]:
    q, k, v, o = models._attention_projections(layer)
    attention = {id(m) for m in (q, k, v, o)}
    fc1, fc2 = [m for m in layer.modules() if isinstance(m, nn.Linear) and id(m) not in attention]
    return {"q": q, "k": k, "v": v, "o": o, "fc1": fc1, "fc2": fc2,
            "ln1": layer.layernorm_before, "ln2": layer.layernorm_after}


def _read_norm(reader: nn.Linear, norm: nn.LayerNorm, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias a linear reading the large stream's plain LayerNorm needs to compute what `reader`
    computed from the small stream's LayerNorm with its scale and shift."""
    w = reader.weight.double() * norm.weight.double()
    return w @ Q.T / (Q.shape[0] / Q.shape[1]), reader.bias.double() + reader.weight.double() @ norm.bias.double()


@torch.no_grad()
def grow(small: nn.Module, large: nn.Module, depth: str = "copies") -> None:
    """Write `small` (a trained ViTForImageClassification) into `large` (one of the same patch, image and
    head size, at least as wide, deep and many-headed, built with its own init), in place."""
    if depth not in DEPTHS:
        raise ModelError(f"grow depth '{depth}' is not one of {DEPTHS}")
    cs, cl = small.config, large.config
    d, D = cs.hidden_size, cl.hidden_size
    head = cs.hidden_size // cs.num_attention_heads
    if (cs.patch_size, cs.image_size, head) != (cl.patch_size, cl.image_size, cl.hidden_size // cl.num_attention_heads):
        raise ModelError(f"growing needs the same patch size, image size and head width (small: {cs.patch_size}, "
                         f"{cs.image_size}, {head}; large: {cl.patch_size}, {cl.image_size}, "
                         f"{cl.hidden_size // cl.num_attention_heads})")
    if D < d or cl.intermediate_size < cs.intermediate_size or cl.num_hidden_layers < cs.num_hidden_layers:
        raise ModelError("growing needs a large model at least as wide, with as large an MLP and as many layers")
    Q = embedding(d, D)
    set_ = lambda p, value: p.copy_(value.to(p.dtype))  # noqa: E731

    es, el = small.vit.embeddings, large.vit.embeddings
    set_(el.cls_token, es.cls_token.double() @ Q.T)
    set_(el.position_embeddings, es.position_embeddings.double() @ Q.T)
    ps, pl = es.patch_embeddings.projection, el.patch_embeddings.projection
    set_(pl.weight, torch.einsum("Dd,d...->D...", Q, ps.weight.double()))
    set_(pl.bias, Q @ ps.bias.double())

    small_layers, large_layers = models.encoder_layers(small)[1], models.encoder_layers(large)[1]
    ns, nl = len(small_layers), len(large_layers)
    source = [j * ns // nl for j in range(nl)]  # which small layer each large one grows from
    for j, layer in enumerate(large_layers):
        big = _parts(layer)
        first = j == 0 or source[j] != source[j - 1]
        if depth == "identity" and not first:
            for name in ("o", "fc2"):  # a new layer: its own init, outputs zero, so it passes x through
                big[name].weight.zero_(), big[name].bias.zero_()
            continue
        little = _parts(small_layers[source[j]])
        share = 1.0 if depth == "identity" else 1.0 / source.count(source[j])
        for name in ("ln1", "ln2"):
            big[name].weight.fill_(1), big[name].bias.zero_()
        for name, norm in (("q", "ln1"), ("k", "ln1"), ("v", "ln1"), ("fc1", "ln2")):
            w, b = _read_norm(little[name], little[norm], Q)
            rows = w.shape[0]
            set_(big[name].weight[:rows], w), set_(big[name].bias[:rows], b)
        for name in ("o", "fc2"):  # the branch writes Q times what it wrote; new heads and units write nothing yet
            w, cols = little[name].weight.double(), little[name].weight.shape[1]
            big[name].weight.zero_()
            set_(big[name].weight[:, :cols], share * Q @ w)
            set_(big[name].bias, share * Q @ little[name].bias.double())

    ls, ll = small.vit.layernorm, large.vit.layernorm
    ll.weight.fill_(1), ll.bias.zero_()
    w, b = _read_norm(small.classifier, ls, Q)
    set_(large.classifier.weight, w), set_(large.classifier.bias, b)


def from_checkpoint(large: nn.Module, path: str, depth: str, class_names: list[str]) -> None:
    """Grow the checkpoint at `path` into `large`, refused (before its weights load) unless its classifier has
    these classes in this order."""
    labels = models.checkpoint_labels(models.ModelSettings(id=path, dtype=torch.float32, attention="sdpa"))
    if labels != list(class_names):
        raise ModelError(f"model.grow_from {path} was trained on other classes ({len(labels)}; this data has "
                         f"{len(class_names)}, or the same in another order): grow from a model of this data")
    small = models._from_pretrained(path, dtype=torch.float32)
    grow(small, large, depth)
    cs, cl = small.config, large.config
    print(f"grown from {path} ({depth}): {cs.num_hidden_layers} layers of {cs.hidden_size} -> "
          f"{cl.num_hidden_layers} of {cl.hidden_size}", flush=True)
