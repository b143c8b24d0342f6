r"""Turns a raw talking-head video into a NeRFace dataset folder.

  python preprocess.py --video=me.mp4 --out=data/me
  python preprocess.py --video=frames/ --out=data/me --size=256 \
      --background=color --tracker_model=face_landmarker.task

Tracks every frame with the MediaPipe Face Landmarker (download
face_landmarker.task once; see --tracker_model), crops one square around the
head for the whole video, and writes transforms_{train,val,test}.json, the
frames, bg/00050.png, debug overlays (debug/) and preprocess_report.json.
Then train with --config.data.dir=data/me.
"""

from nerface_jax.apps import preprocess

if __name__ == '__main__':
  preprocess.run()
