"""Human byte sizes ("5GB", "8GiB", 1000000) to integers, and the largest count a recipe may give."""

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
MAX_COUNT = 2**31 - 1  # counts reach torch and tokenizers as C ints
MAX_SIZE = 2**60  # 1 EiB: larger is a typo, and would overflow the C integers it reaches
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Return a positive number of bytes; raise ValueError naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 5GB, 512MiB or a number of bytes")
    if isinstance(value, int):
        size = value
    else:
        match = _PATTERN.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"'{value}' is not a size such as 5GB, 512MiB or a number of bytes")
        if len(match.group(1)) > 30:
            raise ValueError(f"'{value}' is larger than 1 EiB")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("a size must be positive")
    if size > MAX_SIZE:
        raise ValueError(f"'{value}' is larger than 1 EiB")
    return size
