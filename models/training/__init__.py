"""Fine-tuning the base model on the gold corpora: LoRA (PEFT) or full fine-tuning with the transformers Trainer.

Where to look: :mod:`.config` (``TrainConfig``, conf/train/*.yaml), :mod:`.data` (gold notes -> examples as the
extraction path prompts them), :mod:`.checkpoints` (resume, and refusing another run's checkpoints),
:mod:`.trainer` (the loop: :func:`train`), :mod:`.output` (the adapter folder and its manifest).
"""

from notelake.models.training.checkpoints import checkpoint_to_resume
from notelake.models.training.config import BASE_MODEL_NAME, TrainConfig, default_data_dir, load_train_config
from notelake.models.training.data import Example, build_datasets, encode_example, split_notes
from notelake.models.training.output import export_checkpoint, finalize_manifest, set_dev_scores
from notelake.models.training.trainer import main_logging, train

__all__ = ["BASE_MODEL_NAME", "Example", "TrainConfig", "build_datasets", "checkpoint_to_resume", "default_data_dir",
           "encode_example", "export_checkpoint", "finalize_manifest", "load_train_config", "main_logging",
           "set_dev_scores", "split_notes", "train"]
