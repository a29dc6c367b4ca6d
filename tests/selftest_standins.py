"""Kernel paths that misbehave, for tests/test_selftest.py: each is ``{op: implementation}`` with
the registry's signature, loaded by the self-check's worker process (``--standin``)."""

import os
import time

from tformer.ops import registry


def _torch_attention(**args):
    return registry.implementation("attention", "torch")[1](**args)


def _hang(**args):
    time.sleep(3600)


def _crash(**args):
    os.abort()  # as a kernel that faults takes the process down


def _wrong(**args):
    return _torch_attention(**args) * 1.01


def _slow(**args):
    time.sleep(0.02)
    return _torch_attention(**args)


HANGS = {"attention": _hang}
CRASHES = {"attention": _crash}
WRONG = {"attention": _wrong}
SLOW = {"attention": _slow}
