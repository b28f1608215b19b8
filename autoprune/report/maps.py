"""Token-reduction maps: for the front's configs, which patches the last block receives kept,
merged or pruned, on a few validation images. Loads each trial's checkpoint and samples images
from the study's data, so it is the one part of the report that runs models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import PruneConfig
from .context import Context
from .plots import _figure, _png_uri, _style
from .rows import Row

SAMPLE_IMAGES = 4


@dataclass
class MapEntry:
    row: Row
    image: str | None = None   # PNG data URI
    note: str = ""


def patch_status(source, valid=None):
    """Per patch, for one image: -1 pruned (held by no token), 0 kept as itself, g >= 1 merged into
    token group g (several patches in one token). `source` is [N, P] (tokens x patches)."""
    import torch

    if valid is not None:
        source = source[valid]
    held = source.sum(0)
    owner = source.argmax(0)
    members = (source > 1e-6).sum(1)
    status = torch.zeros(source.shape[1], dtype=torch.long)
    status[held <= 1e-6] = -1
    merged_tokens = [int(t) for t in torch.nonzero(members > 1).flatten()]
    for group, token in enumerate(merged_tokens, start=1):
        status[(owner == token) & (held > 1e-6)] = group
    return status


def _load_model(settings: dict, row: Row):
    import timm
    import torch

    from ..patch import apply

    state = torch.load(row.checkpoint, map_location="cpu", weights_only=True)
    model = timm.create_model(settings["model"]["name"], num_classes=int(state["head.weight"].shape[0]),
                              **dict(settings["model"].get("kwargs") or {}))
    model.load_state_dict(state)
    return apply(model, PruneConfig.from_dict(row.trial.user_attrs["prune_config"])).eval()


def _sample_images(settings: dict, model):
    import torch

    from ..data import SyntheticOptions, load_datasets, model_data_config

    config = model_data_config(model)
    synthetic = SyntheticOptions(**settings["synthetic"]) if isinstance(settings.get("synthetic"), dict) \
        else SyntheticOptions()
    # the synthetic val split depends on the seed, class count and image size only: skip rendering
    # the train and test images, which the maps do not use (seconds for a full-size study)
    synthetic = dataclasses.replace(synthetic, train_size=synthetic.num_classes, test_size=0)
    datasets = load_datasets(settings["data"], config, synthetic=synthetic)
    val = datasets.val
    count = min(SAMPLE_IMAGES, len(val))
    step = len(val) / count
    items = [val[int(i * step)] for i in range(count)]
    images = torch.stack([image for image, _ in items])
    labels = [int(label) for _, label in items]
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    shown = (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return images, shown, labels, datasets.classes


# distinct colours for merged tokens, the most distinct first (Trubetskoy's list, without greys)
GROUP_COLORS = ("#e6194B", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
                "#bfef45", "#469990", "#9A6324", "#800000", "#808000", "#000075", "#fabed4", "#dcbeff",
                "#aaffc3", "#ffd8b1")


def _group_colors(count: int) -> list[tuple[float, float, float]]:
    from matplotlib.colors import to_rgb

    return [to_rgb(GROUP_COLORS[i % len(GROUP_COLORS)]) for i in range(count)]


def map_figure(row: Row, model, images, shown, labels, classes) -> tuple[str, str]:
    """One figure per config: the images, then which patches were kept, merged or pruned."""
    import numpy as np
    import torch
    from matplotlib.patches import Patch

    model.track_source = True
    with torch.no_grad():
        logits = model(images)
    tokens = model.final_tokens
    grid = tuple(model.patch_embed.grid_size)
    height, width = shown.shape[1:3]
    count = len(images)
    summaries = []
    with _style():
        fig = _figure(2.55 * count, 5.6)
        axes = fig.subplots(2, count, squeeze=False)
        for b in range(count):
            source = tokens.source[b].float()
            valid = None if tokens.valid is None else tokens.valid[b]
            status = patch_status(source, valid).reshape(grid).numpy()
            groups = int(status.max()) if status.size else 0
            colors = _group_colors(groups)
            overlay = np.zeros(grid + (4,))
            overlay[status == -1] = (0.07, 0.07, 0.09, 0.82)
            for g in range(1, groups + 1):
                overlay[status == g] = colors[g - 1] + (0.55,)
            kept, pruned = int((status == 0).sum()), int((status == -1).sum())
            merged = int((status > 0).sum())
            predicted = int(logits[b].argmax())
            truth = classes[labels[b]] if labels[b] < len(classes) else str(labels[b])
            guess = classes[predicted] if predicted < len(classes) else str(predicted)
            top, bottom = axes[0][b], axes[1][b]
            top.imshow(shown[b], extent=(0, width, height, 0), interpolation="nearest")
            top.set_title(f"{truth}\npredicted: {guess} {'✓' if predicted == labels[b] else '✗'}", fontsize=10,
                          fontweight="normal", color="#1d2433" if predicted == labels[b] else "#b03a2e")
            bottom.imshow(shown[b], extent=(0, width, height, 0), interpolation="nearest")
            bottom.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
            ph, pw = height / grid[0], width / grid[1]
            bottom.vlines([pw * i for i in range(1, grid[1])], 0, height, color="white", linewidth=0.4, alpha=0.6)
            bottom.hlines([ph * i for i in range(1, grid[0])], 0, width, color="white", linewidth=0.4, alpha=0.6)
            bottom.set_xlim(0, width)
            bottom.set_ylim(height, 0)
            bottom.set_title(f"kept {kept} · merged {merged}→{groups} · pruned {pruned}", fontsize=9.5,
                             fontweight="normal")
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            summaries.append(kept + groups)
        fig.legend(handles=[Patch(facecolor="none", edgecolor="#777", label="kept as itself (no tint)"),
                            Patch(facecolor=(0.07, 0.07, 0.09, 0.82), label="pruned (held by no token)"),
                            Patch(facecolor=_group_colors(1)[0] + (0.55,),
                                  label="merged (one colour per token holding several patches)")],
                   loc="outside lower center", ncol=3, frameon=False, fontsize=10)
        patches = grid[0] * grid[1]
        note = (f"{grid[0]}×{grid[1]} = {patches} patches; the final block sees "
                f"{', '.join(map(str, summaries))} patch tokens for these images")
        return _png_uri(fig), note


def token_maps(ctx: Context, maps: int) -> list[MapEntry]:
    """Maps of the first `maps` front configs; a note instead of an entry where one cannot be drawn."""
    entries = [MapEntry(r) for r in ctx.front[:max(0, maps)]]
    if not entries:
        return []
    model_settings = ctx.settings.get("model")
    if not isinstance(model_settings, dict) or "data" not in ctx.settings:
        for entry in entries:
            entry.note = "the study records no model or data settings: maps skipped"
        return entries
    sample = None
    for entry in entries:
        row = entry.row
        if not row.checkpoint or not Path(row.checkpoint).is_file():
            entry.note = f"checkpoint missing ({row.checkpoint or 'none recorded'}): map skipped"
            continue
        try:
            model = _load_model(ctx.settings, row)
            if sample is None:
                sample = _sample_images(ctx.settings, model)
            entry.image, entry.note = map_figure(row, model, *sample)
        except Exception as error:  # a moved dataset, changed code, an unreadable file: say so, go on
            entry.note = f"map skipped: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return entries
