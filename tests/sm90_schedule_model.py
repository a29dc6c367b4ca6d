"""CPU emulation of the sm_90a attention kernels' barrier schedule: the producer, both consumer
warpgroups, the mbarriers (phases, arrival counts, transaction bytes), the pingpong named
barriers, setmaxnreg's register pool, the tensor cores and the TMA unit, under random
completion times. Each kernel's schedule is written out below in the order its source issues
the operations (forward_sm90.cuh, backward_sm90.cuh), with the counts, stages and budgets read
from csrc/attention_sm90/contracts.h.

`simulate` raises ScheduleError on any broken contract:
- a hang (no agent can move and nothing is in flight), e.g. setmaxnreg.inc with too few
  registers at entry, or a wait on a parity that never comes;
- an over-arrival (an agent arriving more often in one mbarrier phase than its share, or the
  pending count going negative), a named barrier reached twice by one warpgroup in one phase
  (unbalanced pingpong), or left half-arrived at exit; tx bytes past the tx-count's range;
- a wgmma reading a slot before its TMA landed (a wrong parity or a missing wait), or a slot
  holding another step's data; a TMA overwriting a slot that a wgmma still reads (released too
  early); a TMA landing after the block exited.
Otherwise it returns the tensor cores' busy fraction over the block's products.

Stated latencies (no GPU has measured these kernels; H100 SXM figures): dense 16-bit wgmma at
4,096 FLOP a cycle an SM (989 TFLOP/s / 132 SMs / 1.83 GHz); a TMA load lands 500-900 cycles
after issue (L2-resident K/V; uniform random) and the SM's loads stream at 48 bytes a cycle
in issue order; the elementwise work of the two consumers shares the SM's issue slots (one
FIFO): the forward's softmax of a 64 x 128 score block costs ~750 issue slots before fix 2 and
~520 after (kernel notes c90c), the rescale and repack of O ~100, the backward's elementwise
step ~12 slots an element of its 64 x step scores; in the one-pass backward (key_grad_dq),
staging dS^T ~1 slot an element and the dQ atomics ~2 an element of dQ.

    python tests/sm90_schedule_model.py      # prints the busy table of every kernel and variant
"""

from __future__ import annotations

import heapq
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90_layout_model import grad_step, read_constants  # noqa: E402


class ScheduleError(AssertionError):
    pass


@dataclass(frozen=True)
class Latencies:
    flops_per_cycle: int = 4096
    tma_latency: tuple[int, int] = (500, 900)
    tma_bytes_per_cycle: int = 48
    softmax_cycles: int = 520       # forward, one 64 x 128 score block (~750 before fix 2)
    rescale_cycles: int = 100       # forward, O *= alpha and P repacked
    epilogue_cycles: int = 400      # forward, O staged in shared memory and stored
    grad_cycles_per_element: int = 12
    stage_cycles_per_element: int = 1  # backward one-pass: dS^T packed and stored to shared memory
    atomic_cycles_per_element: int = 2  # backward one-pass: red.global.add.v2.f32 of dQ (issue + LSU)
    jitter: float = 0.05            # +- on every product and elementwise step
    stall_cycles: int = 0           # forward consumers: up to this many cycles (uniform) lost before
                                    # each named-barrier operation (warp scheduling, adversarial)


@dataclass(frozen=True)
class ForwardVariant:
    """The forward's schedule. `today` is main at 99c1e85; the defaults are the fixed kernel."""
    split_release: bool = True        # K and V slots on separate empty barriers
    release_k_after_s: bool = True    # K released once S = Q K^T completes (else after P V)
    wait_before_turn: bool = True     # wait for K (and V) before taking the pingpong turn
    # Deliberately broken variants (each must raise):
    wrong_parity: bool = False        # wait k_full on the other parity
    release_k_early: bool = False     # release K before S = Q K^T has completed
    double_release: bool = False      # consumer 0 releases its K twice a step
    skip_finish: bool = False         # consumer 0 does not absorb consumer 1's last pass
    skip_first_grant: bool = False    # consumer 1 does not grant consumer 0 the first turn
    # The persistent grid (several query blocks a CTA, KERNEL_NOTES c90c / c90d):
    persistent: bool = False
    q_buffers: int = 1                # 2: tile n's Q in buffer n % 2, so the next Q lands early
    release_q_early: bool = False     # broken: Q released before O has left its rows
    grant_every_tile: bool = False    # broken: a pingpong grant and finish per tile, not per block


