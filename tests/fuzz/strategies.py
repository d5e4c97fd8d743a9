"""Hypothesis strategies built from protobuf descriptors, plus raw wire-level mutations of serialized requests.

`messages(descriptor)` walks a message Descriptor and draws every field: strings (ASCII, any Unicode, whitespace,
huge), integers at their type's boundaries, floats incl. NaN/inf/±3.4e38, enums incl. values the proto does not
define, repeated fields, maps and nested messages (depth-limited). Per-field hints (full field name -> strategy)
steer some fields towards values that get past the first validation check (a 384-float vector, a known tenant),
so the fuzz reaches the code behind it instead of bouncing off the same INVALID_ARGUMENT every time.

`mutations(seed)` corrupts valid serialized bytes: bit flips, truncation, invalid UTF-8 and lone surrogates in a
string field, deep (unterminated) groups, overlong varints, lying length prefixes, unknown fields, random bytes.

    @given(messages(pb.AskRequest.DESCRIPTOR, hints=GATEWAY_HINTS))
    def test(message): ...
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

Hints = Mapping[str, st.SearchStrategy[Any]]

# How big "huge" strings get; the bench raises it (bench/fuzz.py --huge-chars).
DEFAULT_HUGE_CHARS = 20_000

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
FLOAT32_MAX = 3.4028234663852886e38

_FD = FieldDescriptor


def _weighted(*pairs: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """one_of with integer weights (a branch listed n times is drawn n times as often)."""
    return st.one_of(*[s for weight, s in pairs for _ in range(weight)])


def texts(huge_chars: int = DEFAULT_HUGE_CHARS) -> st.SearchStrategy[str]:
    """Mostly short words, sometimes any Unicode (no surrogates: protobuf refuses them client-side), whitespace
    only, control characters, or a huge string."""
    words = st.lists(st.sampled_from(["bee", "honey", "swarm", "queen", "dance", "wax", "the", "why", "[1]", "?"]),
                     min_size=1, max_size=12).map(" ".join)
    specials = st.sampled_from(["", " ", "\t\n ", "\x00", "\u200b", "\ufeff", "e\u0301", "🐝" * 3, "'; DROP --",
                                "{tenant}", "../../etc/passwd", "%s%n", "\U0010ffff", "a" * 129, "*"])
    huge = st.builds(lambda ch, n: ch * n, st.sampled_from(["a", "é", "🐝", "bee ", " "]),
                     st.integers(huge_chars // 4, huge_chars))
    small = _weighted((6, words), (3, st.text(max_size=64)), (2, specials))
    with_huge = _weighted((6, words), (3, st.text(max_size=64)), (2, specials), (1, huge))
    # One draw per example decides whether huge strings may appear in it at all: otherwise almost every message
    # with a few dozen strings holds one, and the per-method size limit answers before any validation runs.
    return st.shared(st.integers(0, 3), key="ragfleet-fuzz-huge").flatmap(lambda n: with_huge if n == 0 else small)


def _ints(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    lo, hi = bounds
    edges = sorted({lo, lo + 1, -1 if lo < 0 else lo, 0, 1, 2, 3, 5, 16, 50, 51, 128, 512, 4096, 5000, hi - 1, hi})
    return _weighted((3, st.sampled_from([e for e in edges if lo <= e <= hi])), (2, st.integers(lo, hi)),
                     (2, st.integers(-3 if lo < 0 else 0, 64)))


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 0.5, 1.0, -1.0, 2.0, 2.0000001, 1e-45, float("nan"), float("inf"), float("-inf"),
             FLOAT32_MAX, -FLOAT32_MAX, 3e38]
    if width == 64:
        edges += [1e308, -1e308, 5e-324]
    return _weighted((2, st.sampled_from(edges)), (2, st.floats(width=width)),
                     (2, st.floats(-2.0, 2.0, width=width)))


def _enum(field: FieldDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in field.enum_type.values]
    return _weighted((4, st.sampled_from(known)), (1, st.sampled_from([-1, max(known) + 1, 99, INT32[1], INT32[0]])))


def _scalar(field: FieldDescriptor, huge_chars: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t == _FD.TYPE_STRING:
        return texts(huge_chars)
    if t == _FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == _FD.TYPE_BOOL:
        return st.booleans()
    if t == _FD.TYPE_ENUM:
        return _enum(field)
    if t in (_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32):
        return _ints(INT32)
    if t in (_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64):
        return _ints(INT64)
    if t in (_FD.TYPE_UINT32, _FD.TYPE_FIXED32):
        return _ints(UINT32)
    if t in (_FD.TYPE_UINT64, _FD.TYPE_FIXED64):
        return _ints(UINT64)
    if t == _FD.TYPE_FLOAT:
        return _floats(32)
    if t == _FD.TYPE_DOUBLE:
        return _floats(64)
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


def _repeated(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    few, many = st.lists(element, max_size=4), st.lists(element, min_size=5, max_size=40)
    # As with huge strings: long lists only in some examples, decided once per example.
    return st.shared(st.integers(0, 3), key="ragfleet-fuzz-many").flatmap(
        lambda n: _weighted((3, few), (1, many)) if n == 0 else few)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == _FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def _is_repeated(field: FieldDescriptor) -> bool:
    # `label` is deprecated in newer protobuf releases; `is_repeated` replaces it.
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == _FD.LABEL_REPEATED


def messages(descriptor: Descriptor, *, hints: Hints | None = None, huge_chars: int = DEFAULT_HUGE_CHARS,
             max_depth: int = 3) -> st.SearchStrategy[Any]:
    """Messages of `descriptor`'s type with every field drawn (or left unset where presence is tracked)."""
    hints = dict(hints or {})
    cls = message_factory.GetMessageClass(descriptor)

    def value_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.type == _FD.TYPE_MESSAGE:
            if depth >= max_depth:
                return st.just(message_factory.GetMessageClass(field.message_type)())
            return messages(field.message_type, hints=hints, huge_chars=huge_chars, max_depth=max_depth - 1)
        return _scalar(field, huge_chars)

    fields: list[tuple[FieldDescriptor, st.SearchStrategy[Any]]] = []
    for field in descriptor.fields:
        if field.full_name in hints:
            strategy = hints[field.full_name]
        elif _is_map(field):
            key_f, val_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            strategy = _weighted((5, st.dictionaries(_scalar(key_f, huge_chars), value_strategy(val_f, 1),
                                                     max_size=4)),
                                 (1, st.dictionaries(_scalar(key_f, 64), value_strategy(val_f, 1), min_size=5,
                                                     max_size=200)))
        elif _is_repeated(field):
            strategy = _repeated(value_strategy(field, 1))
        else:
            strategy = value_strategy(field, 1)
            if field.has_presence:
                strategy = st.none() | strategy
        fields.append((field, strategy))

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Any:
        message = cls()
        for field, strategy in fields:
            if field.containing_oneof is not None and draw(st.booleans()):
                continue  # leave this member of the oneof unset (the last one set wins otherwise)
            _assign(message, field, draw(strategy))
        return message

    return build()


