"""``faceshield map train``: fine-tune a Machine Pareidolia network (registered in :mod:`faceshield.cli.main`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from faceshield.models.expressions import EMOTION_LABELS


@click.group("map")
def map_group() -> None:
    """Machine Pareidolia: train the expression-editing network that `protect --method map` uses."""


@map_group.command("train")
@click.option("--faces", "faces_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Folder of face photos to fine-tune on (the most confident face of each; disjoint from the "
                   "photos you will evaluate on).")
@click.option("--target", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Photo of the identity to impersonate; without it the network learns to dodge.")
@click.option("--expression", type=click.Choice(EMOTION_LABELS), default="happy", help="Expression to show.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the trained network (unet/, scheduler/, map.json) and its checkpoint.")
@click.option("--pretrained", metavar="HUB_ID|FOLDER", default="google/ddpm-ema-celebahq-256",
              help="Pretrained pixel-space DDPM (diffusers UNet2DModel) to fine-tune and invert with.")
@click.option("--surrogates", help="Comma-separated FR models of the identity loss (default: calibrated models "
                                   "with AUC ≥ 0.9).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a training setting, e.g. --set epochs=2 --set lr=1e-5 (see docs/map.md).")
@click.option("--device", default="cpu", help="Where to train (cpu, cuda, cuda:1, mps).")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many steps (checkpointed; run the same "
                                                           "command again to resume).")
@click.option("--overwrite", is_flag=True, help="Start afresh even if the folder holds a checkpoint or a network.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the saved settings as JSON.")
def train(faces_dir: Path, target: Path | None, expression: str, output: Path, pretrained: str,
          surrogates: str | None, settings: tuple[str, ...], device: str, max_steps: int | None, overwrite: bool,
          quiet: bool, as_json: bool) -> None:
    """Fine-tune the score network toward the target identity and the expression (resumes a checkpoint)."""
    from tqdm import tqdm

    from faceshield.methods.map import MAPTrainConfig, train_map
    from faceshield.settings import SettingError, parse_overrides, check_device

    check_device(device)
    overrides = parse_overrides(MAPTrainConfig, settings)
    overrides.update(expression=expression, pretrained=pretrained, device=device)
    if surrogates:
        overrides["surrogates"] = tuple(s.strip() for s in surrogates.split(",") if s.strip())
    try:
        config = MAPTrainConfig(**overrides)  # checked before any model loads
    except SettingError as exc:
        raise SettingError(f"map train: {exc}") from None
    bar = tqdm(disable=quiet or as_json, desc="fine-tuning", unit="step")

    def progress(step: int, total: int, losses: dict) -> None:
        bar.total = total
        bar.n = step
        bar.set_postfix({k: f"{losses[k]:.3f}" for k in ("identity", "expression", "laplacian", "score")},
                        refresh=False)
        bar.refresh()

    try:
        result = train_map(config, faces_dir, target, output, progress, overwrite=overwrite, max_steps=max_steps)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    elif not result["finished"]:
        click.echo(f"stopped at step {result['step']} of {result['total_steps']}; checkpoint in {output} "
                   f"(run the same command again to resume)")
    else:
        history = result["history"]
        click.echo(f"saved {output} ({result['goal']}, {result['expression']}, {result['step']} steps on "
                   f"{len(result['faces'])} faces, {result['seconds']:.0f} s); last identity loss "
                   f"{history['identity'][-1]:.3f}, expression loss {history['expression'][-1]:.3f}\n"
                   f"protect with: faceshield protect PHOTOS --method map --set model={output}")
