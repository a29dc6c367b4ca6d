"""How the Triton attention kernels are launched (tformer.kernels.launch): 64-bit token offsets,
the grid and stride limits, the sequence-length buckets of the autotune key and the CUDA-graph
capture guard. The kernels' numerics are tested in test_attention.py."""

import pytest
import torch

from tformer.ops import attention, attention_varlen

from conftest import DEVICE, ON_GPU, requires_backend
from tolerances import assert_close_to_reference


# ---------------------------------------------------------------------------------------
# 64-bit token offsets
# ---------------------------------------------------------------------------------------

@requires_backend("triton")
def test_token_offsets_past_2_31_elements():
    # Fused-QKV layout, as q, k, v split from one projection: one storage, q/k/v at element
    # offsets 0, D, 2D of each token row. With the largest token stride the launcher takes
    # (launch.MAX_STRIDE rounded to 16) token 257's offset is 257 * 8,388,592 > 2^31: 32-bit
    # offsets wrap there and read far outside the tensor. The storage spans 4.5 GB of address
    # space, of which only the 272 touched rows are ever backed by memory.
    from tformer.kernels.launch import MAX_STRIDE

    seq, head_dim = 272, 16
    token_stride = MAX_STRIDE // 16 * 16
    assert 256 * token_stride < 2**31 < 257 * token_stride
    try:
        storage = torch.empty((seq - 1) * token_stride + 3 * head_dim, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:  # an address space or device smaller than 4.5 GB
        pytest.skip(f"cannot reserve 4.5 GB for the strided view: {error}")
    q, k, v = (storage[i * head_dim:].as_strided((1, 1, seq, head_dim), (0, 0, token_stride, 1)) for i in range(3))
    generator = torch.Generator().manual_seed(0)
    for view in (q, k, v):
        view.copy_(torch.randn(view.shape, generator=generator))
    grad_out = torch.randn(q.shape, generator=generator).to(DEVICE, torch.float16)

    # Plain PyTorch implementation
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected_out = attention(*leaves, causal=True, backend="reference")
    expected_out.backward(grad_out.double())

    # The Triton ops on the strided views themselves (autograd would allocate a 4.5 GB gradient).
    scale = head_dim ** -0.5
    causal = (-1, 0, False, 0.0)  # window_left, window_right, bottom_right, softcap: top-left causal
    out, lse = torch.ops.tformer.triton_attention_fwd(q, k, v, None, None, None, seq, seq, *causal, scale, 0.0, None,
                                                      "auto", "split", True)
    grads = torch.ops.tformer.triton_attention_bwd(grad_out, q, k, v, out, lse, None, None, None, seq, seq, *causal,
                                                   scale, 0.0, None, "split", True)

    # Check results
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads),
                               (expected_out, *(t.grad for t in leaves))):
        assert_close_to_reference(got, want, torch.float16, kind="forward" if name == "out" else "grad",
                                  scale=max(1.0, want.abs().max().item()), what=f"strided {name}")


@requires_backend("triton")
def test_refuses_token_stride_over_the_tile_limit():
    from tformer.kernels.launch import MAX_STRIDE

    storage = torch.empty(MAX_STRIDE + 17, device=DEVICE)
    q = storage.as_strided((1, 1, 2, 16), (0, 0, MAX_STRIDE + 1, 1))
    with pytest.raises(ValueError, match=r"argument 'q' has token/head-dim strides \(8388608, 1\)"):
        attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------------------
# Grid y (heads) and z (sequences) hold at most 65,535 blocks
# ---------------------------------------------------------------------------------------

@requires_backend("triton")
@pytest.mark.parametrize("shape, message", [((1, 65_536, 1, 16), "argument 'q' has 65536 heads"),
                                            ((65_536, 1, 1, 16), "argument 'q' has batch size 65536")],
                         ids=["heads", "batch"])
def test_refuses_grids_over_65535(shape, message):
    q = torch.zeros(shape, device=DEVICE)
    with pytest.raises(ValueError, match=f"{message}, at most 65535 are supported"):
        attention(q, q, q, backend="triton")
    from tformer.kernels.attention_tiles import problem

    at_limit = torch.empty([65_535 if size == 65_536 else size for size in shape], device="meta")
    problem(at_limit, at_limit, None, 1, 1)  # the limit itself is accepted


@requires_backend("triton")
def test_refuses_more_than_65535_packed_sequences():
    q = torch.zeros(65_536, 1, 16, device=DEVICE)
    cu_seqlens = torch.arange(65_537, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="argument 'cu_seqlens_q' describes 65536 sequences, at most 65535"):
        attention_varlen(q, q, q, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=1, max_seqlen_k=1,
                         backend="triton")


# ---------------------------------------------------------------------------------------
# Autotune key: sequence-length buckets; never tuning inside a CUDA-graph capture
# ---------------------------------------------------------------------------------------

