"""The ``vpt`` model of lmms-eval: lmms-eval's image tasks answered with the two-round VPT protocol.

::

    lmms-eval --model vpt --model_args pretrained=/models/Qwen2-VL-2b-VPT-Det,mode=region \\
        --tasks pope,textvqa_val --batch_size 8 --log_samples --output_path outputs/lmms
    accelerate launch --num_processes 8 -m lmms_eval --model vpt --model_args pretrained=DIR,mode=region ...

lmms-eval 0.7 finds the model through this package's ``lmms_eval.models`` entry point
(`transformers_vpt.integrations.lmms_eval_manifest`); nothing of lmms-eval is patched. Install it with the ``lmms``
extra. Every ``generate_until`` request is one record of `VPTPipeline`: the task's prompt (``<image>`` tags removed)
is the question, user text, with the trigger phrase of ``mode`` after it; the document's one image is the image.
Round 1 answers, its perception tokens pick the route, round 2 answers with the region crops or the re-encoded image
(`transformers_vpt.pipeline`), and the final answer, cut at the task's ``until`` strings, is the response lmms-eval
scores. A plain base checkpoint (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) runs as the one-round baseline
(`BaselinePipeline`, mode ``free``), so a VPT model and its base are compared on the same tasks by the same code.

Model arguments (``--model_args key=value,...``; a wrong one stops the run with one line naming it):

=================  ==================================================================================================
``pretrained``     the local checkpoint directory (required); nothing is downloaded
``mode``           ``region`` (the default for VPT models), ``reencode`` or ``free`` (no trigger phrase; the only mode
                   of a plain base checkpoint, and its default)
``batch_size``     records per generation batch (default 1); lmms-eval's ``--batch_size`` sets it too, the model
                   argument wins
``device``         ``cuda``, ``cuda:1``, ``cpu``, ... (default: ``cuda`` when there is one); under ``accelerate
                   launch`` every process uses its own device and answers its share of the requests
``dtype``          ``auto`` (the checkpoint's, the default), ``bfloat16``, ``float16`` or ``float32``
``max_image_side`` long-side cap of images and crops before the processor (512, the released ``image_resolution``;
                   0 for none)
``protocol``       ``project`` (the default) or ``released``: how round-1 text is routed at the edges; a record the
                   released protocol drops gets an empty answer (lmms-eval scores every record)
``on_error``       ``record`` (the default: a record that cannot be answered gets an empty answer and a warning) or
                   ``raise``
``seed``           seed of sampled answers (default 0): a record draws from its own generator, seeded with
                   ``seed + doc_id``, so its answer does not depend on its batch or on the number of processes
=================  ==================================================================================================

Generation follows the task's ``generation_kwargs``: ``max_new_tokens`` (per round; default 128), ``temperature``
(above 0 samples, 0 is greedy), ``do_sample``, ``top_p``, ``top_k``, ``num_beams``, ``repetition_penalty``; ``until``
cuts the final answer (not round 1, whose perception tokens must reach the router whole). Other keys are ignored
with a warning. ``loglikelihood`` requests (multiple-choice and perplexity tasks), multi-round tasks and
``--apply_chat_template`` are not part of the protocol and stop with one line.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from loguru import logger as eval_logger
from PIL import Image
from tqdm.auto import tqdm

from ..errors import VPTUserError, one_line
from ..images import IMAGE_RESOLUTION
from ..pipeline import BASELINE_MODEL_TYPES, MODES, ON_ERROR, PROTOCOLS, load_pipeline, model_type_of
from ..vocabulary import IMAGE_PLACEHOLDER

__all__ = ["MODEL_ARGS", "VPTLmms", "VPTModelArgs", "cut_at", "generation_settings", "parse_model_args"]

MODEL_ARGS = ("pretrained", "mode", "batch_size", "device", "dtype", "max_image_side", "protocol", "on_error", "seed")
"""The ``--model_args`` keys of the ``vpt`` model."""
DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                   "repetition_penalty")
"""The task ``generation_kwargs`` the model follows; others are ignored with a warning."""
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v")
_NOT_DATA_PARALLEL = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
_PREFIX = "vpt model: "


def _error(message: str) -> VPTUserError:
    return VPTUserError(_PREFIX + message)


@dataclass(frozen=True)
class VPTModelArgs:
    """The checked model arguments of one ``vpt`` model (see the module docstring for each field)."""

    pretrained: str
    mode: str | None = None
    batch_size: int = 1
    device: str | None = None
    dtype: str = "auto"
    max_image_side: int = IMAGE_RESOLUTION
    protocol: str = "project"
    on_error: str = "record"
    seed: int = 0


def _int_arg(name: str, value: Any, low: int) -> int:
    """``value`` (an int, or a string lmms-eval did not turn into one) as an int >= ``low``; one line otherwise."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _error(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _error(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def parse_model_args(**kwargs: Any) -> VPTModelArgs:
    """The checked `VPTModelArgs` of ``--model_args`` values; a `VPTUserError` naming the first wrong one.

    Only the arguments are checked here (no file is read): ``pretrained`` must be given, the others must be known
    and valid. Whether ``mode`` suits the checkpoint is checked when the model loads.
    """
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    kwargs.pop("max_batch_size", None)  # lmms-eval's --max_batch_size serves --batch_size auto only
    unknown = sorted(set(kwargs) - set(MODEL_ARGS))
    if unknown:
        raise _error(f"unknown model argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                     f"the vpt model takes {', '.join(MODEL_ARGS)}")
    pretrained = kwargs.get("pretrained")
    if pretrained in (None, ""):
        raise _error("no checkpoint given: add pretrained=DIR (a local checkpoint directory) to --model_args")
    if isinstance(kwargs.get("batch_size"), str) and kwargs["batch_size"].startswith("auto"):
        raise _error(f"batch_size {kwargs['batch_size']!r} is not supported; give a number of records per batch")
    if str(kwargs.get("device", "")).startswith("auto"):
        raise _error("device auto is not supported: one process holds one whole model; give cuda, cuda:N or cpu "
                     "(accelerate launch runs one process per device)")
    if "device" in kwargs:
        try:
            torch.device(str(kwargs["device"]))
        except (RuntimeError, ValueError):
            raise _error(f"unknown device {kwargs['device']!r}; give cuda, cuda:N or cpu") from None
    return VPTModelArgs(
        pretrained=str(pretrained),
        mode=None if "mode" not in kwargs else _choice("mode", kwargs["mode"], MODES),
        batch_size=_int_arg("batch_size", kwargs.get("batch_size", 1), 1),
        device=None if "device" not in kwargs else str(kwargs["device"]),
        dtype=_choice("dtype", kwargs.get("dtype", "auto"), tuple(DTYPES)),
        max_image_side=_int_arg("max_image_side", kwargs.get("max_image_side", IMAGE_RESOLUTION), 0),
        protocol=_choice("protocol", kwargs.get("protocol", "project"), PROTOCOLS),
        on_error=_choice("on_error", kwargs.get("on_error", "record"), ON_ERROR),
        seed=_int_arg("seed", kwargs.get("seed", 0), 0),
    )


def generation_settings(gen_kwargs: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str], list[str]]:
    """A task's ``generation_kwargs`` as `VPTPipeline.run` ``generation_kwargs``, the ``until`` stop strings, and
    the keys that were ignored.

    ``temperature`` above 0 samples and 0 is greedy; ``do_sample``, when the task gives it, decides (a sampled run
    still needs a temperature above 0, or none). ``top_p``/``top_k`` apply to sampling only. ``max_new_tokens`` is
    the limit of each round.
    """
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    if until is None:
        stops = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
        stops = list(until)
    else:
        raise _error(f"generation_kwargs until must be a string or a list of strings, got {until!r}")
    settings: dict[str, Any] = {}
    if kwargs.get("max_new_tokens") is not None:
        settings["max_new_tokens"] = _int_arg("generation_kwargs max_new_tokens", kwargs["max_new_tokens"], 1)
    temperature = kwargs.pop("temperature", None)
    temperature = None if temperature is None else float(temperature)
    do_sample = kwargs.pop("do_sample", None)
    if do_sample is None:
        sample = temperature is not None and temperature > 0
    else:
        sample = bool(do_sample) and (temperature is None or temperature > 0)
    settings["do_sample"] = sample
    top_p, top_k = kwargs.pop("top_p", None), kwargs.pop("top_k", None)
    if sample:
        if temperature is not None:
            settings["temperature"] = temperature
        if top_p is not None:
            settings["top_p"] = float(top_p)
        if top_k is not None:
            settings["top_k"] = _int_arg("generation_kwargs top_k", top_k, 1)
    num_beams = kwargs.pop("num_beams", None)
    if num_beams is not None and _int_arg("generation_kwargs num_beams", num_beams, 1) > 1:
        settings["num_beams"] = int(num_beams)
    if kwargs.get("repetition_penalty") is not None:
        settings["repetition_penalty"] = float(kwargs["repetition_penalty"])
    ignored = sorted(key for key in kwargs if key not in GENERATION_KEYS)
    return settings, [stop for stop in stops if stop], ignored


