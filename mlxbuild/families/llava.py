"""LLaVA (transformers' ``llava``): a CLIP vision tower, a two-layer projector, a Llama
decoder. The ``multimodal-text-to-text`` task kind's vision family
(``mlxbuild.families.multimodal``):

- ``vision_encoder(image[3, H, W] uint8) -> embeds[1, T, D]``: the image as ExecuTorch's
  multimodal runner hands it over (bytes, already resized to the tower's size), rescaled and
  normalised in the graph with the image processor's mean and std, through the vision tower;
  the features of ``vision_feature_layer`` (CLS dropped for the "default" strategy) through
  the projector: T = (H / patch)²;
- ``token_embedding`` and ``text_decoder`` (``mlxbuild.families.embeds``).

Why LLaVA among the VLMs: its vision tower attends bidirectionally within the image and the
decoder causally over everything, so the runner's segment-by-segment prefill computes exactly
what transformers computes with image placeholders (Gemma 3 attends bidirectionally across
the image's tokens inside the decoder, which one causal prefill call per segment does not
reproduce); ExecuTorch ships a LLaVA example for the same runner, and its image preprocessing
(a resize and a normalisation) is small enough to live in the graph and the processor file.
"""

from __future__ import annotations

NAME = "llava"
MODALITY = "images"
ENCODER = "vision_encoder"
METHODS = (ENCODER, "token_embedding", "text_decoder")
# CLIP's normalisation, transformers' CLIPImageProcessor defaults (OPENAI_CLIP_MEAN / STD): what
# a LLaVA checkpoint's preprocessor_config.json says, and what a synthetic one is given.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_size(cfg) -> int:
    return int(cfg.vision_config.image_size)


def image_tokens(cfg) -> int:
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return n if cfg.vision_feature_select_strategy == "default" else n + 1


def family_config(model) -> dict:
    from mlxbuild.families import embeds

    cfg = model.config
    return {**embeds.text_ids(model), "image_size": image_size(cfg), "image_tokens": image_tokens(cfg),
            "image_token_id": cfg.image_token_id, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}


def _normalise(image, mean, std):
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (image.to(torch.float32).unsqueeze(0) / 255.0 - m) / s


def image_features(model, image, fc: dict):
    """The projected features of a [3, H, W] uint8 image, [1, T, D]: what the method computes."""
    cfg = model.config
    pixels = _normalise(image, fc["image_mean"], fc["image_std"]).to(model.dtype)
    out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return out.pooler_output[0].unsqueeze(0)


def export(model, params: dict, flavour):
    import torch
    from torch import nn

    from mlxbuild.errors import BuildError
    from mlxbuild.families import embeds, hf
    from mlxbuild.families.common import export_methods

    cfg = model.config
    fc = family_config(model)
    if params["max_prefill_chunk"] < fc["image_tokens"]:
        raise BuildError(f"export.max_prefill_chunk {params['max_prefill_chunk']}: ExecuTorch's multimodal "
                         f"runner prefills an image's {fc['image_tokens']} embeddings in one text_decoder "
                         f"call, so the chunk must be at least that")
    dtype = hf.DTYPES[params["dtype"]]
    # Loaded with the flavour's attention (a decoder's, over its cache); the vision tower
    # attends over its whole image with transformers' SDPA.
    model.model.vision_tower.set_attn_implementation("sdpa")

    class VisionEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, image):
            return image_features(self.m, image, fc)

    modules = {ENCODER: VisionEncoder().eval(),
               **embeds.decoder_modules(cfg.text_config, model.model.language_model, model.lm_head, dtype, flavour,
                                        params)}
    size = fc["image_size"]
    examples = {ENCODER: ({"image": torch.zeros(3, size, size, dtype=torch.uint8)}, None),
                **embeds.decoder_examples(fc["hidden_size"], dtype, params["max_prefill_chunk"])}
    with torch.no_grad():
        # transformers installs its hidden-state capturing hooks (vision_feature_layer reads
        # them) on the first call, under a lock dynamo cannot trace: make that call eagerly.
        modules[ENCODER](**examples[ENCODER][0])
    return export_methods(modules, examples, METHODS), fc


def constant_methods(params: dict, fc: dict) -> dict:
    from mlxbuild.families import embeds

    return {**embeds.runner_constants(params, fc), "get_image_size": fc["image_size"],
            "get_image_tokens": fc["image_tokens"], "image_token_id": fc["image_token_id"]}


def synthetic_image(size: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)


def with_prompt(model, inputs: dict, before: list[int], after: list[int]) -> dict:
    from mlxbuild.families import embeds

    fc = family_config(model)
    return embeds.media_prompt(inputs, ENCODER, fc["image_token_id"], fc["image_tokens"], before, after)


def reference_inputs(model, params: dict) -> dict:
    """BOS, one seeded image, then seeded text tokens."""
    from mlxbuild.families import embeds

    fc = family_config(model)
    suffix = embeds.seeded_text(fc, params["prompt"], params["seed"] + 1, [fc["image_token_id"]])
    prefix = [fc["bos_token_id"]] if fc["bos_token_id"] is not None else []
    return with_prompt(model, {"media": synthetic_image(fc["image_size"], params["seed"])}, prefix, suffix)


def eager_generate(model, inputs: dict, new_tokens: int) -> list[int]:
    from mlxbuild.families import embeds

    fc = family_config(model)
    pixels = _normalise(inputs["media"], fc["image_mean"], fc["image_std"]).to(model.dtype)
    return embeds.eager_generate(model, inputs["prompt_ids"], new_tokens, pixel_values=pixels)


def eager_logits(model, inputs: dict, ids: list[int]):
    """Every position's logits along ``ids``, the image features at the prompt's placeholders."""
    import torch

    from mlxbuild.families import embeds

    fc = family_config(model)
    with torch.no_grad():
        features = image_features(model, inputs["media"], fc)
    return embeds.logits_with_media(model, inputs["prompt_ids"], ids, fc["image_token_id"], features)


def media(program, args):
    """[3, H, W] uint8: ``--image`` decoded and resized (bicubic, as CLIP's processor does) to
    the tower's size, or a seeded synthetic image."""
    import numpy as np
    import torch

    size = int(program.constant_methods["get_image_size"])
    if getattr(args, "image", None):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(args.image) as im:
                pixels = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
        except FileNotFoundError:
            raise ValueError(f"--image {args.image}: no such file") from None
        except UnidentifiedImageError:
            raise ValueError(f"--image {args.image}: not an image Pillow can read") from None
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return synthetic_image(size, args.seed)
