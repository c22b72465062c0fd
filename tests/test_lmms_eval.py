"""The lmms-eval ``vpt`` model (`transformers_vpt.integrations.lmms_eval`): its model arguments and their errors, the
entry point lmms-eval finds it by, requests answered in process, and a whole ``lmms-eval --model vpt`` run over a
local task, offline and without any network lookup, whose answers are `VPTPipeline`'s two-round answers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from utils import spy_generate, tiny_image

pytest.importorskip("lmms_eval", reason="the lmms extra is not installed: pip install -c constraints.txt -e '.[lmms]'")

from lmms_eval.api.instance import Instance  # noqa: E402

from transformers_vpt.errors import VPTUserError  # noqa: E402
from transformers_vpt.integrations import LMMS_EVAL_CLASS, lmms_eval_manifest  # noqa: E402
from transformers_vpt.integrations.lmms_eval import (  # noqa: E402
    VPTLmms,
    cut_at,
    generation_settings,
    parse_model_args,
)
from transformers_vpt.pipeline import VPTPipeline, build_user_text  # noqa: E402
from transformers_vpt.regions import box_to_region_text  # noqa: E402
from transformers_vpt.tiny.assemble import build_tiny_qwen2_vl, build_tiny_vpt  # noqa: E402

SPAN = box_to_region_text((2, 3, 4, 5))
TASK, SPLIT = "vpt_local", "test"
QUESTIONS = ("What is in picture 0?", "Which colour is the corner?", "Is there a cat?", "What is written here?")
LMMS_EVAL = Path(sys.executable).with_name("lmms-eval")


def save_region_model(directory: Path) -> None:
    """A tiny VPT model whose round 1 in ``region`` mode is always `SPAN` (then EOS), saved with its processor.

    The saved generation config holds the script as a ``sequence_bias``: the span's first token after the end of the
    region trigger phrase and the chat template's assistant header, each next span token after the one before, EOS
    after the span. Round 2 (whose prompt ends in an image, not in the trigger) decodes the random model freely, so
    its answer depends on the crop it gets; `free` mode never sees the trigger.
    """
    model, processor = build_tiny_vpt(vision_encoder_ls=("clip",))
    tokenizer = processor.tokenizer
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": build_user_text("?", "region")}], add_generation_prompt=True
    )
    trigger_end = tokenizer.encode(prompt)[-14:]  # "... the question.<|im_end|>\n<|im_start|>assistant\n"
    span = tokenizer.encode(SPAN)
    script = [trigger_end + span[:1], *([a, b] for a, b in zip(span, span[1:])), [span[-1], tokenizer.eos_token_id]]
    model.generation_config.sequence_bias = [[tokens, 100.0] for tokens in script]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lmms") / "vpt"
    save_region_model(directory)
    return directory


@pytest.fixture(scope="module")
def images():
    return [tiny_image(84, 56 + 28 * i, seed=i) for i in range(len(QUESTIONS))]


def request(doc_id: int, gen_kwargs: dict, context: str | None = None) -> Instance:
    """A ``generate_until`` request of lmms-eval for document ``doc_id`` of the in-process task."""
    context = f"<image>\n{QUESTIONS[doc_id % len(QUESTIONS)]}" if context is None else context
    arguments = (context, dict(gen_kwargs), lambda doc: doc["visuals"], doc_id, TASK, SPLIT)
    return Instance("generate_until", arguments, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


# ------------------------------------------------------------------------------------------------- model arguments
@pytest.mark.parametrize(
    ("arg_string", "message"),
    [
        ("", "vpt model: no checkpoint given: add pretrained=DIR (a local checkpoint directory) to --model_args"),
        ("mode=region", "vpt model: no checkpoint given"),
        ("pretrained=DIR,mode=zoom", "vpt model: unknown mode 'zoom'; choose one of region, reencode, free"),
        ("pretrained=DIR,temperature=0.5", "vpt model: unknown model argument temperature; the vpt model takes"),
        ("pretrained=DIR,batch_size=0", "vpt model: batch_size must be an integer >= 1, got 0"),
        ("pretrained=DIR,batch_size=auto", "vpt model: batch_size 'auto' is not supported"),
        ("pretrained=DIR,dtype=int8", "vpt model: unknown dtype 'int8'; choose one of auto, bfloat16, float16"),
        ("pretrained=DIR,protocol=upstream", "vpt model: unknown protocol 'upstream'; choose one of project, released"),
        ("pretrained=DIR,on_error=skip", "vpt model: unknown on_error 'skip'"),
        ("pretrained=DIR,max_image_side=-1", "vpt model: max_image_side must be an integer >= 0"),
        ("pretrained=DIR,device=auto", "vpt model: device auto is not supported"),
        ("pretrained=DIR,device=gpu", "vpt model: unknown device 'gpu'; give cuda, cuda:N or cpu"),
        ("pretrained", "vpt model: --model_args must be key=value pairs separated by commas, got 'pretrained'"),
        ("pretrained=/no/such/dir", "model directory /no/such/dir does not exist"),
    ],
)
def test_model_argument_errors_are_one_line(arg_string, message, model_dir):
    with pytest.raises(VPTUserError) as raised:
        VPTLmms.create_from_arg_string(arg_string.replace("DIR", str(model_dir)), {"batch_size": 1})
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_model_arguments_and_defaults(model_dir):
    args = parse_model_args(pretrained=str(model_dir), batch_size="4", max_batch_size=None, device=None)
    assert (args.mode, args.batch_size, args.device, args.dtype, args.max_image_side) == (None, 4, None, "auto", 512)
    assert (args.protocol, args.on_error, args.seed) == ("project", "record", 0)
    # lmms-eval's --batch_size and --device arrive as extra config; the model arguments win
    lm = VPTLmms.create_from_arg_string(f"pretrained={model_dir},batch_size=3", {"batch_size": 1, "device": "cpu"})
    assert (lm.batch_size, lm.device, lm.mode, lm.rank, lm.world_size) == (3, torch.device("cpu"), "region", 0, 1)
    assert isinstance(lm.pipeline, VPTPipeline) and not lm.baseline


def test_a_plain_checkpoint_is_the_one_round_baseline(tmp_path):
    build_tiny_qwen2_vl(save_dir=tmp_path / "plain")
    lm = VPTLmms.create_from_arg_string(f"pretrained={tmp_path / 'plain'},device=cpu")
    assert lm.baseline and lm.mode == "free"
    with pytest.raises(VPTUserError, match=r"^vpt model: .* is a plain qwen2_vl checkpoint, .*not region$"):
        VPTLmms.create_from_arg_string(f"pretrained={tmp_path / 'plain'},mode=region,device=cpu")


@pytest.mark.parametrize(
    ("gen_kwargs", "settings", "stops", "ignored"),
    [
        ({"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0, "do_sample": False, "top_p": 1.0, "num_beams": 1},
         {"max_new_tokens": 16, "do_sample": False}, ["\n\n"], []),
        ({"temperature": 0.7, "top_p": 0.9, "top_k": 5}, {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                                        "top_k": 5}, [], []),
        ({"do_sample": True}, {"do_sample": True}, [], []),
        ({"do_sample": True, "temperature": 0.0}, {"do_sample": False}, [], []),  # temperature 0 is greedy
        ({"do_sample": False, "temperature": 0.2}, {"do_sample": False}, [], []),  # an explicit do_sample decides
        ({"until": "###", "num_beams": 3, "image_aspect_ratio": "pad"}, {"do_sample": False, "num_beams": 3},
         ["###"], ["image_aspect_ratio"]),
        ({"until": None, "repetition_penalty": 1.1}, {"do_sample": False, "repetition_penalty": 1.1}, [], []),
        (None, {"do_sample": False}, [], []),
    ],
)
def test_generation_settings(gen_kwargs, settings, stops, ignored):
    assert generation_settings(gen_kwargs) == (settings, stops, ignored)


def test_generation_setting_errors_and_stops():
    with pytest.raises(VPTUserError, match="^vpt model: generation_kwargs until must be a string or a list"):
        generation_settings({"until": 3})
    with pytest.raises(VPTUserError, match="^vpt model: generation_kwargs max_new_tokens must be an integer >= 1"):
        generation_settings({"max_new_tokens": 0})
    assert cut_at("yes\n\nbecause", ["\n\n", "ASSISTANT"]) == "yes"
    assert cut_at("a.b;c", [";", "."]) == "a"  # the first stop in the text, whichever stop it is
    assert cut_at("plain", ["\n\n"]) == cut_at("plain", []) == "plain"


# ------------------------------------------------------------------------------------------------- registration
def test_lmms_eval_finds_the_model_through_the_entry_point():
    (point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vpt"]
    assert point.value == "transformers_vpt.integrations:lmms_eval_manifest"
    assert lmms_eval_manifest().simple_class_path == LMMS_EVAL_CLASS
    from lmms_eval.models import get_model, list_available_models

    assert "vpt" in list_available_models()
    assert get_model("vpt") is VPTLmms


# ------------------------------------------------------------------------------------------------- requests in process
@pytest.fixture(scope="module")
def lm(model_dir, images):
    lm = VPTLmms.create_from_arg_string(f"pretrained={model_dir},batch_size=2,device=cpu")
    lm.task_dict = {TASK: {SPLIT: [{"visuals": [image]} for image in images]}}
    return lm


def test_generate_until_runs_both_rounds_in_batches(lm, images, monkeypatch):
    greedy = {"max_new_tokens": 7, "temperature": 0, "do_sample": False, "until": ["\n\n", "$"]}
    other = {"max_new_tokens": 6, "until": "\n\n"}  # room for the 6 tokens of the span in round 1
    requests = [request(0, greedy), request(1, greedy), request(3, other), request(2, greedy)]
    calls = spy_generate(lm.pipeline, monkeypatch)
    answers = lm.generate_until(requests)

    # requests with the same generation kwargs share batches of batch_size, in request order: [0, 1], [2], [3]
    batches = [(len(kw["input_ids"]), kw["max_new_tokens"]) for kw, _ in calls]
    assert batches == [(2, 7), (2, 7), (1, 7), (1, 7), (1, 6), (1, 6)]  # round 1 and round 2 of each batch
    pipe = VPTPipeline(lm.pipeline.model, lm.pipeline.processor)
    direct = {}
    for docs, kwargs in (([0, 1], {"max_new_tokens": 7}), ([2], {"max_new_tokens": 7}), ([3], {"max_new_tokens": 6})):
        results = pipe([images[d] for d in docs], [QUESTIONS[d] for d in docs], mode="region", generation_kwargs=kwargs)
        direct.update(zip(docs, results))
    assert all(result.action == "region" and result.round1_text == SPAN for result in direct.values())
    assert answers == [cut_at(direct[0].answer, ["\n\n", "$"]), cut_at(direct[1].answer, ["\n\n", "$"]),
                       cut_at(direct[3].answer, ["\n\n"]), cut_at(direct[2].answer, ["\n\n", "$"])]
    assert SPAN not in "".join(answers)  # the answers are round 2's, not round 1's span


def test_sampled_answers_do_not_depend_on_the_batch(lm, monkeypatch):
    sampled = {"max_new_tokens": 8, "temperature": 0.9, "top_k": 50}
    together = lm.generate_until([request(d, sampled) for d in range(4)])
    monkeypatch.setattr(lm, "args", dataclasses.replace(lm.args, batch_size=1))
    alone = lm.generate_until([request(d, sampled) for d in (2, 0, 3, 1)])
    assert [alone[1], alone[3], alone[0], alone[2]] == together


def test_requests_the_protocol_cannot_answer(lm, images):
    lm.task_dict["two"] = {SPLIT: [{"visuals": [images[0], images[1]]}, {"visuals": []}, {"visuals": ["clip.mp4"]}]}
    bad = [request(d, {"max_new_tokens": 8}) for d in range(3)]
    bad = [Instance("generate_until", r.args[:4] + ("two", SPLIT), idx=0, metadata=r.metadata) for r in bad]
    good = request(0, {"max_new_tokens": 8})
    answers = lm.generate_until([bad[0], good, bad[1], bad[2]])
    assert answers[0] == answers[2] == answers[3] == "" and answers[1]
    strict = VPTLmms.create_from_arg_string(f"pretrained={lm.args.pretrained},device=cpu,on_error=raise")
    strict.task_dict = lm.task_dict
    with pytest.raises(VPTUserError, match=r"^vpt model: two doc 0: it has 2 images; the VPT protocol answers one"):
        strict.generate_until([bad[0]])
    with pytest.raises(VPTUserError, match=r"^vpt model: two doc 2: it holds a video \(clip.mp4\)"):
        strict.generate_until([bad[2]])


def test_what_the_protocol_does_not_do_is_refused_in_one_line(lm):
    with pytest.raises(NotImplementedError, match=r"^vpt model: loglikelihood requests .* run generate_until tasks$"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match=r"^vpt model: multi-round tasks are not supported"):
        lm.generate_until_multi_round([])
    with pytest.raises(NotImplementedError, match=r"^vpt model: --apply_chat_template is not supported"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------------- the lmms-eval CLI
NO_NETWORK = '''
"""Installed by tests/test_lmms_eval.py: every name lookup or connection beyond this machine is logged and refused."""
import os
import socket
import traceback

_LOG = os.environ["VPT_TEST_NETWORK_LOG"]
_LOCAL = (None, "", "localhost", "::1")
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect


def _refuse(what):
    with open(_LOG, "a") as log:
        log.write(what + "\\n" + "".join(traceback.format_stack(limit=30)) + "\\n")
    raise OSError("network refused by the test: " + what)


def getaddrinfo(host, *args, **kwargs):
    if host in _LOCAL or str(host).startswith("127."):
        return _getaddrinfo(host, *args, **kwargs)
    _refuse(f"name lookup of {host!r}")


def connect(self, address, *args):
    host = address[0] if isinstance(address, tuple) else None
    if self.family == socket.AF_UNIX or host in _LOCAL or str(host).startswith("127."):
        return _connect(self, address, *args)
    _refuse(f"connection to {address!r}")


socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
open(_LOG + ".on", "w").close()  # the test checks that the guard ran
'''

TASK_YAML = """task: vpt_local
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function vpt_local_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow  # lmms-eval starts in about 15 s on a CPU (it imports its metrics and indexes ~2000 task files)
def test_lmms_eval_cli_runs_the_two_round_protocol_offline(model_dir, images, tmp_path):
    import datasets

    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"image{i}.png"))
        image.save(paths[-1])
    records = {"image": paths, "question": list(QUESTIONS), "answer": ["red"] * len(paths)}
    datasets.Dataset.from_dict(records).cast_column("image", datasets.Image()).to_parquet(tmp_path / "test.parquet")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "vpt_local.yaml").write_text(TASK_YAML.format(data=tmp_path / "test.parquet"))
    (tasks / "vpt_local_utils.py").write_text("def doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n")
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    network_log = tmp_path / "network.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LMMS_EVAL_", "HF_", "WANDB"))}
    env |= {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
        "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")])),
        "VPT_TEST_NETWORK_LOG": str(network_log),
    }
    out = tmp_path / "out"
    done = subprocess.run(
        [str(LMMS_EVAL), "--model", "vpt", "--model_args", f"pretrained={model_dir},mode=region,device=cpu",
         "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "2", "--log_samples",
         "--output_path", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "Error during evaluation" not in log, log[-3000:]
    assert Path(f"{network_log}.on").exists() and not network_log.exists(), network_log.read_text()
    (results_file,) = out.glob("*/*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "vpt" and "exact_match,none" in results["results"][TASK]
    (samples_file,) = out.glob(f"*/*_samples_{TASK}.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(QUESTIONS)))

    # The same records through VPTPipeline, greedy, in lmms-eval's batches of two
    pipe = VPTPipeline.from_pretrained(model_dir, device="cpu")
    direct = pipe(paths, list(QUESTIONS), mode="region", batch_size=2, generation_kwargs={"max_new_tokens": 6})
    assert all(result.action == "region" and result.round1_text == SPAN for result in direct)
    assert [s["filtered_resps"] for s in samples] == [cut_at(result.answer, ["\n\n"]) for result in direct]
    assert len({result.answer for result in direct}) > 1  # round 2 saw each record's own crop
