"""Reading and writing tokenizer files: tiktoken's BPE format, with strict checks.

The tiktoken format is one ``<base64 token bytes> <rank>`` pair per line. Meta's own reader
skips lines it cannot parse with a warning, so a truncated or wrong file gives a tokenizer that
silently encodes differently; ours refuses such a file and says which line is wrong.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path


class TokenizerFileError(ValueError):
    """A tokenizer file is missing, corrupt or in a format we do not read."""


def sniff_format(path: Path) -> str:
    """``"hf_json"`` for a Hugging Face ``tokenizer.json``, else ``"tiktoken"``.

    Decided by content, not by name: a JSON object starts with ``{``; a tiktoken line never
    does (``{`` is not a base64 character).
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "hf_json" if head.startswith(b"{") else "tiktoken"


def read_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file into ``{token_bytes: rank}``, validating every line.

    Ranks must be exactly ``0..n-1`` with no duplicate token, and all 256 single bytes must
    be present (byte-level BPE falls back to them; tiktoken cannot encode a byte without one).
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerFileError(f"tokenizer file not found: {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise TokenizerFileError(f"{path}: the tokenizer file is empty")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(
            f"{path}: not a tiktoken BPE file (byte {e.start} is not ASCII; expected lines of "
            "'<base64 token> <rank>')"
        ) from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(
                f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}"
            )
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError):
            raise TokenizerFileError(
                f"{path}:{lineno}: bad base64 token or integer rank: {line[:80]!r}"
            ) from None
        if not token:
            raise TokenizerFileError(f"{path}:{lineno}: empty token")
        if token in ranks:
            raise TokenizerFileError(f"{path}:{lineno}: duplicate token {token!r}")
        ranks[token] = rank
    n = len(ranks)
    if set(ranks.values()) != set(range(n)):
        raise TokenizerFileError(
            f"{path}: ranks are not exactly 0..{n - 1} (duplicates or gaps); the file is corrupt"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(
            f"{path}: {len(missing)} of the 256 single-byte tokens are missing (e.g. byte "
            f"{missing[0]}); a byte-level BPE file must contain all of them"
        )
    return ranks


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename, so a
    crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_tiktoken_bpe(path: str | os.PathLike, ranks: dict[bytes, int]) -> None:
    """Write ``{token_bytes: rank}`` in tiktoken's format, ordered by rank, atomically."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    atomic_write_bytes(path, "".join(lines).encode("ascii"))