def test_seqlen_buckets_are_powers_of_two():
    from tformer.kernels.launch import seqlen_bucket

    assert [seqlen_bucket(n) for n in (0, 1, 16, 17, 1024, 1025, 4096)] == [16, 16, 16, 32, 1024, 2048, 4096]


def test_tuned_kernels_take_the_buckets_last_and_key_on_them():
    from tformer.kernels import attention as fwd, attention_bwd as bwd
    from tformer.kernels.launch import BUCKET_ARGS

    meta_device = torch.device("meta")
    q = torch.empty(2, 4, 17, 64, dtype=torch.bfloat16, device=meta_device)
    k = torch.empty(2, 2, 33, 64, dtype=torch.bfloat16, device=meta_device)
    launches = []

    def record(kernel, tuned, grid_of, args, meta, device):
        launches.append((kernel, tuned, args))

    out, lse = fwd.attention_forward(q, k, k, None, None, None, 17, 33, True, 0.125, 0.0, 0, launcher=record)
    bwd.attention_backward(out, q, k, k, out, lse, None, None, None, 17, 33, True, 0.125, 0.0, 0, launcher=record)
    tuned_launches = [(kernel, tuned, args) for kernel, tuned, args in launches if tuned is not None]
    assert [kernel for kernel, _, _ in tuned_launches] == [fwd._attention_fwd_kernel, bwd._dkdv_kernel,
                                                           bwd._dq_kernel]
    for kernel, tuned, args in tuned_launches:
        assert args[-2:] == (32, 64)  # buckets of Sq = 17 and Sk = 33
        assert kernel.arg_names[len(args) - 2:len(args)] == list(BUCKET_ARGS)
        assert set(BUCKET_ARGS) <= set(tuned.autotuner.keys)


class _RecordingTuner:
    """Stands in for triton's Autotuner: records the bucket arguments of each tuned launch."""

    def __init__(self):
        self.launched = []

    def __getitem__(self, grid_of):
        return lambda *args, **meta: self.launched.append(args[-2:])


def test_never_autotunes_while_a_cuda_graph_is_captured(monkeypatch):
    from tformer.kernels import launch as launch_module

    capturing = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: bool(capturing))
    monkeypatch.delenv("TFORMER_AUTOTUNE", raising=False)
    tuned = launch_module.Tuned(_RecordingTuner(), {}, {})
    cuda = torch.device("cuda")  # only the device type is read: no GPU needed

    def kernel():
        pass

    def run(buckets):
        launch_module.launch(kernel, tuned, lambda blocks: (1, 1, 1), (torch.empty(1), 7, *buckets),
                             dict(BLOCK_D=64, IS_CAUSAL=True), cuda)

    capturing.append(True)
    with pytest.raises(RuntimeError, match="autotune while a CUDA graph is being captured.*buckets 32/64"):
        run((32, 64))
    assert tuned.autotuner.launched == []
    capturing.clear()
    run((32, 64))  # eager: tunes
    capturing.append(True)
    run((32, 64))  # captured, already tuned: runs
    assert tuned.autotuner.launched == [(32, 64), (32, 64)]
    with pytest.raises(RuntimeError, match="buckets 32/128"):
        run((32, 128))  # another sequence-length bucket would tune again
    # The error's other way out: the leading candidate, untimed (TFORMER_AUTOTUNE=0 -> autotune=False).
    from tformer.ops import overrides

    monkeypatch.setenv("TFORMER_AUTOTUNE", "0")
    assert not overrides.autotune()


# ---------------------------------------------------------------------------------------
# The interpreter's tiles (tests run the GPU tables' tile shapes with launch.interpreter_tiles)
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(ON_GPU, reason="the interpreter's blocks: CPU tensors only")
@requires_backend("triton")
def test_interpreter_tiles_apply_and_refuse_a_kernel_that_never_launched(monkeypatch):
    from tformer.kernels import attention as fwd, launch

    seen = []
    original = launch.interpreter_blocks
    monkeypatch.setattr(launch, "interpreter_blocks", lambda kernel: seen.append(original(kernel)) or seen[-1])
    q = torch.randn(1, 1, 40, 16, device=DEVICE)
    with launch.interpreter_tiles(_attention_fwd_kernel=(32, 16)):
        attention(q, q, q, backend="triton")
    assert seen[0] == {"BLOCK_M": 32, "BLOCK_N": 16}
    attention(q, q, q, backend="triton")
    assert seen[-1] is launch.INTERPRETER_BLOCKS  # put back on leaving
    with pytest.raises(RuntimeError, match="_attention_forward_kernel never launched"):
        with launch.interpreter_tiles(_attention_forward_kernel=(32, 16)):  # a misspelled name
            attention(q, q, q, backend="triton")
    assert fwd._attention_fwd_kernel.__name__ == "_attention_fwd_kernel"