TODAY = ForwardVariant(split_release=False, release_k_after_s=False, wait_before_turn=False)
FIXED = ForwardVariant()


# ---- the machine ---------------------------------------------------------------------------------
@dataclass
class Mbarrier:
    name: str
    count: int
    quota: dict[str, int]          # the most arrivals each agent makes in one phase
    pending: int = 0
    tx: int = 0
    phase: int = 0
    arrived: dict[str, int] = field(default_factory=dict)
    waiters: list = field(default_factory=list)


@dataclass
class Slot:
    content: object = None
    landed: int = 0
    reads: list = field(default_factory=list)  # (content, start, end)


@dataclass
class Agent:
    name: str
    program: object
    registers: int
    pending: tuple | None = None
    groups: list = field(default_factory=list)  # completion times of outstanding wgmma groups
    done: bool = False


class Machine:
    def __init__(self, c: dict[str, int], lat: Latencies, rng: random.Random, registers_at_entry: int):
        self.c, self.lat, self.rng = c, lat, rng
        self.now, self.events, self.sequence = 0, [], 0
        self.barriers: dict[str, Mbarrier] = {}
        self.named: dict[int, dict] = {}
        self.slots: dict[tuple, Slot] = {}
        self.tensor_free = self.alu_free = self.tma_free = 0
        self.tensor_busy, self.first_product, self.last_product = 0, None, 0
        self.pool = 0  # registers released by setmaxnreg.dec, not yet claimed
        self.registers_at_entry = registers_at_entry
        self.agents: dict[str, Agent] = {}
        self.exited_at = None

    # -- setup
    def mbarrier(self, name: str, count: int, quota: dict[str, int]):
        self.barriers[name] = Mbarrier(name, count, quota, pending=count)

    def agent(self, name: str, program):
        self.agents[name] = Agent(name, program, self.registers_at_entry)
        self._schedule(0, "resume", name)

    # -- event loop
    def _schedule(self, time: int, kind: str, payload):
        heapq.heappush(self.events, (time, self.sequence, kind, payload))
        self.sequence += 1

    def run(self, limit: int = 50_000_000):
        while self.events:
            time, _, kind, payload = heapq.heappop(self.events)
            self.now = time
            if time > limit:
                raise ScheduleError(f"no progress by cycle {limit} (livelock?)")
            if kind == "resume":
                self._step(self.agents[payload])
            else:  # a TMA load landed: its bytes complete the barrier's transaction count
                if self.exited_at is not None:
                    raise ScheduleError(f"a TMA load into {payload[0]} lands at {time}, after the block exited")
                barrier, size = payload
                self._complete_tx(self.barriers[barrier], size)
        stuck = [f"{a.name} blocked on {a.pending}" for a in self.agents.values() if not a.done]
        if stuck:
            raise ScheduleError("hang: " + "; ".join(stuck))
        for barrier_id, state in self.named.items():
            if state["count"]:
                raise ScheduleError(f"named barrier {barrier_id} left half-arrived at exit by {sorted(state['who'])}")
        for barrier in self.barriers.values():
            if barrier.pending != barrier.count or barrier.tx:
                raise ScheduleError(f"{barrier.name} left in a partial phase at exit ({barrier.count - barrier.pending}"
                                    f" of {barrier.count} arrivals, {barrier.tx} tx bytes)")

    def _step(self, agent: Agent):
        op = agent.pending if agent.pending is not None else next(agent.program)
        agent.pending = op
        cost = getattr(self, "_op_" + op[0])(agent, *op[1:])
        if cost is None:  # blocked: woken by a phase, a named barrier or released registers
            return
        agent.pending = None
        if op[0] == "exit":
            agent.done = True
            if all(a.done for a in self.agents.values()):
                self.exited_at = self.now
            return
        self._schedule(self.now + cost, "resume", agent.name)

    def _wake(self, waiters: list):
        for name in waiters:
            self._schedule(self.now + 1, "resume", name)
        waiters.clear()

    def _jitter(self, cycles: float) -> int:
        return max(1, round(cycles * (1 + self.rng.uniform(-self.lat.jitter, self.lat.jitter))))

    # -- mbarriers
    def _complete_phase_if_done(self, barrier: Mbarrier):
        if barrier.pending == 0 and barrier.tx == 0:
            barrier.phase += 1
            barrier.pending = barrier.count
            barrier.arrived = {}
            self._wake(barrier.waiters)

    def _arrive(self, agent: Agent, barrier: Mbarrier, count: int):
        barrier.arrived[agent.name] = barrier.arrived.get(agent.name, 0) + count
        if barrier.arrived[agent.name] > barrier.quota.get(agent.name, 0):
            raise ScheduleError(f"over-arrival: {agent.name} arrived {barrier.arrived[agent.name]} times on "
                                f"{barrier.name} in phase {barrier.phase} (its share is {barrier.quota.get(agent.name, 0)})")
        barrier.pending -= count
        if barrier.pending < 0:
            raise ScheduleError(f"over-arrival on {barrier.name}: pending count {barrier.pending}")
        self._complete_phase_if_done(barrier)

    def _complete_tx(self, barrier: Mbarrier, size: int):
        barrier.tx -= size
        if barrier.tx < 0:
            raise ScheduleError(f"{barrier.name}: {-barrier.tx} TMA bytes more than announced")
        self._complete_phase_if_done(barrier)

    def _op_wait(self, agent, name, parity):
        barrier = self.barriers[name]
        if (barrier.phase & 1) != parity:  # the phase of this parity has completed
            return 1
        barrier.waiters.append(agent.name)
        return None

    def _op_arrive(self, agent, name, count):
        self._arrive(agent, self.barriers[name], count)
        return 1

    def _op_expect_tx(self, agent, name, size):
        if size > self.c["kMaxTransactionBytes"]:
            raise ScheduleError(f"{name}: {size} tx bytes exceed the mbarrier's tx-count ({self.c['kMaxTransactionBytes']})")
        barrier = self.barriers[name]
        barrier.tx += size
        self._arrive(agent, barrier, 1)
        return 1

    # -- TMA and wgmma
    def _op_tma(self, agent, barrier, size, slot_key, content):
        slot = self.slots.setdefault(slot_key, Slot())
        for old, start, end in slot.reads:
            if end > self.now:
                raise ScheduleError(f"TMA overwrites {slot_key} (step {old} -> {content}) at {self.now} while a wgmma "
                                    f"or the epilogue reads it until {end}")
        arrival = max(self.now + self.rng.randint(*self.lat.tma_latency), self.tma_free)
        self.tma_free = arrival + size // self.lat.tma_bytes_per_cycle
        if slot.content != content:  # the first box of new data
            slot.content, slot.reads = content, []
        slot.landed = self.tma_free  # boxes land in issue order: the last one completes the tile
        self._schedule(self.tma_free, "tx", (barrier, size))
        return 2

    def _op_wgmma(self, agent, name, reads, flops):
        cycles = self._jitter(flops / self.lat.flops_per_cycle)
        start = max(self.now, self.tensor_free)
        end = start + cycles
        for slot_key, content in reads:
            slot = self.slots.get(slot_key)
            if slot is None or slot.content != content:
                raise ScheduleError(f"{agent.name} {name} reads {slot_key} for step {content}, which holds "
                                    f"{None if slot is None else slot.content}")
            if slot.landed > start:
                raise ScheduleError(f"{agent.name} {name} reads {slot_key} at {start}, before its TMA lands at "
                                    f"{slot.landed} (wrong parity or missing wait)")
            slot.reads.append((content, start, end))
        self.tensor_free = end
        self.tensor_busy += cycles
        self.first_product = start if self.first_product is None else self.first_product
        self.last_product = max(self.last_product, end)
        agent.groups.append(end)
        return 8

    def _op_use_slot(self, agent, slot_key, content, cycles):
        """Generic loads and stores on a slot's rows for `cycles` (the epilogue's staging of O)."""
        slot = self.slots.get(slot_key)
        if slot is None or slot.content != content or slot.landed > self.now:
            raise ScheduleError(f"{agent.name} reuses {slot_key} for tile {content}, which holds "
                                f"{None if slot is None else slot.content}")
        slot.reads.append((content, self.now, self.now + cycles))
        return cycles

    def _op_stage(self, agent, slot_key, content, cycles):
        """Generic stores into a buffer a wgmma reads later (the one-pass backward's dS^T): no
        wgmma may still be reading the buffer's previous content."""
        slot = self.slots.setdefault(slot_key, Slot())
        for old, start, end in slot.reads:
            if end > self.now:
                raise ScheduleError(f"{agent.name} stages {slot_key} (step {old} -> {content}) at {self.now} while a "
                                    f"wgmma reads it until {end}")
        slot.content, slot.reads, slot.landed = content, [], self.now + cycles
        return self._op_compute(agent, cycles)

    def _op_wait_group(self, agent, pending):
        agent.groups = [end for end in agent.groups if end > self.now]
        if len(agent.groups) <= pending:
            return 1
        until = sorted(agent.groups)[len(agent.groups) - pending - 1]
        return until - self.now + 1

    def _op_compute(self, agent, cycles, shared=True):
        if not shared:
            return self._jitter(cycles)
        start = max(self.now, self.alu_free)
        self.alu_free = start + self._jitter(cycles)
        return self.alu_free - self.now

    # -- named barriers (bar.sync / bar.arrive, one warpgroup's 128 threads at a time)
    def _named(self, agent, barrier_id, sync):
        if not 1 <= barrier_id < self.c["kNamedBarriers"]:
            raise ScheduleError(f"named barrier id {barrier_id} outside 1..{self.c['kNamedBarriers'] - 1}")
        state = self.named.setdefault(barrier_id, {"count": 0, "who": set(), "waiters": []})
        if agent.name in state["who"]:
            raise ScheduleError(f"unbalanced pingpong: {agent.name} reached named barrier {barrier_id} twice in one phase")
        state["who"].add(agent.name)
        state["count"] += self.c["kWarpgroupThreads"]
        if state["count"] == self.c["kConsumers"] * self.c["kWarpgroupThreads"]:  # this arrival completes it
            state["count"], state["who"] = 0, set()
            for name in state["waiters"]:
                self.agents[name].pending = ("named_done",)
            self._wake(state["waiters"])
            return 1
        if sync:
            state["waiters"].append(agent.name)
            return None
        return 1

    def _op_bar_sync(self, agent, barrier_id, label=""):
        return self._named(agent, barrier_id, True)

    def _op_bar_arrive(self, agent, barrier_id, label=""):
        return self._named(agent, barrier_id, False)

    def _op_named_done(self, agent):
        return 1

    # -- setmaxnreg
    def _op_setmaxnreg(self, agent, direction, registers):
        threads = self.c["kWarpgroupThreads"]
        if direction == "dec":
            self.pool += (agent.registers - registers) * threads
            agent.registers = registers
            for other in self.agents.values():
                if other.pending and other.pending[0] == "setmaxnreg" and other.name != agent.name:
                    self._schedule(self.now + 1, "resume", other.name)
            return 1
        need = (registers - agent.registers) * threads
        if need > self.pool:
            return None  # spins: setmaxnreg.inc waits for registers that may never come
        self.pool -= need
        agent.registers = registers
        return 1

    def _op_stall(self, agent, cycles):
        return self.rng.randint(1, cycles)

    def _op_exit(self, agent):
        return 0


