"""Keras compatibility: what a Keras user passes to a layer and how Keras reads it.

Keras 3's initializers, regularizers, constraints and activation identifiers (names, configs,
objects), keras.json's defaults, argument standardization with Keras's wording, and the symbolic
tensors of functional models. The layer API (tvmconv.layer, tvmconv.model) uses these; nothing
here compiles or runs code. `tvmconv.initializers` and its siblings are these modules.
"""
