"""Backend selection: names, availability, defaults, auto, and the messages users see."""

import logging

import pytest
import torch

import tformer
from tformer.ops import dispatch, registry

from conftest import DEVICE


def _inputs():
    q = torch.randn(1, 2, 3, 8, device=DEVICE)
    return q, q.clone(), q.clone()


def test_available_backends_lists_every_backend_with_a_reason_or_none():
    backends = tformer.available_backends()
    assert set(backends) == {"reference", "torch", "triton", "triton:atomic_dq", "triton:fa2", "cuda", "cuda:sm80"}
    assert backends["reference"] is None
    for name, reason in backends.items():
        assert reason is None or (isinstance(reason, str) and len(reason) > 20), (name, reason)


def test_unknown_backend_names_the_choices_and_suggests_the_nearest():
    with pytest.raises(tformer.BackendError, match=r"unknown backend 'trition'.*Did you mean 'triton'"):
        tformer.ops.attention(*_inputs(), backend="trition")
    with pytest.raises(tformer.BackendError, match="unknown backend"):
        with tformer.backend("fastest"):
            pass


def test_unavailable_backend_says_why_and_how_to_get_it(monkeypatch):
    monkeypatch.setattr(registry._backends["cuda"], "reason", "the CUDA extension was not built; rebuild it")
    monkeypatch.setattr(registry._backends["cuda"], "loaded", False)
    with pytest.raises(tformer.BackendError, match=r"backend 'cuda' is not available: the CUDA extension was not "
                                                   r"built; rebuild it"):
        tformer.ops.layer_norm(torch.randn(2, 4, device=DEVICE), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_cuda_backend_without_gpu_or_extension_gives_real_reason():
    reason = tformer.available_backends()["cuda"]
    assert reason is not None
    assert "extension" in reason or "no CUDA GPU" in reason
    with pytest.raises(tformer.BackendError, match="backend 'cuda' is not available"):
        tformer.ops.softmax(torch.randn(2, 3), backend="cuda")


def test_backend_refuses_dtype_it_cannot_run(monkeypatch):
    # float64 is for the reference only; a kernel backend names the dtype it got and what it takes.
    fake = registry.Implementation(lambda **kw: None, frozenset({"cpu", "cuda"}), frozenset({torch.float32}))
    monkeypatch.setitem(registry._backends["triton"].impls, "softmax", fake)
    monkeypatch.setattr(registry._backends["triton"], "loaded", True)
    monkeypatch.setattr(registry, "unavailable_reason", lambda name: None)
    with pytest.raises(tformer.UnsupportedInput, match=r"backend 'triton' runs 'softmax' on dtypes \['float32'\], "
                                                   r"got float64"):
        tformer.ops.softmax(torch.randn(2, 3, dtype=torch.float64), backend="triton")


def test_auto_on_cpu_picks_torch_and_logs_once_with_the_reason(caplog):
    dispatch._auto_logged.clear()
    x = torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="tformer"):
        tformer.ops.layer_norm(x, backend="auto")
        tformer.ops.layer_norm(x, backend="auto")
    chosen = [r.getMessage() for r in caplog.records if "backend='auto' chose" in r.getMessage()]
    assert chosen == ["backend='auto' chose 'torch' for layer_norm on cpu float32: on a CPU torch's operators are "
                      "the fast path (tformer's Triton kernels run there only interpreted)"]


def test_auto_on_cpu_takes_reference_where_torch_refuses(caplog):
    dispatch._auto_logged.clear()
    with caplog.at_level(logging.INFO, logger="tformer"):
        tformer.ops.layer_norm(torch.randn(4, 1), backend="auto")  # one-element rows: torch's backward is inexact
    (message,) = [r.getMessage() for r in caplog.records if "backend='auto' chose" in r.getMessage()]
    assert message.startswith("backend='auto' chose 'reference' for layer_norm") and "passed over: torch: " in message


def test_auto_falls_back_past_backends_that_refuse_and_says_why(monkeypatch, caplog):
    # A meta tensor stands in for a device torch's backend refuses; the reference is allowed it
    # here, so auto falls back to it and logs the backend it passed over, with the reason.
    registry._load("reference")
    real = registry._backends["reference"].impls["softmax"]
    monkeypatch.setitem(registry._backends["reference"].impls, "softmax",
                        registry.Implementation(real.fn, real.devices | {"meta"}, real.dtypes))
    dispatch._auto_logged.clear()
    with caplog.at_level(logging.INFO, logger="tformer"):
        out = tformer.ops.softmax(torch.empty(2, 3, device="meta"), backend="auto")
    assert out.device.type == "meta"
    (message,) = [r.getMessage() for r in caplog.records if "backend='auto' chose" in r.getMessage()]
    assert message.startswith("backend='auto' chose 'reference' for softmax on meta float32: ")
    assert "(passed over: torch: backend 'torch' runs 'softmax' on ['cpu', 'cuda'] tensors, got a meta tensor)" in message


