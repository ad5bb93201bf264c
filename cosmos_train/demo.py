"""`make demo`: the main job end to end on the tiny model, on CPU, in a few minutes.

make-tiny -> prepare (latent cache) -> train recipes/tiny/t2v_lora.yaml on the bundled clips (packed) ->
export (LoRA merged) -> generate a video from one of the training captions with the exported pipeline -> MP4.
Each step is also a `cosmos-train` command; they are printed as they run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cosmos_train.errors import UserError

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny" / "t2v_lora.yaml"


def _mean(values):
    return sum(values) / len(values)


def run(out_root: Path) -> dict:
    from cosmos_train.config import load_recipe
    from cosmos_train.data import read_manifest
    from cosmos_train.export.generator import export_run
    from cosmos_train.inference import choose_prompt, export_prompt_format, generate_video, load_pipeline, write_mp4
    from cosmos_train.models.tiny import make_tiny
    from cosmos_train.prepare import prepare
    from cosmos_train.trainer.loop import train
    from cosmos_train.trainer.metrics import read_metrics

    tiny_dir, run_dir, export_dir = out_root / "tiny-cosmos3", out_root / "run", out_root / "export"
    video_path = out_root / "sample.mp4"

    print(f"$ cosmos-train make-tiny {tiny_dir}", flush=True)
    make_tiny(tiny_dir)

    overrides = [f"model.pretrained={tiny_dir}", f"output_dir={run_dir}"]
    recipe = RECIPE.relative_to(REPO)
    print(f"$ cosmos-train prepare {recipe} {' '.join(overrides)}", flush=True)
    cfg = load_recipe(RECIPE, overrides)
    prepare(cfg)
    print(f"$ cosmos-train train {recipe} {' '.join(overrides)}", flush=True)
    train(cfg, recipe_path=str(recipe))

    losses = [m["loss"] for m in read_metrics(run_dir) if isinstance(m.get("loss"), (int, float))]
    window = max(1, len(losses) // 10)
    first, last = _mean(losses[:window]), _mean(losses[-window:])

    print(f"$ cosmos-train export {run_dir} {export_dir}", flush=True)
    info = export_run(run_dir, export_dir)

    caption = read_manifest(cfg.data.manifest)[0].caption
    height, width = cfg.pixel_size()
    print(f'$ cosmos-train generate {export_dir} "{caption}" --frames {cfg.data.num_frames} '
          f"--height {height} --width {width} --steps 20 --out {video_path}", flush=True)
    recorded = export_prompt_format(export_dir)  # prompted as the finetune was trained, as `generate` does
    choice = choose_prompt(recorded[0] if recorded else None, source=str(recorded[1]) if recorded else "")
    print(choice.description, flush=True)
    pipe = load_pipeline(export_dir, device="cpu")
    frames = generate_video(pipe, caption, num_frames=cfg.data.num_frames, height=height, width=width,
                            fps=cfg.data.fps, steps=20, guidance=6.0, seed=0, prompt_choice=choice)
    write_mp4(frames, video_path, fps=cfg.data.fps)
    return {"run": run_dir, "export": export_dir, "video": video_path, "loss_first": first, "loss_last": last,
            "window": window, "steps": len(losses), "verify": info["verification_max_relative_difference"]}


def main() -> int:
    out_root = REPO / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    try:
        result = run(out_root)
    except UserError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 2
    print()
    print(f"loss (mean of first/last {result['window']} of {result['steps']} steps): "
          f"{result['loss_first']:.4f} -> {result['loss_last']:.4f} "
          f"({result['loss_first'] / result['loss_last']:.1f}x lower)")
    print(f"run:    {result['run']}   (recipe.yaml, metrics.jsonl, checkpoints/)")
    print(f"export: {result['export']}   (released layout: diffusers, transformers, vLLM and vLLM-Omni load it; "
          f"verified to {result['verify']:.1e})")
    print(f"video:  {result['video']}")
    (out_root / "demo_summary.json").write_text(json.dumps({k: str(v) for k, v in result.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
