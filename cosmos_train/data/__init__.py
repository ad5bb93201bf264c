"""Data: JSONL manifests, video/image decoding, and the training dataset (see docs/ARCHITECTURE.md)."""

from cosmos_train.data.dataset import DEFAULT_IMAGE_FPS, GeneratorDataset, collate_skip_none, iter_samples
from cosmos_train.data.manifest import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ManifestRecord,
    is_image_path,
    read_manifest,
)
from cosmos_train.data.media import (
    VideoClip,
    load_image,
    load_video,
    load_video_clip,
    preprocess_frames,
    probe_video,
    sample_frame_indices,
)
from cosmos_train.data.skips import SkipCounter

__all__ = [
    "DEFAULT_IMAGE_FPS",
    "GeneratorDataset",
    "IMAGE_EXTENSIONS",
    "ManifestRecord",
    "SkipCounter",
    "VIDEO_EXTENSIONS",
    "VideoClip",
    "collate_skip_none",
    "is_image_path",
    "iter_samples",
    "load_image",
    "load_video",
    "load_video_clip",
    "preprocess_frames",
    "probe_video",
    "read_manifest",
]
