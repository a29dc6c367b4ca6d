"""The sm_90a kernels' banded variants skip every key block outside all rows' bands and mask
only the blocks a band edge (or the sequence's end) cuts: csrc/attention_sm90/band.h, compiled
with the host compiler, against a brute-force mask from tformer.ops.attention_mask.allowed_keys,
at the kernels' own block sizes (csrc/attention_sm90/contracts.h), for both head dims' backward
steps. A copy of the header with an off-by-one in its last key block must fail the same check,
and so must tests/sm90_band_model.py's broken mirrors. The kernels' arithmetic on those blocks
(skipped blocks, masks only where cuts() says, soft-cap in raw units with the scale in the
exponent, dS times 1 - tanh^2) is emulated in float64 against the reference backend's outputs,
log-sum-exp and gradients, rows with no key included."""

import shutil
import subprocess

import pytest
import torch

import sm90_band_model as band_model
import sm90_grid_model as grid
from sm90_layout_model import HEAD_DIMS, ROOT, read_constants

CONSTANTS = read_constants()
CASES = band_model.band_cases(CONSTANTS)
SMALL = 4096  # cases with Sq x Sk up to this also compare band.h's per-element allows()

PROGRAM = r"""
#include <cstdio>
#include "attention_sm90/band.h"
#include "attention_sm90/tile_scheduler.h"
using namespace tformer::attention_sm90;
int main() {
  int q, k, l, r, br, block, rows, gblock, step;
  while (std::scanf("%d %d %d %d %d %d %d %d %d", &q, &k, &l, &r, &br, &block, &rows, &gblock, &step) == 9) {
    const SequenceBand b = sequence_band(q, k, l, r, br != 0);
    std::printf("F");
    for (int m0 = 0; m0 < q; m0 += block) {
      const BlockRange range = b.key_blocks(m0, block, block);
      std::printf(" %d:%d:", range.first, range.end);
      for (int r0 = m0; r0 < m0 + block; r0 += rows) {
        for (int n = range.first; n < range.end; ++n) std::printf("%d", b.cuts(r0, r0 + rows - 1, n * block, block));
        std::printf("/");
      }
    }
    std::printf("\nK");
    for (int n0 = 0; n0 < k; n0 += gblock) {
      const BlockRange range = b.query_blocks(n0, gblock, step);
      std::printf(" %d:%d", range.first, range.end);
    }
    std::printf("\nQ");
    for (int m0 = 0; m0 < q; m0 += gblock) {
      const BlockRange range = b.key_blocks(m0, gblock, step);
      std::printf(" %d:%d", range.first, range.end);
    }
    std::printf("\nP %d\nA ", pair_query_blocks(l, r));
    if (q * k <= %SMALL%) {
      for (int i = 0; i < q; ++i)
        for (int j = 0; j < k; ++j) std::printf("%d", b.allows(i, j));
      std::printf(" ");
      for (int i = 0; i < q; ++i)
        for (int j = 0; j < k; ++j) std::printf("%d", b.key_rows(j).contains(i));
    }
    std::printf("\n");
  }
}
"""


