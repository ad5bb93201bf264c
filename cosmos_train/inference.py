"""Generate with an exported (or any) Cosmos 3 pipeline directory and write an MP4."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch

from cosmos_train.errors import UserError


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """frames: [T, H, W, 3] uint8 (or float in [0, 1])."""
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            if frame.shape[0] != stream.height or frame.shape[1] != stream.width:
                frame = np.pad(frame, ((0, stream.height - height), (0, stream.width - width), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def load_pipeline(pipeline_dir: str | Path, device: str | None = None, lora: str | Path | None = None):
    from diffusers import Cosmos3OmniPipeline

    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise UserError(f"{pipeline_dir} is not a pipeline directory (no model_index.json)")
    pipe = Cosmos3OmniPipeline.from_pretrained(str(pipeline_dir), enable_safety_checker=False)
    if lora is not None:
        pipe.transformer.load_lora_adapter(str(lora), weight_name="pytorch_lora_weights.safetensors")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def generate_video(pipe, prompt: str, *, num_frames: int, height: int, width: int, fps: float = 24.0,
                   steps: int = 35, guidance: float = 6.0, seed: int = 0, image=None) -> np.ndarray:
    """[T, H, W, 3] float frames in [0, 1]."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompt=prompt, num_frames=num_frames, height=height, width=width, fps=fps, image=image,
               num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np",
               enable_safety_check=False)
    video = np.asarray(out.video)
    return video[None] if video.ndim == 3 else video
