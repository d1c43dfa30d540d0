"""Mergeable summaries of a window's values: a quantile sketch and a distinct-member state.

SPEC section 4 asks for percentiles within 1% of exact, and distinct counts
within 2%, over any time range or tag grouping queried later.  Per-window
exact answers cannot be combined (a p99 of p99s means nothing), so every
rollup also stores a small state that *can* be merged: a :class:`Sketch` for
timers, histograms and distributions, a :class:`SetState` for sets.

Quantile definition (used everywhere, and by the tests as "exact"):
weighted nearest rank -- the smallest value x such that the total weight of
the values <= x is at least ``q * total weight``; ``q = 0`` gives the minimum.
The comparison forgives a relative ``RANK_EPSILON`` so that ``0.07 * 100``
(= 7.000000000000001 in binary floating point) still means "the 7th value".

Sketch
------
DDSketch-style logarithmic buckets with relative accuracy ``ALPHA = 0.005``
(half of the 1% SPEC allows, to leave room for rounding at bucket edges).
With ``gamma = (1 + ALPHA) / (1 - ALPHA)``, a value x > 0 lands in bucket
``i = ceil(log(x) / log(gamma))``, which covers ``(gamma**(i-1), gamma**i]``;
the bucket answers ``2 * gamma**i / (gamma + 1)``, within ALPHA relative of
every value in it.  Negative values use a mirrored set of buckets keyed by
``|x|``; exact zeros have their own weight.  Because buckets are ordered like
the values they hold, the sketch picks the very bucket that holds the exact
nearest-rank value, so its answer is within ALPHA of exact.  The result is
clamped to the exact [min, max], so q=0 and q=1 are exact.  A window of
ordinary values (say 1e-6..1e9) needs at most ~3,400 buckets per sign;
adversarial input spanning the whole float range could need ~71,000 per
sign, so each sign keeps at most ``MAX_BUCKETS`` (4,096, a value range of
about 6e17) and folds the buckets nearest zero into the smallest one kept
(DDSketch's "collapsing lowest" store).  Quantiles that land in the folded
buckets lose their accuracy guarantee (they are still clamped to the exact
min and max); the others keep it.

Serialized form (msgpack array), version 1::

    [1, zero_weight, min, max, {index: weight, ...}, {index: weight, ...}]
         |            |    |    positive buckets     negative buckets (by |x|)
         |            exact min and max of the values
         weight of the values that are exactly 0

Weights are written as msgpack integers when they are whole numbers (the
common case: sample rate 1 or 1/2^k) and as float64 otherwise.  The total
weight (``count``) is the sum of every weight and is not stored.

SetState
--------
Exact member set up to ``SET_EXACT_LIMIT`` (4096) members, then a
HyperLogLog of precision 14 (16,384 one-byte registers; standard error
0.81%) fed by a 64-bit BLAKE2b hash -- stable across processes, unlike
Python's randomised ``hash()``.  Cardinality uses Ertl's improved raw
estimator ("New cardinality estimation algorithms for HyperLogLog
sketches", 2017), which has no bias bump between the small and large ranges
and so needs no empirical correction tables.

Serialized form (msgpack array), version 1::

    [1, 0, [member, ...]]     exact: the members, sorted, as UTF-8 strings
    [1, 1, registers]         HyperLogLog: 16,384 bytes (msgpack bin), one
                              register per hash bucket, value = rank (0..51)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from hashlib import blake2b
from typing import Any

import msgpack

from .fastpath import sketch_native
from .model import DISTRIBUTION_TYPES, SET

__all__ = [
    "ALPHA",
    "INV_LOG_GAMMA",
    "MAX_BUCKETS",
    "RANK_EPSILON",
    "SET_EXACT_LIMIT",
    "SetState",
    "Sketch",
    "merge_blobs",
    "sketch_bytes",
]

ALPHA = 0.005
_GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(_GAMMA)
INV_LOG_GAMMA = 1.0 / _LOG_GAMMA
#: log of the factor that turns a bucket's upper bound into its representative
_LOG_REPR = math.log(2.0 / (_GAMMA + 1.0))

#: relative slack in the nearest-rank comparison (see module docstring)
RANK_EPSILON = 1e-12

_SKETCH_VERSION = 1
_SET_VERSION = 1
_SET_EXACT = 0
_SET_HLL = 1

SET_EXACT_LIMIT = 4096
#: most buckets kept per sign (see the module docstring)
MAX_BUCKETS = 4096
_HLL_P = 14
_HLL_M = 1 << _HLL_P
_HLL_Q = 64 - _HLL_P  # hash bits left for the rank
_HLL_MASK = (1 << _HLL_Q) - 1
_HLL_ALPHA_INF = 1.0 / (2.0 * math.log(2.0))


def _representative(index: int) -> float:
    """The value a bucket answers with; inf when it would overflow a float."""
    try:
        return math.exp(index * _LOG_GAMMA + _LOG_REPR)
    except OverflowError:
        return math.inf


#: msgpack integers stop at 2**64; a larger whole weight (a sample rate like
#: @1e-300 makes one: found by tests/fuzz) travels as a float
_MAX_PACKED_INT = float(2**63)
#: ints up to here survive a round trip through float unchanged
_EXACT_INT = 2**53


def _pack_weight(weight: float) -> int | float:
    """Whole weights travel as msgpack ints: 1-3 bytes instead of 9."""
    return int(weight) if weight.is_integer() and weight < _MAX_PACKED_INT else weight


def _pack_weights(buckets: dict[int, float]) -> dict[int, int | float]:
    """_pack_weight over a bucket map, in C when every weight is whole (the usual case)."""
    weights = buckets.values()
    if all(map(float.is_integer, weights)) and max(weights, default=0.0) < _MAX_PACKED_INT:
        return dict(zip(buckets, map(int, weights), strict=True))
    return {index: _pack_weight(weight) for index, weight in buckets.items()}


def _fill_buckets(
    items: Iterable[tuple[float, Any]],
    positive: dict[int, Any],
    negative: dict[int, Any],
    nothing: float,
) -> Any:
    """Add (value, weight) pairs to the bucket maps; return the weight of the zeros.

    Sums start at ``nothing``: 0 keeps integer counts integers (``sketch_bytes``
    packs them as they are), 0.0 makes every weight a float (a Sketch's).
    Runs once per distinct value of every timer series at flush: locals only.
    """
    zero = nothing
    log = math.log
    ceil = math.ceil
    inv_log_gamma = INV_LOG_GAMMA
    for value, weight in items:
        if value > 0.0:
            index = ceil(log(value) * inv_log_gamma)
            positive[index] = positive.get(index, nothing) + weight
        elif value < 0.0:
            index = ceil(log(-value) * inv_log_gamma)
            negative[index] = negative.get(index, nothing) + weight
        else:
            zero += weight
    return zero


def sketch_bytes(values: Sequence[float], low: float, high: float) -> bytes:
    """``Sketch.from_values(values).to_bytes()``, byte for byte, for values of weight 1.

    The flush's common case (an unsampled timer), built without a Sketch:
    every weight is a whole count, so the bucket maps go to msgpack as they
    are.  ``low`` and ``high`` are the values' min and max (the caller has
    sorted them already).  In C when the extension is built and the values
    are a list of finite floats; the same bytes either way.
    """
    if sketch_native is not None:
        packed: bytes | None = sketch_native.sketch_bytes(
            values, low, high, INV_LOG_GAMMA, MAX_BUCKETS
        )
        if packed is not None:
            return packed
    return _sketch_bytes(values, low, high)


def _sketch_bytes(values: Sequence[float], low: float, high: float) -> bytes:
    """sketch_bytes in Python. Values are folded with a Counter only when
    there are many, so the logarithm runs once per distinct value."""
    positive: dict[int, int] = {}
    negative: dict[int, int] = {}
    items: Iterable[tuple[float, int]] = (
        Counter(values).items() if len(values) > 16 else ((v, 1) for v in values)
    )
    zero = _fill_buckets(items, positive, negative, 0)
    if len(positive) > MAX_BUCKETS or len(negative) > MAX_BUCKETS:
        return Sketch.from_values(values).to_bytes()
    packed: bytes = msgpack.packb(
        [_SKETCH_VERSION, zero, low, high, positive, negative], use_bin_type=True
    )
    return packed


class Sketch:
    """A mergeable quantile sketch with relative error <= ALPHA (0.5%).

    ``count`` is the total weight, ``min`` and ``max`` are exact.  An empty
    sketch has count 0, min +inf and max -inf.
    """

    __slots__ = ("count", "max", "min", "negative", "positive", "zero")

    def __init__(self) -> None:
        self.count: float = 0.0
        self.min: float = math.inf
        self.max: float = -math.inf
        self.zero: float = 0.0
        self.positive: dict[int, float] = {}
        self.negative: dict[int, float] = {}

    def __repr__(self) -> str:
        return (
            f"Sketch(count={self.count!r}, min={self.min!r}, max={self.max!r}, "
            f"buckets={len(self.positive) + len(self.negative) + (self.zero > 0)})"
        )

    @classmethod
    def from_values(cls, values: Sequence[float], weights: Sequence[float] | None = None) -> Sketch:
        """Build a sketch from raw values (weights default to 1 each; must be > 0).

        Identical values are folded first (timer values repeat a lot, and a
        Counter runs in C), so the logarithm runs once per distinct value.
        """
        sketch = cls()
        if not values:
            return sketch
        folded: Mapping[float, float]
        if weights is None:
            folded = Counter(values)
        else:
            if len(weights) != len(values):
                raise ValueError("values and weights differ in length")
            summed: dict[float, float] = {}
            get = summed.get
            for value, weight in zip(values, weights, strict=True):
                summed[value] = get(value, 0.0) + weight
            folded = summed
        if min(folded.values()) <= 0.0:
            raise ValueError("weights must be positive")
        sketch.zero = _fill_buckets(folded.items(), sketch.positive, sketch.negative, 0.0)
        sketch.min = min(folded)
        sketch.max = max(folded)
        sketch.count = float(math.fsum(folded.values()))
        sketch._cap()
        return sketch

    def _cap(self) -> None:
        """Fold the buckets nearest zero until each sign has at most MAX_BUCKETS."""
        for buckets in (self.positive, self.negative):
            excess = len(buckets) - MAX_BUCKETS
            if excess > 0:
                order = sorted(buckets)
                kept = order[excess]
                buckets[kept] += math.fsum(buckets.pop(index) for index in order[:excess])

    def merge(self, other: Sketch) -> None:
        """Add ``other``'s values into this sketch (in place)."""
        if not other.count:
            return
        for mine, theirs in ((self.positive, other.positive), (self.negative, other.negative)):
            get = mine.get
            for index, weight in theirs.items():
                mine[index] = get(index, 0.0) + weight
        self.zero += other.zero
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self._cap()

    def quantile(self, q: float) -> float:
        """The weighted nearest-rank q-quantile (q in [0, 1]), within ALPHA relative."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Several quantiles in one pass over the buckets; answers in the order asked.

        Raises ValueError on an empty sketch or a q outside [0, 1].
        """
        if self.count <= 0.0:
            raise ValueError("quantile of an empty sketch")
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        order = sorted(range(len(qs)), key=qs.__getitem__)
        answers = [self.max] * len(qs)
        pos = 0
        # q = 0 is the minimum by definition
        while pos < len(order) and qs[order[pos]] == 0.0:
            answers[order[pos]] = self.min
            pos += 1
        # q = 1 is the max by definition; its bucket's representative is only near it
        end = len(order)
        while end > pos and qs[order[end - 1]] == 1.0:
            end -= 1
        order = order[:end]
        if pos == len(order):
            return answers
        scale = self.count * (1.0 - RANK_EPSILON)
        target = qs[order[pos]] * scale
        cumulative = 0.0
        # walk the buckets from the smallest value up; a bucket's value is only
        # computed when an answer lands in it
        for sign, buckets in ((-1.0, self.negative), (0.0, {0: self.zero}), (1.0, self.positive)):
            for index in sorted(buckets, reverse=sign < 0.0):
                weight = buckets[index]
                if not weight:
                    continue
                cumulative += weight
                if cumulative < target:
                    continue
                value = sign * _representative(index) if sign else 0.0
                value = min(max(value, self.min), self.max)
                while cumulative >= target:
                    answers[order[pos]] = value
                    pos += 1
                    if pos == len(order):
                        return answers
                    target = qs[order[pos]] * scale
        return answers  # rounding left some targets unmet: they are the max

    def to_bytes(self) -> bytes:
        """msgpack ``[1, zero, min, max, {i: w} positive, {i: w} negative]``."""
        packed: bytes = msgpack.packb(
            [
                _SKETCH_VERSION,
                _pack_weight(self.zero),
                self.min,
                self.max,
                _pack_weights(self.positive),
                _pack_weights(self.negative),
            ],
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> Sketch:
        """Inverse of :meth:`to_bytes`; ValueError on anything else."""
        try:
            fields: Any = msgpack.unpackb(data, strict_map_key=False)
            version, zero, low, high, positive, negative = fields
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"not a sketch: {exc}") from exc
        if version != _SKETCH_VERSION:
            raise ValueError(f"unknown sketch version {version!r}")
        sketch = cls()
        sketch.zero = float(zero)
        sketch.min = float(low)
        sketch.max = float(high)
        try:
            sketch.positive = dict(
                zip(map(int, positive), map(float, positive.values()), strict=True)
            )
            sketch.negative = dict(
                zip(map(int, negative), map(float, negative.values()), strict=True)
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed sketch buckets: {exc}") from exc
        sketch.count = (
            sketch.zero + math.fsum(sketch.positive.values()) + math.fsum(sketch.negative.values())
        )
        sketch._cap()
        return sketch


def _hll_point(member: str) -> tuple[int, int]:
    """(register index, rank) of a member: 14 hash bits pick, 50 bits rank."""
    digest = blake2b(member.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    h = int.from_bytes(digest, "big")
    return h >> _HLL_Q, _HLL_Q + 1 - (h & _HLL_MASK).bit_length()


def _sigma(x: float) -> float:
    """Ertl's sigma(x) = x + sum_k x^(2^k) 2^(k-1), the empty-register term."""
    if x == 1.0:
        return math.inf
    y = 1.0
    z = x
    while True:
        x *= x
        previous = z
        z += x * y
        y += y
        if z == previous:
            return z


def _tau(x: float) -> float:
    """Ertl's tau(x), the saturated-register term."""
    if x in (0.0, 1.0):
        return 0.0
    y = 1.0
    z = 1.0 - x
    while True:
        x = math.sqrt(x)
        previous = z
        y *= 0.5
        z -= (1.0 - x) ** 2 * y
        if z == previous:
            return z / 3.0


class SetState:
    """Distinct members: exact up to SET_EXACT_LIMIT, then HyperLogLog (p=14)."""

    __slots__ = ("members", "registers")

    def __init__(self) -> None:
        #: the exact members, or None once the state became a HyperLogLog
        self.members: set[str] | None = set()
        self.registers: bytearray | None = None

    def __repr__(self) -> str:
        kind = "exact" if self.members is not None else "hll"
        return f"SetState({kind}, cardinality={self.cardinality()})"

    @classmethod
    def from_members(cls, members: Iterable[str]) -> SetState:
        """A state holding these members (duplicates are fine)."""
        state = cls()
        state.members = set(members)
        if len(state.members) > SET_EXACT_LIMIT:
            state._to_hll()
        return state

    def _to_hll(self) -> None:
        """Switch from the exact set to registers, hashing every member once."""
        members = self.members or set()
        self.members = None
        self.registers = bytearray(_HLL_M)
        self._hll_add(members)

    def _hll_add(self, members: Iterable[str]) -> None:
        registers = self.registers
        assert registers is not None
        for member in members:
            index, rank = _hll_point(member)
            if rank > registers[index]:
                registers[index] = rank

    def merge(self, other: SetState) -> None:
        """Union ``other`` into this state (in place)."""
        if other.members is not None:
            if self.members is not None:
                self.members |= other.members
                if len(self.members) > SET_EXACT_LIMIT:
                    self._to_hll()
            else:
                self._hll_add(other.members)
            return
        assert other.registers is not None
        if self.members is not None:
            mine = self.members
            self.members = None
            self.registers = bytearray(other.registers)
            self._hll_add(mine)
            return
        assert self.registers is not None
        self.registers = bytearray(map(max, self.registers, other.registers))

    def cardinality(self) -> int:
        """Distinct members: exact, or the HyperLogLog estimate rounded."""
        if self.members is not None:
            return len(self.members)
        assert self.registers is not None
        histogram = [0] * (_HLL_Q + 2)
        for value, times in Counter(self.registers).items():
            histogram[value] += times
        m = float(_HLL_M)
        z = m * _tau(1.0 - histogram[_HLL_Q + 1] / m)
        for k in range(_HLL_Q, 0, -1):
            z = 0.5 * (z + histogram[k])
        z += m * _sigma(histogram[0] / m)
        return round(_HLL_ALPHA_INF * m * m / z)

    def to_bytes(self) -> bytes:
        """msgpack ``[1, 0, [members sorted]]`` or ``[1, 1, registers]``."""
        if self.members is not None:
            body: object = [_SET_VERSION, _SET_EXACT, sorted(self.members)]
        else:
            assert self.registers is not None
            body = [_SET_VERSION, _SET_HLL, bytes(self.registers)]
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> SetState:
        """Inverse of :meth:`to_bytes`; ValueError on anything else."""
        try:
            fields: Any = msgpack.unpackb(data)
            version, kind, payload = fields
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"not a set state: {exc}") from exc
        if version != _SET_VERSION:
            raise ValueError(f"unknown set state version {version!r}")
        state = cls()
        if kind == _SET_EXACT:
            state.members = set(payload)
        elif kind == _SET_HLL and isinstance(payload, bytes) and len(payload) == _HLL_M:
            state.members = None
            state.registers = bytearray(payload)
        else:
            raise ValueError("malformed set state")
        return state


def merge_blobs(type_code: str, blobs: Iterable[bytes | None]) -> bytes | None:
    """Merge serialized sketches (ms/h/d) or set states (s) into one blob.

    None entries are skipped; None comes back when there was nothing to merge.
    """
    present = [blob for blob in blobs if blob is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    if type_code in DISTRIBUTION_TYPES:
        merged = None
        if sketch_native is not None:
            merged = sketch_native.merge_sketches(present, MAX_BUCKETS)
        if merged is None:
            merged = _merge_small_sketches(present)
        if merged is not None:
            return merged
        sketch = Sketch.from_bytes(present[0])
        for blob in present[1:]:
            sketch.merge(Sketch.from_bytes(blob))
        return sketch.to_bytes()
    if type_code == SET:
        merged = None
        if sketch_native is not None:
            merged = sketch_native.merge_sets(present, SET_EXACT_LIMIT)
        if merged is None:
            merged = _merge_exact_sets(present)
        if merged is not None:
            return merged
        state = SetState.from_bytes(present[0])
        for blob in present[1:]:
            state.merge(SetState.from_bytes(blob))
        return state.to_bytes()
    raise ValueError(f"type {type_code!r} has no mergeable state")


def _merge_small_sketches(blobs: list[bytes]) -> bytes | None:
    """merge_blobs of sketches without building Sketch objects: the bucket maps
    are added as msgpack gives them.  Downsampling merges a dozen or more
    small sketches per series and bucket, so this runs once per timer series
    at every compaction.  The bytes are those of the Sketch path.  None when
    that path must decide: a blob that is not a well-formed version-1 sketch
    (it raises the right error), or a result over MAX_BUCKETS (it folds).
    """
    positive: dict[int, Any] = {}
    negative: dict[int, Any] = {}
    zero: Any = 0
    low = math.inf
    high = -math.inf
    unpackb = msgpack.unpackb
    try:
        for blob in blobs:
            version, weight, first, last, more, less = unpackb(blob, strict_map_key=False)
            if version != _SKETCH_VERSION:
                return None
            zero += weight
            if first < low:
                low = first
            if last > high:
                high = last
            get = positive.get
            for index, weight in more.items():
                positive[index] = get(index, 0) + weight
            get = negative.get
            for index, weight in less.items():
                negative[index] = get(index, 0) + weight
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException):
        return None
    if len(positive) > MAX_BUCKETS or len(negative) > MAX_BUCKETS:
        return None
    if not (type(zero) is int and zero < _EXACT_INT and _all_int(positive) and _all_int(negative)):
        # some weight is fractional (a sample rate): write whole sums as ints, as to_bytes does
        try:
            zero = _pack_weight(float(zero))
            positive = {int(i): _pack_weight(float(w)) for i, w in positive.items()}
            negative = {int(i): _pack_weight(float(w)) for i, w in negative.items()}
        except (TypeError, ValueError):
            return None
    packed: bytes = msgpack.packb(
        [_SKETCH_VERSION, zero, float(low), float(high), positive, negative], use_bin_type=True
    )
    return packed


def _all_int(buckets: dict[int, Any]) -> bool:
    """Every weight a plain int that a float holds exactly (else: the float path)."""
    return all(type(weight) is int and weight < _EXACT_INT for weight in buckets.values())


def _merge_exact_sets(blobs: list[bytes]) -> bytes | None:
    """merge_blobs of exact set states that stay exact, as plain set unions; None
    when the SetState path must decide (a HyperLogLog, too many members, or a
    malformed blob)."""
    members: set[Any] = set()
    unpackb = msgpack.unpackb
    try:
        for blob in blobs:
            version, kind, listed = unpackb(blob)
            if version != _SET_VERSION or kind != _SET_EXACT or type(listed) is not list:
                return None
            members.update(listed)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if len(members) > SET_EXACT_LIMIT or not all(type(m) is str for m in members):
        return None
    packed: bytes = msgpack.packb([_SET_VERSION, _SET_EXACT, sorted(members)], use_bin_type=True)
    return packed
