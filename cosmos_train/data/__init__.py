"""Data: JSONL manifests, video/image decoding, and the training dataset (see docs/ARCHITECTURE.md)."""

from cosmos_train.data.action_norm import ActionNormalizer
from cosmos_train.data.buckets import (
    ASPECTS,
    BUCKET_SIZES,
    Bucket,
    BucketBatchSampler,
    BucketSampler,
    SampleKey,
    assign_bucket,
)
from cosmos_train.data.build import DataInfo, GeneratorData, build_generator_data, read_source, source_specs
from cosmos_train.data.dataset import (
    DEFAULT_IMAGE_FPS,
    DecodeLog,
    GeneratorDataset,
    MarkBadSamples,
    collate_list,
    collate_skip_none,
    iter_samples,
    summarize_decode_log,
)
from cosmos_train.data.hf import read_hf_dataset
from cosmos_train.data.lerobot import ActionWindow, LeRobotActionDataset, LeRobotSource
from cosmos_train.data.manifest import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ManifestRecord,
    caption_for,
    is_image_path,
    read_manifest,
)
from cosmos_train.data.media import (
    SHORT_CLIP_MODES,
    InMemoryMedia,
    VideoClip,
    describe_clip,
    load_image,
    load_video,
    load_video_clip,
    preprocess_frames,
    probe_image,
    probe_video,
    sample_frame_indices,
)
from cosmos_train.data.skips import SkipCounter

__all__ = [
    "ASPECTS",
    "ActionNormalizer",
    "ActionWindow",
    "BUCKET_SIZES",
    "Bucket",
    "BucketBatchSampler",
    "BucketSampler",
    "DEFAULT_IMAGE_FPS",
    "DataInfo",
    "DecodeLog",
    "GeneratorData",
    "GeneratorDataset",
    "IMAGE_EXTENSIONS",
    "InMemoryMedia",
    "LeRobotActionDataset",
    "LeRobotSource",
    "ManifestRecord",
    "MarkBadSamples",
    "SHORT_CLIP_MODES",
    "SampleKey",
    "SkipCounter",
    "VIDEO_EXTENSIONS",
    "VideoClip",
    "assign_bucket",
    "build_generator_data",
    "caption_for",
    "collate_list",
    "collate_skip_none",
    "describe_clip",
    "is_image_path",
    "iter_samples",
    "load_image",
    "load_video",
    "load_video_clip",
    "preprocess_frames",
    "probe_image",
    "probe_video",
    "read_hf_dataset",
    "read_manifest",
    "read_source",
    "source_specs",
    "summarize_decode_log",
]
