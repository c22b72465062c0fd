"""scripts/bench.py on every base: the JSON report, and the upstream design doing upstream's work with VPT's
numerics."""

from __future__ import annotations

import json

import pytest
import torch
from utils import BASES

from scripts import bench
from transformers_vpt.generation import ForceTokenAtStepLogitsProcessor
from transformers_vpt.models.bases import VPT_BASES, base_of

SEQ_LEN = 96
CPU = torch.device("cpu")


@pytest.mark.parametrize("base", BASES)
def test_report_has_every_figure_and_variant(base, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--base", base, "--repeats", "1", "--warmup", "0", "--seq-len", str(SEQ_LEN), "--new-tokens", "4",
                "--out", str(out)])
    entries = json.loads(out.read_text())
    expected = {(figure, variant) for figure in bench.FIGURES for variant in (*bench.VARIANTS, bench.UPSTREAM)}
    assert sorted((e["figure"], e["variant"]) for e in entries) == sorted(expected)
    for entry in entries:
        assert set(entry) == {"figure", "variant", "plain", "vpt", "ratio"}
        assert entry["plain"] > 0 and entry["vpt"] > 0
        assert entry["ratio"] == pytest.approx(entry["vpt"] / entry["plain"])
    printed = capsys.readouterr().out
    assert "Machine:" in printed and all(figure in printed for figure in bench.FIGURES)
    assert f"Setup: base {base}, size tiny" in printed


