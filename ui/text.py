"""Small words for the pages: counts with the right noun ("1 entry", "3 entries") and sizes in words."""
import math

MB = 1024 * 1024  # Streamlit's maxUploadSize and the app's limits count megabytes of 2**20 bytes


def plural(n: int, one: str, many: str) -> str:
    """``plural(1, "entry", "entries")`` is "1 entry"; 0 and 2 or more take ``many``."""
    return f"{n} {one if n == 1 else many}"


def megabytes(size: int) -> str:
    """A size in bytes as megabytes with one decimal, rounded up: just over 50 MB reads "50.1 MB", never "50.0"."""
    return f"{math.ceil(size / MB * 10) / 10:.1f} MB"
