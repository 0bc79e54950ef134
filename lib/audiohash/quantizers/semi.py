"""Semi-supervised deep quantization (``dqn_semi``): a proxy loss on noisy views of the labeled
rows, self-training on the unlabeled ones, the product-quantization loss on every row.

The network and the codes are DQN's (``dqn.make_network``, M x 256 codewords on its output z,
ranked by asymmetric distance); no pairwise loss and no classifier head. What trains it:
- labeled rows: a normalized-softmax proxy loss (one learnable proxy per class, logits =
  ``scale`` x cos(z, proxy); Movshovitz-Attias et al. ICCV 2017, NormFace 2017), on a noisy view
  of each row: Gaussian noise of std ``noise`` on the standardized input, then a ``mask`` share of
  its dimensions zeroed. The noise is what makes the codes carry over to recording chains and
  classes the labels do not cover (validation, below);
- every row, labeled or not: the product-quantization loss of DQN against the current codewords
  (weight ``quant_weight``), the codewords refitted every ``refit_every`` steps by k-means on the
  outputs of all rows;
- every row, labeled or not: a decoder (training device, not saved) rebuilds the standardized
  input from z, mean squared error weighted ``reconstruction_weight``: z must keep what the input
  holds about sounds of kinds no label covers, not only the labeled classes' evidence;
- self-training (Lee 2013, as dqn_cls): ``pseudo_rounds`` more runs from a fresh network, each
  adding the unlabeled rows the proxies are surest of (per class up to round x
  ``pseudo_per_label`` x its labeled count); given labels are never replaced;
- optional, off by default: a class-agnostic consistency term pulling z of a noisy view of every
  row to z of the row itself (``consistency_weight``), and FixMatch (Sohn et al. 2020): a noisy view
  trained to the proxy its clean view is sure of, max probability >= ``confidence``
  (``pseudo_weight``). Both lowered validation mAP (below), so both weights default to 0. Also
  off: an instance-contrastive term between two noisy views of every row (SimCLR's NT-Xent, as
  GCD's unsupervised term; ``contrastive_weight``, ``temperature``).
Proxies are a training device only; the bundle keeps the network and the codewords.

Chosen on validation queries carved from the GM database split (never the benchmark's query
split), 32 bits, 10% labels, hard (cross-bank) and unseen-class settings: noise 0.5 over 0.3 and 1.0;
mask 0.2 over 0.4; scale 16 over 32; self-training 2 rounds over none; consistency (0.1, 1.0)
and FixMatch (1.0) lowered mAP@all (README, Results). Session 14 (``python benchmarks/quality.py
--validation``, carve seed 10): reconstruction weight 1.0 over 0 on unseen-class queries 46.8 vs
45.6 (class split 10) and 56.7 vs 53.7 (split 11), seen-class retention 0.98 / 0.96 vs 0.97 / 0.94;
the contrastive term at weight 1.0 (temperature 0.1) took cross-bank mAP@all from about 48 to 24.7.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audiohash.errors import AudiohashError
from audiohash.quantizers.dqn import DQN, codebook_trainer, confident_pseudo_labels, make_network, quantization_loss


def proxy_logits(z: torch.Tensor, proxies: torch.Tensor, scale: float) -> torch.Tensor:
    """scale x cos(z_i, proxy_c): (b, C) for z (b, D') and proxies (C, D')."""
    return scale * F.normalize(z, dim=1) @ F.normalize(proxies, dim=1).T


def confident_agreement_loss(logits_clean: torch.Tensor, logits_noisy: torch.Tensor, confidence: float) -> torch.Tensor:
    """Cross-entropy of the noisy view against the clean view's most probable proxy, over the rows
    where that probability is >= ``confidence``, divided by all rows (0 when none is confident).
    The clean view is a fixed target (no gradient)."""
    probs = torch.softmax(logits_clean.detach(), dim=1)
    top, target = probs.max(dim=1)
    mask = (top >= confidence).float()
    return (F.cross_entropy(logits_noisy, target, reduction="none") * mask).sum() / max(len(mask), 1)


def instance_contrastive_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between two views of the same b rows (SimCLR's NT-Xent, as GCD's unsupervised term):
    row i of ``z_a`` should be nearest (cosine / ``temperature``) to row i of ``z_b`` among all rows
    of ``z_b``, and the other way round; mean of both directions' cross-entropies."""
    a, b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def noisy_view(x: torch.Tensor, noise: float, mask: float, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, noise^2), then a random ``mask`` share of each row's entries set to 0."""
    out = x + noise * torch.randn(x.shape, generator=generator)
    if mask > 0:
        out = out * (torch.rand(x.shape, generator=generator) >= mask).float()
    return out


