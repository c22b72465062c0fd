"""The data-parallel evaluation (`transformers_vpt.evaluation.parallel`): ranks from the launcher's variables, records
shared by index mod world size, shard files merged by rank 0, run locks the ranks of one run share and other runs
cannot, a rank that dies named by rank 0, resume with another number of processes, and a real 2-process torchrun run
on CPU whose answers equal the 1-process run's. Tiny CPU models, as test_evaluation.py; ranks run as threads of the
test process except in the torchrun test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from utils import ROOT, SPAN_A, action_record, draw, load, read_jsonl, region_record, scripted

from transformers_vpt.errors import one_line
from transformers_vpt.evaluation import evaluation as ev
from transformers_vpt.evaluation import parallel
from transformers_vpt.evaluation.parallel import RankError, Ranks, merge_shards, read_answers, run_lock
from transformers_vpt.evaluation.storage import AnswerLog, OutputDirError
from transformers_vpt.pipeline import VPTPipeline
from transformers_vpt.vocabulary import BRANCH_TOKENS

SPLITS = {"GQA_region_test": (region_record, 5), "POPE_action_test": (action_record, 7)}
ROUND1 = (SPAN_A, BRANCH_TOKENS["dino"].action_triple, "Yes")  # region, re-encoding, an answer at once
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Two splits (5 region, 7 action records; GQA's record 2 has no image); returns (data dir, round-1 scripts)."""
    root = tmp_path_factory.mktemp("parallel_data")
    (root / "images").mkdir()
    scripts, k = {}, 0
    for dataset, (make, count) in SPLITS.items():
        records = []
        for i in range(count):
            key = f"[p{k:02d}]"
            draw(root / f"images/{k}.png", k)
            image = "images/missing.png" if (dataset, i) == ("GQA_region_test", 2) else f"images/{k}.png"
            records.append(make(f"What is in {key}?", ("Yes", "No")[k % 2], image))
            scripts[key] = ROUND1[k % len(ROUND1)]
            k += 1
        (root / f"{dataset}.json").write_text(json.dumps(records))
    return root, scripts


def config(data_dir, out, model_dir, *extra) -> ev.EvalConfig:
    argv = ["--model", f"vpt={model_dir}", "--data-dir", str(data_dir), "--output-dir", str(out), "--device", "cpu"]
    return ev.parse_config(argv + ["--max-image-side", "64", "--max-new-tokens", "8", "--batch-size", "2", *extra])


SAMPLED = ("--no-greedy", "--temperature", "1.0", "--top-k", "0", "--top-p", "1.0")


def run_ranks(cfg, world_size: int, overrides=lambda: None, key: str = "run") -> dict[int, object]:
    """Every rank of a run as a thread of this process (named ``rank<R>``); returns {rank: result or exception}."""
    outcome = {}

    def rank_main(rank: int) -> None:
        try:
            outcome[rank] = ev.evaluate(cfg, overrides(), ranks=Ranks(rank, world_size, rank, key))
        except BaseException as error:  # noqa: BLE001 - reported to the test
            outcome[rank] = error

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    return outcome


def answers_of(out: Path) -> dict[str, list[dict]]:
    return {dataset: read_jsonl(out / "vpt" / dataset / "answers.jsonl") for dataset in SPLITS}


def assert_same_outputs(out: Path, reference: Path) -> None:
    """answers.jsonl, final_answers.json, scores.json and problems.json equal, byte for byte; no shard is left."""
    for dataset in SPLITS:
        for name in ("answers.jsonl", "final_answers.json", "scores.json", "problems.json"):
            path = f"vpt/{dataset}/{name}"
            assert (out / path).read_text() == (reference / path).read_text(), path
        left = sorted(p.name for p in (out / "vpt" / dataset).iterdir() if p.name.startswith(("answers.", ".done")))
        assert left == ["answers.jsonl"]
    assert load(out / "summary.json") == load(reference / "summary.json")


