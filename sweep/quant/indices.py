"""Numbers chosen on an axis (the layers of a model, the experts of a layer): an int or a list of ints, validated."""

from __future__ import annotations

from ..errors import SweepError


def parse_indices(value, n: int, axis: str, a_number: str, example: str, out_of_range: str,
                  also: str = "") -> tuple[int, ...]:
    """`value` (an int or a list of ints) as distinct numbers 0..n-1, in the order given; otherwise a SweepError of
    one line. `a_number`: "a layer number"; `example`: a list to show; `also`: other words the axis takes besides
    `all` ("each, "); `out_of_range`: the message for a number outside 0..n-1, with `{item}`."""
    iterable = isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str)
    chosen = []
    for item in list(value) if iterable else [value]:
        try:
            number = int(item)
        except (TypeError, ValueError):
            raise SweepError(f"{axis}={item!r} is not {a_number}; use an int 0..{n - 1}, a list like {example}, "
                             f"{also}or all") from None
        if not 0 <= number < n or str(item).strip() != str(number):
            raise SweepError(out_of_range.format(item=item))
        chosen.append(number)
    if not chosen:
        raise SweepError(f"{axis}=[] selects nothing; give {a_number}, a list, {also}or all")
    return tuple(dict.fromkeys(chosen))