def test_auto_with_no_backend_for_the_input_lists_every_reason():
    with pytest.raises(tformer.BackendError, match=r"softmax: no backend can run this input: torch: .*; "
                                                   r"reference: backend 'reference' runs 'softmax' on \['cpu', "
                                                   r"'cuda'\] tensors, got a meta tensor"):
        tformer.ops.softmax(torch.empty(2, 3, device="meta"), backend="auto")


def test_default_comes_from_context_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv("TFORMER_BACKEND", raising=False)
    assert tformer.default_backend() == "auto"
    monkeypatch.setenv("TFORMER_BACKEND", "reference")
    assert tformer.default_backend() == "reference"
    with tformer.backend("triton"):
        assert tformer.default_backend() == "triton"
        with tformer.backend("reference"):
            assert tformer.default_backend() == "reference"
        assert tformer.default_backend() == "triton"
    assert tformer.default_backend() == "reference"


def test_context_default_is_used_by_ops(monkeypatch):
    calls = []
    original = registry._backends["reference"].impls
    registry._load("reference")
    real = original["softmax"]
    monkeypatch.setitem(original, "softmax", registry.Implementation(
        lambda **kw: calls.append("reference") or real.fn(**kw), real.devices, real.dtypes))
    with tformer.backend("reference"):
        tformer.ops.softmax(torch.randn(2, 3))
    assert calls == ["reference"]


def test_unknown_environment_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("TFORMER_BACKEND", "tritn")
    with pytest.raises(tformer.BackendError, match="Did you mean 'triton'"):
        tformer.ops.softmax(torch.randn(2, 3))


def test_dispatch_traces_under_torch_compile_fullgraph():
    # The registry is plain dict lookups once tformer is imported, so dynamo sees through it.
    def step(x, weight, q, key_padding_mask):
        y = tformer.ops.layer_norm(x, weight, backend="reference")
        p = tformer.ops.softmax(y, mask=y > 0)
        out = tformer.ops.attention(q, q, q, causal=True, key_padding_mask=key_padding_mask)
        return p.sum() + out.sum()

    x, weight = torch.randn(4, 8), torch.ones(8)
    q, pad = torch.randn(1, 2, 5, 8), torch.tensor([[False, False, False, True, True]])
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, weight, q, pad), step(x, weight, q, pad))


def test_triton_backend_loads_wherever_triton_can_run():
    # Guards against a broken kernel module turning every Triton test into a silent skip.
    import importlib.util

    from tformer.backends.triton import interpreting

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available() or interpreting():
        assert tformer.available_backends()["triton"] is None


@pytest.mark.parametrize("triton_version, numpy_version, conflict", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.8.0+git1234", "2.5.0", False),
    ("3.5.1", "2.10.0", True)])
def test_interpreter_numpy_conflict_names_the_fix(triton_version, numpy_version, conflict):
    # Triton < 3.7's interpreter does int() of one-element arrays, a TypeError since NumPy 2.4:
    # the backend must say so and how to fix it, not fail inside a kernel.
    from tformer.backends.triton import interpreter_numpy_conflict

    reason = interpreter_numpy_conflict(triton_version, numpy_version)
    if conflict:
        assert f"Triton {triton_version}" in reason and f"NumPy {numpy_version}" in reason
        assert "pip install 'numpy<2.4' or 'triton>=3.7'" in reason
    else:
        assert reason is None


def _attention_args(head_dim, seq, causal):
    q = torch.empty(1, 2, seq, head_dim, device="meta")
    return dict(q=q, k=q, v=q, causal=causal)


MEASURED = {"measured": {"device": "H100"}, "entries": [
    {"op": "attention", "dtype": "bfloat16", "head_dim": 64, "seq": 1024, "causal": True, "order": ["cuda", "triton"]},
    {"op": "attention", "dtype": "bfloat16", "head_dim": 64, "seq": 4096, "causal": True, "order": ["triton", "cuda"]},
    {"op": "attention", "dtype": "bfloat16", "head_dim": 128, "seq": 1024, "causal": True, "order": ["triton"]},
    {"op": "attention", "dtype": "bfloat16", "head_dim": 64, "seq": 1024, "causal": False, "order": ["reference"]},
    {"op": "layer_norm", "dtype": "bfloat16", "n": 512, "order": ["cuda", "triton"]},
    {"op": "layer_norm", "dtype": "bfloat16", "n": 8192, "order": ["triton", "cuda"]},
]}


