"""Evaluate VPT models and plain base-model baselines on the released VPT test splits.

A VPT model of any base (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) answers in two rounds
(`transformers_vpt.pipeline.VPTPipeline`): round 1 on the record's first user turn and first image, round 2 on the
region crops or the re-encoded image its perception tokens ask for. A plain base checkpoint (config ``model_type``
``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``: the bases of `transformers_vpt.models.bases`) is the baseline: one round,
the trigger phrase removed.
Answers are scored with the judge-free metric of each dataset and, given ``--judge-base-url``, by the LLM judge.

Runs are resumable: every batch of answers is appended to ``answers.jsonl`` and synced; a rerun with the same
settings answers only the missing records, then rescores everything (judge replies are cached). Sampling draws each
record from its own generator (seed + record index), so a resumed run gives the answers of an uninterrupted one
whatever the batch boundaries. One run at a time writes into an output directory (it holds ``<output-dir>/.lock``).

Data parallel: under ``torchrun --nproc-per-node N`` or ``accelerate launch`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)
every rank loads the models on its own device (``cuda:LOCAL_RANK``, or the CPU) and answers the records whose index
mod N is its rank, appending to ``answers.rank<R>-of-<N>.jsonl``; rank 0 waits for the others' done markers (files,
no torch.distributed collective), merges the shards into ``answers.jsonl``, scores once and writes the reports.
Answers equal those of one process, and a run killed on any rank resumes with any N (`parallel` has the rules).

``--protocol released`` routes round-1 text and scores as the released evaluation did, to reproduce the published
table like for like (`transformers_vpt.pipeline.route`): region spans by the released regex (``<|x_8|>`` makes a span
no region, an x-only span is one), the released crop box as is, a record whose crop cannot be built dropped from
scoring (listed in problems.json), and the released judge score rule unless ``--judge-score-rule`` is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from transformers_vpt.errors import DEBUG_ENV, VPTUserError, one_line, run_cli
from transformers_vpt.files import write_json
from transformers_vpt.images import ImageLoadError, load_image
from transformers_vpt.pipeline import (
    BASELINE_MODEL_TYPES,
    PROTOCOLS,
    VPT_MODEL_TYPES,
    VPTPipeline,
    VPTResult,
    model_type_of,
)

from .baseline import BaselinePipeline
from .datasets import (
    MODES,
    RELEASED_TEST_SETS,
    TEST_SPLIT_GLOB,
    DatasetError,
    Item,
    find_datasets,
    load_records,
    prepare_items,
    prompt_for_mode,
)
from .judge import SCORE_RULES, JudgeClient
from .parallel import RankError, Ranks, RunLock, merge_shards, read_answers, run_lock
from .report import write_reports
from .scoring import score
from .storage import (
    AnswerLog,
    OutputDirError,
    name_problem,
    output_path,
    prepare_output_dir,
    read_json,
)

logger = logging.getLogger("transformers_vpt.evaluation")
"""The evaluation's logger; its modules' loggers are its children, so `_logging_to` gets their messages too."""

MODEL_KINDS = {**dict.fromkeys(BASELINE_MODEL_TYPES, "baseline"), **dict.fromkeys(VPT_MODEL_TYPES, "vpt")}
"""How each ``model_type`` is evaluated: a plain base model as the one-round baseline, a VPT model in two rounds."""


class ConfigError(VPTUserError):
    """A usage error found after parsing (models, data, settings of an earlier run); exit status 2."""


@dataclass
class EvalConfig:
    """Every option of the command line (and keys of a ``--config`` YAML file), with the upstream defaults."""

    model: list[str]
    data_dir: str
    datasets: list[str] | None = None
    media_dir: str | None = None
    output_dir: str = "outputs/evaluation"
    limit: int = 1000
    max_image_side: int = 512
    mode: str = "keep"
    batch_size: int = 8
    greedy: bool = False
    max_new_tokens: int = 1024
    temperature: float = 0.95
    top_k: int = 10
    top_p: float = 0.1
    seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    judge_base_url: str | None = None
    judge_model: str = "gpt-4o"
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_concurrency: int = 8
    judge_score_rule: str | None = None
    region_meta: str | None = None
    protocol: str = "project"
    oracle: bool = False

    def score_rule(self) -> str:
        """The judge score rule: the one given, else ``upstream`` with ``--protocol released``, else ``strict``."""
        if self.judge_score_rule is not None:
            return self.judge_score_rule
        return "upstream" if self.protocol == "released" else "strict"

    def generation_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    kind: str  # "vpt" or "baseline"


@dataclass
class Pair:
    """One (model, dataset): its records (evaluable items and problems), output folder and the answers found there.

    ``answers`` is the file this process appends to (``answers.jsonl``, or its rank's shard in a data-parallel run);
    ``done`` holds the answers of every file of the folder. ``problems`` starts with the ``broken`` records found when
    the split was read; the records that failed when answered follow."""

    model: ModelSpec
    dataset: str
    records: int
    items: list[Item]
    problems: list[dict[str, Any]]
    directory: Path
    answers: AnswerLog
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)
    broken: int = 0

    @property
    def pending(self) -> list[Item]:
        """The records this rank owns (all of them in one process) that no answer file holds yet."""
        return [item for item in self.items if item.index not in self.done and self.ranks.owns(item.index)]

    @property
    def name(self) -> str:
        return f"{self.model.name}/{self.dataset}"


# --- command line ---------------------------------------------------------------------------------------------------

_DEFAULTS = EvalConfig(model=[], data_dir="")


def _default(name: str) -> str:
    return f" (default: {getattr(_DEFAULTS, name)})"


def _int_at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def build_parser(prog: str = "evaluation.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        epilog=f"""\
outputs (under --output-dir):
  <model>/<dataset>/answers.jsonl      answers, appended per batch (the resume state)
  <model>/<dataset>/settings.json      settings of these answers; a rerun must match them
  <model>/<dataset>/final_answers.json question, ground truth, round-1 text, action, boxes, answer, scores
  <model>/<dataset>/scores.json        dataset metrics, judge score, action counts, region accuracy
  <model>/<dataset>/problems.json      records skipped in the last run (broken, unreadable) or dropped from
                                       scoring by --protocol released (crop failed), by index
  summary.md|csv|json, summary.png     main score per model (rows) and dataset (columns), average
  action_usage.md|json                 how often region, re-encoding or no perception token was used
  judge_cache.jsonl, evaluation.log
  <model>/<dataset>/answers.rank<R>-of-<N>.jsonl   data parallel only: rank R's answers until rank 0 merges them

released splits:
{textwrap.fill(", ".join(RELEASED_TEST_SETS), 110, initial_indent="  ", subsequent_indent="  ")}

examples:
  python evaluation/evaluation.py --model saves/vpt-2b-det --model qwen2vl=Qwen2-VL-2B-Instruct --data-dir data
  python evaluation/evaluation.py --config evaluation/evaluation.yaml --limit 100 --greedy
  vpt-eval --config evaluation/evaluation.yaml                                  (the same, installed)
  torchrun --nproc-per-node 4 evaluation/evaluation.py --config evaluation/evaluation.yaml   (4 GPUs)
  accelerate launch --multi_gpu --num_processes 4 evaluation/evaluation.py --config evaluation/evaluation.yaml

exit status: 0 when something was evaluated, 1 when nothing could be, 2 on usage errors and on errors that stop
the run (a missing model or data directory, an unusable or busy --output-dir, a model that cannot be loaded): one
line on stderr naming the problem (--debug shows the traceback).""",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="read options from a YAML mapping (keys as the long options, e.g. data_dir: data); "
        "options on the command line win",
    )
    data = parser.add_argument_group("models and data")
    data.add_argument(
        "--model",
        action="extend",
        nargs="+",
        metavar="[NAME=]DIR",
        help="model directory, repeatable; NAME (default: the folder name) names its output folder and table row. "
        "A plain base checkpoint (e.g. Qwen2-VL-2B-Instruct, Qwen3-VL-4B-Instruct) is evaluated as the "
        "single-round baseline",
    )
    data.add_argument("--data-dir", metavar="DIR", help="folder of the test split JSON files (required)")
    data.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME",
        help=f"splits to evaluate, by file name without .json (default: every {TEST_SPLIT_GLOB} in --data-dir)",
    )
    data.add_argument(
        "--media-dir", metavar="DIR", help="folder that relative image paths start from (default: --data-dir)"
    )
    data.add_argument(
        "--limit",
        type=_int_at_least(0),
        metavar="N",
        help="evaluate the first N records of each split, 0 for all" + _default("limit"),
    )
    data.add_argument(
        "--region-meta",
        metavar="JSON",
        help="report region-token accuracy: a JSON file whose 'targets' maps images[0] paths to {'cells': "
        "[x0, y0, x1, y1]} (e.g. synthetic_meta.json); a region answer is correct when its cell box contains them",
    )
    inference = parser.add_argument_group("inference")
    inference.add_argument(
        "--mode",
        choices=MODES,
        help="round-1 trigger phrase: keep the record's, or rebuild the question with the region or re-encoding "
        "trigger, or none (free); the baseline always gets none" + _default("mode"),
    )
    inference.add_argument(
        "--max-image-side",
        type=_int_at_least(0),
        metavar="N",
        help="downscale images and crops to this long side, 0 for no cap" + _default("max_image_side"),
    )
    inference.add_argument(
        "--batch-size", type=_int_at_least(1), metavar="N", help="samples per batch" + _default("batch_size")
    )
    inference.add_argument(
        "--greedy",
        action=argparse.BooleanOptionalAction,
        help="greedy decoding instead of the upstream sampling settings below (default: sampling)",
    )
    inference.add_argument(
        "--max-new-tokens", type=_int_at_least(1), metavar="N", help="per round" + _default("max_new_tokens")
    )
    inference.add_argument(
        "--temperature", type=float, metavar="T", help="sampling temperature" + _default("temperature")
    )
    inference.add_argument("--top-k", type=_int_at_least(0), metavar="K", help="sampling top-k" + _default("top_k"))
    inference.add_argument("--top-p", type=float, metavar="P", help="sampling top-p" + _default("top_p"))
    inference.add_argument(
        "--seed",
        type=_int_at_least(0),
        metavar="N",
        help="sampling seed; record i draws its tokens from its own generator seeded with N + i, so answers do not "
        "depend on --batch-size or on where a run was resumed" + _default("seed"),
    )
    inference.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="routing and scoring at the protocol edges. project: region indices past the grid (<|x_8|>) are "
        "clamped, spans without x or y indices skipped, crops at least one pixel. released: as the released "
        "evaluation, for comparisons with the published table: such spans are no region / a region whose crop "
        "fails, which drops the record from scoring (listed in problems.json), and the judge score rule defaults "
        "to upstream. Part of the settings a rerun is checked against" + _default("protocol"),
    )
    inference.add_argument(
        "--oracle",
        action=argparse.BooleanOptionalAction,
        help="VPT models: instead of generating round 1, replay each record's own first assistant turn (its "
        "ground-truth region or re-encoding tokens), so round 2 answers from the crop or features the record asks "
        "for: the ceiling of the second round. Records without such a turn are listed as problems; plain baselines "
        "are unaffected. Part of the settings a rerun is checked against (default: off)",
    )
    inference.add_argument(
        "--device",
        help="cpu, cuda or cuda:N (default: cuda when available); under torchrun/accelerate cuda means "
        "cuda:LOCAL_RANK",
    )
    inference.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="weights dtype" + _default("dtype")
    )
    judge = parser.add_argument_group("LLM judge (used only with --judge-base-url)")
    judge.add_argument(
        "--judge-base-url", metavar="URL", help="OpenAI-compatible API root, e.g. https://api.openai.com/v1"
    )
    judge.add_argument("--judge-model", metavar="NAME", help="judge model" + _default("judge_model"))
    judge.add_argument(
        "--judge-api-key-env",
        metavar="VAR",
        help="environment variable holding the API key" + _default("judge_api_key_env"),
    )
    judge.add_argument(
        "--judge-concurrency",
        type=_int_at_least(1),
        metavar="N",
        help="parallel requests" + _default("judge_concurrency"),
    )
    judge.add_argument(
        "--judge-score-rule",
        choices=SCORE_RULES,
        help="strict: the number after 'score:' (else the reply's only number), valid only in [0, 1]; a reply "
        "without one is asked again once, then the answer is unscored (left out of the mean, counted in the "
        'summary). upstream: the released rule, first match of [01]\\.?\\d*, 0 when none ("score: 10" gives 10), '
        "for comparisons with the published table. Replies are cached, so switching rules sends no request "
        "(default: strict; upstream with --protocol released)",
    )
    parser.add_argument("--output-dir", metavar="DIR", help="where results go" + _default("output_dir"))
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error instead of one line (also {DEBUG_ENV}=1)",
    )
    return parser


def _config_file_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The options of a YAML config file as command-line arguments, so that they are checked like them."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"--config {path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    known = {f.name for f in fields(EvalConfig)}
    argv = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            parser.error(f"--config {path}: unknown option {key!r}")
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_config(argv: Sequence[str] | None = None, prog: str = "evaluation.py") -> EvalConfig:
    """Options from ``argv`` over those of ``--config``, over the defaults; usage errors exit with status 2."""
    parser = build_parser(prog)
    values = vars(parser.parse_args(argv))
    values.pop("debug", None)  # read by `run_cli` from argv
    if "config" in values:
        values = vars(parser.parse_args(_config_file_argv(values.pop("config"), parser))) | values
    missing = [f"--{name.replace('_', '-')}" for name in ("model", "data_dir") if name not in values]
    if missing:
        parser.error(f"missing {' and '.join(missing)} (on the command line or in --config)")
    return EvalConfig(**values)


# --- evaluation -----------------------------------------------------------------------------------------------------


def resolve_models(specs: Sequence[str]) -> list[ModelSpec]:
    """The models of ``--model [NAME=]DIR`` options: local checkpoint directories of a known type, unique names."""
    models = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        try:
            model_type = model_type_of(path)
        except VPTUserError as error:
            raise ConfigError(f"--model {spec}: {error}") from error
        if model_type not in MODEL_KINDS:
            raise ConfigError(
                f"--model {spec}: model_type {model_type!r} is neither a VPT model ({', '.join(VPT_MODEL_TYPES)}) nor "
                f"a plain base model ({', '.join(BASELINE_MODEL_TYPES)})"
            )
        if (problem := name_problem(name)) is not None:
            raise ConfigError(
                f"--model {spec}: {name!r} cannot name an output folder ({problem}); use --model NAME=DIR"
            )
        models.append(ModelSpec(name, Path(path), MODEL_KINDS[model_type]))
    names = [model.name for model in models]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ConfigError(f"several models are named {', '.join(duplicates)}; name them with --model NAME=DIR")
    return models


def load_region_targets(path: str | None) -> dict[str, dict[str, Any]] | None:
    if path is None:
        return None
    try:
        targets = read_json(path)["targets"]
        for target in targets.values():
            if len(target["cells"]) != 4:
                raise ValueError(f"cells {target['cells']} are not [x0, y0, x1, y1]")
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as error:
        raise ConfigError(f"--region-meta {path}: {type(error).__name__}: {error}") from error
    return targets


class Evaluator:
    """Answers, scores and reports every (model, dataset) pair of a config."""

    def __init__(
        self,
        config: EvalConfig,
        generation_overrides: dict[str, Any] | None = None,
        ranks: Ranks | None = None,
        lock: RunLock | None = None,
    ):
        """``generation_overrides`` (e.g. a ``logits_processor``) go to `generate` on top of the config's settings;
        they are not part of the settings a rerun is checked against. ``ranks`` (default: one process) is this
        process's place in a data-parallel run, whose locks ``lock`` holds (`parallel.run_lock`; `evaluate` takes
        them)."""
        self.config = config
        self.ranks = ranks or Ranks()
        if self.ranks.parallel and lock is None:
            raise ValueError("a data-parallel Evaluator needs the run's locks: use evaluate(), or pass lock=")
        self.lock = lock
        self.output_dir = Path(config.output_dir)
        self.generation = config.generation_kwargs()
        self.generation_overrides = generation_overrides or {}
        self.load_errors: dict[str, str] = {}
        self.marked: set[str] = set()  # the pairs whose done marker this rank (r > 0) wrote
        self.targets = load_region_targets(config.region_meta)
        self.models = resolve_models(config.model)
        try:
            self.datasets = self._load_datasets()
        except DatasetError as error:
            raise ConfigError(str(error)) from error
        self.pairs = {
            model.name: [self._open_pair(model, name, *data) for name, data in self.datasets.items()]
            for model in self.models
        }

    def _load_datasets(self) -> dict[str, tuple[list[Item], list[dict[str, Any]]]]:
        config = self.config
        media_dir = config.media_dir or config.data_dir
        datasets = {}
        for name, path in find_datasets(config.data_dir, config.datasets).items():
            try:
                records = load_records(path)
            except DatasetError as error:
                logger.error("Skipping %s: %s", name, error)
                continue
            items, problems = prepare_items(records, media_dir, config.limit or None)
            datasets[name] = items, problems
            logger.info("%s: %d records to evaluate, %d broken", name, len(items), len(problems))
        return datasets

    def settings(self, model: ModelSpec) -> dict[str, Any]:
        """What the answers of ``model`` depend on; a rerun into the same folder must have the same.

        ``protocol`` is recorded for VPT models only (the one-round baseline does not route); settings files written
        before it existed read as ``"project"`` (`_saved_settings`)."""
        return {
            "model_path": str(model.path.resolve()),
            "kind": model.kind,
            "mode": "free" if model.kind == "baseline" else self.config.mode,
            **({"protocol": self.config.protocol} if model.kind == "vpt" else {}),
            **({"oracle": True} if self.config.oracle and model.kind == "vpt" else {}),
            "max_image_side": self.config.max_image_side,
            "dtype": self.config.dtype,
            "generation": self.generation,
            "seed": self.config.seed,
            # Sampled answers of older versions were seeded per batch; they must not be mixed with per-record ones.
            **({"seeding": "per_record"} if self.generation.get("do_sample") else {}),
        }

    def _open_pair(self, model: ModelSpec, dataset: str, items: list[Item], problems: list[dict]) -> Pair:
        try:
            directory = output_path(self.output_dir, model.name, dataset)
        except OutputDirError as error:
            raise ConfigError(f"{model.name} / {dataset}: {error}") from error
        settings_file = directory / "settings.json"
        if settings_file.exists():
            saved, current = _saved_settings(read_json(settings_file)), json.loads(json.dumps(self.settings(model)))
            if saved != current:
                changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
                raise ConfigError(
                    f"{directory} holds answers made with other settings ({', '.join(changed)}); "
                    "use another --output-dir, or delete that folder to start it again"
                )
        answers = AnswerLog(directory / self.ranks.shard_name())
        records = len(items) + len(problems)
        pair = Pair(model, dataset, records, items, list(problems), directory, answers, {}, self.ranks, len(problems))
        pair.done = read_answers(directory, answers, repair_merged=self.ranks.rank == 0)
        questions = {item.index: item.question for item in items}
        if stale := [i for i, answer in pair.done.items() if i in questions and answer["question"] != questions[i]]:
            raise ConfigError(
                f"{directory} holds answers to other questions than {dataset} has now (records {stale[:5]}...); "
                "use another --output-dir"
            )
        return pair

    def run(self) -> tuple[dict[str, dict[str, dict[str, Any]]], str]:
        """Answer what is missing, score everything, write the reports; return the summaries and the Markdown.

        In a data-parallel run every rank answers its records of each model, ranks > 0 then write their done markers
        and return ``({}, "")``; rank 0 waits for them, merges the shards and scores (`parallel`)."""
        judge = None
        if self.config.judge_base_url and self.ranks.rank == 0:
            judge = JudgeClient(
                self.config.judge_base_url,
                model=self.config.judge_model,
                api_key_env=self.config.judge_api_key_env,
                cache_path=self.output_dir / "judge_cache.jsonl",
                concurrency=self.config.judge_concurrency,
                score_rule=self.config.score_rule(),
            )
        if self.ranks.parallel:
            logger.info(
                "Data parallel over %d processes: this is %s on %s; records are shared by index mod %d",
                self.ranks.world_size,
                self.ranks.label,
                self._device(),
                self.ranks.world_size,
            )
        results = {}
        try:
            for model in self.models:
                if todo := [pair for pair in self.pairs[model.name] if pair.pending]:
                    self._answer(model, todo)
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                if self.ranks.rank > 0:
                    for pair in self.pairs[model.name]:
                        if pair.name not in self.marked:  # nothing to answer, or the model failed to load
                            self._mark(pair)
                else:
                    for pair in self.pairs[model.name]:
                        self._gather(pair)
                if self.load_errors and len(self.load_errors) == len(self.models):
                    raise ConfigError("; ".join(self.load_errors.values()))
                if self.ranks.rank == 0:
                    results[model.name] = {pair.dataset: self._finish(pair, judge) for pair in self.pairs[model.name]}
        finally:
            if judge is not None:
                judge.close()
        if self.ranks.rank > 0:
            logger.info("Answers done; rank 0 merges and scores them")
            return {}, ""
        models = {model.name: {"kind": model.kind, "path": str(model.path)} for model in self.models}
        markdown = write_reports(self.output_dir, results, models, list(self.datasets))
        return results, markdown

    def _mark(self, pair: Pair) -> None:
        """Rank r > 0: the done marker of ``pair`` (its records are answered or problems, or the model failed)."""
        self.lock.write_marker(
            pair.directory,
            pair.problems[pair.broken :],
            sum(self.ranks.owns(index) for index in pair.done),
            self.load_errors.get(pair.model.name),
        )
        self.marked.add(pair.name)

    def _gather(self, pair: Pair) -> None:
        """Rank 0 (or one process): wait for the other ranks' done markers of ``pair``, take their problems, merge
        every shard file of its folder into answers.jsonl (those of earlier runs too)."""
        failed = set()  # ranks on which the model could not be loaded: their records stay unanswered
        if pair.model.name in self.load_errors:
            failed.add(self.ranks.rank)
        if self.ranks.parallel:
            markers = self.lock.wait_for_markers(pair.directory, pair.name)
            seen = {problem["index"] for problem in pair.problems}
            for rank, marker in sorted(markers.items()):
                for problem in marker.get("problems") or []:
                    if problem.get("index") not in seen:
                        pair.problems.append(problem)
                        seen.add(problem.get("index"))
                if error := marker.get("load_error"):
                    failed.add(rank)
                    logger.error(
                        "%s: rank %d of %d could not load the model (%s); its records are left unanswered, rerun to "
                        "answer them",
                        pair.name,
                        rank,
                        self.ranks.world_size,
                        error,
                    )
        pair.done = merge_shards(pair.directory)
        problems = {problem["index"] for problem in pair.problems}
        missing = [
            item.index
            for item in pair.items
            if item.index not in pair.done
            and item.index not in problems
            and item.index % self.ranks.world_size not in failed
        ]
        if missing:  # never expected: every rank answers its records or lists them as problems
            logger.warning(
                "%s: %d records have no answer (indices %s); rerun to answer them",
                pair.name,
                len(missing),
                ", ".join(map(str, missing[:20])),
            )

    def _device(self) -> str:
        """This rank's device: ``--device`` (``cuda`` means ``cuda:LOCAL_RANK`` in a data-parallel run), else
        ``cuda:LOCAL_RANK`` / ``cuda`` when CUDA is present, else ``cpu``."""
        device = self.config.device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.ranks.parallel:
            count = torch.cuda.device_count()
            if self.ranks.local_rank >= count:
                raise ConfigError(
                    f"{self.ranks.label}: LOCAL_RANK={self.ranks.local_rank} but this machine has {count} CUDA "
                    "device(s); start at most that many processes per machine, or give --device"
                )
            device = f"cuda:{self.ranks.local_rank}"
        return device

    def _answer(self, model: ModelSpec, pairs: list[Pair]) -> None:
        device = self._device()
        if device.startswith("cuda:"):
            torch.cuda.set_device(device)
        where = f"{device}, {self.ranks.label}" if self.ranks.parallel else device
        logger.info("Loading %s model %s from %s on %s", model.kind, model.name, model.path, where)
        pipeline_class = BaselinePipeline if model.kind == "baseline" else VPTPipeline
        try:
            runner = pipeline_class.from_pretrained(model.path, dtype=self.config.dtype, device=device)
        except Exception as error:  # the other models can still be evaluated; with none left, `run` stops
            self.load_errors[model.name] = f"cannot load model {model.name} ({model.path}): {one_line(error)}"
            if len(self.load_errors) < len(self.models):
                logger.error("%s; its missing answers are skipped", self.load_errors[model.name])
            return
        mode = self.settings(model)["mode"]
        rank = f" [rank {self.ranks.rank}/{self.ranks.world_size}]" if self.ranks.parallel else ""
        started, answered = time.perf_counter(), 0
        for pair in pairs:
            pending = pair.pending
            logger.info(
                "%s / %s: answering %d records (%d already answered)%s",
                model.name,
                pair.dataset,
                len(pending),
                len(pair.done),
                f"; this rank's records: index mod {self.ranks.world_size} = {self.ranks.rank}" if rank else "",
            )
            write_json(pair.directory / "settings.json", self.settings(model))
            size = self.config.batch_size
            with tqdm(total=len(pending), desc=f"{pair.name}{rank}", unit="item") as progress:
                for start in range(0, len(pending), size):
                    batch = pending[start : start + size]
                    answers = self._answer_batch(runner, batch, mode, pair.problems)
                    pair.answers.append(answers)
                    pair.done.update((answer["index"], answer) for answer in answers)
                    answered += len(answers)
                    progress.update(len(batch))
            if self.ranks.rank > 0:
                self._mark(pair)
        seconds = time.perf_counter() - started
        logger.info(  # scripts/bench.py --sections eval reads this line
            "Answered %d records of %s in %.3f s (%.3g records/s, model loading excluded)",
            answered,
            model.name,
            seconds,
            answered / seconds if seconds > 0 else float("nan"),
        )

    def _answer_batch(self, runner, batch: list[Item], mode: str, problems: list[dict]) -> list[dict[str, Any]]:
        """Answers of a batch; items whose image cannot be loaded or whose generation fails go to ``problems``."""
        loaded = []
        for item in batch:
            try:
                loaded.append((item, load_image(item.image_path)))
            except (ImageLoadError, OSError, ValueError) as error:  # bombs and truncated files included
                self._problem(problems, item, one_line(error))
        return self._generate(runner, loaded, mode, problems)

    def _generate(self, runner, loaded, mode: str, problems: list[dict]) -> list[dict[str, Any]]:
        """Answers of loaded items, each sampled with its own seed (``seed + index``, whatever the batch)."""
        oracle = self.config.oracle and runner.two_rounds
        if oracle:
            for item, _ in loaded:
                if item.round1 is None:
                    self._problem(problems, item, "--oracle: the record has no first assistant turn to replay")
            loaded = [(item, image) for item, image in loaded if item.round1 is not None]
        if not loaded:
            return []
        prompts = [prompt_for_mode(item.question, mode) for item, _ in loaded]
        try:
            results = runner.run(
                prompts,
                [image for _, image in loaded],
                batch_size=len(loaded),
                max_image_side=self.config.max_image_side or None,
                generation_kwargs=self.generation | self.generation_overrides,
                progress=False,
                seeds=[self.config.seed + item.index for item, _ in loaded],
                on_error="record",
                protocol=self.config.protocol,  # the one-round baseline does not route: no effect there
                round1_texts=[item.round1 for item, _ in loaded] if oracle else None,
            )
        except Exception as error:  # the pipeline keeps per-record errors; anything else: retry the items alone
            if len(loaded) == 1:
                self._problem(problems, loaded[0][0], f"generation failed: {one_line(error)}")
                return []
            logger.warning("A batch failed (%s); answering its records one by one", one_line(error))
            return [answer for one in loaded for answer in self._generate(runner, [one], mode, problems)]
        answers = []
        for (item, _), prompt, result in zip(loaded, prompts, results):
            if result.error is not None:
                self._problem(problems, item, f"generation failed: {result.error}")
            else:
                answers.append(_answer_record(item, prompt, result))
        return answers

    @staticmethod
    def _problem(problems: list[dict], item: Item, message: str) -> None:
        logger.warning("Record %d skipped: %s", item.index, message)
        problems.append({"index": item.index, "problem": message})

    def _finish(self, pair: Pair, judge: JudgeClient | None) -> dict[str, Any]:
        """Score the answered items of ``pair`` and write its final_answers, scores and problems files.

        Answers the released protocol drops (``dropped``: their crop could not be built) are not scored; they are
        listed in problems.json with the reason, and kept in answers.jsonl, so a rerun does not answer them again.
        """
        dropped = [
            {"index": item.index, "problem": f"dropped from scoring (--protocol released): {reason}"}
            for item in pair.items
            if item.index in pair.done and (reason := pair.done[item.index].get("dropped"))
        ]
        dropped_indices = {problem["index"] for problem in dropped}
        rows = [
            {
                "index": item.index,
                "image": item.image,
                "question": item.question,
                "ground_truth": item.reference,
                **{key: pair.done[item.index][key] for key in ("prompt", "round1_text", "action", "boxes", "answer")},
            }
            for item in pair.items
            if item.index in pair.done and item.index not in dropped_indices
        ]
        name = f"{pair.model.name}/{pair.dataset}"
        protocol = self.config.protocol if pair.model.kind == "vpt" else "project"
        final_answers, summary = score(
            pair.dataset, rows, judge, self.targets, desc=f"judge {name}", protocol=protocol
        )
        summary = {
            "model": pair.model.name,
            "dataset": pair.dataset,
            "kind": pair.model.kind,
            "records": pair.records,
            **summary,
            "problems": len(pair.problems) + len(dropped),
            "dropped": len(dropped),
        }
        write_json(pair.directory / "final_answers.json", final_answers)
        write_json(pair.directory / "scores.json", summary)
        problems = sorted(pair.problems + dropped, key=lambda problem: problem["index"])
        write_json(pair.directory / "problems.json", problems)
        if problems:
            logger.warning(
                "%s: %d records skipped (indices %s); see %s",
                name,
                len(problems),
                ", ".join(str(p["index"]) for p in problems[:20]),
                pair.directory / "problems.json",
            )
        if summary["family"] is None:
            logger.warning(
                "%s: no judge-free metric for this dataset name (metrics.py knows the released splits only)%s",
                name,
                "" if judge else "; give --judge-base-url to score it",
            )
        return summary


def _saved_settings(saved: Any) -> Any:
    """A settings file as the current version writes it: one from before ``--protocol`` existed read as
    ``protocol: project`` (VPT models only; those answers were routed by the project's rules)."""
    if isinstance(saved, dict) and saved.get("kind") == "vpt" and "protocol" not in saved:
        return {**saved, "protocol": "project"}
    return saved


def _answer_record(item: Item, prompt: str, result: VPTResult) -> dict[str, Any]:
    answer = {"index": item.index, "question": item.question, "prompt": prompt, **asdict(result)}
    answer.pop("error", None)  # always None here: failed records are problems, not answers
    if answer["dropped"] is None:  # only the released protocol drops answers; others keep the older format
        answer.pop("dropped")
    return answer | {"boxes": [list(box) for box in result.boxes]}


def evaluate(
    config: EvalConfig, generation_overrides: dict[str, Any] | None = None, ranks: Ranks | None = None
) -> tuple[dict[str, dict[str, dict[str, Any]]], str]:
    """Run the evaluation of ``config``; see `Evaluator`. ``ranks`` defaults to the launcher's variables
    (`Ranks.from_env`: one process without them).

    The run holds the lock of ``config.output_dir`` (`storage.exclusive_run`; in a data-parallel run rank 0 does and
    every rank holds its rank lock, `parallel.run_lock`): a second evaluation writing into the same directory fails
    at once with `OutputDirError`. Ranks other than 0 return ``({}, "")``.
    """
    ranks = Ranks.from_env() if ranks is None else ranks
    with run_lock(config.output_dir, ranks) as lock:
        return Evaluator(config, generation_overrides, ranks, lock).run()


@contextmanager
def _logging_to(output_dir: Path, ranks: Ranks):
    """Log the ``transformers_vpt.evaluation`` loggers to stderr and to ``output_dir/evaluation.log`` (appended, by
    every rank; lines name the rank in a data-parallel run) meanwhile.

    An error that ends the run is written to the log file; `run_cli` prints it on stderr, as one line.
    """
    prepare_output_dir(output_dir)
    log_file = output_dir / "evaluation.log"
    try:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
    except OSError as error:
        raise OutputDirError(f"cannot write {log_file}: {error.strerror or one_line(error)}") from error
    stream_handler = logging.StreamHandler()
    handlers = [stream_handler, file_handler]
    where = f" [{ranks.label}]" if ranks.parallel else ""
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")
    logger.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    try:
        yield
    except Exception as error:
        logger.removeHandler(stream_handler)
        logger.error("%s", one_line(error))
        raise
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def _main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv, prog=_prog_name())
    ranks = Ranks.from_env()
    with _logging_to(Path(config.output_dir), ranks):
        results, markdown = evaluate(config, ranks=ranks)
        if ranks.rank > 0:  # rank 0 prints the tables
            return 0
        print(markdown)
        if not any(summary["answered"] for per_dataset in results.values() for summary in per_dataset.values()):
            logger.error("Nothing could be evaluated: no record was answered")
            return 1
    return 0


def _prog_name() -> str:
    """``vpt-eval`` when run as the installed script, else ``evaluation.py`` (``python evaluation/evaluation.py``)."""
    return "vpt-eval" if os.path.basename(sys.argv[0] or "") == "vpt-eval" else "evaluation.py"


def _error_prog() -> str:
    """The program name of error lines; in a data-parallel run it names the rank (``evaluation.py [rank 1 of 2]``)."""
    try:
        ranks = Ranks.from_env()
    except RankError:
        return _prog_name()
    return f"{_prog_name()} [{ranks.label}]" if ranks.parallel else _prog_name()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (``vpt-eval``, ``python evaluation/evaluation.py``, also under ``torchrun`` or ``accelerate
    launch``); an error that stops the run is one line on stderr and exit status 2 (``--debug``: the traceback).
    Usage errors exit 2 with argparse's message."""
    return run_cli(_main, argv, prog=_error_prog())


if __name__ == "__main__":
    raise SystemExit(main())
