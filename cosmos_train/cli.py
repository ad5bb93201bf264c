"""`cosmos-train` console script.

User mistakes (`UserError`) print one clear message and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cosmos_train.errors import UserError


def _cmd_show(args) -> None:
    from cosmos_train.config import load_recipe, recipe_to_yaml

    print(recipe_to_yaml(load_recipe(args.recipe, args.overrides)), end="")


def _cmd_train(args) -> None:
    from cosmos_train.config import load_recipe
    from cosmos_train.trainer.loop import train

    cfg = load_recipe(args.recipe, args.overrides)
    run_dir = train(cfg, resume=args.resume, recipe_path=" ".join([args.recipe, *args.overrides]))
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {run_dir}")


def _cmd_prepare(args) -> None:
    from cosmos_train.config import load_recipe
    from cosmos_train.prepare import prepare

    cfg = load_recipe(args.recipe, args.overrides)
    path, skips = prepare(cfg)
    print(skips.summary())
    if cfg.action is not None:
        print(f"action normalization: {path} (the run uses it; action windows are encoded while training)")
    else:
        print(f"latent cache: {path} (training with this recipe uses it automatically)")


def _cmd_export(args) -> None:
    from cosmos_train.config import load_saved_recipe

    recipe = Path(args.run_dir) / "recipe.yaml"
    if not recipe.is_file():
        raise UserError(f"{args.run_dir} is not a cosmos_train run directory (no recipe.yaml)")
    if args.lora_only and args.transformers:
        raise UserError("--lora-only and --transformers are different export forms: choose one")
    if load_saved_recipe(recipe).objective == "reasoner":
        from cosmos_train.export.reasoner import export_reasoner_run

        form = "transformers" if args.transformers else "release"
        info = export_reasoner_run(args.run_dir, args.out_dir, step=args.step, form=form, lora_only=args.lora_only,
                                   ema=args.ema)
        kind = ("LoRA adapters (PEFT for transformers; vllm/ for vLLM)" if args.lora_only else
                "transformers model" if args.transformers else "Cosmos 3 checkpoint (released layout)")
    else:
        from cosmos_train.export.generator import export_run

        if args.transformers:
            raise UserError("--transformers is for reasoner runs; a generator export is the released-layout "
                            "checkpoint (which transformers also loads) or --lora-only")
        info = export_run(args.run_dir, args.out_dir, step=args.step, lora_only=args.lora_only, ema=args.ema)
        kind = ("LoRA adapters (diffusers; vllm-omni/ for vLLM-Omni)" if args.lora_only else
                "Cosmos 3 checkpoint (released layout, LoRA merged)" if info["method"] == "lora" else
                "Cosmos 3 checkpoint (released layout)")
    if args.ema:
        kind += ", EMA weights"
    print(f"exported {kind} from {info['checkpoint']} to {args.out_dir} "
          f"(verified: max relative difference {info['verification_max_relative_difference']:.2e}; "
          f"model card: {Path(args.out_dir) / 'README.md'})")


def _cmd_chat(args) -> None:
    from cosmos_train.chat import chat

    local = Path(args.model_dir).expanduser()
    if args.model_dir != "tiny" and (local.is_absolute() or args.model_dir.startswith(".") or
                                     args.model_dir.count("/") != 1) and not local.is_dir():
        raise UserError(f"chat: model directory not found: {args.model_dir}")
    answer = chat(args.model_dir, args.question, images=args.image, videos=args.video, reasoning=args.reasoning,
                  greedy=args.greedy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, top_k=args.top_k, presence_penalty=args.presence_penalty,
                  video_fps=args.video_fps, seed=args.seed, device=args.device)
    print(answer)


def _cmd_generate(args) -> None:
    from cosmos_train.inference import (choose_prompt, export_prompt_format, generate_clip, load_pipeline, write_mp4,
                                        write_mp4_with_sound)

    if args.action is not None:
        return _generate_action(args)
    if args.actions:
        raise UserError("--actions goes with --action forward_dynamics")

    if args.frames < 1 or (args.frames - 1) % 4:
        raise UserError(f"--frames {args.frames}: a frame count of the form 4k+1 (1, 5, 9, ..., 93, ...)")
    for name in ("height", "width"):
        if getattr(args, name) <= 0 or getattr(args, name) % 16:
            raise UserError(f"--{name} {getattr(args, name)}: a positive multiple of 16")
    recorded = export_prompt_format(args.lora, args.pipeline_dir)
    choice = choose_prompt(recorded[0] if recorded else None, templates=getattr(args, "templates", None),
                           system_prompt=getattr(args, "system_prompt", None),
                           source=str(recorded[1]) if recorded else "")
    pipe = load_pipeline(args.pipeline_dir, device=args.device, lora=args.lora)
    print(choice.description)
    if args.sound and getattr(pipe, "sound_tokenizer", None) is None:
        raise UserError(f"--sound: {args.pipeline_dir} has no sound_tokenizer/ component")
    image = _read_image(args.image) if args.image else None  # i2v
    video = None
    if args.video:  # v2v: the clip's leading frames condition the generated one
        from PIL import Image

        video = [Image.fromarray((f * 255).round().astype("uint8")) for f in _read_clip(args.video, args.frames)]
    clip = generate_clip(pipe, args.prompt, num_frames=args.frames, height=args.height, width=args.width,
                         fps=args.fps, steps=args.steps, guidance=args.guidance, seed=args.seed, image=image,
                         video=video, prompt_choice=choice, enable_sound=args.sound)
    frames = clip.frames
    if clip.sound is not None:
        path = write_mp4_with_sound(frames, clip.sound, args.out, fps=args.fps)
    else:
        path = write_mp4(frames, args.out, fps=args.fps)
    print(f"video: {path} ({frames.shape[0]} frames, {frames.shape[1]}x{frames.shape[2]}"
          f"{', AAC 48 kHz stereo sound' if clip.sound is not None else ''})")


def _generate_action(args) -> None:
    """`generate --action MODE`: the stock pipeline in an action mode, with the export's embodiment and
    normalization; writes the MP4 and (policy, inverse dynamics) a JSON of de-normalized actions."""
    import json

    import numpy as np

    from cosmos_train.inference import export_prompt_format, load_pipeline, write_mp4
    from cosmos_train.inference_action import action_record, generate_action, read_actions

    if args.sound:
        raise UserError("--sound does not apply to --action runs (the action pipeline call generates no sound)")
    record = action_record(args.lora, args.pipeline_dir)
    if record is None:
        raise UserError(f"--action needs an action finetune's export (its cosmos_train_export.json records the "
                        f"embodiment and action normalization); {args.pipeline_dir} has none")
    chunk, width = int(record["chunk_size"]), int(record["raw_action_dim"])
    if args.action == "inverse_dynamics" and not args.video:
        raise UserError(f"--action inverse_dynamics infers the actions of a clip: give --video (a clip of {chunk + 1} "
                        "frames)")
    if args.action == "forward_dynamics" and not args.actions:
        raise UserError(f"--action forward_dynamics rolls out given actions: give --actions (a JSON list of {chunk} "
                        f"rows of {width} numbers)")
    if args.action != "inverse_dynamics" and not (args.image or args.video):
        raise UserError(f"--action {args.action} starts from a frame: give --image (or --video: its first frame)")
    image = video = actions = None
    if args.video:
        video = _read_clip(args.video, chunk + 1)
        if args.action == "inverse_dynamics" and len(video) < chunk + 1:
            raise UserError(f"--video {args.video}: {len(video)} frames; inverse dynamics of this export needs "
                            f"{chunk + 1} (chunk_size {chunk} + 1)")
    elif args.image:
        image = _read_image(args.image)
    if args.actions:
        actions = read_actions(args.actions, chunk, width)
    recorded = export_prompt_format(args.lora, args.pipeline_dir)
    use_system_prompt = recorded[0].use_system_prompt if recorded else None
    pipe = load_pipeline(args.pipeline_dir, device=args.device, lora=args.lora)
    print(f"action {args.action}: embodiment {record['embodiment']} (domain {record['domain_id']}, {width} wide), "
          f"chunk {chunk} ({chunk + 1} frames) at {record['fps']:g} fps, canvas tier {record['resolution_tier']}, "
          f"normalization {record['normalization'].get('method')} (frames, size and fps come from the export: "
          "--frames / --height / --width / --fps do not apply)")
    frames, predicted = generate_action(pipe, record, args.action, args.prompt, image=image, video=video,
                                        actions=actions, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                        use_system_prompt=use_system_prompt)
    path = write_mp4(frames, args.out, fps=float(record["fps"]))
    print(f"video: {path} ({frames.shape[0]} frames, {frames.shape[1]}x{frames.shape[2]})")
    if predicted is not None:
        out = Path(args.actions_out or Path(args.out).with_suffix(".actions.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"embodiment": record["embodiment"], "mode": args.action,
                                   "actions": np.asarray(predicted).round(6).tolist()}, indent=1) + "\n")
        print(f"actions: {out} ({len(predicted)} rows of {width}, de-normalized)")


def _read_image(path):
    from PIL import Image

    try:
        return Image.open(path).convert("RGB")
    except OSError as err:
        raise UserError(f"--image {path}: unreadable ({err})") from None


def _read_clip(path, num_frames: int):
    """[T, H, W, 3] float frames in [0, 1] of a video file (the first `num_frames`)."""
    import av
    import numpy as np

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(num_frames), container.decode(video=0))]
    except (OSError, av.error.FFmpegError) as err:
        raise UserError(f"--video {path}: unreadable ({err})") from None
    if not frames:
        raise UserError(f"--video {path}: no frames")
    return np.stack(frames).astype(np.float32) / 255.0


def _cmd_report(args) -> None:
    from cosmos_train.report import make_report

    path = make_report(args.run_dir, args.out)
    plots = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"report: {path} ({len(plots)} plot{'s' if len(plots) != 1 else ''}: {', '.join(plots) or 'none'})")


def _cmd_make_tiny(args) -> None:
    from cosmos_train.models.tiny import make_tiny

    out = make_tiny(args.out_dir, seed=args.seed)
    print(f"tiny Cosmos 3 checkpoint: {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosmos-train", description="Post-train NVIDIA Cosmos 3 world models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("show", help="print the resolved recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--resume", dest="resume", action="store_const", const="latest", default=False,
                   help="continue from the newest intact checkpoint in output_dir (an error when there is none)")
    p.add_argument("--resume=auto", dest="resume", action="store_const", const="auto",
                   help="continue when output_dir has a checkpoint, else start a new run (for requeued jobs)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("prepare", help="encode every sample once into the latent cache")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("export", help="export a run: the released-layout checkpoint (default) or LoRA adapters")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--lora-only", action="store_true",
                   help="write only the LoRA adapters as PEFT directories (generator: diffusers + vllm-omni/; "
                        "reasoner: transformers/PEFT + vllm/)")
    p.add_argument("--ema", action="store_true",
                   help="export the exponential moving average of the trained weights (runs with train.ema_decay)")
    p.add_argument("--transformers", action="store_true",
                   help="reasoner: a plain transformers directory instead of the released-layout checkpoint")
    p.add_argument("--unified", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("chat", help="ask a (finetuned) reasoner about images / videos")
    p.add_argument("model_dir", help="a reasoner export, a unified checkpoint, a hub id or `tiny`")
    p.add_argument("question")
    p.add_argument("--image", action="append", default=[], help="an image path (repeatable)")
    p.add_argument("--video", action="append", default=[], help="a video path (repeatable)")
    p.add_argument("--reasoning", action="store_true", help="explicit reasoning (<think>) and its sampling defaults")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of the documented sampling")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--video-fps", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("generate", help="generate a video with a pipeline directory and write an MP4",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("pipeline_dir")
    p.add_argument("prompt")
    p.add_argument("--out", default="outputs/sample.mp4", help="MP4 to write")
    p.add_argument("--lora", default=None, help="a LoRA-only export to load on top of the pipeline")
    p.add_argument("--frames", type=int, default=93, help="4k+1 frames (the tiny model: e.g. 17)")
    p.add_argument("--height", type=int, default=480, help="pixels, multiple of 16 (the tiny model: e.g. 64)")
    p.add_argument("--width", type=int, default=832, help="pixels, multiple of 16")
    p.add_argument("--fps", type=float, default=24.0, help="frame rate (also in the prompt and positions)")
    p.add_argument("--steps", type=int, default=35, help="denoising steps (UniPC)")
    p.add_argument("--guidance", type=float, default=6.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--templates", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="duration + resolution sentences in the prompt (default: as the export was trained, "
                        "from its cosmos_train_export.json; else the pipeline's default, on)")
    p.add_argument("--system-prompt", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="the Cosmos 3 system prompt (default: as the export was trained; else model_index.json's "
                        "default_use_system_prompt)")
    p.add_argument("--sound", action="store_true", help="also generate the stereo soundtrack (AAC in the MP4)")
    p.add_argument("--action", default=None, choices=["policy", "forward_dynamics", "inverse_dynamics"],
                   help="an action finetune's mode: PROMPT is the task; condition on --image (or --video)")
    p.add_argument("--image", default=None, help="i2v (and action modes): the conditioning frame")
    p.add_argument("--video", default=None, help="v2v: a clip whose leading frames condition the video; action "
                                                 "modes: the conditioning clip (inverse dynamics)")
    p.add_argument("--actions", default=None, help="forward dynamics: a JSON list of raw action rows")
    p.add_argument("--actions-out", default=None, help="policy / inverse dynamics: where to write the "
                                                       "de-normalized actions (default: next to --out)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("report", help="PNG plots and a Markdown summary of a run (RUN_DIR/report/)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("make-tiny", help="write a tiny random-weight Cosmos 3 checkpoint (for tests and the demo)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        from cosmos_train.errors import BadSampleError

        hint = (" (data.skip_bad_samples=true skips such samples and counts them)"
                if isinstance(err, BadSampleError) and "skip_bad_samples" not in str(err) else "")
        print(f"cosmos-train: error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cosmos-train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
