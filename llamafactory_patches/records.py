"""Record checks and record ids: a `vpt_qwen2_vl` run refuses bad records before tokenisation, and a batch that
fails in the model names the dataset records it came from.

* **Checks.** When a dataset of a `vpt_qwen2_vl` run is loaded (`loader._load_single_dataset`), every record is
  checked right after `datasets.load_dataset` returns it: before `num_samples` picks from it, before a streamed
  recipe (`streaming: true` on a file) turns it into an iterable dataset, and before `align_dataset` (other sources:
  right before `align_dataset`). A record is read as a released-format record (`record_view`, through the dataset's
  `dataset_info.json` columns and tags) and checked with `transformers_vpt.records.record_problems`, the rules of
  `scripts/prepare_data.py`, with the branches, projector scale and pass count of the model being trained
  (`record_rules`). Bad records raise one `VPTUserError` naming the dataset file, the record indices and the
  problems; `vpt_skip_bad_records: true` drops them and logs how many and which. No files are opened here (the
  plugin names a missing or unreadable image when it loads it); prepare_data.py checks the files.
* **Record ids.** Each record gets a `_vpt_record` column ``[source key, index in the file]``, carried by the
  converter and the dataset processor (as `vpt_record`) and batched by the collator as a (batch, 2) tensor; the
  trainer pops it before the forward and, when the forward raises `ValueError` ("Sample i ..."), raises again
  naming the records (`batch_error`). Ints, not strings, so that the batch stays a dict of tensors (accelerate's
  batch dispatching, device moves); `SOURCES` maps the key (a CRC-32 of the dataset label) back to the label in
  every process that loaded the dataset.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any

import datasets
from datasets import Dataset, IterableDataset
from llamafactory.data import converter, loader
from llamafactory.extras import logging
from llamafactory.model import loader as model_loader

from transformers_vpt.errors import VPTUserError
from transformers_vpt.models.vpt.configuration_vpt import VPTConfigMixin
from transformers_vpt.records import record_problems

from .data import EXTRA_IMAGE_KEYS, RECORD_COLUMN, stock_formatting, vpt_formatting
from .guard import Private
from .plugin import VPT_TEMPLATES

logger = logging.get_logger(__name__)

BATCH_KEY = "vpt_record"
"""Tokenised dataset column and batch key: the same pair, a (batch, 2) tensor in a batch."""
SOURCES: dict[int, str] = {}
"""Source key -> dataset label (the file path), for every dataset this process checked."""
MAX_LISTED = 3
"""Bad records spelled out in an error or a skip report (the count covers all of them)."""


# ---------------------------------------------------------------------------------------------- record names
def dataset_label(dataset_attr, data_args) -> str:
    """The dataset's file (``dataset_dir/file_name``), or its hub/script name."""
    if dataset_attr.load_from == "file" and isinstance(data_args.dataset_dir, str):
        return os.path.join(data_args.dataset_dir, dataset_attr.dataset_name)
    return str(dataset_attr.dataset_name)


def source_key(label: str) -> int:
    """A stable int for ``label`` (the same in every process), registered in `SOURCES`."""
    key = zlib.crc32(label.encode("utf-8")) & 0x7FFFFFFF
    SOURCES[key] = label
    return key


def record_name(key: int, index: int) -> str:
    """``"path/file.json[index]"``, as scripts/prepare_data.py names records."""
    return f"{SOURCES.get(key, f'dataset #{key}')}[{index}]"


# ---------------------------------------------------------------------------------------------- record view
def _sharegpt_messages(example: dict, attr) -> Any:
    messages = example.get(attr.messages)
    if not isinstance(messages, list):
        return messages
    roles = {attr.user_tag: "user", attr.assistant_tag: "assistant", attr.system_tag: "system"}
    view = [
        {"role": roles.get(m.get(attr.role_tag), m.get(attr.role_tag)), "content": m.get(attr.content_tag)}
        if isinstance(m, dict)
        else m
        for m in messages
    ]
    system = example.get(attr.system) if attr.system else None
    return ([{"role": "system", "content": system}] if system else []) + view


def _alpaca_messages(example: dict, attr) -> list[dict]:
    messages = [{"role": "system", "content": example[attr.system]}] if attr.system and example.get(attr.system) else []
    history = example.get(attr.history) if attr.history else None
    for old_prompt, old_response in history if isinstance(history, list) else []:
        messages += [{"role": "user", "content": old_prompt}, {"role": "assistant", "content": old_response}]
    query = [example[column] for column in (attr.prompt, attr.query) if column and example.get(column)]
    messages.append({"role": "user", "content": "\n".join(query)})
    messages.append({"role": "assistant", "content": example.get(attr.response) if attr.response else None})
    return messages