def test_nearest_entry_takes_the_nearest_shape_of_the_same_kind():
    from tformer.ops.measured_order import nearest_entry, shape_key

    def order(op, args, dtype="bfloat16"):
        found = nearest_entry(op, dtype, shape_key(op, args), MEASURED["entries"])
        return found and tuple(found["order"])

    assert order("attention", _attention_args(64, 1500, True)) == ("cuda", "triton")  # log2: nearer 1024
    assert order("attention", _attention_args(64, 3000, True)) == ("triton", "cuda")  # nearer 4096
    assert order("attention", _attention_args(96, 1024, True)) == ("triton",)  # log2: 96 is nearer 128 than 64
    assert order("attention", _attention_args(128, 8192, True)) == ("triton",)  # head dim first
    assert order("attention", _attention_args(64, 1024, False)) == ("reference",)  # causal must match
    assert order("attention", _attention_args(64, 1024, True), dtype="float16") is None  # no fp16 entry
    varlen = dict(_attention_args(64, 1, True), max_seqlen_k=4000)
    assert order("attention_varlen", varlen) == ("triton", "cuda")  # the padded op's measurements
    x = torch.empty(3, 600, device="meta")
    assert order("layer_norm", dict(x=x)) == ("cuda", "triton")
    assert order("rms_norm", dict(x=torch.empty(3, 7000, device="meta"))) == ("triton", "cuda")
    assert order("softmax", dict(x=x)) is None


def test_the_shipped_measured_table_is_well_formed():
    from tformer.ops.measured_order import TABLE_PATH, load_table

    assert TABLE_PATH.is_file(), "the package ships its table (empty until a GPU run writes it)"
    table = load_table(TABLE_PATH)
    for entry in table["entries"]:
        assert entry["op"] in ("attention", "layer_norm", "softmax") and set(entry["order"]) <= set(registry.backend_names())


ENVIRONMENT_READS = ("os.environ", "os.getenv", "getenv(", "secure_getenv(", "environ[")


def environment_readers(root, folders=("kernels", "tformer/backends", "csrc"),
                        suffixes=(".py", ".cu", ".cuh", ".h", ".cpp")) -> list[str]:
    """The files under ``folders`` of ``root`` that read the environment."""
    return [str(path.relative_to(root)) for folder in folders for path in sorted((root / folder).rglob("*"))
            if path.suffix in suffixes and any(word in path.read_text() for word in ENVIRONMENT_READS)]


def test_kernels_backends_and_the_extension_read_no_environment(tmp_path):
    """Choices are arguments; the environment is read as overrides in tformer/ops/overrides.py only
    (the CUDA sources included: the sm_80 path is the argument force_sm80, not a variable)."""
    from pathlib import Path

    assert environment_readers(Path(__file__).resolve().parents[1]) == []
    # The check sees a C++ read and a Python one.
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "dispatch.cu").write_text('const char* v = std::getenv("X");')
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text('import os\npath = os.environ.get("X")')
    assert environment_readers(tmp_path) == ["kernels/k.py", "csrc/dispatch.cu"]


def test_variants_are_listed_chosen_by_name_and_set_kernel_arguments(monkeypatch):
    assert {"triton:atomic_dq", "triton:fa2"} <= set(tformer.available_backends())
    _pretend_every_backend_available(monkeypatch)
    impl, fn = registry.implementation("attention", "triton:atomic_dq")
    assert fn.keywords["dq_mode"] == "atomic" and fn.keywords["fwd_path"] == "auto"
    assert registry.implementation("attention", "triton:fa2")[1].keywords["fwd_path"] == "fa2"
    # An op the variant does not change runs the backend's default path.
    assert registry.implementation("layer_norm", "triton:atomic_dq")[1] is registry.implementation(
        "layer_norm", "triton")[1]
    monkeypatch.setenv("TFORMER_ATTENTION_DQ", "atomic")  # the override, read at call time
    assert registry.implementation("attention", "triton")[1].keywords["dq_mode"] == "atomic"
    with pytest.raises(tformer.BackendError, match="unknown backend 'triton:atomic'.*Did you mean 'triton:atomic_dq'"):
        tformer.ops.softmax(torch.randn(2, 3), backend="triton:atomic")


