import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"test data missing: {SHARED_DATA} (the repository's sibling shared/data)")
    return SHARED_DATA

# rouge-score imports absl, whose log handler keeps whatever sys.stderr is at import time (under
# pytest: a capture stream). Hydra's in-process runs call logging.config.dictConfig, which closes
# every handler ever created, and absl's close() then closes pytest's capture stream. Give absl a
# stream of its own.
import absl.logging  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = open(os.devnull, "w")
