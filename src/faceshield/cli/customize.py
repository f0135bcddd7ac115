"""``faceshield attack customize`` (the DreamBooth/LoRA attack harness) and ``faceshield evaluate-customization``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from faceshield.diffusion.hub import SD2_BASE_ID as DEFAULT_MODEL


def _attack_options(func):
    """Options shared by both commands (the attacker's settings; defaults: Anti-DreamBooth's evaluation)."""
    options = [
        click.option("--mode", type=click.Choice(["dreambooth", "lora"]), default="dreambooth",
                     help="Full DreamBooth (UNet + text encoder, lr 5e-7) or LoRA adapters (lr 1e-4)."),
        click.option("--diffusion-model", default=DEFAULT_MODEL, metavar="HUB_ID|FOLDER",
                     help="Stable Diffusion 1.x/2.x to fine-tune."),
        click.option("--steps", type=click.IntRange(0), default=1000, help="Fine-tuning steps."),
        click.option("--n-images", type=click.IntRange(1), default=16, help="Images generated per prompt."),
        click.option("--sample-steps", type=click.IntRange(1), default=100, help="DDIM steps per image."),
        click.option("--resolution", type=click.IntRange(64), default=512, help="Training/generation side."),
        click.option("--prior-weight", type=click.FloatRange(0), default=0.0,
                     help="Prior preservation weight (0 = off; 200 class images when on)."),
        click.option("--seed", type=int, default=0, help="Seed of training and generation."),
        click.option("--fr-models", default="", metavar="NAMES",
                     help="Comma-separated FR models of our zoo for ISM (default: the calibrated surrogate models)."),
        click.option("--device", default="cpu", help="cpu, cuda, cuda:N."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _config(mode, diffusion_model, steps, n_images, sample_steps, resolution, prior_weight, seed, device):
    from faceshield.eval.customization import AttackConfig

    return AttackConfig(mode=mode, diffusion_model=diffusion_model, steps=steps, n_images=n_images,
                        sample_steps=sample_steps, resolution=resolution, prior_weight=prior_weight, seed=seed,
                        device=device)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _line(name: str, s: dict) -> str:
    ism = ", ".join(f"{m} {v:.2f}" for m, v in s["ism"].items() if v is not None) or "no face"
    bq = "–" if s["brisque"] is None else f"{s['brisque']:.1f}"
    return f"{name:<8} FDFR {100 * s['fdfr']:5.1f}%  ISM {ism}  BRISQUE {bq}"


@click.group("attack")
def attack() -> None:
    """Attacks that measure protection (customization of a diffusion model on your photos)."""


@attack.command("customize")
@click.argument("photo_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Run folder: generated images, report.json, report.html.")
@click.option("--clean", "clean_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Clean photos of the person the ISM refers to (default: PHOTO_DIR itself).")
@_attack_options
def customize(photo_dir, output, clean_dir, mode, diffusion_model, steps, n_images, sample_steps, resolution,
              prior_weight, seed, fr_models, device, as_json) -> None:
    """Fine-tune Stable Diffusion on PHOTO_DIR (one person), generate "a photo of sks person" and "a dslr portrait
    of sks person", and score the images: FDFR, ISM (our FR zoo and the independent judge), BRISQUE."""
    from faceshield.eval.customization import attack_customize
    from faceshield.fileio import check_writable_folder

    check_writable_folder(output, "output folder (-o)")
    config = _config(mode, diffusion_model, steps, n_images, sample_steps, resolution, prior_weight, seed, device)
    report = attack_customize(photo_dir, output, config, clean_dir=clean_dir, models=_names(fr_models))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    lines = [_line(f"prompt{k}", s) for k, s in enumerate(report["prompts"].values())]
    click.echo("\n".join([f"report: {output / 'report.html'}", *lines, _line("all", report["overall"])]))


@click.command("evaluate-customization")
@click.argument("set_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--methods", default="haa,aspl", help="Comma-separated set methods to compare with the clean set.")
@click.option("--reference", "reference_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Clean photos of the person for ISM (default: SET_DIR).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Method setting for every method that has it, e.g. --set outer_steps=10.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default="faceshield-customization",
              help="Folder of the runs and summary.json / summary.html.")
@_attack_options
def evaluate_customization(set_dir, methods, reference_dir, settings, output, mode, diffusion_model, steps, n_images,
                           sample_steps, resolution, prior_weight, seed, fr_models, device, as_json) -> None:
    """Protect SET_DIR with each method, attack the clean and every protected set alike, and tabulate them."""
    from faceshield.eval.customization import evaluate_customization as run
    from faceshield.fileio import check_writable_folder
    from faceshield.methods.base import get_method_class
    from faceshield.settings import parse_overrides

    check_writable_folder(output, "output folder (-o)")
    names = list(_names(methods))
    if not names:
        raise click.BadParameter("name at least one set method (haa, aspl)", param_hint="--methods")
    classes = tuple(get_method_class(n).Config for n in names)
    if not all(getattr(get_method_class(n), "set_method", False) for n in names):
        raise click.BadParameter("only set methods (haa, aspl) protect against customization", param_hint="--methods")
    overrides = parse_overrides(classes, settings) if settings else {}
    config = _config(mode, diffusion_model, steps, n_images, sample_steps, resolution, prior_weight, seed, device)
    summary = run(set_dir, names, output, config, overrides, reference_dir, models=_names(fr_models))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    lines = [f"summary: {output / 'summary.html'}"] + [_line(n, r) for n, r in summary["methods"].items()]
    click.echo("\n".join(lines))
