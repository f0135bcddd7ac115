"""Validate faceshield's native ImageReward (src/faceshield/diffusion/image_reward.py) against the reference package.

The reference stack cannot live in faceshield's venv (image-reward 1.5 pins timm 0.6.13 and fairscale 0.4.13), so it
runs in its own venv, and nothing is downloaded: no checkpoint (deterministic random weights instead) and no
bert-base-uncased tokenizer (a small local vocabulary; ``BertTokenizer.from_pretrained`` is redirected to it).

    python3 -m venv /work/refvenv_ir && /work/refvenv_ir/bin/pip install torch==2.14.1 torchvision \\
        "timm==0.6.13" "fairscale==0.4.13" "transformers<4.40" image-reward==1.5
    # the small fixture the CI test (tests/test_image_reward.py) checks against:
    /work/refvenv_ir/bin/python benchmarks/validate_image_reward.py fixture
    # full size (ViT-L/16 24 blocks, BERT-base 12 layers, vocabulary 30524), once:
    /work/refvenv_ir/bin/python benchmarks/validate_image_reward.py full --dir /tmp/ir_full
    .venv/bin/python benchmarks/validate_image_reward.py compare --dir /tmp/ir_full

What is compared: ImageReward's ``score_gard`` (its differentiable path, the one HAA needs) on images ``2×3×64×80``
in [0, 1], preprocessed by torchvision's tensor transforms (``Resize(224, bicubic, antialias)``, ``CenterCrop(224)``,
CLIP ``Normalize``: ``score``'s transform without the PIL 8-bit rounding), for two prompts, and the gradient of one
score w.r.t. the image's low-resolution source (the images are a bilinear upsampling of ``2×3×24×30`` seeded noise,
so the stored gradient is small). The ``full`` mode also reports ImageReward's ``score`` (PIL path) on the 8-bit
image against faceshield's differentiable path, i.e. what the missing 8-bit rounding costs.

Weights (``random_state``), per key of the reference ``state_dict`` in sorted order, each from its own
``torch.Generator`` seeded ``seed + index``: LayerNorm weights ``1 + 0.1·N(0,1)``; other 1-D tensors (biases)
``0.05·N``; word/position embeddings ``0.5·N``; matrices ``N/√fan_in``; the ViT's first tokens small, so that its
LayerNorm ε (1e-6) shows in the scores: ``cls_token``, ``pos_embed`` ``0.01·N``, the patch convolution
``0.01·N/√fan_in``; ``position_ids`` buffers ``arange``. The file is saved as ``ImageReward.pt`` is: the
model's whole state dict (BLIP's unused contrastive projections included).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "image_reward_reference.json"
SEED = 20231
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "person", "portrait",
         "dslr", "the", "face", "##s", "'", "close", "up", "blurry", "ugly"]
PROMPTS = ["a photo of person", "a DSLR close-up portrait of the person's ugly, blurry faces"]
BLIP_MED_CONFIG = {  # THUDM/ImageReward's med_config.json (BLIP's)
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True}
SMALL_MED_CONFIG = {**BLIP_MED_CONFIG, "num_hidden_layers": 2, "intermediate_size": 1536,
                    "max_position_embeddings": 40, "vocab_size": len(VOCAB) + 2}  # + [DEC], [ENC]
SMALL_VIT = {"width": 256, "depth": 2, "heads": 4}  # head width 64, as BLIP's ViT-B/L
IMAGE_SHAPE, SOURCE_SIZE = (2, 3, 64, 80), (24, 30)


def scale_of(key: str, shape: tuple[int, ...]) -> str:
    if key.startswith("blip.visual_encoder.") and key.endswith(("cls_token", "pos_embed", "patch_embed.proj.weight")):
        return "vit_input"
    if len(shape) == 1 and ("norm" in key.lower()) and key.endswith("weight"):
        return "layernorm"
    if key.endswith(("cls_token", "pos_embed", "word_embeddings.weight", "position_embeddings.weight")):
        return "embedding"
    return "bias" if len(shape) == 1 else "matrix"


def random_state(keys: list[tuple[str, tuple[int, ...]]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """The deterministic weights for ``keys`` (name, shape) — see the module docstring."""
    state = {}
    for index, (key, shape) in enumerate(sorted(keys)):
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).expand(shape).clone()
            continue
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + index))
        kind = scale_of(key, shape)
        if kind == "layernorm":
            state[key] = 1 + 0.1 * noise
        elif kind == "bias":
            state[key] = 0.05 * noise
        elif kind == "embedding":
            state[key] = 0.5 * noise
        elif kind == "vit_input":  # small first tokens (variance ~1e-4): the ViT's LayerNorm ε 1e-6 then matters
            state[key] = 0.01 * noise / math.sqrt(math.prod(shape[1:]) if len(shape) == 4 else 1)
        else:
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
    return state


def images(seed: int = SEED) -> torch.Tensor:
    """The low-resolution source ``2×3×24×30`` in [0, 1] (seeded) whose upsampling is the scored image."""
    return torch.rand((IMAGE_SHAPE[0], 3, *SOURCE_SIZE), generator=torch.Generator().manual_seed(seed + 10**6))


def upsample(source: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(source, size=IMAGE_SHAPE[2:], mode="bilinear", align_corners=False)


# --- reference side (runs in /work/refvenv_ir) ------------------------------------------------------------------
def reference_model(med_config: Path, vocab: Path, small: bool):
    """image-reward 1.5's ImageReward, built offline (its tokenizer from ``vocab``; ``small``: a 2-block ViT)."""
    # stubs for modules the package imports but scoring does not use: OpenAI's clip (its CLIP/Aesthetic scores) and
    # its ReFL training code (imports diffusers, which needs a newer transformers than the package allows)
    sys.modules.setdefault("clip", types.ModuleType("clip"))
    sys.modules.setdefault("ImageReward.ReFL", types.ModuleType("ImageReward.ReFL"))
    import transformers

    transformers.BertTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: cls(vocab_file=str(vocab)))
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.ImageReward import ImageReward
    from ImageReward.models.BLIP.vit import VisionTransformer

    if small:
        blip_pretrain.create_vit = lambda *args, **kwargs: (VisionTransformer(
            img_size=224, patch_size=16, embed_dim=SMALL_VIT["width"], depth=SMALL_VIT["depth"],
            num_heads=SMALL_VIT["heads"]), SMALL_VIT["width"])
    return ImageReward(med_config=str(med_config), device="cpu").eval()


