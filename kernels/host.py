"""Integer helpers for the host side of this package's launches (grids, tile sizes). Triton's `triton.cdiv` and
`triton.next_power_of_2` are constexpr functions, and a call from Python through their wrapper took about 5 us of
host time on this repo's CPU machine, several per launch; these are the same arithmetic on plain ints."""


def cdiv(a, b):
    """ceil(a / b) for ints, b > 0 (triton.cdiv)."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n, for n >= 1 (triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length()
