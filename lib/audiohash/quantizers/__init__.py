"""Quantizer registry: method name -> class. Every method implements ``base.Quantizer``.

Classes are imported on first use: a query executor scanning PQ codes never imports torch (which
the DQN module needs), only a process that loads a network-backed method does.
"""
from __future__ import annotations

import importlib
import inspect

from audiohash.errors import AudiohashError
from audiohash.quantizers.base import AdcQuantizer, Quantizer, QuantizerState

# method -> (module under audiohash.quantizers, class name)
METHODS: dict[str, tuple[str, str]] = {
    "pq": ("pq", "PQ"),
    "pq_fastscan": ("pq", "PQFastScan"),
    "opq": ("opq", "OPQ"),
    "itq": ("binary", "ITQ"),
    "sh": ("binary", "SH"),
    "agh": ("binary", "AGH"),
    "dqn": ("dqn", "DQN"),
    "dqn_cls": ("dqn", "DQNCls"),
    "dqn_semi": ("semi", "SemiDQN"),
}


def quantizer_class(method: str) -> type[Quantizer]:
    try:
        module, name = METHODS[method]
    except KeyError:
        raise AudiohashError(f"unknown method {method!r}; known: {sorted(METHODS)}") from None
    cls = getattr(importlib.import_module(f"audiohash.quantizers.{module}"), name)
    assert cls.method == method, (cls, method)
    return cls


def make_quantizer(method: str, n_bits: int, seed: int = 0, **hyper) -> Quantizer:
    cls = quantizer_class(method)
    known = {p.name for klass in cls.__mro__[:-1] if "__init__" in vars(klass)  # [:-1]: not object
             for p in inspect.signature(klass.__init__).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY} - {"self", "n_bits", "seed"}
    unknown = sorted(set(hyper) - known)
    if unknown:
        raise AudiohashError(f"train.hyper.{method}: unknown hyper-parameter(s) {unknown}; "
                             f"{method} takes {sorted(known) or 'none'}")
    return cls(n_bits, seed=seed, **hyper)


def load_quantizer(state: QuantizerState) -> Quantizer:
    return quantizer_class(state.method).from_state(state)


__all__ = ["METHODS", "AdcQuantizer", "Quantizer", "QuantizerState", "load_quantizer", "make_quantizer",
           "quantizer_class"]