def cut_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first of the ``stops`` strings it holds (the whole text when it holds none)."""
    return text[: min((text.find(stop) for stop in stops if stop in text), default=len(text))]


def _generation_key(gen_kwargs: Any) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=repr)


def _visuals(value: Any) -> list[Any]:
    """A document's visuals as a flat list (lmms-eval's ``doc_to_visual`` gives None, one item, or nested lists)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        return [value]
    return [item for entry in value for item in _visuals(entry)]


def _one_image(visuals: list[Any]) -> Image.Image | str:
    """The one image of a document; a `VPTUserError` saying why the document has none the protocol can use."""
    images = []
    for visual in visuals:
        if isinstance(visual, (str, os.PathLike)) and os.fspath(visual).lower().endswith(VIDEO_SUFFIXES):
            raise VPTUserError(f"it holds a video ({os.fspath(visual)}); the vpt model answers questions about images")
        if not isinstance(visual, (Image.Image, str, os.PathLike)):
            raise VPTUserError(f"it holds a {type(visual).__name__} visual; the vpt model answers about images")
        images.append(visual)
    if len(images) != 1:
        raise VPTUserError(f"it has {len(images)} images; the VPT protocol answers one image per question")
    return images[0]


def question_of(context: Any) -> str:
    """The question of a request's context: the task's prompt without lmms-eval's ``<image>`` tags (the pipeline
    places the image itself)."""
    if not isinstance(context, str):
        raise VPTUserError(f"its context is a {type(context).__name__}, not a text prompt")
    return context.replace(IMAGE_PLACEHOLDER, "").strip()