def test_cuda_sm80_is_a_variant_whose_overrides_are_read_in_python(monkeypatch):
    """The CUDA attention's sm_80 path is chosen like the Triton variants: listed, an argument of
    the kernels (the compiled extension reads no environment), with its variables as overrides."""
    from tformer.ops import overrides

    assert "cuda:sm80" in tformer.available_backends()
    sm80 = registry.variants("cuda")["sm80"]
    assert sm80.options == {"force_sm80": True} and set(sm80.ops) == {"attention", "attention_varlen"}
    for name in ("TFORMER_ATTENTION_FORCE_SM80", "TFORMER_ATTENTION_BWD_FORCE_SM80",
                 "TFORMER_ATTENTION_BAND_FORCE_SM80"):
        monkeypatch.delenv(name, raising=False)
    assert overrides.kernel_options("cuda", "attention") == {"force_sm80": False, "force_sm80_backward": False,
                                                             "force_sm80_banded": False}
    monkeypatch.setenv("TFORMER_ATTENTION_BWD_FORCE_SM80", "1")
    monkeypatch.setenv("TFORMER_ATTENTION_BAND_FORCE_SM80", "1")
    assert overrides.kernel_options("cuda", "attention_varlen") == {"force_sm80": False, "force_sm80_backward": True,
                                                                    "force_sm80_banded": True}
    monkeypatch.setenv("TFORMER_ATTENTION_FORCE_SM80", "0")  # "0" is unset, as for every flag
    assert not overrides.kernel_options("cuda", "attention")["force_sm80"]
    assert overrides.kernel_options("cuda", "layer_norm") == {}


def test_band_force_sm80_moves_only_the_calls_the_banded_kernels_take():
    """TFORMER_ATTENTION_BAND_FORCE_SM80 (the GPU canary's step-around for the sm_90a banded
    variants) forces sm_80 for exactly the calls csrc's attention_has_band_or_softcap sends to
    them: plain and top-left causal calls keep the sm_90a kernels."""
    from tformer.backends.cuda.paths import kernel_band, sm80_flags, takes_banded_kernels
    from tformer.ops.attention_mask import resolve_band

    def forced(causal, window=None, alignment="top_left", softcap=0.0, same_lengths=False):
        band_args = kernel_band(resolve_band("t", causal, window, alignment), same_lengths)
        return sm80_flags(False, False, True, takes_banded_kernels(band_args, softcap))

    assert forced(False) == (False, False)
    assert forced(True) == (False, False)
    assert forced(True, alignment="bottom_right", same_lengths=True) == (False, False)  # the same band
    assert forced(True, alignment="bottom_right") == (True, True)
    assert forced(True, window=(64, 0)) == (True, True)
    assert forced(False, window=(-1, 3)) == (True, True)
    assert forced(False, softcap=30.0) == (True, True)
    assert sm80_flags(False, False, False, True) == (False, False)  # off: banded calls stay on sm_90a
    assert sm80_flags(False, True, True, False) == (False, True)


def test_cuda_sm80_variant_binds_the_kernel_argument(monkeypatch):
    from tformer.backends import cuda

    if cuda.extension_error() is not None:
        pytest.skip(f"the CUDA extension does not load here: {cuda.extension_error()}")
    _pretend_every_backend_available(monkeypatch)
    for name in ("TFORMER_ATTENTION_FORCE_SM80", "TFORMER_ATTENTION_BWD_FORCE_SM80"):
        monkeypatch.delenv(name, raising=False)
    assert registry.implementation("attention", "cuda:sm80")[1].keywords["force_sm80"] is True
    assert registry.implementation("attention", "cuda")[1].keywords["force_sm80"] is False
    assert registry.implementation("layer_norm", "cuda:sm80")[1] is registry.implementation("layer_norm", "cuda")[1]
    monkeypatch.setenv("TFORMER_ATTENTION_FORCE_SM80", "1")  # the override, read at call time
    assert registry.implementation("attention", "cuda")[1].keywords["force_sm80"] is True


def _pretend_every_backend_available(monkeypatch) -> None:
    """Every backend loads, here; afterwards each is as loaded as it was before. A backend this
    test loads while pretending (the CUDA one, built but without a GPU) must not stay loaded:
    later tests expect its real reason ("no CUDA GPU is visible") on first use."""
    for backend in registry._backends.values():
        monkeypatch.setattr(backend, "loaded", backend.loaded)
    monkeypatch.setattr(registry, "unavailable_reason", lambda name: None)
