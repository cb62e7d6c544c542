"""An offline tokenizer for backbones built from a config (no pretrained path, no hub).

A byte-level BPE trained at first use on a small embedded corpus of robot-instruction words, so every string
round-trips exactly (unknown words fall back to bytes) while common instruction words are one or two tokens. Training
is deterministic: the same corpus and vocabulary size always give the same merges. The special tokens and the chat
format follow SmolVLM's tokenizer, so Idefics3's processor works with it unchanged.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|im_start|>"
PAD_TOKEN = "<|im_end|>"
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
# Idefics3's processor looks these up even when image splitting is off.
ROW_COL_TOKENS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
IMAGE_TOKENS = [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, *ROW_COL_TOKENS]
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, END_OF_UTTERANCE, *IMAGE_TOKENS]

# SmolVLM's chat format ("<|im_start|>User:<image>text<end_of_utterance>\nAssistant:"). Content may be a list of
# {"type": "image"} / {"type": "text"} parts (the processor's form) or a plain string (a text-only LM's form).
CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_CORPUS_WORDS = """
pick place put push pull open close move slide lift drop stack unstack press turn rotate grasp grab reach insert
remove pour wipe fold unfold hang sweep flip knock tilt twist hold release touch point go bring take give get set
align sort arrange collect empty fill cover uncover plug unplug switch toggle carry hand throw roll shake stir
block blocks cube cubes cup cups mug bowl bowls plate plates drawer door button handle lever peg pegs hole box bin
basket ball can bottle lid faucet window shelf table tray sponge towel cloth apple banana orange lemon carrot
marker pen pencil spoon fork knife pot pan stove sink microwave fridge cabinet switch dial knob wall puck goal
target object objects item items thing region zone area corner edge side center middle slot rack hook
red green blue yellow purple orange black white gray grey pink brown cyan magenta dark light small large big tiny
left right top bottom front back up down on in into onto off out of under over above below behind beside between
next near far to from with without the a an and then it its them this that these those first second third last
one two three four five six seven eight nine ten all each other same different closest farthest highest lowest
robot arm gripper hand wrist camera scene view task episode instruction state action step goal success fail
what is are do does should can will please now again slowly quickly carefully until while where which how
user assistant system image text video
""".split()


@functools.lru_cache(maxsize=None)
def _trained_tokenizer_json(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Words appear at a sentence start ("Red") and after a space (" red"); teach the merges every form.
    forms = [*_CORPUS_WORDS, *(w.capitalize() for w in _CORPUS_WORDS)]
    corpus = [*forms, *(" " + w for w in forms)]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer.to_str()


def offline_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A fresh ``PreTrainedTokenizerFast`` (callers may add tokens to it); training runs once per process."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=BOS_TOKEN,
        eos_token=END_OF_UTTERANCE,
        pad_token=PAD_TOKEN,
        extra_special_tokens=IMAGE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