def test_real_sizes_of_each_base():
    """The public configs of each base's sizes, cut in depth (Qwen2.5-VL keeps a full-attention block, Qwen3-VL a
    DeepStack block); built on the meta device, the plain side is the base's stock model; a size the base does not
    have is refused."""
    assert {name: bench.real_sizes(base) for name, base in VPT_BASES.items()} == {
        "qwen2_vl": ["2b", "7b"], "qwen2_5_vl": ["3b", "7b"], "qwen3_vl": ["4b", "8b"]
    }
    vocab = bench.vocabulary("2b")
    sizes = (("qwen2_vl", "2b", 1536), ("qwen2_5_vl", "3b", 2048), ("qwen2_5_vl", "7b", 3584), ("qwen3_vl", "4b", 2560),
             ("qwen3_vl", "8b", 4096))
    for name, size, hidden in sizes:
        args = bench.parse_args(["--base", name, "--size", size, "--layers", "1", "--encoder-layers", "2"])
        config = bench.build_config(args, "dino", vocab)
        assert type(config) is VPT_BASES[name].config_class and config.text_config.hidden_size == hidden
        assert config.text_config.num_hidden_layers == 1 and config.vision_config.depth == 2
        if name == "qwen2_5_vl":
            assert config.vision_config.fullatt_block_indexes == [1]
        if name == "qwen3_vl":  # nested text config, DeepStack cut to the blocks and layers left, 16-pixel patches
            assert config.vision_config.deepstack_visual_indexes == [1]
            assert config.tie_word_embeddings == config.text_config.tie_word_embeddings == (size == "4b")
            assert (args.image_size, bench.shapes(args).crop) == (384, 192)
        plain, vpt = bench.build_models(args, "dino", vocab, torch.device("meta"), torch.float32)
        assert type(plain) is VPT_BASES[name].stock_model_class and type(vpt) is VPT_BASES[name].model_class
        assert (plain.lm_head.weight is plain.get_input_embeddings().weight) == (size in ("2b", "3b", "4b"))
    full = bench.build_config(bench.parse_args(["--base", "qwen3_vl", "--size", "8b"]), "clip", vocab)
    assert full.text_config.num_hidden_layers == 36 and full.vision_config.deepstack_visual_indexes == [8, 16, 24]
    cut = bench.build_config(bench.parse_args(["--base", "qwen3_vl", "--size", "8b", "--layers", "2"]), "clip", vocab)
    assert cut.vision_config.deepstack_visual_indexes == [8, 16]  # one feature per decoder layer at most
    with pytest.raises(SystemExit):
        bench.parse_args(["--base", "qwen2_vl", "--size", "3b"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--base", "qwen3_vl", "--size", "4b", "--image-size", "336"])  # not a multiple of 32
    assert bench.parse_args(["--base", "qwen2_vl", "--size", "2b"]).image_size == 336


@pytest.fixture(scope="module", params=BASES)
def dino(request):
    args = bench.parse_args(["--base", request.param, "--seq-len", str(SEQ_LEN)])
    vocab = bench.vocabulary("tiny")
    plain, vpt = bench.build_models(args, "dino", vocab, CPU, torch.float32)
    inputs = bench.make_inputs("dino", vpt.config, vocab, bench.shapes(args), SEQ_LEN, 2, seed=0)
    return plain, vpt, inputs, vocab


def decoder_columns(model, run) -> list[int]:
    """Columns of every decoder call made by `run()`."""
    columns = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: columns.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        run()
    finally:
        hook.remove()
    return columns


def test_plain_model_holds_the_vpt_text_and_vision_weights(dino):
    plain, vpt, _, _ = dino
    ours = vpt.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_upstream_design_shares_the_vpt_modules(dino):
    _, vpt, _, _ = dino
    upstream = bench.upstream_view(vpt)
    assert upstream.vpt is vpt
    assert {id(p) for p in upstream.parameters()} == {id(p) for p in vpt.parameters()}
    base = base_of(vpt.config.model_type)
    assert type(vpt) is base.model_class  # no class swap
    assert isinstance(upstream, bench.pretrained_class(base))  # a model of the base (its attention settings)


def test_upstream_training_step_runs_two_full_passes(dino):
    plain, vpt, inputs, _ = dino
    upstream = bench.upstream_view(vpt)
    train = inputs["train"]
    assert decoder_columns(plain, lambda: bench.train_step(plain, bench.without_extra(train))) == [SEQ_LEN]
    ours = decoder_columns(vpt, lambda: bench.train_step(vpt, train))
    assert len(ours) == 2 and sum(ours) == SEQ_LEN  # pass 1 up to the action, pass 2 from it
    # the upstream design runs the VPT model's own decoder
    assert decoder_columns(vpt, lambda: bench.train_step(upstream, train)) == [SEQ_LEN, SEQ_LEN]


def test_upstream_decoding_runs_two_passes_per_step(dino):
    _, vpt, inputs, vocab = dino
    upstream = bench.upstream_view(vpt)
    prompt, new_tokens = inputs["round1"], 6
    start = vpt.config.detection_action_start_id
    runs = {
        name: lambda model=model: bench.decode_tokens_per_s(model, prompt, new_tokens, start, vocab, CPU)
        for name, model in (("vpt", vpt), ("upstream", upstream))
    }
    prompt_length = prompt["input_ids"].shape[1]
    assert decoder_columns(vpt, runs["vpt"]) == [prompt_length] + [1] * (new_tokens - 1)
    # the step consuming <|detection_action|> (generated third) re-feeds it with its start token
    steps = [1] * (new_tokens - 1)
    steps[bench.FORCED_STEP + 1] = 2
    assert decoder_columns(vpt, runs["upstream"]) == [c for c in [prompt_length, *steps] for _ in range(2)]


def test_upstream_design_has_vpt_numerics(dino):
    _, vpt, inputs, vocab = dino
    upstream = bench.upstream_view(vpt)
    vpt.eval()
    with torch.no_grad():
        torch.testing.assert_close(upstream(**inputs["train"]).logits, vpt(**inputs["train"]).logits)
    prompt = inputs["round1"]
    force = bench.LogitsProcessorList([ForceTokenAtStepLogitsProcessor(prompt["input_ids"].shape[1], bench.FORCED_STEP,
                                                                       vpt.config.detection_action_start_id)])
    outputs = [
        model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, logits_processor=force,
                       pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab[bench.IM_END])
        for model in (vpt, upstream)
    ]
    assert torch.equal(outputs[0], outputs[1])
    assert vpt.config.detection_action_id in outputs[0][0].tolist()


def test_compile_section_decodes_as_eager(tmp_path, capsys):
    """The compile section on the tiny model with the eager backend (dynamo traces the decode step in one graph,
    no code generation): a report entry per scenario, compiled tokens equal to eager ones, the action step reusing the
    decode graph."""
    out = tmp_path / "bench.json"
    entries = bench.main(["--sections", "compile", "--compile-backend", "eager", "--new-tokens", "4", "--repeats", "1",
                          "--warmup", "0", "--seq-len", str(SEQ_LEN), "--out", str(out)])
    assert json.loads(out.read_text()) == entries
    assert [e["scenario"] for e in entries] == list(bench.COMPILE_SCENARIOS)
    for entry in entries:
        assert tuple(entry) == bench.COMPILE_FIELDS
        assert (entry["figure"], entry["variant"], entry["backend"], entry["new_tokens"]) == (
            bench.COMPILE_FIGURE, "dino", "eager", 4)
        assert entry["tokens_equal"] is True, entry["scenario"]
        assert entry["eager_ms_per_token"] > 0 and entry["compiled_ms_per_token"] > 0
        assert entry["ratio"] == pytest.approx(entry["compiled_ms_per_token"] / entry["eager_ms_per_token"])
        assert entry["first_call_s"] > 0 and entry["warm_call_s"] > 0
        assert entry["compile_s"] == pytest.approx(entry["first_call_s"] - entry["warm_call_s"])
    text, action = entries
    assert text["graphs"] == 1  # generate compiled the decode step once (prefill and decode states alike)
    assert action["graphs"] == 0  # the action's decode step runs the same graph
    assert (text["action_taken"], action["action_taken"]) == (False, True)
    printed = capsys.readouterr().out
    assert "sections compile, compile: dino model, backend eager" in printed
    assert "tokens equal" in printed and "NO" not in printed.split("tokens equal", 1)[1]


def test_compile_section_reports_other_tokens(monkeypatch):
    """A compiled run whose tokens differ from the eager run's is reported (here the "compiled" calls run eager and
    their last token is changed, so that nothing is compiled)."""
    timed_generate = bench.timed_generate

    def altered(*args, **kwargs):
        if kwargs.pop("compile_config", None) is None:
            return timed_generate(*args, **kwargs)
        sequences, wall, times = timed_generate(*args, **kwargs, disable_compile=True)
        sequences = sequences.clone()
        sequences[:, -1] += 1
        return sequences, wall, times

    monkeypatch.setattr(bench, "timed_generate", altered)
    args = bench.parse_args(["--sections", "compile", "--compile-backend", "eager", "--new-tokens", "4", "--repeats",
                             "1", "--warmup", "0", "--seq-len", str(SEQ_LEN)])
    entries = bench.bench_compile(args, bench.vocabulary("tiny"), CPU, torch.float32)
    assert [entry["tokens_equal"] for entry in entries] == [False, False]
    assert "NO" in bench.format_compile_table(entries)


def test_eval_section_reports_records_per_second(tmp_path, capsys):
    """The eval section on the demo's tiny model, one process (a real `python evaluation/evaluation.py` run on 2
    scenes x 3 splits): an entry with every field, the records of the three splits, the table."""
    out = tmp_path / "bench.json"
    entries = bench.main(["--sections", "eval", "--eval-processes", "1", "--eval-records", "2", "--threads", "1",
                          "--eval-dir", str(tmp_path / "eval"), "--out", str(out)])
    assert json.loads(out.read_text()) == entries
    [entry] = entries
    assert tuple(entry) == bench.EVAL_FIELDS
    assert (entry["figure"], entry["processes"], entry["threads"], entry["records"]) == (bench.EVAL_FIGURE, 1, 1, 6)
    assert entry["wall_s"] > entry["answer_s"] > 0 and entry["records_per_s"] == pytest.approx(6 / entry["wall_s"])
    assert entry["answer_records_per_s"] == pytest.approx(6 / entry["answer_s"])
    assert (entry["speedup"], entry["answers_equal"]) == (1.0, True)
    assert len(list((tmp_path / "eval/eval-1/vpt").glob("*/answers.jsonl"))) == 3
    printed = capsys.readouterr().out
    assert "eval: demo tiny model, 2 scenes x 3 splits, processes 1" in printed and "answer rec/s" in printed


def test_eval_section_commands_and_log_reading():
    """N > 1 processes run the documented command under torchrun; the answering time is the slowest rank's."""
    command = bench.eval_command(2, bench.Path("m"), bench.Path("d"), bench.Path("o"), "cpu")
    assert command[1:5] == ["--standalone", "--nproc-per-node", "2", str(bench.ROOT / "evaluation/evaluation.py")]
    assert bench.Path(command[0]).name == "torchrun" and "--greedy" in command
    log = ("t INFO transformers_vpt.evaluation [rank 0 of 2]: Answered 5 records of vpt in 1.500 s (3.33 records/s)\n"
           "t INFO transformers_vpt.evaluation [rank 1 of 2]: Answered 4 records of vpt in 2.000 s (2 records/s)\n"
           "t INFO transformers_vpt.evaluation [rank 0 of 2]: Answered 1 records of base in 1.000 s (1 records/s)\n")
    assert bench.answer_times(log) == (10, 2.5)
    assert bench.answer_times("x INFO transformers_vpt.evaluation: Answered 3 records of vpt in 0.250 s") == (3, 0.25)
