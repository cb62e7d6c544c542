"""SmolVLM (Idefics3 architecture) as the System 2 backbone: the closest open relative of GR00T N1's Eagle-2.

SigLIP vision tower -> Idefics3 connector (pixel shuffle + linear into the LM's width) -> SmolLM2 truncated to its
first ``select_layer`` layers -> LayerNorm + Linear to the action head's width. Images and instruction follow the
model's own processor and chat format: ``<|im_start|>User:`` + one ``<fake_token_around_image><global-img><image>*T
<fake_token_around_image>`` block per view + instruction + ``<end_of_utterance>\\nAssistant:``. Each view is one
unsplit image at the vision tower's resolution (SmolVLM-256M: 512 px -> 64 tokens, like Eagle-2 in GR00T N1).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoProcessor,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Model,
    Idefics3Processor,
    LlamaConfig,
)

from ..lora import LoRA
from .common import (
    OutputProjector,
    VisionLanguageBackbone,
    hub_kwargs,
    load_config,
    load_pretrained,
    strip_final_norm,
    truncated_text_config,
)
from .tokenizer import offline_tokenizer


class SmolVLMBackbone(VisionLanguageBackbone):
    """VL tokens from a SmolVLM / Idefics3 model, random (small config) or loaded from a local directory.

    Args:
        pretrained_path: a SmolVLM / Idefics3 checkpoint with its processor files: a local directory (saved with
            ``save_pretrained``) or a Hub id such as ``HuggingFaceTB/SmolVLM-256M-Instruct`` (downloaded when online;
            read from the Hugging Face cache under ``HF_HUB_OFFLINE``). None builds a random model from the size
            arguments below (which are then the only ones used) with the offline tokenizer.
        select_layer: keep LM layers ``[0, select_layer)``; negative counts from the top (-1 drops the last layer).
        project_to: width of the output tokens (the action head's ``cross_attention_dim``); also ``out_dim``.
        tune_llm: train the language model (token embeddings included).
        tune_visual: train the vision tower and the pretrained connector (as GR00T's Eagle ``mlp1``).
        tune_projector: train the output projector (new weights, not in any checkpoint).
        max_text_tokens: instructions are cut to this many tokens.
        image_size, patch_size, vision_*, lm_*, scale_factor: the random model; frames of any size are resized
            to ``image_size`` (or to the checkpoint's) in torch.
        llm_lora: peft LoRA adapters on the LM's attention projections (``components.lora.LoRA``); needs
            ``tune_llm=False``: the adapters train, the LM stays as loaded.
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        *,
        select_layer: int = 2,
        project_to: int = 128,
        tune_llm: bool = False,
        tune_visual: bool = True,
        tune_projector: bool = True,
        max_text_tokens: int = 32,
        image_size: int = 64,
        patch_size: int = 8,
        scale_factor: int = 2,
        vision_hidden_size: int = 64,
        vision_layers: int = 2,
        vision_heads: int = 4,
        lm_hidden_size: int = 128,
        lm_layers: int = 4,
        lm_heads: int = 4,
        llm_lora: LoRA | None = None,
    ) -> None:
        super().__init__(project_to, max_text_tokens)
        if pretrained_path is None:
            self.processor, config = self._random_processor_and_config(
                image_size, patch_size, scale_factor, vision_hidden_size, vision_layers, vision_heads,
                lm_hidden_size, lm_layers, lm_heads,
            )  # fmt: skip
            config.text_config = truncated_text_config(config.text_config, select_layer)
            self.model = Idefics3Model(config)
            strip_final_norm(self.model.text_model)
        else:
            config = load_config(pretrained_path, "pretrained_path")
            if not hasattr(config, "text_config") or not hasattr(config, "scale_factor"):
                raise ValueError(
                    f"{pretrained_path}: config.json describes a {config.model_type!r} model; SmolVLMBackbone loads "
                    "SmolVLM / Idefics3 checkpoints (model_type 'idefics3' or 'smolvlm')"
                )
            try:
                self.processor = AutoProcessor.from_pretrained(pretrained_path,
                                                               **hub_kwargs(pretrained_path, "pretrained_path"))
            except (OSError, ValueError) as err:
                raise FileNotFoundError(
                    f"{pretrained_path}: no usable processor files ({err}); save the checkpoint's processor there "
                    "too: AutoProcessor.from_pretrained(name).save_pretrained(path)"
                ) from err
            config.text_config = truncated_text_config(config.text_config, select_layer)
            self.model = load_pretrained(pretrained_path, config, decoder_of=lambda model: model.text_model)
        vision = self.model.config.vision_config
        self.image_token_id = self.model.config.image_token_id
        self.projector = OutputProjector(self.model.config.text_config.hidden_size, project_to)
        image_processor = self.processor.image_processor
        self._finish_init(
            tokenizer=self.processor.tokenizer,
            image_size=vision.image_size,
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
            rescale_factor=image_processor.rescale_factor,
            tokens_per_image=(vision.image_size // vision.patch_size) ** 2 // self.model.config.scale_factor**2,
            tune_llm=tune_llm,
            tune_visual=tune_visual,
            tune_projector=tune_projector,
            llm_lora=llm_lora,
        )

    @staticmethod
    def _random_processor_and_config(
        image_size, patch_size, scale_factor, vision_hidden_size, vision_layers, vision_heads,
        lm_hidden_size, lm_layers, lm_heads,
    ) -> tuple[Idefics3Processor, Idefics3Config]:  # fmt: skip
        tokenizer = offline_tokenizer()
        grid = image_size // patch_size
        if image_size % patch_size or grid % scale_factor:
            raise ValueError(
                f"image_size={image_size} must be a multiple of patch_size={patch_size} and the patch grid ({grid}) "
                f"a multiple of scale_factor={scale_factor}"
            )
        image_processor = Idefics3ImageProcessor(
            size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}, do_image_splitting=False
        )
        processor = Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=grid**2 // scale_factor**2,
            chat_template=tokenizer.chat_template,
        )
        config = Idefics3Config(
            vision_config=dict(
                hidden_size=vision_hidden_size,
                intermediate_size=4 * vision_hidden_size,
                num_hidden_layers=vision_layers,
                num_attention_heads=vision_heads,
                image_size=image_size,
                patch_size=patch_size,
            ),
            text_config=LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=lm_hidden_size,
                intermediate_size=3 * lm_hidden_size,  # SmolLM2: 2.7x
                num_hidden_layers=lm_layers,
                num_attention_heads=lm_heads,
                num_key_value_heads=lm_heads,
                rms_norm_eps=1e-5,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            ),
            scale_factor=scale_factor,
            image_token_id=processor.image_token_id,
        )
        return processor, config

    def tunable_parts(self) -> dict[str, list[nn.Module]]:
        return {
            "visual": [self.model.vision_model, self.model.connector],
            "llm": [self.model.text_model],
            "projector": [self.projector],
        }

    def _prompt(self, instruction: str, num_views: int) -> tuple[list[int], list[bool]]:
        processor = self.processor
        content = [{"type": "image"}] * num_views + [{"type": "text", "text": instruction}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        # What the processor writes for an unsplit image (rows = cols = 0); its tokenizer call below is the same too.
        image_block = (
            processor.fake_image_token
            + (getattr(processor, "global_image_tag", None) or processor.global_image_token)  # Idefics3 / SmolVLM
            + processor.image_token * processor.image_seq_len
            + processor.fake_image_token
        )
        ids = processor.tokenizer(prompt.replace(processor.image_token, image_block))["input_ids"]
        return ids, [i == self.image_token_id for i in ids]

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.model.vision_model(pixel_values=pixels).last_hidden_state  # [N, P, D_vision]
        return self.model.connector(patches)  # [N, P / scale^2, D_lm]

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.get_input_embeddings()(ids)

    def _language_model(self) -> nn.Module:
        return self.model.text_model
