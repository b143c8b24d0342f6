"""Tests of the hand-written TensorBoard event files and the metrics log."""

import io
import struct

import numpy as np
from PIL import Image

from nerface_jax import summary


def _varint(message: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = message[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, pos


def _parse(message: bytes) -> dict[int, list]:
  """A minimal protobuf decoder written independently of the writer."""
  fields, pos = {}, 0
  while pos < len(message):
    key, pos = _varint(message, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(message, pos)
    elif wire == 1:
      value = struct.unpack('<d', message[pos:pos + 8])[0]
      pos += 8
    elif wire == 5:
      value = struct.unpack('<f', message[pos:pos + 4])[0]
      pos += 4
    elif wire == 2:
      length, pos = _varint(message, pos)
      value = message[pos:pos + length]
      pos += length
    else:
      raise AssertionError(f'wire type {wire}')
    fields.setdefault(number, []).append(value)
  return fields


def test_crc32c_known_vector():
  assert summary.crc32c(b'123456789') == 0xE3069283
  assert summary.crc32c(b'') == 0


def test_event_file_holds_version_scalars_and_images(tmp_path):
  writer = summary.EventWriter(tmp_path)
  writer.scalars(7, {'loss': 0.25, 'psnr': 21.5, 'bad': float('nan')})
  image = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  writer.image(8, 'val/frame_0', image)
  writer.close()
  records = summary.read_events(writer.path)
  assert len(records) == 3
  assert _parse(records[0])[3] == [b'brain.Event:2']

  event = _parse(records[1])
  assert event[2] == [7]
  values = [_parse(v) for v in _parse(event[5][0])[1]]
  got = {v[1][0].decode(): v[2][0] for v in values}
  assert got == {'loss': 0.25, 'psnr': 21.5}  # The NaN is left out.

  event = _parse(records[2])
  assert event[2] == [8]
  value = _parse(_parse(event[5][0])[1][0])
  assert value[1] == [b'val/frame_0']
  img = _parse(value[4][0])
  assert (img[1], img[2], img[3]) == ([5], [6], [3])
  decoded = np.asarray(Image.open(io.BytesIO(img[4][0])))
  np.testing.assert_array_equal(decoded, image)


def test_corrupt_record_is_detected(tmp_path):
  writer = summary.EventWriter(tmp_path)
  writer.scalars(1, {'loss': 1.0})
  writer.close()
  data = bytearray(writer.path.read_bytes())
  data[-6] ^= 0xFF
  writer.path.write_bytes(bytes(data))
  try:
    summary.read_events(writer.path)
    raise AssertionError('corruption not detected')
  except ValueError as e:
    assert 'corrupt' in str(e)


def test_metrics_log_appends_rows(tmp_path):
  log = summary.MetricsLog(tmp_path / 'metrics.jsonl')
  log.write({'step': 1, 'loss': 0.5})
  log.write({'step': 2, 'loss': 0.25, 'val_psnr': 20.0})
  assert log.rows() == [{'step': 1, 'loss': 0.5},
                        {'step': 2, 'loss': 0.25, 'val_psnr': 20.0}]


def test_progress_line_has_step_loss_psnr_rate_and_eta():
  stream = io.StringIO()
  progress = summary.Progress(100, stream)
  progress.update(25, 0.0123, 19.1, 51200.0, 2.5)
  line = stream.getvalue()
  for part in ('step 25/100', 'loss 0.01230', 'psnr 19.10', '51,200 rays/s',
               'ETA 0:30'):
    assert part in line, line
