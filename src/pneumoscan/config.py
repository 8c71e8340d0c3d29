"""The one training configuration: a typed dataclass, validated on creation.

CLI flags override its defaults; the resolved config is written to the run folder
and into every checkpoint so that a run can be repeated and a model explained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field

from .augment import LEVELS
from .model import ARCHITECTURES, SEED_WIDTHS
from .preprocess import INTENSITIES

LOSSES = ("weighted_ce", "ce", "focal")
AUGMENTS = tuple(LEVELS)
EVAL_METRICS = {"auroc": "max", "loss": "min"}
LR_SCHEDULES = ("plateau", "cosine")
DEVICES = ("auto", "cpu", "cuda")

# Presets set defaults; any flag the user gives explicitly still wins. "full" is the recipe of
# the shipped model (docs/experiments.md): the dataclass defaults below.
PRESETS: dict[str, dict] = {
    "full": {},
    # About 10 minutes on a 2-core CPU, data preparation included (benchmarks/fast_preset.py):
    # 128 px, half-width MedicalCNN (~4x fewer FLOPs), acquisition augmentation and a cosine schedule
    # over 6 epochs (chosen by 5-fold cross-validation, docs/experiments.md "Issue 7"), mixup 0.2
    # (docs/experiments.md "Mixup for the fast preset"); stops before 8 minutes of training. Where a few
    # timed steps show that 6 half-width epochs would not fit in those 8 minutes, it trains at quarter
    # width instead (docs/experiments.md "A quarter-width fast preset for slow machines").
    "fast": {"image_size": 128, "width": 0.5, "epochs": 6, "lr": 2e-3, "augment": "acquisition",
             "lr_schedule": "cosine", "loss": "weighted_ce", "patience": 4, "lr_patience": 2,
             "mixup": 0.2, "max_train_minutes": 8.0, "fallback_width": 0.25},
}


# What a resumed run does not take from the run it continues: where and how it runs, and what training fills in.
# Every other flag not given again is the continued run's own (a fast run resumed without --preset stays fast).
RESUME_OWN = ("data_dir", "output_dir", "device", "num_threads", "cache_dir", "resume", "overwrite", "strict",
              "extra", "patients_csv_sha256", "val_patients_sha256", "init_split")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Unknown values raise ``ValueError``."""

    data_dir: str = ""
    output_dir: str = "./training_output"
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = 224
    in_channels: int = 3
    arch: str = "medical_cnn"
    width: float = 1.0
    # > 0 with --max_train_minutes: train at this width instead where --epochs at --width would not fit in the
    # budget, as measured by timing a few training steps first (budget.choose_width); 0: off
    fallback_width: float = 0.0
    dropout: float = 0.5
    loss: str = "focal"
    focal_gamma: float = 2.0
    augment: str = "strong"
    mixup: float = 0.0  # > 0: mixup of each batch with Beta(mixup, mixup) weights (augment.mixup); 0: off
    intensity: str = "raw"  # equalize: each film's grey levels replaced by their rank (preprocess.equalize)
    eval_metric: str = "auroc"
    patience: int = 15
    lr_schedule: str = "plateau"  # plateau: ReduceLROnPlateau on eval_metric; cosine: to min_lr over --epochs
    lr_patience: int = 3
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    val_fraction: float = 0.15
    cv_folds: int = 0  # k > 0: patient-level k-fold; fold cv_fold is the validation split
    cv_fold: int = 0
    cv_holdout: bool = False  # keep the usual validation patients out of every fold (for an ensemble)
    patients_csv: str = ""  # file,patient rows for every film (data.assign_patients); "": DICOM PatientID or names
    patients_csv_sha256: str = ""  # filled in by training: a later split_from_config or --resume checks the file
    val_patients_sha256: str = ""  # filled in by training: data.patients_digest of its validation patients
    min_val_images: int = 100
    target_sensitivity: float = 0.95
    seed: int = 42
    device: str = "auto"
    num_threads: int = 0
    strict: bool = False
    cache_dir: str = ""
    resume: bool = False
    overwrite: bool = False  # a new run may replace the run in output_dir (without it, such a folder is refused)
    init_from: str = ""  # start from these weights (a checkpoint path or "shipped") instead of Xavier init
    init_split: dict = field(default_factory=dict)  # filled in by training: init_from's split (data.split_record)
    freeze_blocks: int = 0  # with init_from: the first N conv blocks stay as they are (5: only fc1/fc2 train)
    max_train_minutes: float = 0.0
    preset: str = "full"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        choices = {"arch": tuple(ARCHITECTURES), "loss": LOSSES, "augment": AUGMENTS,
                   "eval_metric": tuple(EVAL_METRICS), "device": DEVICES, "preset": tuple(PRESETS),
                   "lr_schedule": LR_SCHEDULES, "intensity": INTENSITIES}
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")
        positive = ("epochs", "batch_size", "lr", "image_size", "width", "patience")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        non_negative = ("weight_decay", "lr_patience", "min_lr", "focal_gamma", "num_threads", "mixup",
                        "max_train_minutes", "min_val_images", "fallback_width")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch normalisation cannot train on one film), "
                             f"got {self.batch_size}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 32 (five 2x2 poolings), "
                             f"got {self.image_size}")
        if self.fallback_width > self.width:
            raise ValueError(f"fallback_width ({self.fallback_width}) must not exceed width ({self.width}): it is the "
                             f"narrower, faster model trained where --epochs at --width do not fit the time budget")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ValueError(f"cv_folds must be 0 (one patient-level split) or >= 2, got {self.cv_folds}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite contradict each other: --resume continues the run in output_dir, "
                             "--overwrite starts a new one over it; give one")
        if not self.cv_folds and (self.cv_fold or self.cv_holdout):
            raise ValueError(f"cv_fold ({self.cv_fold}) and cv_holdout ({self.cv_holdout}) need cv_folds >= 2 "
                             f"(k-fold cross-validation); got cv_folds {self.cv_folds}")
        if self.cv_folds and not 0 <= self.cv_fold < self.cv_folds:
            raise ValueError(f"cv_fold must be in 0..{self.cv_folds - 1}, got {self.cv_fold}")
        if not 0 <= self.freeze_blocks <= len(SEED_WIDTHS):
            raise ValueError(f"freeze_blocks must be between 0 and {len(SEED_WIDTHS)} (the convolutional blocks), "
                             f"got {self.freeze_blocks}")
        if self.freeze_blocks and not self.init_from:
            raise ValueError("freeze_blocks needs init_from (a trained checkpoint, or 'shipped'): training on top of "
                             "untrained frozen blocks learns nothing useful")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.5 <= self.target_sensitivity < 1.0:
            raise ValueError(f"target_sensitivity must be in [0.5, 1), got {self.target_sensitivity}")

    @property
    def metric_mode(self) -> str:
        return EVAL_METRICS[self.eval_metric]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def continued(self, stored: dict, given: Collection[str]) -> TrainConfig:
        """This config with the values of the run ``--resume`` continues (``stored``: its config) for every field
        not in ``given`` (the flags given again), the preset included, but ``RESUME_OWN``."""
        fields = {f.name for f in dataclasses.fields(self)} - set(RESUME_OWN) - set(given)
        if stored.get("fallback_width") and stored.get("width") == stored["fallback_width"]:
            fields.discard("width")  # the speed check's choice, not the width asked: --resume keeps it (budget.py)
        return dataclasses.replace(self, **{k: v for k, v in stored.items() if k in fields})

    @classmethod
    def from_overrides(cls, preset: str | None = "full", **overrides) -> TrainConfig:
        """Defaults, then the preset's values (None: full), then the explicit overrides."""
        preset = preset or "full"
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**PRESETS[preset], **given}
        if "width" in given and "fallback_width" not in given:  # an explicit --width is kept on any machine
            values["fallback_width"] = 0.0
        return cls(preset=preset, **values)
