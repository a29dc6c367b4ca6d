"""Data sets: download with checksums, verify, split, tokenize and batch.

Each data set is its own module (``tformer.data.imdb``, ...); this package imports none of
them so that loading one never pulls in another's dependencies.
"""
