"""The patches are invisible to runs that are not VPT: the same LLaMA-Factory SFT runs (a tiny text-only Qwen2 with
the `qwen` template, a tiny plain Qwen2-VL with the stock `qwen2_vl` template; full and LoRA fine-tuning) give
bit-identical per-step losses and final weights with the patches applied by the `.pth` hook and with the hook
switched off (``VPT_LLAMAFACTORY_PATCH=0``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM

from transformers_vpt.tiny import build_tiny_qwen2_vl, build_tiny_tokenizer

pytestmark = pytest.mark.slow

RUNS = {
    "text_full": dict(model="qwen2", template="qwen", dataset="text", finetuning_type="full"),
    "text_lora": dict(model="qwen2", template="qwen", dataset="text", finetuning_type="lora"),
    "vl_full": dict(model="qwen2_vl", template="qwen2_vl", dataset="images", finetuning_type="full"),
    "vl_lora": dict(model="qwen2_vl", template="qwen2_vl", dataset="images", finetuning_type="lora"),
}
STEPS = 3

# Runs every entry of RUNS with `run_exp`, recording the exact loss of every training forward (a forward hook on
# the trained module) and a digest of the saved weights; prints one JSON line.
CHILD = r"""
import hashlib, json, sys
import torch
torch.set_num_threads(1)
from llamafactory.train.tuner import run_exp  # the .pth hook applies the patches here unless switched off
from safetensors.torch import load_file
from transformers import TrainerCallback
import llamafactory_patches
from llamafactory.train.sft import workflow


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_hook(
            lambda module, inputs, output: self.losses.append(output.loss.item().hex()) if module.training else None
        )


def digest(out_dir):
    files = sorted(p for p in out_dir.iterdir() if p.suffix == ".safetensors")
    tensors = {name: t for f in files for name, t in load_file(f).items()}
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode()); h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return {"files": [f.name for f in files], "tensors": len(tensors), "sha256": h.hexdigest()}


from pathlib import Path
spec = json.loads(Path(sys.argv[1]).read_text())
results = {"patched": llamafactory_patches._applied, "trainer": workflow.CustomSeq2SeqTrainer.__module__, "runs": {}}
for name, args in spec.items():
    recorder = Losses()
    run_exp(args=args, callbacks=[recorder])
    results["runs"][name] = {"losses": recorder.losses, "weights": digest(Path(args["output_dir"]))}
print("RESULT " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    tokenizer = build_tiny_tokenizer((), with_regions=False)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(root / "qwen2")
    tokenizer.save_pretrained(root / "qwen2")
    build_tiny_qwen2_vl(save_dir=root / "qwen2_vl")

    data = root / "data"
    data.mkdir()
    colours = ["red", "green", "blue", "white"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (56 + 28 * (i % 2), 56), colour).save(data / f"{colour}.png")
    text = [{"instruction": f"What colour is number {i}?", "input": "", "output": colours[i % 4]} for i in range(8)]
    images = [
        {
            "messages": [
                {"role": "user", "content": "<image>What colour is the image?"},
                {"role": "assistant", "content": colours[i % 4]},
            ],
            "images": [f"{colours[i % 4]}.png"],
        }
        for i in range(8)
    ]
    (data / "text.json").write_text(json.dumps(text))
    (data / "images.json").write_text(json.dumps(images))
    (data / "dataset_info.json").write_text(json.dumps({
        "text": {"file_name": "text.json"},
        "images": {
            "file_name": "images.json", "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
    }))
    return root


def run_all(workspace: Path, label: str, env: dict) -> dict:
    spec = {}
    for name, run in RUNS.items():
        spec[name] = {
            "model_name_or_path": str(workspace / run["model"]),
            "stage": "sft",
            "do_train": True,
            "finetuning_type": run["finetuning_type"],
            **({"lora_target": "all", "lora_rank": 4} if run["finetuning_type"] == "lora" else {}),
            "dataset": run["dataset"],
            "dataset_dir": str(workspace / "data"),
            "template": run["template"],
            "cutoff_len": 256,
            "image_max_pixels": 112 * 112,
            "overwrite_cache": True,
            "output_dir": str(workspace / label / name),
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1.0e-3,
            "max_steps": STEPS,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "seed": 7,
            "dataloader_num_workers": 0,
        }
    spec_file = workspace / f"{label}.json"
    spec_file.write_text(json.dumps(spec))
    child_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_CACHE": str(workspace / label / "datasets-cache"), "DISABLE_VERSION_CHECK": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spec_file)], env=child_env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def result(process) -> dict:
    output, _ = process.communicate(timeout=600)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, output[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_non_vpt_runs_are_bit_identical_with_and_without_the_patches(workspace):
    patched_run = run_all(workspace, "patched", {"VPT_LLAMAFACTORY_PATCH": "1"})
    stock_run = run_all(workspace, "stock", {"VPT_LLAMAFACTORY_PATCH": "0"})
    patched, stock = result(patched_run), result(stock_run)

    assert patched["patched"] and patched["trainer"] == "llamafactory_patches.trainer"
    assert not stock["patched"] and stock["trainer"] == "llamafactory.train.sft.trainer"
    for name in RUNS:
        ours, theirs = patched["runs"][name], stock["runs"][name]
        assert len(ours["losses"]) == STEPS, (name, ours)
        assert ours["losses"] == theirs["losses"], name
        assert ours["weights"]["tensors"] > 0 and ours["weights"] == theirs["weights"], name
    lora = patched["runs"]["vl_lora"]["weights"]["files"]
    assert lora == ["adapter_model.safetensors"]
    # the runs did train: the losses of one run are not all the same number
    assert len(set(patched["runs"]["text_full"]["losses"])) > 1