def _build(tmp_path, include_root):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler to build band.h")
    source = tmp_path / "band.cpp"
    source.write_text(PROGRAM.replace("%SMALL%", str(SMALL)))
    binary = tmp_path / "band"
    subprocess.run([compiler, "-std=c++17", "-O1", "-I", str(include_root), str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    return binary


def _pair(text: str) -> tuple[int, int]:
    first, end = map(int, text.split(":")[:2])
    return (0, 0) if end <= first else (first, end)


def _run(binary, cases, sizes) -> list[tuple[band_model.BandRanges, bool, str]]:
    """band.h's ranges, pair_query_blocks and allows() bits for each case."""
    lines = "".join(f"{q} {k} {l} {r} {int(br)} {sizes['forward']} {sizes['rows_masked']} {sizes['grad_block']} "
                    f"{sizes['grad_step']}\n" for q, k, l, r, br in cases)
    out = subprocess.run([str(binary)], input=lines, check=True, capture_output=True, text=True,
                         timeout=300).stdout.splitlines()
    results = []
    for i in range(len(cases)):
        forward_line, key_line, query_line, pair_line, allows_line = out[5 * i:5 * i + 5]
        forward, masked = [], []
        for item in forward_line.split()[1:]:
            first, end, flags = item.split(":", 2)
            forward.append(_pair(f"{first}:{end}"))
            masked.append([[bit == "1" for bit in part] for part in flags.split("/")[:-1]])
        ranges = band_model.BandRanges(forward, masked, [_pair(t) for t in key_line.split()[1:]],
                                       [_pair(t) for t in query_line.split()[1:]])
        results.append((ranges, pair_line == "P 1", allows_line[2:]))
    return results


@pytest.fixture(scope="module")
def header_binary(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("band"), ROOT / "csrc")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_header_block_ranges_match_the_brute_force_mask(header_binary, head_dim):
    sizes = band_model.block_sizes(head_dim, CONSTANTS)
    errors = []
    for case, (ranges, _, _) in zip(CASES, _run(header_binary, CASES, sizes)):
        errors += band_model.check_ranges(ranges, *case, sizes)
        mirror = band_model.band_ranges(band_model.sequence_band(*case), sizes)
        if mirror != ranges:
            errors.append(f"{case}: tests/sm90_band_model.py's mirror differs from band.h")
    assert errors == [], errors[:5]


def test_header_row_and_key_intervals_allow_exactly_the_brute_force_pairs(header_binary):
    sizes = band_model.block_sizes(HEAD_DIMS[0], CONSTANTS)
    small = [case for case in CASES if case[0] * case[1] <= SMALL]
    assert len(small) > 50
    for case, (_, pair, bits) in zip(small, _run(header_binary, small, sizes)):
        q_len, k_len, left, right, bottom_right = case
        want = band_model.brute_force_mask(q_len, k_len, left, right, bottom_right).flatten().tolist()
        by_row, by_key = bits.split()  # row_keys(row) (forward, dQ pass), key_rows(key) (dK/dV pass)
        assert [bit == "1" for bit in by_row] == want, case
        assert [bit == "1" for bit in by_key] == want, case
        assert pair == grid.pair_query_blocks(left, right), case


def test_header_with_an_off_by_one_last_block_is_caught(tmp_path):
    # The same program on a copy of band.h whose key_end drops one key: the last key block of
    # rows whose band ends one key into a block is skipped.
    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc" / "attention_sm90", copy / "attention_sm90")
    header = copy / "attention_sm90" / "band.h"
    text = header.read_text()
    assert text.count("clamp(row_end + offset + right, 0, k_len)") == 1
    header.write_text(text.replace("clamp(row_end + offset + right, 0, k_len)",
                                   "clamp(row_end + offset + right - 1, 0, k_len)"))
    binary = _build(tmp_path, copy)
    sizes = band_model.block_sizes(HEAD_DIMS[0], CONSTANTS)
    errors = [e for case, (ranges, _, _) in zip(CASES, _run(binary, CASES, sizes))
              for e in band_model.check_ranges(ranges, *case, sizes)]
    assert any("forward query block" in e for e in errors) and any("dQ query block" in e for e in errors)


@pytest.mark.parametrize("broken, what", [(band_model.KeyEndOffByOne, "visits blocks"),
                                          (band_model.CutsIgnoresLeftEdge, "runs unmasked")])
def test_broken_mirrors_are_caught(broken, what):
    sizes = band_model.block_sizes(HEAD_DIMS[1], CONSTANTS)
    errors = []
    for q_len, k_len, left, right, bottom_right in CASES:
        band = broken(q_len, k_len, k_len - q_len if bottom_right else 0, left, right)
        errors += band_model.check_ranges(band_model.band_ranges(band, sizes), q_len, k_len, left, right,
                                          bottom_right, sizes)
    assert any(what in e for e in errors)


def test_windows_skip_whole_blocks():
    # A causal 256-key window over 8k tokens visits 3 key blocks a query block (2 where the
    # window starts on a block edge), not the up to 64 plain causal visits.
    sizes = band_model.block_sizes(128, CONSTANTS)
    block = sizes["forward"]
    window = 2 * block
    ranges = band_model.band_ranges(band_model.sequence_band(8192, 8192, window, 0, False), sizes)
    counts = [end - first for first, end in ranges.forward]
    assert max(counts) == window // block + 1 and sum(counts) < 3 * len(counts)


# ---- the banded kernels' arithmetic, emulated block by block against the float64 reference -----
NUMERIC_CASES = {  # (Sq, Sk, left, right, bottom_right, softcap)
    "causal_sliding": (300, 300, 100, 0, False, 0.0),
    "two_sided": (300, 300, 128, 128, False, 0.0),
    "bottom_right_sq_lt_sk": (130, 400, -1, 0, True, 0.0),
    "bottom_right_sq_gt_sk_rows_without_keys": (400, 130, -1, 0, True, 0.0),
    "top_left_left_window_rows_without_keys": (300, 17, 5, -1, False, 0.0),
    "softcap": (200, 257, -1, -1, False, 2.0),
    "softcap_window_bottom_right": (257, 300, 50, 0, True, 10.0),
    "one_query": (1, 300, 64, 0, True, 5.0),
}


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(NUMERIC_CASES))
def test_banded_block_arithmetic_matches_the_reference(case, head_dim):
    import tformer

    q_len, k_len, left, right, bottom_right, softcap = NUMERIC_CASES[case]
    sizes = band_model.block_sizes(head_dim, CONSTANTS)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(n, 16, generator=generator, dtype=torch.float64) for n in (q_len, k_len, k_len))
    dout = torch.randn(q_len, 16, generator=generator, dtype=torch.float64)
    scale = 0.3
    band = band_model.sequence_band(q_len, k_len, left, right, bottom_right)
    out, lse = band_model.emulate_forward(q, k, v, band, scale, softcap, sizes)
    grads = band_model.emulate_backward(q, k, v, dout, out, lse, band, scale, softcap, sizes)

    leaves = [t[None, None].clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = tformer.ops.attention(*leaves, window=(left, right), softcap=softcap, scale=scale,
                                               alignment="bottom_right" if bottom_right else "top_left",
                                               return_lse=True, backend="reference")
    want_out.backward(dout[None, None])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse[0, 0]))
    torch.testing.assert_close(out, want_out[0, 0].detach(), rtol=1e-10, atol=1e-10)
    finite = torch.isfinite(lse)
    # lse comes back as float32 (the kernels' convention), from a float64 computation.
    torch.testing.assert_close(lse[finite], want_lse[0, 0][finite].double(), rtol=1e-6, atol=1e-6)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        torch.testing.assert_close(got, leaf.grad[0, 0], rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_emulation_without_the_softcap_slope_is_caught():
    # dS without the factor 1 - tanh^2: the emulated gradients leave the reference.
    q_len, k_len, left, right, bottom_right, softcap = NUMERIC_CASES["softcap_window_bottom_right"]
    sizes = band_model.block_sizes(64, CONSTANTS)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(n, 16, generator=generator, dtype=torch.float64) for n in (q_len, k_len, k_len))
    dout = torch.randn(q_len, 16, generator=generator, dtype=torch.float64)
    band = band_model.sequence_band(q_len, k_len, left, right, bottom_right)
    out, lse = band_model.emulate_forward(q, k, v, band, 0.3, softcap, sizes)
    right_grads = band_model.emulate_backward(q, k, v, dout, out, lse, band, 0.3, softcap, sizes)
    original = band_model._capped
    try:
        band_model._capped = lambda raw, scale, cap: (original(raw, scale, cap)[0], torch.ones_like(raw))
        wrong_grads = band_model.emulate_backward(q, k, v, dout, out, lse, band, 0.3, softcap, sizes)
    finally:
        band_model._capped = original
    assert not torch.allclose(right_grads[0], wrong_grads[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("broken", [band_model.KeyEndOffByOne, band_model.CutsIgnoresLeftEdge])
def test_emulation_of_a_broken_band_is_caught(broken):
    import tformer

    # A window whose right edge ends one key into the next block (the off-by-one drops that
    # block) and whose left edge cuts blocks the right edge does not.
    sizes = band_model.block_sizes(64, CONSTANTS)
    q_len, k_len, left, right, bottom_right, softcap = 300, 300, sizes["forward"] - 1, 1, False, 0.0
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 16, generator=generator, dtype=torch.float64) for n in (q_len, k_len, k_len))
    band = broken(q_len, k_len, k_len - q_len if bottom_right else 0, left, right)
    out, _ = band_model.emulate_forward(q, k, v, band, 0.3, softcap, sizes)
    want = tformer.ops.attention(q[None, None], k[None, None], v[None, None], window=(left, right), scale=0.3,
                                 backend="reference")[0, 0]
    assert not torch.allclose(out, want, rtol=1e-6, atol=1e-6)


