"""`GeneratorDataset`: manifest records -> decoded training samples."""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset

from cosmos_train.data.manifest import ManifestRecord
from cosmos_train.data.media import load_image, load_video_clip
from cosmos_train.data.skips import SkipCounter
from cosmos_train.errors import BadSampleError, UserError

# fps reported for image samples that do not set one (the Cosmos3 pipeline's default; the model
# ignores fps when there is a single latent frame).
DEFAULT_IMAGE_FPS = 24.0


class GeneratorDataset(Dataset):
    """Map-style dataset of ``{"pixels", "caption", "fps", "source", "is_image"}`` dicts.

    - ``pixels``: float32 [3, T, H, W] in [-1, 1]; videos give ``T = num_frames`` frames sampled
      from the record's ``[start_frame, end_frame)`` window at the record's ``fps`` (nearest source
      frame) or, without one, at the dataset's ``fps`` (the recipe's ``data.fps``), or else
      consecutive frames at the file's own rate. Images give ``T = 1``.
    - ``fps``: frame rate of the returned frames (record fps, else the file's rate; for images the
      record fps or 24).
    - ``source``: the record's ``manifest:line``.

    Bad samples (undecodable, too short, vanished file): with ``skip_bad_samples=False`` the
    `BadSampleError` propagates. With ``skip_bad_samples=True`` the sample is counted in
    ``self.counter`` (once per index per process; later hits return straight away) and
    ``__getitem__`` returns ``None``; use `collate_skip_none` (or `iter_samples`) to drop them.
    With DataLoader workers each worker counts in its own copy of the counter.
    """

    def __init__(
        self,
        records: Sequence[ManifestRecord],
        num_frames: int,
        height: int,
        width: int,
        skip_bad_samples: bool = False,
        counter: SkipCounter | None = None,
        fps: float | None = None,
    ):
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
            raise UserError(
                f"num_frames must be of the form 4k+1 (1, 5, 9, ..., 17, ..., 33, ...), got {num_frames!r}: "
                "the video VAE compresses time 4x after the first frame"
            )
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if len(records) == 0:
            raise UserError("GeneratorDataset: no records (is the manifest empty?)")
        self.records = list(records)
        self.num_frames = num_frames
        self.height = height
        self.width = width
        self.skip_bad_samples = skip_bad_samples
        self.fps = fps  # target rate for records that do not set their own (recipe `data.fps`)
        self.counter = counter if counter is not None else SkipCounter()
        self._bad: dict[int, str] = {}  # index -> reason, for samples already counted as skipped

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        """Decode one sample; always raises `BadSampleError` on a bad sample."""
        rec = self.records[index]
        try:
            if rec.is_image:
                pixels = load_image(rec.path, self.height, self.width)
                fps = rec.fps or self.fps or DEFAULT_IMAGE_FPS
            else:
                clip = load_video_clip(
                    rec.path,
                    self.num_frames,
                    self.height,
                    self.width,
                    fps=rec.fps or self.fps,
                    start_frame=rec.start_frame or 0,
                    end_frame=rec.end_frame,
                )
                pixels, fps = clip.pixels, clip.fps
        except BadSampleError as e:
            raise BadSampleError(f"{rec.source}: {e}", e.reason) from None
        return {
            "pixels": pixels,
            "caption": rec.caption,
            "fps": float(fps),
            "source": rec.source,
            "is_image": rec.is_image,
        }

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index < 0:
            index += len(self.records)
        if not self.skip_bad_samples:
            return self.load(index)
        if index in self._bad:
            return None
        try:
            return self.load(index)
        except BadSampleError as e:
            self._bad[index] = e.reason
            self.counter.add(e.reason, self.records[index].source, str(e))
            return None


def collate_skip_none(batch: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """DataLoader ``collate_fn``: drop skipped (``None``) samples, return the rest as a list of dicts
    (no stacking: images (T = 1) and videos can share a batch). May return an empty list."""
    return [s for s in batch if s is not None]


def iter_samples(dataset: GeneratorDataset, indices: Sequence[int] | None = None):
    """Yield the decoded samples of `dataset` (in `indices` order), skipping ``None``s."""
    for i in range(len(dataset)) if indices is None else indices:
        sample = dataset[i]
        if sample is not None:
            yield sample
