import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)

# rouge-score imports absl, whose log handler keeps whatever sys.stderr is at import time (under
# pytest: a capture stream). Hydra's in-process runs call logging.config.dictConfig, which closes
# every handler ever created, and absl's close() then closes pytest's capture stream. Give absl a
# stream of its own.
import absl.logging  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = open(os.devnull, "w")