@pytest.fixture(autouse=True)
def threads_as_ranks(monkeypatch):
    """Ranks wait at most 60 s for each other; models load one at a time (transformers' loading is not thread-safe:
    real ranks are processes)."""
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "60")
    loading, from_pretrained = threading.Lock(), VPTPipeline.from_pretrained.__func__

    def one_at_a_time(cls, *args, **kwargs):
        with loading:
            return from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(VPTPipeline, "from_pretrained", classmethod(one_at_a_time))


# --- ranks, shards, merge -------------------------------------------------------------------------------------------


def test_ranks_from_the_launcher_variables():
    assert Ranks.from_env({}) == Ranks() and not Ranks().parallel
    assert Ranks.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == Ranks()
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}
    ranks = Ranks.from_env(torchrun)
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.label) == (3, 4, 1, "rank 3 of 4")
    assert ranks.key == Ranks.from_env({**torchrun, "RANK": "0"}).key  # shared by the ranks of one launch
    assert ranks.key != Ranks.from_env({**torchrun, "MASTER_PORT": "29501"}).key
    assert Ranks.from_env({**torchrun, parallel.RUN_ID_ENV: "job-7"}).key == "job-7"
    assert Ranks.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}).local_rank == 1
    assert [ranks.owns(i) for i in range(8)] == [i % 4 == 3 for i in range(8)]
    assert (ranks.shard_name(), ranks.shard_name(0), Ranks().shard_name()) == (
        "answers.rank3-of-4.jsonl",
        "answers.rank0-of-4.jsonl",
        "answers.jsonl",
    )
    for environ, message in [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE=two is not an integer >= 1"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1 is not an integer >= 0"),
        ({"RANK": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
    ]:
        with pytest.raises(RankError, match=message) as error:
            Ranks.from_env(environ)
        assert "\n" not in str(error.value)


def lines(*indices, cut: str = "") -> str:
    return "".join(json.dumps({"index": i, "answer": f"a{i}"}) + "\n" for i in indices) + cut


def test_merge_appends_what_only_shards_hold_in_record_order(tmp_path):
    (tmp_path / "answers.jsonl").write_text(lines(0, 3))
    (tmp_path / "answers.rank0-of-2.jsonl").write_text(lines(2) + json.dumps({"index": 0, "answer": "other"}) + "\n")
    (tmp_path / "answers.rank1-of-2.jsonl").write_text(lines(5, 1, cut='{"index": 7, "ans'))  # killed mid-line
    (tmp_path / "answers.rank1-of-3.jsonl").write_text(lines(4))
    (tmp_path / ".done.rank1-of-2.json").write_text("{}")
    (tmp_path / "answers.rank1-of-2.jsonl.bak").write_text("a user's file")

    own = AnswerLog(tmp_path / "answers.rank1-of-3.jsonl")
    seen = read_answers(tmp_path, own, repair_merged=False)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5] and seen[0]["answer"] == "a0"  # the merged file wins
    assert (tmp_path / "answers.rank1-of-2.jsonl").read_text().endswith('"ans')  # another rank's file: not touched

    merged = merge_shards(tmp_path)
    assert sorted(merged) == [0, 1, 2, 3, 4, 5]
    assert [a["index"] for a in read_jsonl(tmp_path / "answers.jsonl")] == [0, 3, 1, 2, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "answers.rank1-of-2.jsonl.bak"]
    assert merge_shards(tmp_path) == merged  # nothing left to merge


def test_a_rank_repairs_only_the_file_it_writes(tmp_path):
    (tmp_path / "answers.jsonl").write_text(lines(0, cut="{"))
    (tmp_path / "answers.rank0-of-2.jsonl").write_text(lines(2, cut="{"))
    own = AnswerLog(tmp_path / "answers.rank0-of-2.jsonl")
    assert sorted(read_answers(tmp_path, own, repair_merged=False)) == [0, 2]
    assert (tmp_path / "answers.jsonl").read_text().endswith("{")
    assert own.path.read_text() == lines(2)
    assert sorted(read_answers(tmp_path, own, repair_merged=True)) == [0, 2]
    assert (tmp_path / "answers.jsonl").read_text() == lines(0)


