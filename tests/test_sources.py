"""Frame sources: bundled samples, synthetic, image folders, video files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.agent.sources import open_source
from runtime.contracts.errors import InvalidInput
from runtime.models import get_spec, preprocess

SPEC = get_spec("resnet18")


def test_samples_one_pass_then_repeat():
    one_pass = list(open_source(SPEC, "samples"))
    assert len(one_pass) >= 4 and all(f.tensor.shape == (1, 3, 224, 224) for f in one_pass)
    repeated = list(open_source(SPEC, "samples", frames=len(one_pass) + 2))
    assert [f.name for f in repeated[len(one_pass):]] == [f.name for f in one_pass[:2]]
    assert torch.equal(repeated[len(one_pass)].tensor, one_pass[0].tensor)


def test_synthetic_is_deterministic_and_defaults_to_100():
    a = list(open_source(SPEC, "synthetic", 3))
    b = list(open_source(SPEC, "synthetic", 3))
    assert all(torch.equal(x.tensor, y.tensor) for x, y in zip(a, b, strict=False))
    assert sum(1 for _ in open_source(SPEC, "synthetic")) == 100


def test_folder_of_images_sorted_and_empty_folder_refused(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        if name.endswith("txt"):
            (tmp_path / name).write_text("not an image")
        else:
            Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / name)
    frames = list(open_source(SPEC, str(tmp_path)))
    assert [f.name for f in frames] == ["a.jpg", "b.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match="no PNG or JPEG"):
        open_source(SPEC, str(empty))
    with pytest.raises(InvalidInput, match="unknown source"):
        open_source(SPEC, str(tmp_path / "nothing-here"))


def test_video_file_frames_match_their_images(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="the video source needs the optional OpenCV extra")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(5):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    frames = list(open_source(SPEC, str(path)))
    assert [f.name for f in frames] == [f"clip.avi#{i}" for i in range(5)]
    cap = cv2.VideoCapture(str(path))
    ok, bgr = cap.read()
    cap.release()
    assert ok and torch.equal(frames[0].tensor, preprocess(SPEC, Image.fromarray(bgr[:, :, ::-1].copy())))
    assert len(list(open_source(SPEC, str(path), frames=7))) == 7  # a finite video repeats