def record_view(example: dict[str, Any], dataset_attr) -> dict[str, Any]:
    """A raw dataset row as a released-format record: ``messages`` with user/assistant/system roles (through the
    dataset's columns and tags) and the four image columns (absent columns read as no images)."""
    if stock_formatting(dataset_attr.formatting) == "alpaca":
        messages = _alpaca_messages(example, dataset_attr)
    else:  # sharegpt, openai
        messages = _sharegpt_messages(example, dataset_attr)
    record = {"messages": messages}
    for key in ("images", *EXTRA_IMAGE_KEYS):
        column = getattr(dataset_attr, key, None)
        value = example.get(column) if column else None
        record[key] = [value] if isinstance(value, str) else value
    return record


def record_rules(model_args) -> dict[str, Any]:
    """`record_problems` options for the model of this run: YAML values first, then the checkpoint's config."""
    if model_args is None:
        return {"actions_per_image": None}
    names = ("vision_encoder_ls", "projector_scale", "num_inner_forward_run")
    values = {name: getattr(model_args, name, None) for name in names}
    if None in values.values():
        config = model_loader.load_config(model_args)
        if isinstance(config, VPTConfigMixin):
            values = {name: getattr(config, name) if value is None else value for name, value in values.items()}
    return {
        "branches": values["vision_encoder_ls"],
        "actions_per_image": values["projector_scale"],
        "require_actions": values["num_inner_forward_run"] == 2,
    }


