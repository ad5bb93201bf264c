"""The recipe schema: typed, nested dataclasses, validated before any model is loaded.

`model.pretrained`, `output_dir` and `train.max_steps` are a contract other tools rely on: keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

OBJECTIVES = ("generator", "reasoner")
AVAILABLE_OBJECTIVES = ("generator", "reasoner")
GENERATION_MODES = ("t2i", "t2v", "i2v", "v2v")
SOUND_MODES = ("off", "auto", "require")
SIGMA_SAMPLINGS = ("logit_normal", "uniform", "mode")
UNCOND_PROMPTS = ("pipeline", "empty")
LR_SCHEDULES = ("constant", "linear", "cosine")
FINETUNE_METHODS = ("lora", "full")
FULL_TRAINABLE = ("gen", "all")
DTYPES = ("bfloat16", "float32")

# Resolution tiers: pixel size (height, width) of the default 16:9 landscape bucket used by Cosmos 3
# at inference, and the flow shift the official trainer uses for that tier.
TIER_SIZES = {256: (192, 320), 480: (480, 832), 720: (720, 1280)}
TIER_SHIFTS = {256: 3.0, 480: 5.0, 720: 10.0}

# LoRA on the generation pathway only: the understanding pathway (the Reasoner) stays untouched.
GEN_LORA_TARGETS = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "mlp_moe_gen.gate_proj",
                    "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj"]


@dataclass
class ModelConfig:
    pretrained: str = MISSING  # hub id (nvidia/Cosmos3-Nano) or a local directory in diffusers layout
    revision: Optional[str] = None
    dtype: str = "bfloat16"  # dtype of the frozen base weights; trainable weights are always fp32
    vae_dtype: str = "float32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    local_files_only: bool = False
    # none | int8 | fp8: LoRA over a quantized frozen base (torchao weight-only; fp8 needs a GPU with float8
    # support). Training only: exports merge into the unquantized base (cosmos_train/models/quantize.py)
    quantize_base: str = "none"


SHORT_CLIPS = ("skip", "loop", "pad")


@dataclass
class HFColumns:
    """Column names of a Hugging Face dataset source (see cosmos_train/data/hf.py)."""
    video: Optional[str] = None  # path strings, bytes, or {bytes, path} (datasets.Video); None: auto ("video")
    image: Optional[str] = None  # same for images; None: auto ("image")
    caption: str = "caption"  # a string, or a list of strings (several captions, one per epoch)
    fps: Optional[str] = None  # optional columns; each means what the manifest key of that name means
    start_frame: Optional[str] = None
    end_frame: Optional[str] = None
    start_time: Optional[str] = None
    end_time: Optional[str] = None
    width: Optional[str] = None  # the media's own size (lets aspect bucketing skip probing)
    height: Optional[str] = None


@dataclass
class DataSourceConfig:
    """One entry of `data.sources`: a JSONL manifest or a Hugging Face dataset, with a weight."""
    manifest: Optional[str] = None  # JSONL manifest (see README, "Data")
    hf_dataset: Optional[str] = None  # local .parquet / .arrow file, dataset directory, or hub id
    split: str = "train"  # hf_dataset only
    subset: Optional[str] = None  # hf_dataset only: the hub dataset's config name
    columns: HFColumns = field(default_factory=HFColumns)  # hf_dataset only
    media_root: Optional[str] = None  # hf_dataset only: base of relative paths (default: the dataset's folder)
    cache_dir: Optional[str] = None  # hf_dataset only: datasets cache for Parquet / hub data
    weight: Optional[float] = None  # share of the sample stream ~ weight / sum; unset (all): by source size
    name: Optional[str] = None  # label in logs and messages (default: the path / id)


@dataclass
class DataConfig:
    manifest: Optional[str] = None  # JSONL manifest (see README, "Data"); shorthand for one source
    sources: List[DataSourceConfig] = field(default_factory=list)  # several weighted sources
    resolution: int = 480  # tier: 256, 480 or 720; sets the bucket sizes / default size and flow shift
    height: Optional[int] = None  # fixed pixel size (no buckets); defaults to the tier's 16:9 size
    width: Optional[int] = None
    aspect_buckets: Optional[bool] = None  # bucket by aspect ratio within the tier; default: on unless height/width set
    num_frames: int = 93  # 4k+1
    fps: float = 24.0  # frames are sampled at this rate; it also goes into the prompt and positions
    short_clips: str = "skip"  # windows too short for num_frames at fps: skip (too_short) | loop | pad
    skip_bad_samples: bool = False
    shuffle: bool = True
    num_workers: int = 0
    # Latent cache written by `cosmos-train prepare`: auto = use it when present (refuse a stale one),
    # require = fail without one, off = always encode online. Default location: OUTPUT_DIR/latent_cache.
    cache: str = "auto"
    cache_dir: Optional[str] = None

    def use_buckets(self) -> bool:
        """Aspect-ratio buckets on? `aspect_buckets`, else on unless height/width fix the size."""
        if self.aspect_buckets is not None:
            return bool(self.aspect_buckets)
        return self.height is None and self.width is None


@dataclass
class ModeProbabilities:
    t2i: float = 0.0
    t2v: float = 0.7
    i2v: float = 0.2
    v2v: float = 0.1


@dataclass
class LossWeights:
    """Weight of each modality's flow-matching loss in the total (the official trainer, CF, uses
    total = 10 * vision + 10 * action + 2 * sound; only the ratios matter up to the learning rate)."""
    vision: float = 1.0
    sound: float = 1.0
    action: float = 1.0


@dataclass
class GeneratorConfig:
    modes: ModeProbabilities = field(default_factory=ModeProbabilities)
    loss_weights: LossWeights = field(default_factory=LossWeights)  # per-modality loss weights
    # Sound from each clip's own audio track (t2v / i2v / v2v with sound): off | auto (clips without audio train
    # without sound) | require (clips without audio are skipped and counted as no_audio). Images never have sound.
    sound: str = "off"
    v2v_condition_frames: int = 2  # latent frames kept clean in v2v
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # SD3 "mode" density scale
    shift: Optional[float] = None  # defaults per tier: 256/480/720 -> 3/5/10
    text_dropout: float = 0.1  # probability of training on the unconditional prompt (CFG dropout)
    # Prompt format (how the caption becomes tokens; see README "Prompt format" and models/prompt_format.py).
    # The export records it and `cosmos-train generate` prompts the finetune the same way.
    use_system_prompt: Optional[bool] = None  # the Cosmos 3 system prompt; None: the checkpoint's
    #   model_index.json `default_use_system_prompt` (True when absent)
    duration_template: bool = True  # append "The video is N seconds long and is of F FPS." (videos only)
    resolution_template: bool = True  # append "This video/image is of HxW resolution."
    template_dropout: float = 0.0  # per-sample probability of the OTHER template form (both templates off
    #   when the recipe has them on, both on when off), so one finetune serves both forms
    uncond_prompt: str = "pipeline"  # CFG-dropout prompt: pipeline = tokenize_prompt's unconditional prompt for
    #   the sample's template form (inverse templates when on, bare empty prompt when off); empty = always the
    #   bare empty prompt


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(GEN_LORA_TARGETS))


@dataclass
class PackingConfig:
    # Several samples share one transformer forward (each keeps its own prompt, positions and loss,
    # and cannot attend to the others). One micro-step = one pack; train.batch_size is then unused.
    enabled: bool = True
    max_tokens: int = 16384  # sequence budget per pack (text + vision tokens)
    lookahead: int = 32  # samples buffered to choose pack members from (best fit)


DISTRIBUTED_BACKENDS = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass
class DistributedConfig:
    """How trained weights, gradients and optimizer state are spread over the processes (README "Scale-out").
    Chosen here, in the recipe; torchrun / accelerate launch / srun only start the processes."""
    backend: str = "ddp"  # ddp | fsdp2 | zero2 | zero3 (DeepSpeed ZeRO stage 2 / 3)
    offload_optimizer: bool = False  # zero2 / zero3: optimizer state and its update in CPU memory
    offload_params: bool = False  # zero3 / fsdp2: parameters in CPU memory between uses (one layer on the GPU)
    reshard_after_forward: bool = True  # fsdp2: free a layer's gathered weights after its forward
    deepspeed_config: Optional[str] = None  # zero2 / zero3: a DeepSpeed JSON merged over the generated config


@dataclass
class TrainConfig:
    method: str = "lora"  # lora | full
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    full_trainable: str = "gen"  # full finetuning: gen pathway (+ heads, time embedder) or all
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    batch_size: int = 1  # samples per optimizer micro-step (one transformer forward each)
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    # --- durability (see README "Interruptions and resuming")
    max_nonfinite_steps: int = 20  # stop after this many consecutive steps skipped for a non-finite loss / gradient
    extend_schedule: bool = False  # resume with a changed max_steps: recompute the lr schedule over the new length
    # --- seeing the run (see README "Seeing the run"); keep these last in the section
    ema_decay: Optional[float] = None  # EMA of the trainable weights (e.g. 0.999), saved as ema.safetensors; None: off
    init_from: Optional[str] = None  # warm start: a run or checkpoint directory; its trainable weights only


# ---- Reasoner (next-token SFT of the understanding pathway; transformers' Cosmos3OmniForConditionalGeneration)
REASONER_LOSS_ON = ("all_turns", "last_turn")
REASONER_TRAINABLE = ("lora", "full", "frozen")
# LoRA targets in the reasoner's language model (Qwen3-VL text decoder names) and its vision tower.
REASONER_LANGUAGE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REASONER_VISION_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"]
# The explicit-reasoning answer format (Cosmos-Reason style): appended to user turns when reasoner.reasoning is on.
REASONING_PROMPT = ("\n\nAnswer the question using the following format:\n\n<think>\nYour reasoning.\n</think>\n\n"
                    "Write your final answer immediately after the </think> tag.")


@dataclass
class ReasonerMediaConfig:
    """Per-sample pixel budgets and video sampling. None: the checkpoint's processor settings
    (preprocessor_config.json / video_preprocessor_config.json; Qwen3-VL's defaults when absent).
    A conversation's image/video part may override them with its own min_pixels / max_pixels / fps / num_frames."""

    image_min_pixels: Optional[int] = None  # per image (Qwen2-VL smart_resize bounds)
    image_max_pixels: Optional[int] = None
    video_min_pixels: Optional[int] = None  # total over the sampled frames, as Qwen3-VL's video processor counts
    video_max_pixels: Optional[int] = None
    video_fps: Optional[float] = None  # sample videos at this rate (Qwen3-VL default 2) ...
    video_num_frames: Optional[int] = None  # ... or take this many frames, evenly spaced (not both)
    video_min_frames: Optional[int] = None  # clamp of the fps-based frame count (Qwen3-VL: 4 .. 768)
    video_max_frames: Optional[int] = None


@dataclass
class ReasonerConfig:
    # --- data format
    loss_on: str = "all_turns"  # all_turns: every assistant turn is a target; last_turn: only the last one
    reasoning: bool = False  # explicit reasoning: append reasoning_prompt to user turns, train <think>...</think>
    reasoning_prompt: str = REASONING_PROMPT
    system_prompt: Optional[str] = None  # used for conversations that bring no system message
    max_seq_len: int = 8192  # tokens per conversation, image/video placeholders included
    truncate: bool = False  # longer: False -> bad sample (too_long); True -> cut (never inside an image/video)
    media: ReasonerMediaConfig = field(default_factory=ReasonerMediaConfig)
    # batching is train.packing's: with it on, a micro-step is one padding-free pack of conversations of at
    # most train.packing.max_tokens tokens (keep it >= max_seq_len); off, train.batch_size unpacked forwards
    # --- what trains (lora / full / frozen per part; None: language follows train.method)
    language: Optional[str] = None  # the language model (q/k/v/o + MLP for LoRA; everything incl. lm_head for full)
    vision: str = "frozen"  # the vision tower's blocks (+ patch/pos embeddings when full)
    merger: str = "frozen"  # the merger and deepstack mergers (full or frozen)
    language_lora_targets: list = field(default_factory=lambda: list(REASONER_LANGUAGE_LORA_TARGETS))
    vision_lora_targets: list = field(default_factory=lambda: list(REASONER_VISION_LORA_TARGETS))
    language_lr: Optional[float] = None  # None: train.lr
    vision_lr: Optional[float] = None
    merger_lr: Optional[float] = None
    # --- model
    attn_implementation: str = "sdpa"  # sdpa (padding-free packing works with it on CPU/GPU) or flash_attention_2


# ---- World-action training from a LeRobot dataset (see README "World-action data (LeRobot)")
ACTION_MODES = ("policy", "forward_dynamics", "inverse_dynamics")
ACTION_VIEW_POINTS = ("ego_view", "third_person_view", "wrist_view", "concat_view")  # diffusers' framing sentences
ACTION_NORMALIZATIONS = ("none", "quantile", "mean_std", "min_max")
ACTION_STATS = ("dataset", "computed")
ACTION_TIERS = (256, 480, 704, 720)  # diffusers' _ACTION_RESOLUTION_BINS tiers
# Action domain ids that diffusers, the official trainer and vLLM-Omni leave unused (of 32 in the released Nano).
FREE_ACTION_DOMAIN_IDS = (10, 11, 14, 18, 19, *range(24, 32))


@dataclass
class NewEmbodimentConfig:
    """An embodiment the checkpoint does not know: its own action-head rows at a free domain id."""
    name: str = MISSING  # the name `action.embodiment` refers to (not one of diffusers' names)
    raw_action_dim: int = MISSING  # its action width (sum of the action keys' widths)
    domain_id: int = MISSING  # a free id: 10, 11, 14, 18, 19 or 24-31 (and < the model's number of domains)
    init_from: Optional[str] = None  # an existing embodiment whose head rows are copied; None: xavier init


@dataclass
class ActionModes:
    """Share of samples trained in each mode (diffusers' CosmosActionCondition modes); must sum to 1."""
    policy: float = 0.5  # frame 0 clean -> video + actions
    forward_dynamics: float = 0.25  # frame 0 + actions clean -> video
    inverse_dynamics: float = 0.25  # whole video clean -> actions


@dataclass
class ActionConfig:
    dataset: str = MISSING  # LeRobot dataset directory (v3.0; v2.1 read too); ./ and ../ relative to the recipe
    cameras: List[str] = MISSING  # video feature keys, e.g. [observation.images.top]; several: side by side
    action_keys: List[str] = field(default_factory=lambda: ["action"])  # concatenated in this order
    state_key: Optional[str] = None  # e.g. observation.state: returned (normalized) at a window's first frame
    chunk_size: int = 16  # actions per window (a multiple of 4); a window has chunk_size + 1 frames
    fps: Optional[float] = None  # rate told to the model (prompt, positions); default: the dataset's fps.
    #   Frames and actions are never resampled: every dataset frame is one step.
    window_stride: Optional[int] = None  # frames between window starts; default 1 (every frame starts one)
    val_episodes: int = 0  # the last N episodes (by episode_index) are held out as the "val" split
    embodiment: str = MISSING  # a name from diffusers' _EMBODIMENT_TO_DOMAIN_ID, or new_embodiment.name
    new_embodiment: Optional[NewEmbodimentConfig] = None
    view_point: str = "ego_view"  # ego_view | third_person_view | wrist_view | concat_view
    normalization: str = "quantile"  # none | quantile (q01..q99 -> -1..1) | mean_std | min_max (min..max -> -1..1)
    stats: str = "dataset"  # dataset: meta/stats.json; computed: from the training episodes' rows
    clamp: Optional[float] = None  # clamp normalized actions / state to [-clamp, clamp]
    modes: ActionModes = field(default_factory=ActionModes)
    head_lr_multiplier: float = 5.0  # learning rate of the action heads = train.lr x this (official: 5x)
    resolution_tier: int = 256  # the pipeline's action canvas tier: 256, 480, 704 or 720
    # held-out action error at every checkpoint (needs val_episodes > 0): windows sampled, denoising steps
    eval_windows: int = 4
    eval_steps: int = 10


# Accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS)
TRACKERS = ("tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab")


@dataclass
class LoggingConfig:
    wandb: bool = False  # shorthand for trackers: [wandb]
    wandb_project: str = "cosmos_train"
    wandb_mode: str = "offline"  # offline | online
    run_name: Optional[str] = None
    trackers: List[str] = field(default_factory=list)  # Accelerate trackers: tensorboard, wandb, mlflow, ...


@dataclass
class ValidationConfig:
    """Held-out evaluation and samples every `every` optimizer steps (see README "Seeing the run")."""
    every: int = 0  # steps between validations; 0: off (action runs still get their action error at checkpoints)
    manifest: Optional[str] = None  # held-out data: a generator manifest / reasoner conversations JSONL
    #   (action runs use the held-out episodes, action.val_episodes, instead)
    max_samples: int = 8  # held-out samples evaluated (the first N, in file order)
    # generator: held-out loss at these quantiles of the recipe's sigma density (after the shift), fixed noise
    sigma_quantiles: List[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    prompts: List[str] = field(default_factory=list)  # generator: sample videos / images from these prompts
    images: List[str] = field(default_factory=list)  # optional i2v conditioning image per prompt ("" = none)
    sample_frames: Optional[int] = None  # 4k+1; default data.num_frames (1: PNG images)
    sample_steps: int = 30  # denoising steps of the samples
    sample_guidance: float = 6.0  # CFG scale of the samples


@dataclass
class RecipeConfig:
    objective: str = "generator"
    output_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    reasoner: ReasonerConfig = field(default_factory=ReasonerConfig)
    action: Optional[ActionConfig] = None  # world-action training from a LeRobot dataset; None: not an action run
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    description: str = ""
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    # Derived values; recipes may leave them unset.
    def pixel_size(self) -> tuple[int, int]:
        default_h, default_w = TIER_SIZES[self.data.resolution]
        return (self.data.height or default_h, self.data.width or default_w)

    def flow_shift(self) -> float:
        return self.generator.shift if self.generator.shift is not None else TIER_SHIFTS[self.data.resolution]
