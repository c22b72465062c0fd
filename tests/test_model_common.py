"""The generic transformers model and generation behaviours, for every base and for no branch or two branches.

Modelled on transformers' model-tester pattern: a tester builds a tiny config and inputs without VPT tokens, and each
test holds the VPT model to what a transformers user expects of its stock base (`VPT_BASES[...].stock_model_class`
with the same weights): tuples with ``return_dict=False``, generation from ``inputs_embeds``, static cache and a
``fullgraph`` compiled decode step, beam search, assisted decoding, sampling with several return sequences, sdpa vs
eager attention, save/load, the stock errors, the sub-configs and the Auto classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModel, CompileConfig, LogitsProcessorList, SuppressTokensLogitsProcessor
from utils import BASES, IM_END, IMAGE, PAD, Sample, collate, make_model, stock_twin

from transformers_vpt.models.bases import VPT_BASES

torch.set_num_threads(1)

BRANCH_SETS = {"no branch": (), "dino+clip": ("dino", "clip")}


@dataclass
class VPTModelTester:
    """A tiny VPT model of one base and branch set, its stock twin, and prompts without VPT tokens."""

    base: str
    branches: tuple[str, ...]

    def __post_init__(self):
        self.model = make_model(self.branches, seed=3, base=self.base)
        self.stock = stock_twin(self.model, self.base)

    def inputs(self, padding_side: str = "left", labels: bool = False, batch_size: int = 2) -> dict:
        samples = [Sample("plain", seed=1, question=(50, 51, 52)), Sample("region", seed=2)][:batch_size]
        batch = collate(samples, padding_side)
        return batch if labels else {key: value for key, value in batch.items() if key != "labels"}

    def vpt_tokens(self) -> list[int]:
        """Every VPT pad, action start and action id of the model's branches."""
        fields = ("image_token_id", "action_start_id", "action_id")
        prefixes = {"dino": "detection", "sam": "seg", "clip": "clip"}
        return [getattr(self.model.config, f"{prefixes[kind]}_{field}") for kind in self.branches for field in fields]

    def generate_both(self, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' `generate` with no VPT token allowed (the VPT rules already keep pads and actions out; the
        action starts are kept out of both), from the same seed."""
        kwargs = {"max_new_tokens": 5, "pad_token_id": PAD, "eos_token_id": IM_END, **kwargs}
        ban = LogitsProcessorList([SuppressTokensLogitsProcessor(self.vpt_tokens())] if self.branches else [])
        torch.manual_seed(0)
        ours = self.model.generate(**kwargs, logits_processor=ban)
        torch.manual_seed(0)
        theirs = self.stock.generate(**kwargs, logits_processor=ban)
        return ours, theirs


@pytest.fixture(scope="module", params=[(base, name) for base in BASES for name in BRANCH_SETS],
                ids=lambda param: f"{param[0]}-{param[1]}")
def tester(request) -> VPTModelTester:
    base, name = request.param
    return VPTModelTester(base, BRANCH_SETS[name])


def sequences(output) -> torch.Tensor:
    return output.sequences if hasattr(output, "sequences") else output


# --------------------------------------------------------------------------------------------- outputs and forward
def test_return_dict_false_gives_the_output_tuple(tester):
    inputs = tester.inputs(labels=True)
    with torch.no_grad():
        as_dict = tester.model(**inputs)
        as_tuple = tester.model(**inputs, return_dict=False)
        model_tuple = tester.model.model(**{k: v for k, v in inputs.items() if k != "labels"}, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(model_tuple, tuple)
    assert len(as_tuple) == len(as_dict.to_tuple())
    for ours, expected in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(expected, torch.Tensor):
            assert torch.equal(ours, expected)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    tester.model.config.return_dict = False  # the config's default, as transformers reads it
    try:
        with torch.no_grad():
            assert isinstance(tester.model(**inputs), tuple)
    finally:
        tester.model.config.return_dict = True


def test_the_forward_is_the_stock_forward_on_plain_inputs(tester):
    inputs = tester.inputs(labels=True)
    with torch.no_grad():
        ours, theirs = tester.model(**inputs), tester.stock(**inputs)
    keep = inputs["attention_mask"].bool()
    assert torch.equal(ours.logits[keep], theirs.logits[keep])
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=1e-7)


def test_inputs_embeds_forward_as_stock(tester):
    inputs = tester.inputs()
    embeds = tester.model.get_input_embeddings()(inputs["input_ids"])
    text_only = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        ours, theirs = tester.model(**text_only), tester.stock(**text_only)
    keep = inputs["attention_mask"].bool()
    assert torch.equal(ours.logits[keep], theirs.logits[keep])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        tester.model(input_ids=inputs["input_ids"], inputs_embeds=embeds)


def test_sdpa_and_eager_attention_agree(tester):
    inputs = tester.inputs(padding_side="right")
    model = make_model(tester.branches, seed=3, base=tester.base, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        eager, sdpa = model(**inputs).logits, tester.model(**inputs).logits
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager[keep], sdpa[keep], rtol=1e-4, atol=1e-5)


def test_image_token_mismatch_is_the_stock_value_error(tester):
    inputs = tester.inputs()
    first_image = int((inputs["input_ids"][0] == IMAGE).nonzero()[0, 0])
    broken = {**inputs, "input_ids": inputs["input_ids"].clone()}
    broken["input_ids"][0, first_image] = 50
    with pytest.raises(ValueError) as ours, torch.no_grad():
        tester.model(**broken)
    with pytest.raises(ValueError) as theirs, torch.no_grad():
        tester.stock(**broken)
    assert str(ours.value) == str(theirs.value) and "Image features and image tokens do not match" in str(ours.value)


# -------------------------------------------------------------------------------------------------- configuration
def test_sub_configs_round_trip_through_their_own_classes(tester, tmp_path):
    config = tester.model.config
    config.save_pretrained(tmp_path)
    for name in ("detection_config", "seg_config"):
        sub = getattr(config, name)
        loaded = type(sub).from_pretrained(tmp_path)  # read from the VPT config.json, under its own key
        assert loaded.to_dict() == sub.to_dict()
        sub.save_pretrained(tmp_path / name)
        assert type(sub).from_pretrained(tmp_path / name).to_dict() == sub.to_dict()
        assert config.sub_configs[name] is type(sub)


def test_auto_model_from_config_is_the_vpt_model(tester):
    model = AutoModel.from_config(tester.model.config)
    assert type(model) is VPT_BASES[tester.base].model_class.vpt_model_class
    assert tester.model.can_generate() and not model.can_generate()  # the generation-mixin check


def test_save_and_load_give_the_same_model(tester, tmp_path):
    tester.model.save_pretrained(tmp_path)
    loaded, info = type(tester.model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs = tester.inputs()
    with torch.no_grad():
        assert torch.equal(tester.model(**inputs).logits, loaded.eval()(**inputs).logits)


# ------------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("with_ids", [True, False])
def test_generate_from_inputs_embeds(tester, with_ids):
    inputs = tester.inputs()
    embeds = tester.model.get_input_embeddings()(inputs["input_ids"])
    kwargs = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "do_sample": False}
    if with_ids:
        kwargs["input_ids"] = inputs["input_ids"]
    ours, theirs = tester.generate_both(**kwargs)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mode", ["greedy", "static cache", "beam search", "assisted", "prompt lookup", "sampling"])
def test_generation_as_stock(tester, mode):
    single = mode in ("assisted", "prompt lookup")  # transformers' assisted decoding takes one sequence
    kwargs = {**tester.inputs(batch_size=1 if single else 2), "do_sample": False}
    if mode == "static cache":
        kwargs["cache_implementation"] = "static"
    elif mode == "beam search":
        kwargs.update(num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    elif mode == "assisted":
        kwargs["assistant_model"] = make_model(tester.branches, seed=8, base=tester.base)
    elif mode == "prompt lookup":
        kwargs["prompt_lookup_num_tokens"] = 2
    elif mode == "sampling":
        kwargs.update(do_sample=True, num_return_sequences=3, top_k=20, temperature=0.8)
    ours, theirs = tester.generate_both(**kwargs)
    assert torch.equal(sequences(ours), sequences(theirs))
    if mode == "beam search":
        torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)
    if mode == "sampling":
        assert sequences(ours).shape[0] == 3 * kwargs["input_ids"].shape[0]


def test_static_cache_decoding_compiles_with_fullgraph(tester):
    """The decode step traces into one graph (a graph break would raise), and decodes as the eager model."""
    assert type(tester.model)._can_compile_fullgraph
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles on CUDA only unless told otherwise
    kwargs = {**tester.inputs(), "do_sample": False, "max_new_tokens": 4, "pad_token_id": PAD,
              "eos_token_id": IM_END, "cache_implementation": "static"}
    torch._dynamo.reset()
    compiled = tester.model.generate(**kwargs, compile_config=compile_config)
    eager = tester.model.generate(**kwargs, disable_compile=True)
    assert torch.equal(compiled, eager)
