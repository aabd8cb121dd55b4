"""How a streamed request's step progress and previews leave the UNet stage.

The ``sdxl`` ensemble's UNet stage is not decoupled, and must not be: a decoupled step makes the
ensemble decoupled (plain HTTP inference then refuses it) and runs the VAE again for every progress
response (../shared/reference/production.md). So the decoupled ``sdxl_stream`` model calls the
stage through BLS like any client, with one extra input, ``progress_token``: the name of a Unix
socket it listens on, in a directory only this server's user can enter. The stage connects, sends
one frame per step (rank 0 holds the full latent), and closes the connection when the request ends;
the stream closing its end is how a cancelled or disconnected client stops the denoising.

A token is 128 random bits: a client that calls ``unet`` directly cannot guess another stream's, and
the stage opens no path but ``<directory>/<32 hex digits>.sock``.

A frame: 4 bytes (big-endian length of the header), the header as JSON (``step``, ``total``, and
``preview``: the ``[rows, height, width, 3]`` shape of the uint8 pixels that follow, or null).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import select
import socket
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..config import ConfigError

TOKEN_FIELD = "progress_token"
_TOKEN = re.compile(r"[0-9a-f]{32}")
_HEADER = struct.Struct(">I")
_MAX_HEADER_BYTES = 4096
SEND_TIMEOUT_S = 10.0
"""A stream that reads nothing for this long counts as gone: the denoising must not wait on a
stalled client (frames otherwise wait in the socket's buffer, a few previews deep)."""


def stream_directory(server_pid: int) -> Path:
    """The sockets of tritonserver ``server_pid``'s streams; created private (mode 0700) and
    refused if someone else owns it."""
    directory = Path(tempfile.gettempdir()) / f"distrifusion-streams-{server_pid}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{directory} is not a private directory of this user")
    return directory


@dataclasses.dataclass(frozen=True)
class StepMessage:
    step: int
    """1-based."""
    total: int
    preview: np.ndarray | None = None
    """uint8 ``[rows, height, width, 3]``, or None on a step without one."""


def _encode(message: StepMessage) -> bytes:
    preview = message.preview
    header = json.dumps(
        {
            "step": message.step,
            "total": message.total,
            "preview": None if preview is None else list(preview.shape),
        }
    ).encode()
    body = b"" if preview is None else np.ascontiguousarray(preview, dtype=np.uint8).tobytes()
    return _HEADER.pack(len(header)) + header + body


class ProgressListener:
    """The stream's end: a fresh token and its socket; :meth:`messages` yields what the stage sends."""

    def __init__(self, directory: Path) -> None:
        self.token = secrets.token_hex(16)
        self.path = directory / f"{self.token}.sock"
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(1)
        self._connection: socket.socket | None = None

    def messages(
        self, finished: Callable[[], bool], cancelled: Callable[[], bool], poll_s: float = 0.2
    ) -> Iterator[StepMessage]:
        """Frames until the stage closes the connection, or until ``finished()`` (the stage's call
        returned) with no connection; ``cancelled()`` (asked every ``poll_s``) closes it, which
        stops the denoising at the next step."""
        self._server.settimeout(poll_s)
        while self._connection is None:
            if cancelled():
                return
            # Asked before the accept: a stage that has finished connected before it did, so its
            # connection is in the backlog by then (a one-step request can finish within poll_s).
            was_finished = finished()
            try:
                self._connection, _ = self._server.accept()
            except TimeoutError:
                if was_finished:
                    return
        self._connection.settimeout(poll_s)
        reader = _FrameReader(self._connection)
        while True:
            if cancelled():
                self.close()
                return
            try:
                message = reader.next()
            except TimeoutError:
                continue
            if message is None:
                return
            yield message

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _FrameReader:
    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._buffer = bytearray()

    def _fill(self, size: int) -> bool:
        """Reads until ``size`` bytes are buffered; False at the end of the stream. A timeout
        keeps what was read for the next call."""
        while len(self._buffer) < size:
            chunk = self._connection.recv(max(65536, size - len(self._buffer)))
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def next(self) -> StepMessage | None:
        if not self._fill(_HEADER.size):
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > _MAX_HEADER_BYTES or not self._fill(_HEADER.size + length):
            return None
        header = json.loads(bytes(self._buffer[_HEADER.size : _HEADER.size + length]))
        shape = header["preview"]
        size = _HEADER.size + length + (int(np.prod(shape)) if shape else 0)
        if not self._fill(size):
            return None
        body = bytes(self._buffer[_HEADER.size + length : size])
        del self._buffer[:size]
        preview = np.frombuffer(body, dtype=np.uint8).reshape(shape) if shape else None
        return StepMessage(header["step"], header["total"], preview)


class ProgressSender:
    """The stage's end of one stream."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._gone = False

    @classmethod
    def connect(cls, token: str, directory: Path) -> ProgressSender:
        """Raises ConfigError (naming the field) for a malformed token or one no stream listens on."""
        if not _TOKEN.fullmatch(token):
            raise ConfigError(
                f"{TOKEN_FIELD}: expected 32 lowercase hex digits (set by sdxl_stream), got {token!r}"
            )
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(str(directory / f"{token}.sock"))
        except OSError:
            connection.close()
            raise ConfigError(f"{TOKEN_FIELD}: no stream of this server listens on {token!r}") from None
        connection.settimeout(SEND_TIMEOUT_S)
        return cls(connection)

    def send(self, message: StepMessage) -> None:
        """Sends unless the stream is gone; a stream that stopped reading is gone from then on."""
        if self._gone:
            return
        try:
            self._connection.sendall(_encode(message))
        except OSError:  # closed by the stream, or nothing read for SEND_TIMEOUT_S
            self._gone = True

    def gone(self) -> bool:
        """Whether the stream closed its end (a cancelled or disconnected client); never blocks."""
        if not self._gone:
            # The stream never writes: its end turns readable only when it closes. (A recv with
            # MSG_DONTWAIT would still wait here: Python polls a socket with a timeout first.)
            readable, _, _ = select.select([self._connection], [], [], 0)
            if readable:
                try:
                    self._gone = self._connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    self._gone = True
        return self._gone

    def close(self) -> None:
        self._connection.close()