# ---------------------------------------------------------------------------------------------- checks
def _rows(dataset: Dataset, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter(batch_size=batch_size):
        yield from (dict(zip(batch, values)) for values in zip(*batch.values()))


def _source_indices(dataset: Dataset) -> list[int] | range:
    """Each row's index in the loaded file(s): `num_samples` selects rows through an indices mapping."""
    indices = getattr(dataset, "_indices", None)  # datasets' mapping of a non-contiguous `select`
    return range(len(dataset)) if indices is None else indices.column(0).to_pylist()


def _listing(label: str, bad: list[tuple[int, list[str]]]) -> str:
    shown = "; ".join(f"{label}[{index}]: {' / '.join(problems)}" for index, problems in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return shown + more


def bad_records_error(label: str, bad: list[tuple[int, list[str]]], total: int | None = None) -> VPTUserError:
    """One error for the bad records ``[(index, problems)]`` of a dataset (the first `MAX_LISTED` spelled out)."""
    if total is None:
        head = f"A record of {label} breaks the VPT record rules"
    else:
        head = f"{len(bad)} of {total} records of {label} break the VPT record rules"
    return VPTUserError(
        f"{head} (stopped before training): {_listing(label, bad)}. "
        "Fix them (scripts/prepare_data.py lists every problem) or set `vpt_skip_bad_records: true` to train "
        "without them."
    )


def check_dataset(dataset: Dataset, dataset_attr, data_args, rules: dict[str, Any]) -> Dataset:
    """Every record checked; bad ones raise (or are dropped with ``vpt_skip_bad_records``); ids added."""
    label = dataset_label(dataset_attr, data_args)
    indices = _source_indices(dataset)
    bad_rows = {
        row: problems
        for row, example in enumerate(_rows(dataset))
        if (problems := record_problems(record_view(example, dataset_attr), **rules))
    }
    bad = [(indices[row], problems) for row, problems in bad_rows.items()]
    if bad and not getattr(data_args, "vpt_skip_bad_records", False):
        raise bad_records_error(label, bad, len(dataset))
    key = source_key(label)
    dataset = dataset.add_column(RECORD_COLUMN, [[key, index] for index in indices])
    if bad:
        first = [index for index, _ in bad[:20]]
        logger.warning_rank0(
            f"Skipped {len(bad)} of {len(indices)} records of {label} that break the VPT record rules "
            f"(vpt_skip_bad_records), indices {first}{' ...' if len(bad) > 20 else ''}: {_listing(label, bad)}"
        )
        dataset = dataset.select([row for row in range(len(indices)) if row not in bad_rows])
    return dataset


def check_stream(dataset: IterableDataset, dataset_attr, data_args, rules: dict[str, Any]) -> IterableDataset:
    """The streaming variant: records are checked as they stream by (an error stops the run at that record)."""
    label = dataset_label(dataset_attr, data_args)
    key = source_key(label)
    skip = getattr(data_args, "vpt_skip_bad_records", False)

    def check(example: dict[str, Any], index: int) -> dict[str, Any]:
        problems = record_problems(record_view(example, dataset_attr), **rules)
        if problems and not skip:
            raise bad_records_error(label, [(index, problems)])
        if problems:
            logger.warning_rank0(f"Skipped {label}[{index}] (vpt_skip_bad_records): {' / '.join(problems)}")
        return {RECORD_COLUMN: [key, index], "_vpt_keep": not problems}

    dataset = dataset.map(check, with_indices=True)
    return dataset.filter(lambda example: example["_vpt_keep"]).remove_columns("_vpt_keep")


@dataclass
class _Loading:
    """The dataset `_load_single_dataset` is loading, for the hooks inside it (LLaMA-Factory passes them less)."""

    dataset_attr: Any
    model_args: Any
    data_args: Any
    checked: bool = False

    def check(self, dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
        rules = record_rules(self.model_args)
        check = check_stream if isinstance(dataset, IterableDataset) else check_dataset
        self.checked = True
        return check(dataset, self.dataset_attr, self.data_args, rules)


_LOADING: ContextVar[_Loading | None] = ContextVar("vpt_loading", default=None)


def _wrap_load_single_dataset(load_single_dataset):
    r"""A `vpt_qwen2_vl` run loads each dataset through its VPT formatting (`data.vpt_formatting`) and checks its
    records (the hooks below); any other run calls the stock function unchanged."""

    @wraps(load_single_dataset)
    def wrapper(dataset_attr, model_args, data_args, training_args):
        if data_args.template not in VPT_TEMPLATES:
            return load_single_dataset(dataset_attr, model_args, data_args, training_args)
        dataset_attr.formatting = vpt_formatting(dataset_attr.formatting)
        token = _LOADING.set(_Loading(dataset_attr, model_args, data_args))
        try:
            return load_single_dataset(dataset_attr, model_args, data_args, training_args)
        finally:
            _LOADING.reset(token)

    return wrapper


def _wrap_load_dataset(load_dataset):
    r"""`datasets.load_dataset` as the loader calls it for files, scripts and the HF hub: the records are checked
    as loaded, before `num_samples` picks from them and before a streamed recipe (`streaming: true` on a file)
    turns them into an iterable dataset, so a bad record of a streamed file stops the run before training too."""

    @wraps(load_dataset)
    def wrapper(*args, **kwargs):
        dataset = load_dataset(*args, **kwargs)
        loading = _LOADING.get()
        if loading is not None and not loading.checked and isinstance(dataset, (Dataset, IterableDataset)):
            dataset = loading.check(dataset)
        return dataset

    return wrapper


def _wrap_align_dataset(align_dataset):
    r"""The other sources (ModelScope, Modelers, cloud files) are checked right before their conversion."""

    @wraps(align_dataset)
    def wrapper(dataset, dataset_attr, data_args, training_args):
        loading = _LOADING.get()
        if loading is not None and not loading.checked:
            dataset = loading.check(dataset)
        return align_dataset(dataset, dataset_attr, data_args, training_args)

    return wrapper


# ---------------------------------------------------------------------------------------------- batch errors
def batch_error(error: ValueError, record_ids) -> ValueError:
    """``error`` (raised by the forward of a batch) again, naming the dataset record of its "Sample i"."""
    names = [record_name(key, index) for key, index in record_ids.tolist()]
    match = re.search(r"\bSample (\d+)\b", str(error))
    row = int(match.group(1)) if match else None
    if row is not None and row < len(names):
        where = f"dataset record {names[row]} (batch row {row} of {names})"
    else:
        where = f"a batch of dataset records {names}"
    return ValueError(f"{error} -- in {where}; check it with scripts/prepare_data.py or leave it out")


@contextmanager
def naming_records(record_ids) -> Iterator[None]:
    """Re-raise a `ValueError` of the block with the batch's record names (`batch_error`); no cost otherwise."""
    try:
        yield
    except ValueError as error:
        if record_ids is None:
            raise
        raise batch_error(error, record_ids) from error


_SPLIT = ("dataset", "dataset_attr", "data_args", "training_args")
PRIVATE = (
    Private(loader, "_load_single_dataset", ("dataset_attr", "model_args", "data_args", "training_args"),
            patch="record checks"),
    Private(loader, "load_dataset", expected=datasets.load_dataset, patch="record checks"),
    Private(loader, "align_dataset", _SPLIT, expected=converter.align_dataset, patch="record checks"),
    Private(model_loader, "load_config", ("model_args",), patch="record rules"),
)


def patch() -> None:
    loader._load_single_dataset = _wrap_load_single_dataset(loader._load_single_dataset)
    loader.load_dataset = _wrap_load_dataset(loader.load_dataset)
    loader.align_dataset = _wrap_align_dataset(loader.align_dataset)
