"""Initial embeddings of newly added VPT tokens."""

from collections.abc import Iterable

import torch
from transformers import PreTrainedModel


@torch.no_grad()
def init_added_token_rows(model: PreTrainedModel, token_ids: Iterable[int]) -> list[int]:
    r"""Set the input and output embedding rows of newly added tokens to the mean of the rows before them.

    Qwen2-VL's matrices have spare rows (151,936 for 151,657 tokens), so added tokens take untrained padding rows
    and no resize (or LLaMA-Factory's noisy-mean initialisation) happens; their rows would otherwise start from
    whatever the padding rows hold. The mean of the trained rows (every row before the first added token) is a
    neutral start for both the input embedding and the output (lm_head) row. Ids past the matrices are left to
    the resize. Returns the ids that were initialised.
    """
    token_ids = sorted(set(token_ids))
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    matrices = {id(module.weight): module.weight for module in modules}  # tied embeddings count once
    rows = min(weight.shape[0] for weight in matrices.values())
    initialised = [i for i in token_ids if i < rows]
    if initialised:
        for weight in matrices.values():
            weight[initialised] = weight[: token_ids[0]].float().mean(dim=0).to(weight.dtype)

    return initialised
