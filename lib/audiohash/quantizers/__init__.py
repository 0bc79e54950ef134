"""Quantizer registry: method name -> class. Every method implements ``base.Quantizer``."""
from __future__ import annotations

from audiohash.errors import AudiohashError
from audiohash.quantizers.base import AdcQuantizer, Quantizer, QuantizerState
from audiohash.quantizers.binary import AGH, ITQ, SH
from audiohash.quantizers.dqn import DQN, DQNCls
from audiohash.quantizers.opq import OPQ
from audiohash.quantizers.pq import PQ, PQFastScan

METHODS: dict[str, type[Quantizer]] = {
    cls.method: cls for cls in (PQ, PQFastScan, OPQ, ITQ, SH, AGH, DQN, DQNCls)
}


def quantizer_class(method: str) -> type[Quantizer]:
    try:
        return METHODS[method]
    except KeyError:
        raise AudiohashError(f"unknown method {method!r}; known: {sorted(METHODS)}") from None


def make_quantizer(method: str, n_bits: int, seed: int = 0, **hyper) -> Quantizer:
    return quantizer_class(method)(n_bits, seed=seed, **hyper)


def load_quantizer(state: QuantizerState) -> Quantizer:
    return quantizer_class(state.method).from_state(state)


__all__ = ["METHODS", "AdcQuantizer", "Quantizer", "QuantizerState", "load_quantizer", "make_quantizer"]