# Which calls take the banded variants is decided twice: by csrc/attention/attention.h's
# attention_has_band_or_softcap in the launcher, and by tformer/backends/cuda/paths.py's
# takes_banded_kernels, which the GPU canary's TFORMER_ATTENTION_BAND_FORCE_SM80 relies on to move
# exactly those calls. The header is compiled against a two-line stand-in for cuda_runtime.h (it
# only names cudaError_t and cudaStream_t), so this runs wherever a host compiler does.
_SELECTOR = r"""
#include <cstdio>
#include "attention/attention.h"
int main() {
  int left, right, bottom_right;
  float softcap;
  while (std::scanf("%d %d %d %f", &left, &right, &bottom_right, &softcap) == 4) {
    tformer::AttentionProblem p;
    p.window_left = left;
    p.window_right = right;
    p.bottom_right = bottom_right != 0;
    p.softcap = softcap;
    std::printf("%d\n", tformer::attention_has_band_or_softcap(p) ? 1 : 0);
  }
}
"""


def _selector_answers(tmp_path, csrc, cases) -> list[bool]:
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler to build attention.h")
    stand_in = tmp_path / "stand_in"
    stand_in.mkdir()
    (stand_in / "cuda_runtime.h").write_text("#pragma once\ntypedef int cudaError_t;\ntypedef void* cudaStream_t;\n")
    source, binary = tmp_path / "selector.cpp", tmp_path / "selector"
    source.write_text(_SELECTOR)
    subprocess.run([compiler, "-std=c++17", "-I", str(csrc), "-I", str(stand_in), str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=120)
    lines = "".join(f"{left} {right} {int(bottom_right)} {softcap}\n" for left, right, bottom_right, softcap in cases)
    out = subprocess.run([str(binary)], input=lines, check=True, capture_output=True, text=True, timeout=60)
    return [line == "1" for line in out.stdout.split()]


_SELECTOR_CASES = [(left, right, bottom_right, softcap) for left in (-1, 0, 5) for right in (-1, 0, 3)
                   for bottom_right in (False, True) for softcap in (0.0, 30.0)]


def test_python_rule_for_the_banded_variants_matches_the_launcher(tmp_path):
    from tformer.backends.cuda.paths import takes_banded_kernels

    want = _selector_answers(tmp_path, ROOT / "csrc", _SELECTOR_CASES)
    got = [takes_banded_kernels((left, right, bottom_right), softcap)
           for left, right, bottom_right, softcap in _SELECTOR_CASES]
    assert len(want) == len(_SELECTOR_CASES) and got == want
    assert want[_SELECTOR_CASES.index((-1, 0, False, 0.0))] is False  # plain causal: unbanded
    assert sum(want) > len(want) // 2


def test_selector_with_another_rule_is_caught(tmp_path):
    # A copy of the header where bottom-right causal stays unbanded: the comparison must see it.
    copy = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc" / "attention", copy / "attention")
    shutil.copytree(ROOT / "csrc" / "common", copy / "common")
    header = copy / "attention" / "attention.h"
    rule = "(p.window_right > 0 || p.bottom_right)"
    assert rule in header.read_text()
    header.write_text(header.read_text().replace(rule, "(p.window_right > 0)"))
    from tformer.backends.cuda.paths import takes_banded_kernels

    want = _selector_answers(tmp_path, copy, _SELECTOR_CASES)
    assert want != [takes_banded_kernels(case[:3], case[3]) for case in _SELECTOR_CASES]