def _assign(message: Any, field: FieldDescriptor, value: Any) -> None:
    if value is None:
        return
    name = field.name
    if _is_map(field):
        target = getattr(message, name)
        for key, item in value.items():
            if field.message_type.fields_by_name["value"].type == _FD.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif _is_repeated(field):
        target = getattr(message, name)
        if field.type == _FD.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == _FD.TYPE_MESSAGE:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


# ---------------------------------------------------------------------------------------------------------------
# Raw byte mutations


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string_field(number: int, raw: bytes) -> bytes:
    """A length-delimited field holding `raw` exactly (invalid UTF-8 is not checked here, by design)."""
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


BAD_UTF8 = [b"b\xff\xfeq", b"\xc3", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xc0\xaf",
            b"\xe0\x80\x80", b"ok\x80", b"\xf8\x88\x80\x80\x80"]


def _flip(data: bytes, positions: list[int], bits: list[int]) -> bytes:
    out = bytearray(data)
    for pos, bit in zip(positions, bits):
        if out:
            out[pos % len(out)] ^= 1 << bit
    return bytes(out)


def mutations(seeds: st.SearchStrategy[bytes], string_fields: tuple[int, ...],
              *, max_group_depth: int = 100_000) -> st.SearchStrategy[tuple[str, bytes]]:
    """(kind, bytes) pairs: a valid serialized request corrupted one way or another. `string_fields` are the
    top-level string field numbers of the request type (where invalid UTF-8 is planted)."""
    fields = st.sampled_from(string_fields or (1,))
    flip = st.builds(lambda d, p, b: ("bit_flip", _flip(d, p, b)), seeds,
                     st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
                     st.lists(st.integers(0, 7), min_size=4, max_size=4))
    truncate = st.builds(lambda d, f: ("truncate", d[: int(len(d) * f)]), seeds.filter(len),
                         st.floats(0.01, 0.99))
    bad_utf8 = st.builds(lambda d, f, b, before: ("invalid_utf8", string_field(f, b) + d if before
                                                  else d + string_field(f, b)),
                         seeds, fields, st.sampled_from(BAD_UTF8), st.booleans())
    depth = st.integers(1, max_group_depth)
    groups = st.builds(lambda d, n, closed: ("deep_groups", d + b"\x5b" * n + (b"\x5c" * n if closed else b"")),
                       seeds, depth, st.booleans())  # field 11, wire type 3 (start group) / 4 (end group)
    nested = st.builds(lambda d, n: ("deep_length_delimited", d + _nested(n)), seeds, st.integers(1, 2000))
    varint = st.builds(lambda d, f: ("overlong_varint", d + _varint(f << 3) + b"\xff" * 11), seeds,
                       st.integers(1, 12))
    lying_length = st.builds(lambda d, f, n: ("lying_length", d + _varint(f << 3 | 2) + _varint(n) + b"x"),
                             seeds, fields, st.sampled_from([2, 1000, 2**31 - 1, 2**32, 2**63]))
    unknown = st.builds(lambda d, f, w, payload: ("unknown_field", d + _unknown(f, w, payload)), seeds,
                        st.integers(16, 2**29 - 1), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=16))
    bad_wire = st.builds(lambda d, f, w: ("bad_wire_type", d + _varint(f << 3 | w) + b"\x01"), seeds,
                         st.integers(1, 12), st.sampled_from([3, 4, 6, 7]))
    noise = st.builds(lambda b: ("random_bytes", b), st.binary(max_size=256))
    doubled = st.builds(lambda d: ("concatenated", d + d), seeds)
    return st.one_of(flip, truncate, bad_utf8, bad_utf8, groups, nested, varint, lying_length, unknown, bad_wire,
                     noise, doubled)


def _nested(depth: int) -> bytes:
    """An unknown field 15 holding a message holding a message ... `depth` deep (valid wire format)."""
    inner = b""
    for _ in range(depth):
        inner = _varint(15 << 3 | 2) + _varint(len(inner)) + inner
    return inner


def _unknown(number: int, wire: int, payload: bytes) -> bytes:
    tag = _varint(number << 3 | wire)
    if wire == 0:
        return tag + _varint(int.from_bytes(payload[:8] or b"\x01", "little"))
    if wire == 1:
        return tag + payload[:8].ljust(8, b"\x00")
    if wire == 5:
        return tag + payload[:4].ljust(4, b"\x00")
    return tag + _varint(len(payload)) + payload
