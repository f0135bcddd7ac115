"""Hub ids of the pretrained models the diffusion methods default to (plain strings: importing this module loads
neither torch nor diffusers, so the command line can show them in ``--help``).

Each one can be replaced by a local diffusers folder (``--diffusion-model``, ``--set model=…``).
"""

SD2_BASE_ID = "stabilityai/stable-diffusion-2-base"  # adv-latent (the authors' model); the customization attack
SD14_ID = "CompVis/stable-diffusion-v1-4"  # Diff-Privacy (the authors' model)
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # APL (the authors' model; `runwayml`'s repo is gone)
DDPM_CELEBAHQ_ID = "google/ddpm-ema-celebahq-256"  # MAP (DiffAM's CelebA-HQ DDPM in diffusers form)
CLIP_VIT_L14_ID = "openai/clip-vit-large-patch14"  # Diff-Privacy's MSI; the LAION aesthetic predictor's backbone
