"""Backends: one package per backend, one module per op. See tformer.ops.registry."""
