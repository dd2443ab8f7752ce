"""Reading a file that crosses the trust boundary: its size is checked against a cap before a byte
is read, and an unreadable file is an InvalidInput naming it (never an OSError traceback)."""

from __future__ import annotations

from pathlib import Path

from runtime.contracts.errors import InvalidInput, TooLarge


def read_capped(path: str | Path, cap: int, what: str) -> bytes:
    """The bytes of ``path`` (``what`` names it in messages: "profile", "parallel plan" ...).

    Raises TooLarge above ``cap`` bytes (also for a file that grew after the size check) and
    InvalidInput when it cannot be read."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > cap:
            raise TooLarge(f"{what} {p} is {size} bytes; at most {cap} are read")
        with p.open("rb") as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {p}: {e.strerror or e}") from None
    if len(data) > cap:
        raise TooLarge(f"{what} {p} is over {cap} bytes; at most {cap} are read")
    return data
