"""CPU emulation of the sm_90a attention kernels' shared-memory contract: TMA writes each tile
128-byte swizzled, and every wgmma reads it back through a matrix descriptor. Both sides are
modelled from the hardware documentation, the kernels' side from their own constants
(csrc/attention_sm90/contracts.h, parsed here), and `check_kernel` asserts that every element
each wgmma fetches is the intended (row, column) element of Q, K, V or dO, for every kernel,
head dim, consumer and k-step.

Hardware model (the two ends of the contract):
- TMA, CU_TENSOR_MAP_SWIZZLE_128B: box element (row r, column c) goes to byte
  dst + 128 r + 2 c with address bits [4:6] XOR-ed by bits [7:9] (16-byte chunks permuted
  within each 128-byte row by the row's index in its 8-row, 1024-byte atom).
- wgmma descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading (LBO) and
  stride (SBO) byte offsets in 16-byte units in bits 0-13, 16-29, 32-45; layout type in
  62-63 (1 = 128B swizzle). Canonical 128B-swizzled layouts (CUTLASS mma_traits_sm90_gmma.hpp,
  in elements, T = 8 elements = 16 bytes):
    K-major   ((8, m), (T, 2)) : ((8T, SBO), (1, T))          rows x k
    MN-major  ((T, 8, m), (8, 2)) : ((1, T, LBO), (8T, SBO))  n x k
  and the same XOR on the final address (base offset 0: tiles start on a 1024-byte atom).

The kernels' side mirrors products.cuh (`issue_ss`, `issue_rs`, `pack_a`), hopper.cuh
(`smem_descriptor`) and each kernel's shared-memory carve-up; `overrides` replaces header
constants to build deliberately broken variants (the tests check those fail).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT / "csrc" / "attention_sm90" / "contracts.h"
HEAD_DIMS = (64, 128)
# key_grad_dq: the one-pass dK/dV kernel (kAtomicDq), which also stages dS^T and computes dQ.
KERNELS = ("forward", "key_grad", "query_grad", "key_grad_dq")
_CONSTANT = re.compile(r"^\s*constexpr int (k\w+) = ([^;]+);", re.M)


def read_constants(path: Path = CONTRACTS) -> dict[str, int]:
    """contracts.h's `constexpr int kName = expression;` lines, evaluated in order (C++ integer
    arithmetic on non-negative values: `/` is floor division)."""
    values: dict[str, int] = {}
    for name, expression in _CONSTANT.findall(path.read_text()):
        if not re.fullmatch(r"[\w\s+\-*/%()<>]+", expression):
            raise ValueError(f"{path.name}: {name} = {expression!r} is not plain integer arithmetic")
        try:
            values[name] = int(eval(expression.replace("/", "//"), {"__builtins__": {}}, dict(values)))  # noqa: S307
        except Exception as error:
            raise ValueError(f"{path.name}: cannot evaluate {name} = {expression!r}") from error
    if not values:
        raise ValueError(f"no constants found in {path}")
    return values


# ---- hardware: TMA writes, descriptor decoding, wgmma operand fetches ---------------------------
def swizzle_128b(address: np.ndarray) -> np.ndarray:
    """Address bits [4:6] ^= bits [7:9]: the 128-byte swizzle of TMA and wgmma alike."""
    return address ^ (((address >> 7) & 7) << 4)


class SharedMemory:
    """Shared memory as one code per 16-bit element: tensor id, row, column (-1: never written)."""

    TENSORS = ("Q", "K", "V", "dO", "dS")

    def __init__(self, size: int, atom_bytes: int):
        self.cells = np.full(size // 2, -1, dtype=np.int64)
        self.atom_bytes = atom_bytes
        self.errors: list[str] = []

    @staticmethod
    def code(tensor: str, row, column):
        return SharedMemory.TENSORS.index(tensor) * (1 << 40) + np.asarray(row) * (1 << 20) + np.asarray(column)

    def tma_box(self, dst: int, tensor: str, row0: int, column0: int, rows: int, columns: int, row_bytes: int):
        """One swizzled TMA box of rows x columns 16-bit elements (rows `row_bytes` apart)."""
        if dst % self.atom_bytes:
            self.errors.append(f"TMA destination {dst:#x} of {tensor} is not on a {self.atom_bytes}-byte swizzle atom")
        r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
        address = swizzle_128b(dst + r * row_bytes + 2 * c)
        self.cells[address // 2] = self.code(tensor, row0 + r, column0 + c)

    def read(self, address: np.ndarray) -> np.ndarray:
        return self.cells[swizzle_128b(address) // 2]


@dataclass(frozen=True)
class Descriptor:
    start: int
    leading: int
    stride: int
    layout: int
    base_offset: int

    @staticmethod
    def decode(value: int) -> "Descriptor":
        return Descriptor(start=(value & 0x3FFF) << 4, leading=((value >> 16) & 0x3FFF) << 4,
                          stride=((value >> 32) & 0x3FFF) << 4, layout=value >> 62, base_offset=(value >> 49) & 7)


def fetch_k_major(memory: SharedMemory, desc: int, rows: int) -> np.ndarray:
    """(rows, 16) codes a wgmma reads for a K-major operand (A: 64 rows; B: N rows)."""
    d = Descriptor.decode(desc)
    r, k = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
    return memory.read(d.start + (r % 8) * 128 + (r // 8) * d.stride + (k // 8) * 16 + (k % 8) * 2)


def fetch_mn_major(memory: SharedMemory, desc: int, columns: int) -> np.ndarray:
    """(16, columns) codes a wgmma reads for an MN-major operand (k rows, n columns; for A with
    imm-trans-a, columns are A's 64 rows m)."""
    d = Descriptor.decode(desc)
    k, n = np.meshgrid(np.arange(16), np.arange(columns), indexing="ij")
    return memory.read(d.start + (n % 64) * 2 + (n // 64) * d.leading + (k % 8) * 128 + (k // 8) * d.stride)


# ---- the kernels' side (mirrors hopper.cuh, products.cuh and the kernels' carve-up) --------------
def smem_descriptor(address: int, leading: int, stride: int, c: dict[str, int]) -> int:
    """hopper.cuh's smem_descriptor."""
    desc = (address & 0x3FFFF) >> 4
    desc |= ((leading & 0x3FFFF) >> 4) << c["kDescriptorLeadingShift"]
    desc |= ((stride & 0x3FFFF) >> 4) << c["kDescriptorStrideShift"]
    return desc | (c["kDescriptorSwizzle128B"] << c["kDescriptorSwizzleShift"])


def ss_descriptors(a_address, a_panel_bytes, b_address, b_panel_bytes, head_dim, c):
    """products.cuh's issue_ss: one (A, B) descriptor pair per k-step."""
    pairs = []
    for kk in range(head_dim // c["kWgmmaK"]):
        column = (kk % c["kKStepsPerPanel"]) * c["kKStepBytes"]
        panel = kk // c["kKStepsPerPanel"]
        pairs.append((smem_descriptor(a_address + panel * a_panel_bytes + column, c["kKMajorLeadingBytes"],
                                      c["kKMajorStrideBytes"], c),
                      smem_descriptor(b_address + panel * b_panel_bytes + column, c["kKMajorLeadingBytes"],
                                      c["kKMajorStrideBytes"], c)))
    return pairs


def rs_descriptors(b_address, b_panel_bytes, k_rows, c):
    """products.cuh's issue_rs: one B descriptor per 16 rows of K."""
    return [smem_descriptor(b_address + t * c["kMNStepBytes"], b_panel_bytes, c["kMNMajorStrideBytes"], c)
            for t in range(k_rows // c["kWgmmaK"])]


def forward_q_buffers(head_dim: int, c: dict[str, int]) -> int:
    """forward_sm90.cuh's Shape<kD>::kQBuffers: two Q buffers where they fit beside the K/V ring."""
    tile = head_dim // c["kPanelColumns"] * c["kBoxRows"] * c["kSwizzleBytes"]
    def smem(q_buffers):
        return (q_buffers + 2 * c["kForwardStages"]) * tile + c["kForwardBarrierBytes"] + c["kSwizzleAtomBytes"]
    return c["kForwardQBuffers"] if smem(c["kForwardQBuffers"]) <= c["kMaxSharedBytes"] else 1


def grad_step(head_dim: int, c: dict[str, int]) -> int:
    """backward_sm90.cuh's grad_step."""
    return c["kGradStepSmall"] if head_dim <= c["kGradStepSmallHeadDim"] else c["kGradStepLarge"]


@dataclass(frozen=True)
class Tile:
    """A tile of `rows` x head_dim of `tensor` at `address`: head_dim / 64 panels of `rows` x 128 B,
    as the producer's TMA boxes write it; `row0` is its first row in the tensor (a stand-in token)."""
    tensor: str
    address: int
    rows: int
    row0: int = 0

    @property
    def panel_bytes(self) -> int:
        return self.rows * 128


@dataclass(frozen=True)
class Product:
    """One product a consumer issues: ss (both operands K-major) or rs (B MN-major)."""
    name: str
    kind: str  # "ss" | "rs"
    b: Tile
    a: Tile | None = None  # ss only
    a_row0: int = 0        # ss: the consumer's first row of A's tile
    n: int = 0             # ss: B's rows (N); rs: B's columns (head dim)
    k_rows: int = 0        # rs, ss_mn: K of the product (rows of B)
    a_transposed: bool = True  # ss_mn: A read MN-major (imm-trans-a = 1), as the kernel issues it


def kernel_products(kernel: str, head_dim: int, consumer: int, slot: int, c: dict[str, int], base: int = 0,
                    q_read_bytes: int | None = None):
    """(tiles the producer loads, products consumer `consumer` issues on pipeline slot `slot`).
    `q_read_bytes`: where the consumers think Q buffer b starts (b x that; default the tile's
    bytes, as the producer writes it): a broken variant for the tests."""
    panels = head_dim // c["kPanelColumns"]
    row_offset = consumer * c["kConsumerRowBytes"]  # the kernels' offset into A's tile ...
    consumer_row0 = consumer * c["kWgmmaM"]          # ... must land on the consumer's own 64 rows
    if kernel == "forward":
        # The persistent forward's carve-up: Q buffers, then the K ring, then the V ring. Each Q
        # buffer holds a different tile (row0 apart) and the consumer reads the one its tile uses.
        rows, stages = c["kBoxRows"], c["kForwardStages"]
        tile_bytes = panels * rows * 128
        q_buffers = forward_q_buffers(head_dim, c)
        qs = [Tile("Q", base + b * tile_bytes, rows, row0=500 * b) for b in range(q_buffers)]
        k = Tile("K", base + (q_buffers + slot) * tile_bytes, rows, row0=1000 * slot)
        v = Tile("V", base + (q_buffers + stages + slot) * tile_bytes, rows, row0=1000 * slot)
        read = [replace(q, address=base + b * (q_read_bytes or tile_bytes)) for b, q in enumerate(qs)]
        products = [Product(f"S = Q{b} K^T", "ss", b=k, a=q, a_row0=consumer_row0, n=rows) for b, q in enumerate(read)]
        products.append(Product("O += P V", "rs", b=v, n=head_dim, k_rows=rows))
        return [*qs, k, v], products, row_offset
    block, stages, step = c["kGradBlock"], c["kGradStages"], grad_step(head_dim, c)
    block_bytes, step_bytes = panels * block * 128, panels * step * 128
    first, second = ("K", "V") if kernel == "key_grad" else ("Q", "dO")
    steps = ("Q", "dO") if kernel == "key_grad" else ("K", "V")
    a0 = Tile(first, base, block)
    a1 = Tile(second, base + block_bytes, block)
    b0 = Tile(steps[0], base + 2 * block_bytes + slot * step_bytes, step, row0=1000 * slot)
    b1 = Tile(steps[1], base + 2 * block_bytes + (stages + slot) * step_bytes, step, row0=1000 * slot)
    products = [Product(f"{first}{steps[0]}^T", "ss", b=b0, a=a0, a_row0=consumer_row0, n=step),
                Product(f"{second}{steps[1]}^T", "ss", b=b1, a=a1, a_row0=consumer_row0, n=step)]
    if kernel in ("key_grad", "key_grad_dq"):  # dV += P^T dO, dK += dS^T Q
        products += [Product("dV += P^T dO", "rs", b=b1, n=head_dim, k_rows=step),
                     Product("dK += dS^T Q", "rs", b=b0, n=head_dim, k_rows=step)]
    if kernel == "key_grad_dq":
        # After lse and delta (kGradStages x 2 x step floats), the consumers' dS^T buffers; A of
        # the dQ product is this consumer's. Its rows are the step's queries, its K the
        # consumer's 64 keys (block rows consumer_row0 + ...); B is the K block tile's same rows.
        floats = stages * 2 * step * 4
        stage = Tile("dS", base + 2 * block_bytes + 2 * stages * step_bytes + floats +
                     consumer * (step // c["kPanelColumns"]) * c["kGradStagePanelBytes"], step)
        products += [Product(f"dQ[{64 * part}:] = dS K", "ss_mn", b=a0, a=stage, a_row0=64 * part, n=head_dim,
                             k_rows=c["kWgmmaM"]) for part in range(step // c["kWgmmaM"])]
        return [a0, a1, b0, b1, stage], products, row_offset
    else:  # dQ += dS K
        products += [Product("dQ += dS K", "rs", b=b0, n=head_dim, k_rows=step)]
    return [a0, a1, b0, b1], products, row_offset


def check_kernel(kernel: str, head_dim: int, overrides: dict[str, int] | None = None, base: int = 0,
                 c: dict[str, int] | None = None, stage_swizzled: bool = True,
                 dq_a_transposed: bool = True, q_read_bytes: int | None = None) -> list[str]:
    """Every mismatch between what each wgmma of `kernel` fetches and the element it should, over
    both consumers and every pipeline slot (empty: the contract holds). `stage_swizzled` and
    `dq_a_transposed` break the one-pass kernel's dS^T staging and dQ product (for the tests)."""
    c = dict(c or read_constants())
    c.update(overrides or {})
    stages = c["kForwardStages"] if kernel == "forward" else c["kGradStages"]
    errors: list[str] = []
    for slot in range(stages):
        for consumer in range(c["kConsumers"]):
            tiles, products, row_offset = kernel_products(kernel, head_dim, consumer, slot, c, base, q_read_bytes)
            size = max(t.address + max(head_dim, t.rows) // 64 * t.panel_bytes for t in tiles)
            memory = SharedMemory(size + 4096, c["kSwizzleAtomBytes"])
            for tile in tiles:  # the producer's TMA boxes: one per 64-column panel
                if tile.tensor == "dS":
                    stage_transposed(memory, tile.address, consumer, grad_step(head_dim, c), c, stage_swizzled)
                    continue
                for panel in range(head_dim // c["kPanelColumns"]):
                    memory.tma_box(tile.address + panel * tile.panel_bytes, tile.tensor, tile.row0,
                                   panel * c["kBoxColumns"], tile.rows, c["kBoxColumns"], c["kSwizzleBytes"])
            errors += memory.errors
            for product in products:
                where = f"{kernel} hd{head_dim} consumer {consumer} slot {slot} {product.name}"
                if product.kind == "ss":
                    pairs = ss_descriptors(product.a.address + row_offset, product.a.panel_bytes, product.b.address,
                                           product.b.panel_bytes, head_dim, c)
                    for kk, (a_desc, b_desc) in enumerate(pairs):
                        errors += _check_descriptor(a_desc, c, f"{where} k-step {kk} A")
                        errors += _check_descriptor(b_desc, c, f"{where} k-step {kk} B")
                        k = kk * 16 + np.arange(16)[None, :]
                        m = np.arange(c["kWgmmaM"])[:, None]
                        want_a = SharedMemory.code(product.a.tensor, product.a.row0 + product.a_row0 + m, k)
                        want_b = SharedMemory.code(product.b.tensor, product.b.row0 + np.arange(product.n)[:, None], k)
                        errors += _compare(fetch_k_major(memory, a_desc, c["kWgmmaM"]), want_a, f"{where} k-step {kk} A")
                        errors += _compare(fetch_k_major(memory, b_desc, product.n), want_b, f"{where} k-step {kk} B")
                elif product.kind == "ss_mn":
                    errors += _check_dq_product(memory, product, row_offset, consumer, c, where,
                                                product.a_transposed and dq_a_transposed)
                else:
                    for t, b_desc in enumerate(rs_descriptors(product.b.address, product.b.panel_bytes,
                                                              product.k_rows, c)):
                        errors += _check_descriptor(b_desc, c, f"{where} k-step {t} B")
                        want = SharedMemory.code(product.b.tensor, product.b.row0 + t * 16 + np.arange(16)[:, None],
                                                 np.arange(product.n)[None, :])
                        errors += _compare(fetch_mn_major(memory, b_desc, product.n), want, f"{where} k-step {t} B")
    return errors


def ss_mn_descriptors(a_address, a_panel_bytes, b_address, b_panel_bytes, k_rows, c):
    """products.cuh's issue_ss_mn: one (A, B) descriptor pair per 16 rows of K, both MN-major."""
    return [(smem_descriptor(a_address + t * c["kMNStepBytes"], a_panel_bytes, c["kMNMajorStrideBytes"], c),
             smem_descriptor(b_address + t * c["kMNStepBytes"], b_panel_bytes, c["kMNMajorStrideBytes"], c))
            for t in range(k_rows // c["kWgmmaK"])]


def stage_offset(key: int, query: int, c: dict[str, int], swizzled: bool = True) -> int:
    """backward_sm90.cuh's stage_transposed: the byte of dS^T (key, query) in a consumer's buffer."""
    column = query % c["kPanelColumns"]
    chunk = column // 8
    inner = chunk ^ (key % 8) if swizzled else chunk
    return (query // c["kPanelColumns"] * c["kGradStagePanelBytes"] + key * c["kSwizzleBytes"] + inner * 16 +
            (column % 8) * c["kElementBytes"])


def stage_transposed(memory: SharedMemory, address: int, consumer: int, step: int, c: dict[str, int],
                     swizzled: bool = True):
    """The kernel's generic 4-byte stores of dS^T (no hardware swizzle: the kernel swizzles), each
    thread's fragment word (t, i) = accumulator elements of key accumulator_row(i % 2) and queries
    accumulator_column(2 t + i / 2, 0), + 1. Codes are dS[query, block key]. Checks that no
    word is written twice and that each warp store is free of bank conflicts."""
    written: set[int] = set()
    for t in range(step // 16):
        for i in range(4):
            for warp in range(4):
                banks = set()
                for lane in range(32):
                    key, query = accumulator_position(lane, warp, 4 * (2 * t + i // 2) + 2 * (i % 2))
                    offset = address + stage_offset(key, query, c, swizzled)
                    if offset in written:
                        memory.errors.append(f"dS^T staging: word {offset:#x} written twice")
                    written.add(offset)
                    block_key = consumer * c["kWgmmaM"] + key
                    memory.cells[offset // 2] = SharedMemory.code("dS", query, block_key)
                    memory.cells[offset // 2 + 1] = SharedMemory.code("dS", query + 1, block_key)
                    banks.add((offset // 4) % 32)
                if len(banks) < 32:
                    memory.errors.append(f"dS^T staging, warp {warp} word ({t}, {i}): "
                                         f"{32 // len(banks)}-way bank conflicts")


def _check_dq_product(memory, product, row_offset, consumer, c, where, a_transposed) -> list[str]:
    """dQ (64 queries x D) = dS (64 x 64 keys) K (64 keys x D): A = the staged dS^T read
    MN-major (imm-trans-a), B = the consumer's 64 rows of the K block tile, MN-major."""
    errors = []
    a_address = product.a.address + product.a_row0 // c["kPanelColumns"] * c["kGradStagePanelBytes"]
    pairs = ss_mn_descriptors(a_address, c["kGradStagePanelBytes"], product.b.address + row_offset,
                              product.b.panel_bytes, product.k_rows, c)
    for t, (a_desc, b_desc) in enumerate(pairs):
        errors += _check_descriptor(a_desc, c, f"{where} k-step {t} A")
        errors += _check_descriptor(b_desc, c, f"{where} k-step {t} B")
        keys = consumer * c["kWgmmaM"] + t * 16 + np.arange(16)
        want_a = SharedMemory.code("dS", product.a_row0 + np.arange(c["kWgmmaM"])[:, None], keys[None, :])
        got_a = fetch_mn_major(memory, a_desc, c["kWgmmaM"]).T if a_transposed else \
            fetch_k_major(memory, a_desc, c["kWgmmaM"])
        errors += _compare(got_a, want_a, f"{where} k-step {t} A")
        want_b = SharedMemory.code(product.b.tensor, product.b.row0 + keys[:, None], np.arange(product.n)[None, :])
        errors += _compare(fetch_mn_major(memory, b_desc, product.n), want_b, f"{where} k-step {t} B")
    return errors


def _check_descriptor(desc: int, c: dict[str, int], where: str) -> list[str]:
    d = Descriptor.decode(desc)
    errors = []
    if d.layout != 1:
        errors.append(f"{where}: descriptor layout {d.layout}, not 128B swizzle (1)")
    if (d.start >> 7) & 7:  # base offset 0 is right only when the 8-row group starts on an atom
        errors.append(f"{where}: start {d.start:#x} is not on a swizzle atom's row 0 (base offset 0 would be wrong)")
    if d.stride != c["kSwizzleAtomBytes"]:
        errors.append(f"{where}: SBO {d.stride} B, the swizzle atom is {c['kSwizzleAtomBytes']} B")
    return errors


def _compare(got: np.ndarray, want: np.ndarray, where: str) -> list[str]:
    bad = np.argwhere(got != want)
    if not len(bad):
        return []
    i = tuple(bad[0])
    return [f"{where}: {len(bad)} of {got.size} elements wrong, first at {i}: got {_name(got[i])}, "
            f"want {_name(want[i])}"]


def _name(code: int) -> str:
    if code < 0:
        return "unwritten shared memory"
    tensor, rest = divmod(int(code), 1 << 40)
    row, column = divmod(rest, 1 << 20)
    return f"{SharedMemory.TENSORS[tensor]}[{row}, {column}]"


# ---- register operands: the accumulator of one product is the A fragment of the next -------------
def accumulator_position(lane: int, warp: int, index: int) -> tuple[int, int]:
    """products.cuh: accumulator element 4 j + 2 r + c of a thread is (row, column)."""
    j, rest = divmod(index, 4)
    r, col = divmod(rest, 2)
    return 16 * warp + lane // 4 + 8 * r, 8 * j + 2 * (lane % 4) + col


def a_fragment_position(lane: int, warp: int, register: int, half: int) -> tuple[int, int]:
    """PTX ISA, wgmma .m64nNk16 A fragment for 16-bit types: register i (two elements) of a
    thread holds row 16 warp + lane / 4 (+ 8 for odd i), columns 2 (lane % 4) + half (+ 8 for i >= 2)."""
    return 16 * warp + lane // 4 + 8 * (register % 2), 2 * (lane % 4) + half + 8 * (register // 2)


def check_pack_a(n: int) -> list[str]:
    """pack_a's `a[t][i] = pack2(c[8 t + 2 i], c[8 t + 2 i + 1])` puts, for every thread, the
    accumulator element of (row, 16 t + column) where the A fragment of k-step t expects it."""
    errors = []
    for warp in range(4):
        for lane in range(32):
            for t in range(n // 16):
                for i in range(4):
                    for half in range(2):
                        row, column = accumulator_position(lane, warp, 8 * t + 2 * i + half)
                        want_row, want_column = a_fragment_position(lane, warp, i, half)
                        if (row, column) != (want_row, 16 * t + want_column):
                            errors.append(f"warp {warp} lane {lane} a[{t}][{i}].{half}: accumulator ({row}, {column}), "
                                          f"fragment wants ({want_row}, {16 * t + want_column})")
    return errors


# ---- the forward's epilogue: O staged in the consumer's Q rows, then 16-byte stores --------------
def tile_chunk_offset(row: int, chunk: int, c: dict[str, int], swizzled: bool = True) -> int:
    """forward_sm90.cuh's tile_chunk_offset (a 128-row tile as TMA lays it out)."""
    per_row = c["kSwizzleBytes"] // c["kChunkBytes"]
    panel_bytes = c["kBoxRows"] * c["kSwizzleBytes"]
    inner = (chunk % per_row) ^ (row % 8) if swizzled else chunk % per_row
    return (chunk // per_row) * panel_bytes + row * c["kSwizzleBytes"] + inner * c["kChunkBytes"]


def check_output_staging(head_dim: int, swizzled: bool = True, c: dict[str, int] | None = None) -> list[str]:
    """store_output: every element of each consumer's 64 x head_dim block of O goes through
    shared memory to the right (row, column) of the output, inside the consumer's own Q rows,
    and the staging writes (one 4-byte word a lane) and read-backs (16 bytes a lane) are free of
    shared-memory bank conflicts (32 banks of 4 bytes)."""
    c = c or read_constants()
    errors, threads = [], c["kWarpgroupThreads"]
    chunks_per_row = head_dim // 8
    for consumer in range(c["kConsumers"]):
        smem: dict[int, tuple[int, int]] = {}
        own = range(consumer * c["kWgmmaM"], (consumer + 1) * c["kWgmmaM"])
        for r in range(2):  # staging writes, one warp instruction per (r, j)
            for j in range(chunks_per_row):
                for warp in range(4):
                    banks = set()
                    for lane in range(32):
                        row, column = accumulator_position(lane, warp, 4 * j + 2 * r)
                        tile_row = consumer * c["kWgmmaM"] + row
                        address = tile_chunk_offset(tile_row, j, c, swizzled) + 4 * (lane % 4)
                        if address // (c["kBoxRows"] * c["kSwizzleBytes"]) >= head_dim // 64 or \
                                (address % (c["kBoxRows"] * c["kSwizzleBytes"])) // c["kSwizzleBytes"] not in own:
                            errors.append(f"consumer {consumer}: O row {row} staged outside its own Q rows")
                        smem[address] = (row, column)
                        smem[address + 2] = (row, column + 1)
                        banks.add((address // 4) % 32)
                    if len(banks) < 32:
                        errors.append(f"consumer {consumer} warp {warp} r {r} j {j}: staging store has "
                                      f"{32 // len(banks)}-way bank conflicts")
        for i in range(c["kWgmmaM"] * chunks_per_row // threads):  # read-backs, 16 bytes a thread
            for quarter in range(threads // 8):
                chunk_banks = set()
                for thread in range(8 * quarter, 8 * quarter + 8):
                    index = thread + i * threads
                    local_row, chunk = divmod(index, chunks_per_row)
                    address = tile_chunk_offset(consumer * c["kWgmmaM"] + local_row, chunk, c, swizzled)
                    got = [smem.get(address + 2 * e) for e in range(8)]
                    want = [(local_row, chunk * 8 + e) for e in range(8)]
                    if got != want:
                        errors.append(f"consumer {consumer}: chunk {chunk} of row {local_row} reads {got[:2]}..., "
                                      f"wants {want[:2]}...")
                    chunk_banks.add((address // 16) % 8)
                if len(chunk_banks) < 8:
                    errors.append(f"consumer {consumer}: a quarter-warp's 16-byte reads conflict ({len(chunk_banks)} of 8)")
    return errors
