"""Layer maps: which student hidden state is matched to which teacher hidden state(s).

Indices are those of transformers' ``output_hidden_states``: ``0`` is the embedding output, ``i``
(``1..L``) the output of block ``i``; the last one is after the final norm in most architectures.

Strategies (``L_s`` student blocks, ``L_t`` teacher blocks):

* ``last``: ``L_s -> L_t``.
* ``all``: ``i -> i`` for ``i = 0..L`` (needs ``L_s == L_t``).
* ``uniform``: ``i -> round(i * L_t / L_s)`` for ``i = 0..L_s-1`` (evenly spaced, last state excluded).
* ``uniform+last``: ``uniform`` plus ``L_s -> L_t``.
* ``uniform-consecutive``: block ``i`` (``1..L_s``) -> the ``N = L_t / L_s`` consecutive teacher blocks
  ``(i-1)N+1 .. iN`` (1-to-N; needs ``L_t`` divisible by ``L_s``).
* explicit: ``"s:t,s:t+t"``, e.g. ``"1:2,2:4+5"``.
"""

from __future__ import annotations

from bitdistill.errors import UserError

__all__ = ["LAYER_MAP_STRATEGIES", "build_layer_map"]

LAYER_MAP_STRATEGIES = ("last", "all", "uniform", "uniform+last", "uniform-consecutive")


def _parse_explicit(spec: str) -> list[tuple[int, tuple[int, ...]]]:
    pairs = []
    for item in spec.split(","):
        s, sep, t = item.strip().partition(":")
        if not sep:
            raise UserError(f"cannot parse layer-map entry {item!r}; write 'student:teacher' or 'student:t1+t2', "
                            f"or use one of {', '.join(LAYER_MAP_STRATEGIES)}")
        try:
            pairs.append((int(s), tuple(int(x) for x in t.split("+"))))
        except ValueError as exc:
            raise UserError(f"layer-map entry {item!r} is not made of integers") from exc
    return pairs


def build_layer_map(spec: str, num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, tuple[int, ...]]]:
    """The ``(student_index, teacher_indices)`` pairs for a strategy name or an explicit ``"s:t,..."`` map.

    Raises:
        ValueError: unknown strategy, incompatible depths, or an index outside ``0..L``.
    """
    ls, lt = num_student_layers, num_teacher_layers
    if spec == "last":
        pairs = [(ls, (lt,))]
    elif spec == "all":
        if ls != lt:
            raise UserError(f"layer map 'all' needs equal depths, got {ls} student and {lt} teacher layers; "
                            "use uniform or uniform-consecutive")
        pairs = [(i, (i,)) for i in range(ls + 1)]
    elif spec in ("uniform", "uniform+last"):
        pairs = [(i, (round(i * lt / ls),)) for i in range(ls)]
        if spec == "uniform+last":
            pairs.append((ls, (lt,)))
    elif spec == "uniform-consecutive":
        if lt % ls:
            raise UserError(f"layer map 'uniform-consecutive' needs the teacher depth ({lt}) to be a multiple of the "
                            f"student depth ({ls})")
        n = lt // ls
        pairs = [(i, tuple(range((i - 1) * n + 1, i * n + 1))) for i in range(1, ls + 1)]
    else:
        pairs = _parse_explicit(spec)
    for s, ts in pairs:
        if not 0 <= s <= ls:
            raise UserError(f"layer map refers to student hidden state {s}, but the student has states 0..{ls}")
        for t in ts:
            if not 0 <= t <= lt:
                raise UserError(f"layer map refers to teacher hidden state {t}, but the teacher has states 0..{lt}")
    return pairs