class SemiDQN(DQN):
    """Deep quantization trained on the labeled sample and every unlabeled row (see the module doc).

    labels (n,) int64, -1 for unlabeled rows, at least two classes; every row is used. Same
    bundle format (network + codewords) and query path as DQN.
    """

    method = "dqn_semi"
    _HYPER = DQN._HYPER + ("scale", "noise", "mask", "unlabeled_batch", "consistency_weight", "pseudo_weight",
                           "confidence", "pseudo_rounds", "pseudo_per_label", "contrastive_weight", "temperature",
                           "reconstruction_weight")
    _HYPER_ADDED_OFF = {"contrastive_weight": 0.0, "temperature": 0.1, "reconstruction_weight": 0.0}

    def __init__(self, n_bits: int, seed: int = 0, scale: float = 16.0, noise: float = 0.5, mask: float = 0.2,
                 unlabeled_batch: int = 512, consistency_weight: float = 0.0, pseudo_weight: float = 0.0,
                 confidence: float = 0.95, pseudo_rounds: int = 2, pseudo_per_label: float = 2.0,
                 contrastive_weight: float = 0.0, temperature: float = 0.1, reconstruction_weight: float = 1.0,
                 steps: int = 2000, batch_size: int = 128, **hyper):
        super().__init__(n_bits, seed, steps=steps, batch_size=batch_size, **hyper)
        self.scale, self.noise, self.mask = float(scale), float(noise), float(mask)
        self.unlabeled_batch = int(unlabeled_batch)
        self.consistency_weight, self.pseudo_weight = float(consistency_weight), float(pseudo_weight)
        self.confidence = float(confidence)
        self.pseudo_rounds, self.pseudo_per_label = int(pseudo_rounds), float(pseudo_per_label)
        self.contrastive_weight, self.temperature = float(contrastive_weight), float(temperature)
        self.reconstruction_weight = float(reconstruction_weight)
        non_negative = ("pseudo_rounds", "pseudo_per_label", "noise", "consistency_weight", "pseudo_weight",
                        "contrastive_weight", "reconstruction_weight")
        bad = [f"{name}={getattr(self, name)} (must be >= 0)" for name in non_negative if getattr(self, name) < 0]
        bad += [f"mask={self.mask} (must be in [0, 1))"] if not 0 <= self.mask < 1 else []
        bad += [f"unlabeled_batch={self.unlabeled_batch} (must be >= 1)"] if self.unlabeled_batch < 1 else []
        bad += [f"temperature={self.temperature} (must be > 0)"] if self.temperature <= 0 else []
        if bad:
            raise AudiohashError(f"{self.method}: {', '.join(bad)}")

    def _fit_network(self, xs: np.ndarray, targets: np.ndarray, n_classes: int) -> None:
        proxies = self._train_semi(xs, targets, n_classes, 0)
        rounds = self.pseudo_rounds if (targets < 0).any() else 0
        for round_ in range(1, rounds + 1):
            with torch.no_grad():
                probs = torch.softmax(proxy_logits(torch.from_numpy(self._forward(xs)), proxies, self.scale), 1).numpy()
            pseudo = confident_pseudo_labels(probs, targets, round_ * self.pseudo_per_label)
            proxies = self._train_semi(xs, pseudo, n_classes, round_)

    def _train_semi(self, xs: np.ndarray, targets: np.ndarray, n_classes: int, round_: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1000 * round_)
        labeled = targets >= 0
        self.network = make_network(xs.shape[1], self.hidden, self.code_dim, self.dropout)
        proxies = nn.Parameter(torch.randn(n_classes, self.code_dim, generator=generator))
        trained = list(self.network.parameters()) + [proxies]
        decoder = None
        if self.reconstruction_weight:  # z must keep what the input holds, labeled class or not
            decoder = nn.Sequential(nn.Linear(self.code_dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, xs.shape[1]))
            trained += list(decoder.parameters())
        optimizer = torch.optim.Adam(trained, lr=self.lr)
        pq = codebook_trainer(self.code_dim, self.n_subspaces, self.seed)
        x_all = torch.from_numpy(xs)
        lab_rows = torch.from_numpy(np.flatnonzero(labeled))
        classes = torch.from_numpy(targets)
        trained_codebooks = False
        for step in range(self.steps):
            if step >= self.warmup_steps and (step - self.warmup_steps) % self.refit_every == 0:
                self._refit_codebooks(pq, xs, labeled)
                trained_codebooks = True
            lab = lab_rows[torch.randint(len(lab_rows), (self.batch_size,), generator=generator)]
            every = torch.randint(len(xs), (self.unlabeled_batch,), generator=generator)
            self.network.train()
            z_lab = self.network(noisy_view(x_all[lab], self.noise, self.mask, generator))
            loss = F.cross_entropy(proxy_logits(z_lab, proxies, self.scale), classes[lab])
            z_clean = self.network(x_all[every])
            if self.consistency_weight or self.pseudo_weight:
                z_noisy = self.network(noisy_view(x_all[every], self.noise, self.mask, generator))
                loss = loss + self.consistency_weight * ((z_noisy - z_clean.detach()) ** 2).sum(1).mean()
                loss = loss + self.pseudo_weight * confident_agreement_loss(
                    proxy_logits(z_clean, proxies, self.scale), proxy_logits(z_noisy, proxies, self.scale),
                    self.confidence)
            if decoder is not None:
                loss = loss + self.reconstruction_weight * ((decoder(z_clean) - x_all[every]) ** 2).mean()
            if self.contrastive_weight:
                z_a = self.network(noisy_view(x_all[every], self.noise, self.mask, generator))
                z_b = self.network(noisy_view(x_all[every], self.noise, self.mask, generator))
                loss = loss + self.contrastive_weight * instance_contrastive_loss(z_a, z_b, self.temperature)
            if trained_codebooks:
                z = torch.cat([z_lab, z_clean])
                reconstruction = pq.decode(pq.compute_codes(np.ascontiguousarray(z.detach().numpy())))
                loss = loss + self.quant_weight * quantization_loss(z, torch.from_numpy(reconstruction))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self._refit_codebooks(pq, xs, labeled)  # final codebooks match the final network
        return proxies.detach()
