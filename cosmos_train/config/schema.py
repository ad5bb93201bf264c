"""The recipe schema: typed, nested dataclasses, validated before any model is loaded.

`model.pretrained`, `output_dir` and `train.max_steps` are a contract other tools rely on: keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

OBJECTIVES = ("generator", "reasoner")
AVAILABLE_OBJECTIVES = ("generator",)
GENERATION_MODES = ("t2i", "t2v", "i2v", "v2v")
SIGMA_SAMPLINGS = ("logit_normal", "uniform", "mode")
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


@dataclass
class DataConfig:
    manifest: str = MISSING  # JSONL manifest (see README, "Data")
    resolution: int = 480  # tier: 256, 480 or 720; sets the default size and flow shift
    height: Optional[int] = None  # pixel size; defaults to the tier's 16:9 size
    width: Optional[int] = None
    num_frames: int = 93  # 4k+1
    fps: float = 24.0  # frames are sampled at this rate; it also goes into the prompt and positions
    skip_bad_samples: bool = False
    shuffle: bool = True
    num_workers: int = 0


@dataclass
class ModeProbabilities:
    t2i: float = 0.0
    t2v: float = 0.7
    i2v: float = 0.2
    v2v: float = 0.1


@dataclass
class GeneratorConfig:
    modes: ModeProbabilities = field(default_factory=ModeProbabilities)
    v2v_condition_frames: int = 2  # latent frames kept clean in v2v
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # SD3 "mode" density scale
    shift: Optional[float] = None  # defaults per tier: 256/480/720 -> 3/5/10
    text_dropout: float = 0.1  # probability of training on the empty (unconditional) prompt
    use_system_prompt: bool = True


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(GEN_LORA_TARGETS))


@dataclass
class TrainConfig:
    method: str = "lora"  # lora | full
    lora: LoraConfig = field(default_factory=LoraConfig)
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


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "cosmos_train"
    wandb_mode: str = "offline"  # offline | online
    run_name: Optional[str] = None


@dataclass
class RecipeConfig:
    objective: str = "generator"
    output_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    description: str = ""

    # Derived values; recipes may leave them unset.
    def pixel_size(self) -> tuple[int, int]:
        default_h, default_w = TIER_SIZES[self.data.resolution]
        return (self.data.height or default_h, self.data.width or default_w)

    def flow_shift(self) -> float:
        return self.generator.shift if self.generator.shift is not None else TIER_SHIFTS[self.data.resolution]