# ---- the kernels' schedules ----------------------------------------------------------------------
def _flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def forward_schedule(machine: Machine, head_dim: int, tiles: tuple[int, ...], variant: ForwardVariant,
                     lat: Latencies):
    """forward_sm90.cuh: the producer's loads and each consumer's loop, op by op, for one query
    block of `tiles[0]` key steps; with variant.persistent, for a block that runs the query
    blocks of `tiles` in turn (the persistent grid of fix 3, modelled before it is built: Q's
    slot is refilled only after both consumers have released it on q_empty, once their O has
    left the rows they staged it in; step numbers, slots and parities run on across tiles)."""
    c = machine.c
    stages, threads = c["kForwardStages"], c["kWarpgroupThreads"]
    panels = head_dim // c["kPanelColumns"]
    tile = panels * c["kBoxRows"] * c["kSwizzleBytes"]             # Shape::kTileBytes: what expect_tx announces
    box = c["kBoxRows"] * c["kBoxColumns"] * c["kElementBytes"]  # what one TMA box delivers
    consumers = {f"consumer{i}": threads for i in range(c["kConsumers"])}
    buffers = variant.q_buffers
    q_full = [f"q_full{b}" if buffers > 1 else "q_full" for b in range(buffers)]
    q_empty = [f"q_empty{b}" if buffers > 1 else "q_empty" for b in range(buffers)]
    for b in range(buffers):
        machine.mbarrier(q_full[b], 1, {"producer": 1})
        if variant.persistent:
            machine.mbarrier(q_empty[b], c["kConsumers"] * threads, consumers)
    for s in range(stages):
        machine.mbarrier(f"k_full{s}", 1, {"producer": 1})
        machine.mbarrier(f"v_full{s}", 1, {"producer": 1})
        if variant.split_release:
            machine.mbarrier(f"k_empty{s}", c["kConsumers"] * threads, consumers)
            machine.mbarrier(f"v_empty{s}", c["kConsumers"] * threads, consumers)
        else:
            machine.mbarrier(f"kv_empty{s}", c["kConsumers"] * threads, consumers)
    k_empty = "k_empty" if variant.split_release else "kv_empty"
    v_empty = "v_empty" if variant.split_release else "kv_empty"
    qk, pv = _flops(c["kWgmmaM"], c["kBoxRows"], head_dim), _flops(c["kWgmmaM"], head_dim, c["kBoxRows"])

    def producer():
        yield ("setmaxnreg", "dec", c["kProducerRegisters"])
        base = 0
        for number, steps in enumerate(tiles):
            b, use = number % buffers, number // buffers  # Q buffer, and how often it was used before
            if variant.persistent:
                yield ("wait", q_empty[b], (use & 1) ^ 1)
            yield ("expect_tx", q_full[b], tile)
            for _ in range(panels):
                yield ("tma", q_full[b], box, ("Q", b), number)
            for step in range(base, base + steps):
                slot, parity = step % stages, (step // stages) & 1
                yield ("wait", f"{k_empty}{slot}", parity ^ 1)
                yield ("expect_tx", f"k_full{slot}", tile)
                for _ in range(panels):
                    yield ("tma", f"k_full{slot}", box, ("K", slot), step)
                if variant.split_release:
                    yield ("wait", f"v_empty{slot}", parity ^ 1)
                yield ("expect_tx", f"v_full{slot}", tile)
                for _ in range(panels):
                    yield ("tma", f"v_full{slot}", box, ("V", slot), step)
            base += steps
        yield ("exit",)

    def consumer(i: int):
        turn, other = c["kPingpongBarrier"] + i, c["kPingpongBarrier"] + 1 - i
        k_parity = (lambda step: ((step // stages) & 1) ^ (1 if variant.wrong_parity else 0))
        v_parity = (lambda step: (step // stages) & 1)

        def release_k(slot):
            yield ("arrive", f"{k_empty}{slot}", threads)
            if variant.double_release and i == 0:
                yield ("arrive", f"{k_empty}{slot}", threads)

        yield ("setmaxnreg", "inc", c["kConsumerRegisters"])
        base, any_phase = 0, False
        for number, steps in enumerate(tiles):
            b, use = number % buffers, number // buffers
            yield ("wait", q_full[b], use & 1)
            q = (("Q", b), number)
            if steps > 0:
                # The pingpong runs on across tiles: consumer 1 grants once, before the block's
                # first phase (grant_every_tile: before each tile's, the broken protocol).
                grant = i == 1 and not variant.skip_first_grant and (not any_phase or variant.grant_every_tile)
                yield from mainloop(i, base, steps, q, turn, other, k_parity, v_parity, release_k, grant)
                if i == 0 and variant.grant_every_tile and not variant.skip_finish:
                    yield ("bar_sync", c["kPingpongBarrier"], "finish")
                any_phase = True
            if variant.persistent and variant.release_q_early:
                yield ("arrive", q_empty[b], threads)
            yield ("use_slot", ("Q", b), number, lat.epilogue_cycles)  # O staged in this consumer's Q rows
            if variant.persistent and not variant.release_q_early:
                yield ("arrive", q_empty[b], threads)
            base += steps
        if i == 0 and any_phase and not variant.skip_finish and not variant.grant_every_tile:
            yield ("bar_sync", c["kPingpongBarrier"], "finish")  # absorbs consumer 1's last pass
        yield ("exit",)

    def mainloop(i, base, steps, q, turn, other, k_parity, v_parity, release_k, grant):
        if grant:
            yield ("bar_arrive", c["kPingpongBarrier"], "grant")  # consumer 0 goes first
        if variant.wait_before_turn:
            yield ("wait", f"k_full{base % stages}", k_parity(base))
        yield ("bar_sync", turn, "take")
        if not variant.wait_before_turn:
            yield ("wait", f"k_full{base % stages}", k_parity(base))
        yield ("wgmma", f"S{base}", [q, (("K", base % stages), base)], qk)
        if variant.release_k_early:
            yield from release_k(base % stages)
        yield ("bar_arrive", other, "pass")
        yield ("wait_group", 0)
        if variant.release_k_after_s and not variant.release_k_early:
            yield from release_k(base % stages)
        yield ("compute", lat.softmax_cycles)
        for step in range(base + 1, base + steps):
            slot, prev = step % stages, (step - 1) % stages
            if variant.wait_before_turn:
                yield ("wait", f"k_full{slot}", k_parity(step))
                yield ("wait", f"v_full{prev}", v_parity(step - 1))
            yield ("bar_sync", turn, "take")
            if not variant.wait_before_turn:
                yield ("wait", f"k_full{slot}", k_parity(step))
            yield ("wgmma", f"S{step}", [q, (("K", slot), step)], qk)
            if variant.release_k_early:
                yield from release_k(slot)
            if not variant.wait_before_turn:
                yield ("wait", f"v_full{prev}", v_parity(step - 1))
            yield ("wgmma", f"PV{step - 1}", [(("V", prev), step - 1)], pv)
            yield ("bar_arrive", other, "pass")
            yield ("wait_group", 1)
            if variant.release_k_after_s and not variant.release_k_early:
                yield from release_k(slot)
            yield ("compute", lat.softmax_cycles)
            yield ("wait_group", 0)
            if not variant.release_k_after_s and not variant.release_k_early:
                yield ("arrive", f"{k_empty}{prev}", threads)  # today: K and V together
            if variant.split_release:
                yield ("arrive", f"v_empty{prev}", threads)
            yield ("compute", lat.rescale_cycles)
        last = base + steps - 1
        if variant.wait_before_turn:
            yield ("wait", f"v_full{last % stages}", v_parity(last))
        yield ("bar_sync", turn, "take")
        if not variant.wait_before_turn:
            yield ("wait", f"v_full{last % stages}", v_parity(last))
        yield ("wgmma", f"PV{last}", [(("V", last % stages), last)], pv)
        yield ("bar_arrive", other, "pass")
        yield ("wait_group", 0)
        if not variant.release_k_after_s and not variant.release_k_early:
            yield ("arrive", f"{k_empty}{last % stages}", threads)
        if variant.split_release:
            yield ("arrive", f"v_empty{last % stages}", threads)

    def stalled(program):
        for op in program:
            if op[0] in ("bar_sync", "bar_arrive") and lat.stall_cycles:
                yield ("stall", lat.stall_cycles)
            yield op

    machine.agent("producer", producer())
    for i in range(c["kConsumers"]):
        machine.agent(f"consumer{i}", stalled(consumer(i)))


def backward_schedule(machine: Machine, kernel: str, head_dim: int, steps: int, lat: Latencies,
                      release_early: bool = False, overlap_dq: bool = False):
    """backward_sm90.cuh's key_grad_kernel (two-pass dK/dV), query_grad_kernel (two-pass dQ) or
    the one-pass key_grad_kernel with dQ by atomics ("key_grad_dq"): block tiles once, then
    steps. `overlap_dq` (one pass only) issues dQ = dS K before dV and dK and runs its atomics
    while they are on the tensor cores (wait_group 1) instead of after all three."""
    c = machine.c
    one_pass = kernel == "key_grad_dq"
    if one_pass:
        kernel = "key_grad"
    stages, threads, block = c["kGradStages"], c["kWarpgroupThreads"], c["kGradBlock"]
    step_rows = grad_step(head_dim, c)
    panels = head_dim // c["kPanelColumns"]
    block_tile, step_tile = panels * block * c["kSwizzleBytes"], panels * step_rows * c["kSwizzleBytes"]
    block_box, step_box = (rows * c["kBoxColumns"] * c["kElementBytes"] for rows in (block, step_rows))
    consumers = {f"consumer{i}": threads for i in range(c["kConsumers"])}
    staged = kernel == "key_grad"  # the producer's threads stage each step's lse and delta, one a row
    machine.mbarrier("block_full", 1, {"producer": 1})
    for s in range(stages):
        machine.mbarrier(f"step_full{s}", step_rows if staged else 1, {"producer": step_rows if staged else 1})
        machine.mbarrier(f"step_empty{s}", c["kConsumers"] * threads, consumers)
    score = _flops(c["kWgmmaM"], step_rows, head_dim)
    grad = _flops(c["kWgmmaM"], head_dim, step_rows)
    a0, a1 = ("K", "V") if kernel == "key_grad" else ("Q", "dO")
    b0, b1 = ("Q", "dO") if kernel == "key_grad" else ("K", "V")

    def producer():
        yield ("setmaxnreg", "dec", c["kProducerRegisters"])
        yield ("expect_tx", "block_full", 2 * block_tile)
        for _ in range(panels):  # load_tile_pair: a box of each tile a panel
            yield ("tma", "block_full", block_box, (a0, 0), 0)
            yield ("tma", "block_full", block_box, (a1, 0), 0)
        for step in range(steps):
            slot = step % stages
            yield ("wait", f"step_empty{slot}", ((step // stages) & 1) ^ 1)
            if staged:
                yield ("compute", 600, False)  # lse and delta from global memory
                yield ("arrive", f"step_full{slot}", step_rows - 1)
            yield ("expect_tx", f"step_full{slot}", 2 * step_tile)
            for _ in range(panels):
                yield ("tma", f"step_full{slot}", step_box, (b0, slot), step)
                yield ("tma", f"step_full{slot}", step_box, (b1, slot), step)
        yield ("exit",)

    def consumer(i: int):
        yield ("setmaxnreg", "inc", c["kConsumerRegisters"])
        yield ("wait", "block_full", 0)
        for step in range(steps):
            slot = step % stages
            yield ("wait", f"step_full{slot}", (step // stages) & 1)
            yield ("wgmma", f"S{step}", [((a0, 0), 0), ((b0, slot), step)], score)
            yield ("wgmma", f"dP{step}", [((a1, 0), 0), ((b1, slot), step)], score)
            yield ("wait_group", 0)
            yield ("compute", lat.grad_cycles_per_element * c["kWgmmaM"] * step_rows // threads)
            if one_pass:
                yield from one_pass_products(i, step, slot)
                continue
            if kernel == "key_grad":
                yield ("wgmma", f"dV{step}", [((b1, slot), step)], grad)
                if release_early:
                    yield ("arrive", f"step_empty{slot}", threads)
                yield ("wgmma", f"dK{step}", [((b0, slot), step)], grad)
            else:
                yield ("wgmma", f"dQ{step}", [((b0, slot), step)], grad)
                if release_early:
                    yield ("arrive", f"step_empty{slot}", threads)
            yield ("wait_group", 0)
            if not release_early:
                yield ("arrive", f"step_empty{slot}", threads)
        yield ("exit",)

    dq = _flops(step_rows, head_dim, c["kWgmmaM"])  # dQ (step x D) += dS (step x 64 keys) K (64 x D)
    atomics = lat.atomic_cycles_per_element * step_rows * head_dim // threads

    def one_pass_products(i: int, step: int, slot: int):
        """The one-pass step after the elementwise work: dS^T to this consumer's own staging
        buffer (a generic store, a proxy fence, a sync of its warpgroup), then the products."""
        ds = ((f"dS{i}", 0), step)
        yield ("stage", ds[0], step, lat.stage_cycles_per_element * c["kWgmmaM"] * step_rows // threads)
        if overlap_dq:
            yield ("wgmma", f"dQ{step}", [((a0, 0), 0), ds], dq)
            yield ("wgmma", f"dV{step}", [((b1, slot), step)], grad)
            yield ("wgmma", f"dK{step}", [((b0, slot), step)], grad)
            yield ("wait_group", 1)  # in the kernel: dQ's group completes first
            yield ("compute", atomics)
            yield ("wait_group", 0)
            yield ("arrive", f"step_empty{slot}", threads)
            return
        yield ("wgmma", f"dV{step}", [((b1, slot), step)], grad)
        if release_early:
            yield ("arrive", f"step_empty{slot}", threads)
        yield ("wgmma", f"dK{step}", [((b0, slot), step)], grad)
        yield ("wait_group", 0)
        if not release_early:
            yield ("arrive", f"step_empty{slot}", threads)  # Q and dO are not read again
        yield ("wgmma", f"dQ{step}", [((a0, 0), 0), ds], dq)
        yield ("wait_group", 0)
        yield ("compute", atomics)

    machine.agent("producer", producer())
    for i in range(c["kConsumers"]):
        machine.agent(f"consumer{i}", consumer(i))


def forward_consumer_ops(head_dim: int, steps: int, variant: ForwardVariant = FIXED, consumer: int = 0) -> list[tuple]:
    """The operations forward_schedule has consumer `consumer` issue, in order (for comparing
    with the kernel source's order)."""
    c = read_constants()
    machine = Machine(c, Latencies(), random.Random(0), c["kRegistersAtEntry"])
    forward_schedule(machine, head_dim, (steps,), variant, Latencies())
    return list(machine.agents[f"consumer{consumer}"].program)


def banded_constants(c: dict[str, int]) -> dict[str, int]:
    """contracts.h's constants as the banded backward kernels use them: FA3's register split
    (kBandedProducerRegisters, kBandedConsumerRegisters) in place of the default one."""
    return {**c, "kProducerRegisters": c["kBandedProducerRegisters"],
            "kConsumerRegisters": c["kBandedConsumerRegisters"]}


def simulate(kernel: str, head_dim: int, steps: int = 32, seed: int = 0, variant: ForwardVariant = FIXED,
             lat: Latencies = Latencies(), registers_at_entry: int | None = None,
             constants: dict[str, int] | None = None, release_early: bool = False,
             tiles: tuple[int, ...] | None = None, overlap_dq: bool = False) -> float:
    """The tensor cores' busy fraction over one block's products (first start to last end);
    raises ScheduleError on a broken contract."""
    c = constants or read_constants()
    machine = Machine(c, lat, random.Random(seed), registers_at_entry or c["kRegistersAtEntry"])
    if kernel == "forward":
        forward_schedule(machine, head_dim, tiles or (steps,), variant, lat)
    else:
        backward_schedule(machine, kernel, head_dim, steps, lat, release_early, overlap_dq)
    machine.run()
    return machine.tensor_busy / (machine.last_product - machine.first_product)


def run_forward_block(head_dim: int, tiles: tuple[int, ...], variant: ForwardVariant, constants: dict[str, int],
                      seed: int = 0, lat: Latencies = Latencies()) -> Machine:
    """One forward block run to its exit (machine.exited_at: its cycles from the first load), for
    the grid model (tests/sm90_grid_model.py); raises ScheduleError as simulate does."""
    machine = Machine(constants, lat, random.Random(seed), constants["kRegistersAtEntry"])
    forward_schedule(machine, head_dim, tiles, variant, lat)
    machine.run()
    return machine


def busy_range(kernel: str, head_dim: int, seeds: int = 12, **kwargs) -> tuple[float, float]:
    """(lowest, mean) busy fraction over `seeds` random draws of the completion times."""
    figures = [simulate(kernel, head_dim, seed=seed, **kwargs) for seed in range(seeds)]
    return min(figures), sum(figures) / len(figures)


if __name__ == "__main__":
    before = Latencies(softmax_cycles=750)
    two_stages = {**read_constants(), "kForwardStages": 2}
    rows = [("forward today (99c1e85)", "forward", dict(variant=TODAY, constants=two_stages, lat=before)),
            ("forward fix 1", "forward", dict(variant=FIXED, lat=before)),
            ("forward fixes 1+2 (as built)", "forward", dict(variant=FIXED)),
            ("key_grad", "key_grad", {}), ("query_grad", "query_grad", {}),
            ("key_grad_dq (one pass, as built)", "key_grad_dq", {}),
            ("key_grad_dq, dQ atomics overlapped with dV/dK", "key_grad_dq", dict(overlap_dq=True))]
    print("| schedule | head dim | tensor-core busy, lowest / mean of 12 seeds |")
    print("| --- | --- | --- |")
    for label, kernel, kwargs in rows:
        for head_dim in (64, 128):
            low, mean = busy_range(kernel, head_dim, **kwargs)
            print(f"| {label} | {head_dim} | {low:.1%} / {mean:.1%} |")
    print()
    print("Backward time in units of one product at full tensor-core rate, per query x key tile")
    print("(two passes: 4 products / busy(key_grad) + 3 / busy(query_grad); one pass: 5 / busy):")
    for head_dim in (64, 128):
        two = 4 / busy_range("key_grad", head_dim)[1] + 3 / busy_range("query_grad", head_dim)[1]
        one = 5 / busy_range("key_grad_dq", head_dim)[1]
        overlapped = 5 / busy_range("key_grad_dq", head_dim, overlap_dq=True)[1]
        print(f"| hd {head_dim} | two passes {two:.2f} | one pass {one:.2f} ({two / one:.2f}x) | "
              f"overlapped {overlapped:.2f} ({two / overlapped:.2f}x) |")
