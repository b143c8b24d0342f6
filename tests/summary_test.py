"""Tests of the TensorBoard event files, metrics log and progress line."""

import io
import json
import os
import pathlib
import struct
import time

import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

from nerface_jax import summary


def _events(path: pathlib.Path) -> list[event_pb2.Event]:
  """The events of a TFRecord file, its framing checked (not its CRCs)."""
  data = path.read_bytes()
  events, pos = [], 0
  while pos < len(data):
    # uint64 length, uint32 masked CRC of it, the record, uint32 masked CRC.
    assert pos + 12 <= len(data), 'truncated record header'
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    end = pos + 12 + length + 4
    assert end <= len(data), 'truncated record'
    events.append(event_pb2.Event.FromString(data[pos + 12:end - 4]))
    pos = end
  return events


def _values(events) -> list[tuple[int, str, summary_pb2.Summary.Value]]:
  return [(e.step, v.tag, v) for e in events if e.HasField('summary')
          for v in e.summary.value]


def test_event_file_holds_version_scalars_and_image(tmp_path):
  writer = summary.EventWriter(tmp_path / 'run')
  assert writer.path.parent == tmp_path / 'run'
  assert writer.path.name.startswith('events.out.tfevents.')
  writer.scalars(7, {'loss': 0.25, 'psnr': np.float32(21.5),
                     'bad': float('nan'), 'worse': float('inf')})
  writer.scalars(9, {'loss': 0.125})
  image = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  writer.image(8, 'val/frame_0', image)
  writer.close()
  writer.close()  # Closing twice is harmless.

  events = _events(writer.path)
  assert events[0].file_version == 'brain.Event:2'
  values = _values(events)
  scalars = [(step, tag, v.simple_value) for step, tag, v in values
             if v.HasField('simple_value')]
  # The NaN and the infinity are left out.
  assert sorted(scalars) == [(7, 'loss', 0.25), (7, 'psnr', 21.5),
                             (9, 'loss', 0.125)]
  images = [(step, tag, v.image) for step, tag, v in values
            if v.HasField('image')]
  assert len(images) == 1
  step, tag, encoded = images[0]
  assert (step, tag) == (8, 'val/frame_0')
  assert (encoded.height, encoded.width, encoded.colorspace) == (5, 6, 3)
  decoded = np.asarray(Image.open(io.BytesIO(encoded.encoded_image_string)))
  np.testing.assert_array_equal(decoded, image)


def test_events_reach_the_file_without_close(tmp_path, monkeypatch):
  # What TensorBoard shows during training: the background thread writes
  # within FLUSH_SECS.
  monkeypatch.setattr(summary, 'FLUSH_SECS', 0.2)
  writer = summary.EventWriter(tmp_path)
  try:
    writer.scalars(3, {'loss': 0.5})
    writer.flush()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
      if [t for _, t, _ in _values(_events(writer.path))] == ['loss']:
        break
      time.sleep(0.05)
    else:
      raise AssertionError('the scalar never reached the event file')
  finally:
    writer.close()


def test_writers_in_one_folder_get_their_own_files(tmp_path):
  first, second = summary.EventWriter(tmp_path), summary.EventWriter(tmp_path)
  first.scalars(1, {'a': 1.0})
  second.scalars(2, {'b': 2.0})
  first.close()
  second.close()
  assert first.path != second.path
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [first.path.name, second.path.name])
  assert [(s, t) for s, t, _ in _values(_events(first.path))] == [(1, 'a')]
  assert [(s, t) for s, t, _ in _values(_events(second.path))] == [(2, 'b')]


def test_bad_image_and_use_after_close_are_errors(tmp_path):
  writer = summary.EventWriter(tmp_path)
  with pytest.raises(ValueError, match='uint8'):
    writer.image(1, 'x', np.zeros((4, 4, 3), np.float32))
  writer.close()
  with pytest.raises(ValueError, match='closed'):
    writer.scalars(2, {'loss': 1.0})
  # No second event file was started behind the closed one.
  assert [p.name for p in tmp_path.iterdir()] == [writer.path.name]


def test_metrics_log_appends_rows(tmp_path):
  log = summary.MetricsLog(tmp_path / 'metrics.jsonl')
  assert log.rows() == []
  log.write({'step': 1, 'loss': 0.5})
  log.write({'step': 2, 'loss': 0.25, 'val_psnr': 20.0})
  assert log.rows() == [{'step': 1, 'loss': 0.5},
                        {'step': 2, 'loss': 0.25, 'val_psnr': 20.0}]


def _log(tmp_path, steps, tail=''):
  log = summary.MetricsLog(tmp_path / 'metrics.jsonl')
  for step in steps:
    log.write({'step': step, 'loss': 1.0 / step})
  with open(log.path, 'a') as f:
    f.write(tail)
  return log


def test_drop_after_removes_later_rows_and_a_half_written_line(tmp_path):
  log = _log(tmp_path, [1, 2, 3, 4, 5], tail='{"loss": 0.1, "st')
  log.path.chmod(0o644)
  assert log.drop_after(3) == 3  # Steps 4 and 5, and the broken line.
  assert [row['step'] for row in log.rows()] == [1, 2, 3]
  assert log.path.read_text().endswith('}\n')
  assert log.path.stat().st_mode & 0o777 == 0o644
  # The temporary file was renamed away.
  assert [p.name for p in tmp_path.iterdir()] == ['metrics.jsonl']
  # Appending after the cut gives whole rows again.
  log.write({'step': 4, 'loss': 0.2})
  assert [row['step'] for row in log.rows()] == [1, 2, 3, 4]


def test_drop_after_is_idempotent(tmp_path):
  log = _log(tmp_path, [1, 2, 3, 4])
  assert log.drop_after(2) == 2
  content, mtime = log.path.read_bytes(), log.path.stat().st_mtime_ns
  assert log.drop_after(2) == 0
  assert log.path.read_bytes() == content
  assert log.path.stat().st_mtime_ns == mtime  # Not even rewritten.
  assert log.drop_after(10) == 0
  assert [row['step'] for row in log.rows()] == [1, 2]


def test_drop_after_keeps_rows_without_a_step_and_a_missing_file(tmp_path):
  log = summary.MetricsLog(tmp_path / 'metrics.jsonl')
  assert log.drop_after(5) == 0
  assert not log.path.exists()  # Not created.
  log.write({'note': 'resumed'})
  log.write({'step': 6})
  log.write({'step': 5})
  assert log.drop_after(5) == 1
  assert log.rows() == [{'note': 'resumed'}, {'step': 5}]


def test_drop_after_ends_a_whole_last_line_that_lost_its_newline(tmp_path):
  log = _log(tmp_path, [1], tail=json.dumps({'step': 2}))
  assert log.drop_after(2) == 0
  log.write({'step': 3})
  assert [row['step'] for row in log.rows()] == [1, 2, 3]


def test_drop_after_failure_leaves_the_file_and_no_temporary(tmp_path,
                                                            monkeypatch):
  log = _log(tmp_path, [1, 2, 3])
  before = log.path.read_bytes()

  def fail(*args):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    log.drop_after(1)
  assert log.path.read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ['metrics.jsonl']


def test_progress_line_has_step_loss_psnr_rate_and_eta():
  stream = io.StringIO()
  progress = summary.Progress(100, stream)
  progress.update(25, 0.0123, 19.1, 51200.0, 2.5)
  line = stream.getvalue()
  for part in ('step 25/100', 'loss 0.01230', 'psnr 19.10', '51,200 rays/s',
               'ETA 0:30'):
    assert part in line, line
