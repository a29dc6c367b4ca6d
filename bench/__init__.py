"""tformer's benchmarks: ``pytest bench --benchmark-only`` (pytest-benchmark).

Every kernel is checked against the float64 reference, then timed beside the anchors a user
would otherwise pick (SDPA's backends, torch's LayerNorm and softmax, Liger-Kernel,
flash-attn). ``python -m bench.report RESULTS.json`` turns the JSON into tables and plots.
"""
