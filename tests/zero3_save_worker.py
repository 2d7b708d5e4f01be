"""Run by tests/test_zero3_save.py under torchrun (2 CPU processes): one ZeRO-3 training step of a tiny
converted model with every parameter partitioned, then ``full_parameters`` + rank 0's ``save_pretrained``.
Each rank writes how many parameters were released (empty) before the gather, and the state it gathered."""

import sys
from pathlib import Path

import deepspeed
import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # tests/ and this checkout
from tiny import tiny_model  # noqa: E402

from mixsga_train.attention import AttentionConfig, convert_model  # noqa: E402
from mixsga_train.training.distributed import full_parameters, init_distributed  # noqa: E402

out = Path(sys.argv[1])
dist = init_distributed()
model = tiny_model("llama", layers=2)
convert_model(model, AttentionConfig(method="mixsga", ratio="1:1:2"))
config = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(dist.rank))
engine.backward(engine(input_ids=ids, labels=ids).loss)
engine.step()
released = sum(p.data.numel() == 0 for p in model.parameters())
with full_parameters(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if dist.is_main:
        model.save_pretrained(out / "model")
torch.save(
    {"released": released, "parameters": len(list(model.parameters())), "state": state}, out / f"rank{dist.rank}.pt"
)
torch.distributed.barrier()  # no rank exits while another still talks to it
torch.distributed.destroy_process_group()  # join gloo's threads before exit ("terminate called" at teardown otherwise)