# --- locks ----------------------------------------------------------------------------------------------------------


def test_the_ranks_of_one_run_share_the_directory_and_other_runs_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "0.5")
    monkeypatch.setattr(parallel, "LOCK_PATIENCE_S", 0.2)
    out = tmp_path / "out"
    with run_lock(out, Ranks(0, 2, 0, "A")) as rank0:
        with run_lock(out, Ranks(1, 2, 1, "A")) as rank1:
            assert rank1.nonce == rank0.nonce and rank0.rank_holder(1) is not None
            with pytest.raises(OutputDirError, match=r"holds the lock of rank 1"):
                with run_lock(out, Ranks(1, 2, 1, "A")):
                    pass
        assert rank0.rank_holder(1) is None and rank0._joined(1)  # ended, after joining this run
        with pytest.raises(OutputDirError, match=r"another evaluation \(pid \d+\) is writing into"):
            with run_lock(out, Ranks()):  # a one-process run
                pass
        with pytest.raises(OutputDirError, match=r"another evaluation \(pid \d+\) is writing into"):
            with run_lock(out, Ranks(0, 3, 0, "B")):  # rank 0 of another run
                pass
        with pytest.raises(RankError, match=r"rank 1 of 2: rank 0 of this run did not take .* held by another evalu"):
            with run_lock(out, Ranks(1, 2, 1, "B")):  # rank 1 of another run waits for its own rank 0, then stops
                pass
    with pytest.raises(RankError, match="nobody holds it"):
        with run_lock(out, Ranks(1, 2, 1, "A")):  # rank 0 gone: a later rank 1 does not join a dead run
            pass
    with run_lock(out, Ranks()):  # the directory is free again
        pass


def test_a_rank_left_over_from_another_run_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stray = parallel._take(out / ".lock.rank2", parallel._holder_text(Ranks(2, 3, 2, "old"), "n0"), "rank 2's lock")
    try:
        for ranks in (Ranks(), Ranks(0, 2, 0, "new")):
            with pytest.raises(OutputDirError, match=r"another evaluation \(pid \d+, rank 2 of 3\) is still writing"):
                with run_lock(out, ranks):
                    pass
    finally:
        os.close(stray)
    with run_lock(out, Ranks(0, 2, 0, "new")):
        pass


# --- runs (ranks as threads) ----------------------------------------------------------------------------------------


def test_ranks_answer_their_records_and_rank_0_merges_their_problems(split, vpt, tmp_path, monkeypatch):
    """Greedy, scripted routes (regions, re-encoding, direct answers): 2 ranks give the files of one process; a record
    whose generation fails on rank 1 reaches problems.json through its done marker."""
    data_dir, scripts = split
    model_dir, processor = vpt
    run = VPTPipeline.run

    def fails_on_p08(self, texts, *args, **kwargs):
        if any("[p08]" in text for text in texts):  # POPE record 3: rank 1's
            raise RuntimeError("boom")
        return run(self, texts, *args, **kwargs)

    monkeypatch.setattr(VPTPipeline, "run", fails_on_p08)
    overrides = lambda: scripted(processor, scripts)  # noqa: E731
    reference, _ = ev.evaluate(config(data_dir, tmp_path / "one", model_dir, "--greedy"), overrides())
    outcome = run_ranks(config(data_dir, tmp_path / "two", model_dir, "--greedy"), 2, overrides)
    assert outcome[1] == ({}, "") and outcome[0][0] == reference
    assert_same_outputs(tmp_path / "two", tmp_path / "one")
    problems = load(tmp_path / "two/vpt/POPE_action_test/problems.json")
    assert problems == [{"index": 3, "problem": "generation failed: RuntimeError: boom"}]
    assert [p["index"] for p in load(tmp_path / "two/vpt/GQA_region_test/problems.json")] == [2]  # no image
    actions = {a["action"] for answers in answers_of(tmp_path / "two").values() for a in answers}
    assert actions == {"region", "dino", "none"}