class VPTLmms(lmms):
    """lmms-eval's ``vpt`` model: ``generate_until`` requests answered by `VPTPipeline` (or `BaselinePipeline` for a
    plain base checkpoint), batched, data parallel under ``accelerate launch``.

    Args: the model arguments of the module docstring (`parse_model_args`).
    """

    is_simple = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        args = parse_model_args(**kwargs)
        model_type = model_type_of(args.pretrained)
        self.baseline = model_type in BASELINE_MODEL_TYPES
        mode = args.mode or ("free" if self.baseline else "region")
        if self.baseline and mode != "free":
            raise _error(f"{args.pretrained} is a plain {model_type} checkpoint, the one-round baseline without "
                         f"perception tokens: leave mode out or give mode=free, not {mode}")
        self.args, self.mode = args, mode

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            if accelerator.distributed_type in _NOT_DATA_PARALLEL:
                raise _error(f"accelerate runs {accelerator.distributed_type.value}, but the vpt model runs data "
                             "parallel (one whole model per process); launch with plain `accelerate launch "
                             "--multi_gpu --num_processes N`")
            device: str | torch.device = accelerator.device
            self.accelerator = accelerator
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
            if accelerator.is_local_main_process:
                eval_logger.info(f"vpt: {accelerator.num_processes} processes, data parallel")
                if args.device is not None:
                    eval_logger.warning(f"vpt: device={args.device} ignored: each process uses its own device")
        else:
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        self.pipeline = load_pipeline(args.pretrained, dtype=DTYPES[args.dtype], device=self._device)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VPTLmms:
        """The model of ``--model_args`` (``key=value,...``) and lmms-eval's ``--batch_size``/``--device``; the model
        arguments win where both give a value."""
        try:
            args = simple_parse_args_string(arg_string or "")
        except ValueError as error:
            raise _error(f"--model_args must be key=value pairs separated by commas, got {arg_string!r} "
                         f"({one_line(error)})") from None
        harness = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**{**harness, **args})

    @property
    def model(self):
        return self.pipeline.model

    @property
    def tokenizer(self):
        return self.pipeline.processor.tokenizer

    @property
    def config(self):
        return self.pipeline.model.config

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def clean(self) -> None:
        """Free the model once lmms-eval has every answer (its metrics, and a local judge for them, run next)."""
        self.__dict__.pop("pipeline", None)
        super().clean()

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "vpt model: loglikelihood requests (multiple-choice and perplexity tasks) are not part of the two-round "
            "VPT protocol; run generate_until tasks"
        )

    def apply_chat_template(self, chat_history, *args, **kwargs) -> str:
        """Refused: lmms-eval calls it for ``--apply_chat_template``, but the VPT processor writes the chat turns."""
        raise NotImplementedError(
            "vpt model: --apply_chat_template is not supported: the VPT processor writes the chat turns and the "
            "trigger phrase itself; leave the flag out"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "vpt model: multi-round tasks are not supported (the VPT protocol runs its own two rounds); run "
            "generate_until tasks"
        )

    def generate_until(self, requests) -> list[str]:
        """The final answer of every request; requests with the same generation kwargs share batches."""
        answers: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(_generation_key(request.args[1]), []).append(index)
        actions: Counter[str] = Counter()
        progress = tqdm(total=len(requests), desc="VPT", disable=self.rank != 0)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            settings, stops, ignored = generation_settings(gen_kwargs)
            if ignored and self.rank == 0:
                eval_logger.warning(f"vpt: generation_kwargs {', '.join(ignored)} ignored (not generation settings "
                                    f"the vpt model follows: {', '.join(GENERATION_KEYS)})")
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, (answer, action) in zip(chunk, self._answer([requests[i] for i in chunk], settings)):
                    answers[index] = cut_at(answer, stops)
                    actions[action] += 1
                    self.cache_hook.add_partial("generate_until", (requests[index].args[0], gen_kwargs), answers[index])
                progress.update(len(chunk))
        progress.close()
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        eval_logger.info(f"vpt{where}: round-1 actions: " + ", ".join(f"{k} {n}" for k, n in sorted(actions.items())))
        return answers

    def _answer(self, requests, settings: dict[str, Any]) -> list[tuple[str, str]]:
        """(answer, action) of each request of one batch; a request without one usable image is an error."""
        out: list[tuple[str, str]] = [("", "error")] * len(requests)
        slots, images, questions, seeds = [], [], [], []
        for k, request in enumerate(requests):
            context, _, doc_to_visual, doc_id, task, split = request.args
            try:
                question = question_of(context)
                image = _one_image(_visuals(doc_to_visual(self.task_dict[task][split][doc_id])))
            except VPTUserError as error:
                self._unanswered(task, doc_id, str(error))
                continue
            slots.append(k)
            questions.append(question)
            images.append(image)
            seeds.append(self.args.seed + doc_id if isinstance(doc_id, int) and doc_id >= 0 else None)
        if not slots:
            return out
        sampled = settings["do_sample"] and settings.get("num_beams", 1) == 1 and None not in seeds
        results = self.pipeline(
            images,
            questions,
            mode=self.mode,
            batch_size=len(slots),
            max_image_side=self.args.max_image_side,
            generation_kwargs=settings,
            progress=False,
            seeds=seeds if sampled else None,
            on_error=self.args.on_error,
            protocol=self.args.protocol,
        )
        for k, result in zip(slots, results):
            _, _, _, doc_id, task, _ = requests[k].args
            if result.error is not None:
                self._unanswered(task, doc_id, result.error)
            elif result.dropped is not None:
                eval_logger.warning(f"vpt: {task} doc {doc_id} dropped by the released protocol ({result.dropped}); "
                                    "its answer is empty")
                out[k] = ("", "dropped")
            else:
                out[k] = (result.answer, result.action)
        return out

    def _unanswered(self, task: str, doc_id: Any, reason: str) -> None:
        message = f"{task} doc {doc_id}: {reason}"
        if self.args.on_error == "raise":
            raise _error(message)
        eval_logger.warning(f"vpt: {message}; its answer is empty (on_error=raise stops instead)")
