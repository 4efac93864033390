"""The one reader for files that came with a run directory or a data folder.

Such files may come from someone else, so reading one must never hang, follow a link out
of the folder, exhaust memory or print escape sequences:

- only regular files are read: opened with ``O_NOFOLLOW`` (inside a run directory no path
  component may be a link either: each folder is opened relative to the one before with
  ``O_NOFOLLOW``) and ``O_NONBLOCK`` (opening a FIFO does not wait for a writer), then
  checked with ``fstat`` to be a regular file, never a FIFO, device, socket or folder;
- each kind of file has a size cap (``LIMITS``), checked on the open file before reading,
  and reading stops one byte past it (a file that grows meanwhile is refused too);
- YAML and JSON are checked for nesting depth and node count before they are parsed
  (PyYAML's scanner is quadratic in the depth of flow collections), and every JSON number
  must be finite and within ``MAX_NUMBER``;
- ``printable`` makes any string from such a file safe to print on a terminal.

Every refusal is one ``UntrustedFile`` line (exit 2) naming the file, what it is and what is
allowed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any

from contrastive_cli.errors import ConfigError

KiB, MiB = 1 << 10, 1 << 20
# kind -> the largest file contrast reads as that kind (None: no cap, e.g. checkpoints).
LIMITS: dict[str, int | None] = {
    "config": MiB,  # .hydra/*.yaml: a few kB when contrast writes them
    "json": MiB,  # results.json, tracking.json, evals/*.json
    "metrics": 64 * MiB,  # metrics.jsonl: ~200 bytes per epoch
    "lock": 4 * KiB,  # .lock: "<pid> <command>"
    "header": 16 * MiB,  # a safetensors header (tensor table and metadata)
    "weights": None,  # encoder.safetensors, checkpoints: as large as the model
}
MAX_DEPTH = 32  # nesting of a YAML/JSON document; contrast's own files stay under 10
MAX_NODES = 200_000  # scalars, mappings and sequences in one document
MAX_NUMBER = 1e15  # |number| in a JSON file: times, counts and metrics are far below
MAX_LINE = 64 * KiB  # one metrics.jsonl record


class UntrustedFile(ConfigError):
    """A file from a run directory or data folder that contrast refuses to read."""


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
}


def _what(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: Path, root: Path | None = None, follow: bool = False) -> int:
    """A read-only descriptor of ``path``, refusing anything but a regular file.

    ``root``: ``path`` lies inside this folder (a run directory) and no component between
    them may be a symbolic link. ``follow``: the last component may be a link (image folders,
    where links are allowed); it must still lead to a regular file. Never blocks on a FIFO.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    last = flags | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        if root is not None and Path(path).is_relative_to(root) and Path(path) != Path(root):
            fd = _open_beneath(Path(root), Path(path).relative_to(root), last)
        else:
            fd = os.open(path, last)
    except OSError as e:
        raise _refusal(path, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedFile(
                f"{path} is {_what(st.st_mode)}; allowed: a regular file (contrast never reads "
                "FIFOs, devices or folders in place of a run's or data folder's files)"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_beneath(root: Path, relative: Path, last_flags: int) -> int:
    """Open ``root/relative`` one component at a time, each folder with ``O_NOFOLLOW``."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    directory = getattr(os, "O_DIRECTORY", 0)
    fd = os.open(root, os.O_RDONLY | directory | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in relative.parts[:-1]:
            try:
                child = os.open(part, os.O_RDONLY | directory | nofollow, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):  # a link (or a file) in the way
                    raise UntrustedFile(
                        f"{root / part} is a symbolic link or not a folder; contrast does not "
                        "follow links inside a run directory (copy the run to a new folder)"
                    ) from None
                raise
            os.close(fd)
            fd = child
        return os.open(relative.parts[-1], last_flags, dir_fd=fd)
    finally:
        os.close(fd)


def _refusal(path: Path, e: OSError) -> UntrustedFile:
    if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and Path(path).is_symlink()):
        return UntrustedFile(
            f"{path} is a symbolic link; contrast does not follow links inside a run directory "
            "(copy the run to a new folder)"
        )
    if e.errno == errno.ENXIO:
        return UntrustedFile(f"{path} is a socket or device; allowed: a regular file")
    if isinstance(e, FileNotFoundError):
        return Missing(f"{path} does not exist")
    return UntrustedFile(f"{path} cannot be read ({e.strerror or e})")


class Missing(UntrustedFile):
    """The file is not there (callers that treat a missing file as 'none' catch this)."""


def read_bytes(path: Path, kind: str, root: Path | None = None, follow: bool = False) -> bytes:
    """The bytes of a regular file of ``kind`` (see ``LIMITS``), read through ``open_regular``."""
    cap = LIMITS[kind]
    fd = open_regular(path, root, follow)
    try:
        size = os.fstat(fd).st_size
        if cap is not None and size > cap:
            raise UntrustedFile(
                f"{path} is {size:,} bytes; allowed: at most {cap:,} for a {kind} file "
                "(contrast writes far smaller ones)"
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if cap is not None and total > cap:
                raise UntrustedFile(
                    f"{path} grew past {cap:,} bytes while being read; allowed: a {kind} file "
                    f"of at most {cap:,} bytes"
                )
        return b"".join(chunks)
    except OSError as e:
        raise UntrustedFile(f"{path} cannot be read ({e.strerror or e})") from None
    finally:
        os.close(fd)


def read_text(path: Path, kind: str, root: Path | None = None) -> str:
    """``read_bytes`` decoded as UTF-8; one line when it is not UTF-8."""
    try:
        return read_bytes(path, kind, root).decode("utf-8")
    except UnicodeDecodeError:
        raise UntrustedFile(f"{path} is not a text (UTF-8) file") from None


def is_regular(path: Path) -> bool:
    """``path`` is a regular file itself (not a link, FIFO, device or folder)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# --------------------------------------------------------------------------- JSON
def _bracket_depth(text: str) -> int:
    """The deepest nesting of brackets in ``text`` (strings left in: an upper bound), in
    linear time: running sum of +1/-1, less its lowest point so far."""
    import numpy as np

    data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    steps = np.isin(data, (ord("["), ord("{"))).astype(np.int64) - np.isin(
        data, (ord("]"), ord("}"))
    )
    if not steps.any():
        return 0
    depth = np.cumsum(steps)
    floor = np.minimum.accumulate(np.concatenate(([0], depth)))[:-1]
    return int((depth - floor).max())


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed (only finite numbers)")


def _checked_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_NUMBER:
        raise ValueError(f"the number {text[:30]} is out of range (allowed: |x| <= {MAX_NUMBER:g})")
    return value


def _checked_int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        raise ValueError(
            f"the number {text[:30]}... is out of range (allowed: |x| <= {MAX_NUMBER:g})"
        )
    value = int(text)
    if abs(value) > MAX_NUMBER:
        raise ValueError(f"the number {text} is out of range (allowed: |x| <= {MAX_NUMBER:g})")
    return value


def parse_json(text: str, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON document from an untrusted file: depth checked before parsing, numbers finite
    and within ``MAX_NUMBER``. One UntrustedFile line for anything else."""
    depth = _bracket_depth(text)  # brackets inside strings count too: an upper bound
    if depth > max_depth:
        raise UntrustedFile(
            f"{source} nests {depth} levels deep; allowed: at most {max_depth} (contrast's files "
            "nest a few)"
        )
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_checked_float,
            parse_int=_checked_int,
        )
    except ValueError as e:  # JSONDecodeError, our number checks
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UntrustedFile(f"{source} is not valid JSON ({printable(reason)})") from None
    except RecursionError:
        raise UntrustedFile(f"{source} nests too deeply") from None
    return value


def read_json(path: Path, kind: str = "json", root: Path | None = None) -> Any:
    return parse_json(read_text(path, kind, root), str(path))


# --------------------------------------------------------------------------- YAML
_YAML_NONFINITE = re.compile(r"[-+]?\.(inf|Inf|INF|nan|NaN|NAN)")


def check_yaml(text: str, source: str) -> None:
    """Refuse, before OmegaConf parses ``text``: flow nesting deeper than ``MAX_DEPTH`` (found
    by a linear scan, since the YAML scanner itself is quadratic in it), then from the event
    stream: deeper nesting, more than ``MAX_NODES`` nodes, aliases (a few bytes expanding into
    gigabytes), tags (a file may hold plain data only) and .inf/.nan."""
    import yaml

    if _bracket_depth(text) > MAX_DEPTH:
        raise UntrustedFile(
            f"{source} nests more than {MAX_DEPTH} levels of brackets; allowed: at most "
            f"{MAX_DEPTH} (saved configs nest a few)"
        )
    depth = nodes = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise UntrustedFile(
                    f"{source} uses YAML aliases (*name), which saved configs never do"
                )
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                tag = getattr(event, "tag", None)
                if tag not in (None, "!") and not (
                    isinstance(event, yaml.ScalarEvent) and tag.startswith("tag:yaml.org,2002:")
                ):
                    raise UntrustedFile(
                        f"{source} uses the YAML tag {printable(str(tag))[:60]}; allowed: plain "
                        "values only"
                    )
                if (
                    isinstance(event, yaml.ScalarEvent)
                    and event.style is None
                    and _YAML_NONFINITE.fullmatch(event.value)
                ):
                    raise UntrustedFile(
                        f"{source} holds the value {event.value}; allowed: finite numbers only"
                    )
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise UntrustedFile(
                        f"{source} nests more than {MAX_DEPTH} levels deep; allowed: at most "
                        f"{MAX_DEPTH}"
                    )
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            if nodes > MAX_NODES:
                raise UntrustedFile(
                    f"{source} holds more than {MAX_NODES:,} values; allowed: at most {MAX_NODES:,}"
                )
    except yaml.YAMLError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UntrustedFile(
            f"{source} is not a valid config file ({printable(reason)[:200]})"
        ) from None


# --------------------------------------------------------------------------- safetensors
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
DTYPE_BYTES |= {"U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({tensor: shape}, metadata) of a safetensors file, from its header alone and checked
    against the file: a regular file (never a link or FIFO), a header of bounded size and
    depth, each tensor's bytes inside the file and matching its dtype and shape. Nothing
    the header declares is allocated."""
    fd = open_regular(path, root=path.parent)
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, 8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        cap = LIMITS["header"] or 0
        if not 2 <= n <= min(cap, size - 8):
            raise UntrustedFile(
                f"{path} is not a readable safetensors file (header length {n} does not fit a "
                f"{size:,}-byte file; allowed: at most {cap:,})"
            )
        text = b""
        while len(text) < n and (chunk := os.read(fd, n - len(text))):
            text += chunk
    finally:
        os.close(fd)
    try:
        header = parse_json(text.decode("utf-8"), f"{path}'s header", max_depth=4)
    except UnicodeDecodeError:
        raise UntrustedFile(
            f"{path} is not a readable safetensors file (header not UTF-8)"
        ) from None
    if not isinstance(header, dict):
        raise UntrustedFile(f"{path} is not a readable safetensors file (header not a mapping)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UntrustedFile(f"{path}: its metadata is not a mapping of strings")
    data = size - 8 - n
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        ok = (
            isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and entry.get("dtype") in DTYPE_BYTES
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
            and math.prod(shape) * DTYPE_BYTES[entry["dtype"]] == offsets[1] - offsets[0]
        )
        if not ok:
            raise UntrustedFile(
                f"{path} is not a readable safetensors file (tensor {printable(name)[:80]}: its "
                "dtype, shape or offsets do not match the file)"
            )
        shapes[name] = tuple(shape)
    return shapes, metadata


# --------------------------------------------------------------------------- the terminal
# C0 and C1 control characters, DEL, Unicode bidirectional overrides and isolates (which
# reorder what a terminal shows), line/paragraph separators, and the lone surrogates that
# stand for undecodable bytes of a file name.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with every control character (escape sequences, carriage returns, bidi
    overrides) and undecodable byte shown as a visible ``\\xNN`` escape: safe for a terminal."""
    return _UNPRINTABLE.sub(_escape, str(text))
