"""Training: a zero-contribution path through every VPT branch, so that DDP needs no `find_unused_parameters`.

A micro-batch may lack a branch's extra images (or, in single-pass mode, never use the projector's condition
path), which leaves trainable parameters without a gradient on that rank. Each training step therefore adds
`0 * projector(dummy features, dummy condition).sum()` for every built branch: every trainable VPT parameter
gets a (zero) gradient on every rank, and the loss value is unchanged. The dummy features come from the branch's
own encoder on one blank image, preprocessed by the VPT processor; they are computed once and reused while the
encoder is frozen, and recomputed each step when it trains.

Under DeepSpeed ZeRO-3 or FSDP the model's own uniform mode (`uniform_module_calls`) is on: its forward already
runs every branch once with a zero contribution, so this term is not added (it would call the modules again).

Each batch carries its dataset record ids (`vpt_record`, see `records`): they are popped before the forward, and
a `ValueError` of the forward ("Sample i ...") is raised again naming the dataset record of that row.

For a model that is not VPT the trainer is the stock one (the loss is returned untouched). The SFT workflow
imported the trainer class by name (no registry), so it is replaced there (guarded private patch).
"""

from typing import Any

import torch
from llamafactory.train.sft import workflow
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from PIL import Image
from typing_extensions import override

from transformers_vpt.models.vpt.modeling_vpt import VPTForConditionalGenerationMixin
from transformers_vpt.perception import VisionBranch

from .guard import Private
from .records import BATCH_KEY, naming_records

DUMMY_IMAGE_SIZE = 64


class VPTSeq2SeqTrainer(CustomSeq2SeqTrainer):
    def __init__(self, *args, processor=None, **kwargs) -> None:
        super().__init__(*args, processor=processor, **kwargs)
        self.vpt_processor = processor
        self.frozen_dummy_features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _dummy_features(self, model: VPTForConditionalGenerationMixin, branch: VisionBranch):
        encoder = getattr(model, branch.encoder_attr) if branch.encoder_attr else None
        trainable = encoder is not None and any(param.requires_grad for param in encoder.parameters())
        if trainable or branch.kind not in self.frozen_dummy_features:
            blank = Image.new("RGB", (DUMMY_IMAGE_SIZE, DUMMY_IMAGE_SIZE))
            inputs = self.vpt_processor.preprocess_extra_images(branch.tokens.prefix, [blank])
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
            with torch.set_grad_enabled(trainable):  # the branch encodes with the VPT model (`model.model`)
                features = branch.encode(model.model, inputs)[:2]

            if trainable:
                return features

            self.frozen_dummy_features[branch.kind] = features

        return self.frozen_dummy_features[branch.kind]

    def zero_branch_loss(self, model: VPTForConditionalGenerationMixin) -> torch.Tensor:
        condition_size = model.config.projector_scale * model.config.text_config.hidden_size
        total = 0.0
        for branch in model.vpt_branches:
            features, tokens_per_image = self._dummy_features(model, branch)
            control_states = features.new_zeros(len(tokens_per_image), condition_size)
            total = total + getattr(model, branch.projector_attr)(features, tokens_per_image, control_states).sum()

        return 0.0 * total

    @override
    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, **kwargs):
        with naming_records(inputs.pop(BATCH_KEY, None)):  # a "Sample i" error names its dataset record
            result = super().compute_loss(model, inputs, return_outputs, **kwargs)
        vpt_model = self.accelerator.unwrap_model(model)
        if hasattr(vpt_model, "get_base_model"):  # peft
            vpt_model = vpt_model.get_base_model()

        if not model.training or not isinstance(vpt_model, VPTForConditionalGenerationMixin):
            return result

        if vpt_model.uses_uniform_module_calls:  # the forward gave every trainable VPT parameter a gradient
            return result

        if return_outputs:
            loss, outputs = result
            return loss + self.zero_branch_loss(vpt_model), outputs

        return result + self.zero_branch_loss(vpt_model)

    @override
    def prediction_step(self, model, inputs: dict[str, Any], *args, **kwargs):
        with naming_records(inputs.pop(BATCH_KEY, None)):
            return super().prediction_step(model, inputs, *args, **kwargs)


PRIVATE = (
    Private(workflow, "CustomSeq2SeqTrainer", expected=CustomSeq2SeqTrainer, patch="training"),
    Private(CustomSeq2SeqTrainer, "compute_loss", ("self", "model", "inputs", "args", "kwargs"), patch="training"),
    Private(CustomSeq2SeqTrainer, "prediction_step",
            ("self", "model", "inputs", "prediction_loss_only", "ignore_keys", "gen_kwargs"), patch="training"),
)


def patch() -> None:
    workflow.CustomSeq2SeqTrainer = VPTSeq2SeqTrainer