def reference_outputs(model, folder: Path) -> dict:
    """Tokens, scores (prompt × image) and the gradient of score(prompt 0, image 0) w.r.t. its source."""
    from torchvision import transforms

    preprocess = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(224),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    tokens = [model.blip.tokenizer(p, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
              for p in PROMPTS]
    source = images().requires_grad_(True)
    pixels = preprocess(upsample(source))
    scores = [model.score_gard(t.input_ids.expand(len(pixels), -1), t.attention_mask.expand(len(pixels), -1),
                               pixels).view(-1) for t in tokens]
    (grad,) = torch.autograd.grad(scores[0][0], source)
    return {"input_ids": [t.input_ids[0].tolist() for t in tokens],
            "attention_mask": [t.attention_mask[0].tolist() for t in tokens],
            "scores": [s.detach().tolist() for s in scores], "grad_source0": grad[0].flatten().tolist()}


def build_reference(folder: Path, small: bool) -> tuple[dict, dict]:
    """Reference model with the deterministic weights saved as ``folder/ImageReward.pt`` + ``med_config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    med = SMALL_MED_CONFIG if small else BLIP_MED_CONFIG
    (folder / "med_config.json").write_text(json.dumps(med, indent=1))
    # full size: padded with [unusedN] to bert-base-uncased's 30522 tokens (+ [DEC], [ENC] = the 30524 embeddings)
    vocab = VOCAB if small else VOCAB + [f"[unused{i}]" for i in range(1, 30523 - len(VOCAB))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = reference_model(folder / "med_config.json", folder / "vocab.txt", small)
    keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    state = random_state(keys)
    model.load_state_dict(state, strict=True)
    torch.save(model.state_dict(), folder / "ImageReward.pt")
    return {"keys": [[k, list(s)] for k, s in sorted(keys)], "med_config": med, "vocab": VOCAB}, \
        {"model": model, "state": state}


def pil_gap(model, folder: Path) -> dict:
    """ImageReward's ``score`` (PIL: 8-bit image, PIL bicubic resize, 8-bit rounding) vs ``score_gard`` on the
    same 8-bit image through torchvision's float transforms (what faceshield's differentiable path matches)."""
    from PIL import Image

    image = (upsample(images())[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    pil = model.score(PROMPTS[0], Image.fromarray(image))
    return {"pil_score": pil, "image_uint8_seed": SEED}


def run_reference(mode: str, folder: Path) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    meta, ref = build_reference(folder, small=(mode == "fixture"))
    out = reference_outputs(ref["model"], folder)
    sums = {k: float(v.double().sum()) for k, v in ref["state"].items()}
    record = {"seed": SEED, "prompts": PROMPTS, "image_shape": list(IMAGE_SHAPE), "source_size": list(SOURCE_SIZE),
              "weight_scales": "see benchmarks/validate_image_reward.py (random_state)", **meta, "key_sums": sums,
              **out, "reference": "image-reward 1.5, torch %s, transformers %s" % (
                  torch.__version__, __import__("transformers").__version__)}
    if mode == "full":
        record.update(pil_gap(ref["model"], folder))
    path = FIXTURE if mode == "fixture" else folder / "reference.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    print(json.dumps({"mode": mode, "written": str(path), "bytes": path.stat().st_size, "scores": out["scores"],
                      "seconds": round(time.perf_counter() - start, 1)}))


# --- faceshield side (runs in faceshield's venv) -----------------------------------------------------------------
def compare(folder: Path, record: dict) -> dict:
    """faceshield's ImageReward loaded from ``folder`` against ``record``: max abs diffs of scores and gradient."""
    from faceshield.diffusion.rewards import create_reward_model

    source = images().requires_grad_(True)
    start = time.perf_counter()
    scorers = [create_reward_model("imagereward", str(folder / "ImageReward.pt"), prompt=prompt,
                                   tokenizer=str(folder / "vocab.txt")) for prompt in record["prompts"]]
    seconds = {"load": (time.perf_counter() - start) / len(scorers)}
    start = time.perf_counter()
    scores = torch.stack([scorer(upsample(source)) for scorer in scorers])
    seconds["forward_per_image"] = (time.perf_counter() - start) / scores.numel()
    start = time.perf_counter()
    (grad,) = torch.autograd.grad(scores[0][0], source)
    seconds["backward_one_score"] = time.perf_counter() - start
    ref_scores = torch.tensor(record["scores"], dtype=torch.float64)
    ref_grad = torch.tensor(record["grad_source0"], dtype=torch.float64)
    result = {"score_max_abs_diff": float((scores.detach().double() - ref_scores).abs().max()),
              "grad_max_abs_diff": float((grad[0].flatten().double() - ref_grad).abs().max()),
              "grad_max_abs": float(ref_grad.abs().max()), "scores": scores.tolist(),
              "reference_scores": record["scores"], "seconds_by_stage": seconds,
              "input_ids_equal": [s.ids[0].tolist() == ref for s, ref in zip(scorers, record["input_ids"])]}
    if "pil_score" in record:
        with torch.no_grad():
            u8 = (upsample(images()[:1]) * 255).round() / 255
            result["pil_path_minus_ours_on_8bit_image"] = record["pil_score"] - float(scorers[0](u8)[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("fixture", "full", "compare"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/image_reward_fixture"),
                        help="folder for ImageReward.pt, med_config.json, vocab.txt (and reference.json in full mode)")
    args = parser.parse_args()
    if args.mode == "compare":
        torch.set_num_threads(1)
        start = time.perf_counter()
        record = args.dir / "reference.json"  # written by the full mode; else the fixture
        result = compare(args.dir, json.loads((record if record.is_file() else FIXTURE).read_text()))
        print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 1)}))
    else:
        run_reference(args.mode, args.dir)


if __name__ == "__main__":
    main()
