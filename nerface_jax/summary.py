"""Training logs: TensorBoard event files, metrics.jsonl and a progress line.

TensorBoard reads event files written here directly; the format (TFRecord
framing around `Event` protocol buffers) is small enough to write by hand,
which keeps TensorFlow and tensorboard out of the requirements.
"""

import io
import json
import math
import os
import pathlib
import socket
import struct
import sys
import time
from typing import Any, Optional, TextIO

import numpy as np
from PIL import Image


def _crc32c_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord framing uses."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


def _event(step: int, wall_time: float, summary: Optional[bytes] = None,
           file_version: Optional[str] = None) -> bytes:
  """An `Event` message: wall_time=1 (double), step=2, file_version=3,
  summary=5."""
  out = _field(1, 1, struct.pack('<d', wall_time))
  out += _field(2, 0, _varint(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary is not None:
    out += _bytes_field(5, summary)
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  """A `Summary.Value` with tag=1 and simple_value=2 (float)."""
  return _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack('<f', value))


def _image_value(tag: str, image: np.ndarray) -> bytes:
  """A `Summary.Value` with tag=1 and image=4 (height, width, colorspace,
  encoded PNG)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  height, width, channels = image.shape
  encoded = (_field(1, 0, _varint(height)) + _field(2, 0, _varint(width)) +
             _field(3, 0, _varint(channels)) +
             _bytes_field(4, buffer.getvalue()))
  return _bytes_field(1, tag.encode()) + _bytes_field(4, encoded)


class EventWriter:
  """Appends scalars and images to a TensorBoard event file in `logdir`."""

  def __init__(self, logdir: os.PathLike[str] | str):
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time())}.'
            f'{socket.gethostname()}.{os.getpid()}')
    self.path = self.logdir / name
    self._file = open(self.path, 'ab')
    self._write(_event(0, time.time(), file_version='brain.Event:2'))

  def _write(self, record: bytes):
    header = struct.pack('<Q', len(record))
    self._file.write(header + struct.pack('<I', _masked_crc(header)) + record +
                     struct.pack('<I', _masked_crc(record)))

  def scalars(self, step: int, values: dict[str, float]):
    """Writes one event holding every finite scalar of `values`."""
    summary = b''.join(
        _bytes_field(1, _scalar_value(tag, float(v)))
        for tag, v in values.items() if math.isfinite(float(v)))
    self._write(_event(step, time.time(), summary))

  def image(self, step: int, tag: str, image: np.ndarray):
    """Writes a uint8 [H, W, 3] image."""
    summary = _bytes_field(1, _image_value(tag, np.asarray(image, np.uint8)))
    self._write(_event(step, time.time(), summary))

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def read_events(path: os.PathLike[str] | str) -> list[bytes]:
  """The raw records of an event file, checksums verified (for tests/tools)."""
  records = []
  with open(path, 'rb') as f:
    while header := f.read(8):
      (length,) = struct.unpack('<Q', header)
      (header_crc,) = struct.unpack('<I', f.read(4))
      record = f.read(length)
      (record_crc,) = struct.unpack('<I', f.read(4))
      if header_crc != _masked_crc(header) or record_crc != _masked_crc(record):
        raise ValueError(f'{path}: corrupt record {len(records)}.')
      records.append(record)
  return records


class MetricsLog:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl`."""

  def __init__(self, path: os.PathLike[str] | str):
    self.path = pathlib.Path(path)

  def write(self, row: dict[str, Any]):
    with open(self.path, 'a') as f:
      f.write(json.dumps(row, sort_keys=True) + '\n')

  def rows(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return (f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else
          f'{rest // 60}:{rest % 60:02d}')


class Progress:
  """A one-line progress display: step, loss, PSNR, rays/s and ETA."""

  def __init__(self, total: int, stream: TextIO = sys.stderr):
    self.total = total
    self.stream = stream
    # On a terminal the line is redrawn; in a log file each update is a line.
    self._tty = hasattr(stream, 'isatty') and stream.isatty()

  def update(self, step: int, loss: float, psnr: float, rays_per_sec: float,
             steps_per_sec: float):
    width = 24
    done = int(width * step / max(self.total, 1))
    eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else 0.0
    line = (f'[{"#" * done}{"." * (width - done)}] step {step}/{self.total} '
            f'loss {loss:.5f} psnr {psnr:.2f} dB {rays_per_sec:,.0f} rays/s '
            f'ETA {_duration(eta)}')
    self.stream.write(('\r' + line) if self._tty else (line + '\n'))
    self.stream.flush()

  def close(self):
    if self._tty:
      self.stream.write('\n')
      self.stream.flush()
