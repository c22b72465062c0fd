"""A deliberately plain implementation of the VPT two-pass forward, written from the specification.

Everything runs per sample and per image with explicit loops: full-length pass 1, control state = pass-1 hidden
state right before each action token, f + (f.c)c per image, action embeddings replaced, full pass 2, shifted
cross-entropy. On a DeepStack base (Qwen3-VL) both passes add the original images' DeepStack features at their
positions, and the clip images' at their pad positions when `config.clip_deepstack`. The model under test must
match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BRANCH_PREFIX = {"dino": "detection", "sam": "seg", "clip": "clip"}


def _runs(row: torch.Tensor, token_id: int) -> list[list[int]]:
    """Positions of `token_id` in `row`, grouped into maximal contiguous runs."""
    runs: list[list[int]] = []
    for position in (row == token_id).nonzero().flatten().tolist():
        if runs and runs[-1][-1] == position - 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    return runs


def _visual(model, pixels: torch.Tensor, grid: torch.Tensor):
    """The vision tower: (merged features, DeepStack features per layer, or None for a tower without them)."""
    out = model.model.visual(pixels.type(model.model.visual.dtype), grid_thw=grid)
    if isinstance(out, tuple):
        return out[0], list(out[1])
    return out, None


def _image_features(model, kind: str, index: int, inputs: dict):
    """Unprojected features (tokens, dim) of image `index` of branch `kind`, encoding that image alone, and its
    DeepStack features per layer (clip images of a DeepStack base only; else None)."""
    if kind == "dino":
        image = inputs["detection_images"][index : index + 1]
        return model.detection_model(pixel_values=image).last_hidden_state[0, 1:], None
    if kind == "sam":
        image = inputs["seg_images"][index : index + 1]
        return model.seg_model(image).last_hidden_state, None  # (1, C, h, w), projected below
    grid = inputs["clip_images_grid_thw"]
    patches = grid.prod(-1).tolist()
    start = sum(patches[:index])
    pixels = inputs["clip_pixel_values"][start : start + patches[index]]
    return _visual(model, pixels, grid[index : index + 1])


def _project(model, kind: str, features: torch.Tensor, condition_states: torch.Tensor | None) -> torch.Tensor:
    projector = getattr(model, f"{BRANCH_PREFIX[kind]}_projector")
    if kind == "dino":
        f = projector.linear_feature(projector.layernorm_feature(features))
    elif kind == "sam":
        x = projector.layernorm_feature(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = projector.conv_feature(x)[0]  # (H, h', w')
        f = x.reshape(x.shape[0], -1).T  # row-major over the grid
    else:
        f = features
    if condition_states is None:
        return f
    c = projector.linear_condition(projector.layernorm_condition(condition_states.reshape(-1)))
    out = []
    for token in f:
        out.append(token + torch.dot(token, c) * c)
    return torch.stack(out)


def reference_forward(model, input_ids, attention_mask=None, labels=None, pixel_values=None, image_grid_thw=None,
                      paragraph_mask_rows: dict | None = None, **extra):
    """Return (logits, loss). `paragraph_mask_rows` maps a row to the paragraph indices it blanks in pass 2."""
    config = model.config
    embed = model.model.language_model.embed_tokens
    batch, length = input_ids.shape
    base = embed(input_ids)
    deepstack = {}  # (row, column) -> the DeepStack feature of each layer added there
    if pixel_values is not None:
        image_tokens, image_deepstack = _visual(model, pixel_values, image_grid_thw)
        rows, cols = (input_ids == config.image_token_id).nonzero(as_tuple=True)
        base = base.clone()
        for k, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            base[r, c] = image_tokens[k]
            if image_deepstack is not None:
                deepstack[r, c] = [layer[k] for layer in image_deepstack]

    # Pair images with samples: each pad run is one image, in sample order.
    images = []  # (kind, row, positions, features)
    counters = {kind: 0 for kind in BRANCH_PREFIX}
    for r in range(batch):
        for kind, prefix in BRANCH_PREFIX.items():
            pad_id = getattr(config, f"{prefix}_image_token_id")
            if pad_id is None:
                continue
            for run in _runs(input_ids[r], pad_id):
                feats, feats_deepstack = _image_features(model, kind, counters[kind], extra)
                counters[kind] += 1
                images.append((kind, r, run, feats))
                if feats_deepstack is not None and getattr(config, "clip_deepstack", False):
                    for k, c in enumerate(run):
                        deepstack[r, c] = [layer[k] for layer in feats_deepstack]

    def with_images(embeds, conditions):
        embeds = embeds.clone()
        for i, (kind, r, run, feats) in enumerate(images):
            projected = _project(model, kind, feats, None if conditions is None else conditions[i])
            assert projected.shape[0] == len(run)
            embeds[r, run] = projected
        return embeds

    positions, _ = model.model.get_rope_index(input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    decoder = model.model.language_model

    def run_decoder(embeds):
        kwargs = {}
        if deepstack:
            mask = torch.zeros(batch, length, dtype=torch.bool)
            for r, c in deepstack:
                mask[r, c] = True
            order = sorted(deepstack)  # row-major, as the text model reads them
            layers = [torch.stack([deepstack[p][k] for p in order]) for k in range(len(deepstack[order[0]]))]
            kwargs = {"visual_pos_masks": mask, "deepstack_visual_embeds": layers}
        return decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask, **kwargs)

    action_ids = {kind: getattr(config, f"{prefix}_action_id") for kind, prefix in BRANCH_PREFIX.items()}
    action_positions = [
        (r, t, kind)
        for r in range(batch)
        for t in range(length)
        for kind, a in action_ids.items()
        if a is not None and int(input_ids[r, t]) == a
    ]
    pass1_embeds = with_images(base, None)
    if config.num_inner_forward_run == 1 or not action_positions:
        final = pass1_embeds
    else:
        h1 = run_decoder(pass1_embeds).last_hidden_state
        conditions = []
        for kind, r, run, feats in images:
            # the k-th image of `kind` in row r pairs with the k-th group of `scale` action tokens of `kind` in row r
            k = [img for img in images if img[0] == kind and img[1] == r].index((kind, r, run, feats))
            scale = config.projector_scale
            ts = [t for (rr, t, kk) in action_positions if rr == r and kk == kind][k * scale : (k + 1) * scale]
            conditions.append(torch.cat([h1[r, t - 1] for t in ts]))
        final = with_images(base, conditions)
        for r, paragraphs in (paragraph_mask_rows or {}).items():
            starts = (input_ids[r] == config.para_start_id).nonzero().flatten().tolist()
            ends = (input_ids[r] == config.para_end_id).nonzero().flatten().tolist()
            for p in paragraphs:
                final[r, starts[p] + 1 : ends[p]] = 0.0
        for r, t, _ in action_positions:
            final[r, t] = h1[r, t - 1]
    hidden = run_decoder(final).last_hidden_state
    logits = model.lm_head(hidden)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    return logits, loss