def test_a_rank_that_dies_is_named_and_a_rerun_with_another_n_resumes(split, vpt, tmp_path, monkeypatch):
    """Sampling (seeded per record): rank 1 of 2 is killed in its last batch; rank 0 stops with one line naming it and
    its shard; a rerun with 3 ranks answers the rest, and every file equals that of one uninterrupted process."""
    data_dir, _ = split
    model_dir, _ = vpt
    ev.evaluate(config(data_dir, tmp_path / "one", model_dir, *SAMPLED))

    run, calls = VPTPipeline.run, Counter()

    def killed_in_third_batch(self, *args, **kwargs):
        name = threading.current_thread().name
        calls[name] += 1
        if name == "rank1" and calls[name] == 3:  # GQA [1, 3], POPE [1, 3], then POPE [5]
            raise KeyboardInterrupt
        return run(self, *args, **kwargs)

    monkeypatch.setattr(VPTPipeline, "run", killed_in_third_batch)
    out = tmp_path / "killed"
    outcome = run_ranks(config(data_dir, out, model_dir, *SAMPLED), 2)
    assert isinstance(outcome[1], KeyboardInterrupt)
    error = outcome[0]
    assert isinstance(error, RankError) and one_line(error) == str(error)
    shard = out / "vpt/POPE_action_test/answers.rank1-of-2.jsonl"
    assert str(error) == (
        f"rank 1 of 2 ended before it finished vpt/POPE_action_test (the answers it wrote are kept in {shard}); "
        "see that rank's output, then rerun the same command, with any number of processes, to resume"
    )
    assert [a["index"] for a in read_jsonl(shard)] == [1, 3]
    assert [a["index"] for a in read_jsonl(out / "vpt/POPE_action_test/answers.rank0-of-2.jsonl")] == [0, 2, 4, 6]
    assert [a["index"] for a in read_jsonl(out / "vpt/GQA_region_test/answers.jsonl")] == [0, 1, 3, 4]  # merged

    asked = []

    def recorded(self, texts, *args, **kwargs):
        asked.extend(texts)
        return run(self, texts, *args, **kwargs)

    monkeypatch.setattr(VPTPipeline, "run", recorded)
    outcome = run_ranks(config(data_dir, out, model_dir, *SAMPLED), 3, key="rerun")
    assert not any(isinstance(result, BaseException) for result in outcome.values()), outcome
    assert len(asked) == 1  # POPE record 5
    assert_same_outputs(out, tmp_path / "one")


# --- torchrun -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(split, vpt, tmp_path):
    """``torchrun --nproc-per-node 2 evaluation/evaluation.py`` on CPU (no process group): every file equals the
    1-process run's (greedy), rank 0 alone prints the tables, the logs name the ranks."""
    data_dir, _ = split
    model_dir, _ = vpt
    ev.evaluate(config(data_dir, tmp_path / "one", model_dir, "--greedy"))
    argv = ["--model", f"vpt={model_dir}", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "two")]
    argv += ["--device", "cpu", "--max-image-side", "64", "--max-new-tokens", "8", "--batch-size", "2", "--greedy"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VPT_DEBUG", None)
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "evaluation/evaluation.py", *argv]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert_same_outputs(tmp_path / "two", tmp_path / "one")
    assert done.stdout.count("## Summary") == 1
    assert "Data parallel over 2 processes: this is rank 1 of 2 on cpu" in done.stderr
    assert "[rank 1 of 2]: vpt / POPE_action_test: answering 3 records" in done.stderr
    log = (tmp_path / "two/evaluation.log").read_text()
    assert "[rank 0 of 2]" in log and "[rank 1 of 2]" in log and "Traceback" not in done.stderr
