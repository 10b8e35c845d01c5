"""Conversation templates as data, reproducing MobileVLM's `conversation.py` exactly.

Only the two templates MobileVLM V2 uses are defined: `plain` (pretraining on captions) and `v1`
(Vicuna v1 chat, fine-tuning and inference). The prompt strings must be byte-identical to
MobileVLM's, because the checkpoints were trained on them and any drift costs accuracy silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkd.errors import ConfigError, DataError

IMAGE_TOKEN = "<image>"

V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    """A conversation template. `sep` ends a user turn, `sep2` ends an assistant turn.

    For `v1`, `sep2` is "</s>": it is written as the EOS token id, never as text.
    For `plain`, there is no system prompt or role, and every caption ends with `sep` ("\\n").
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None


PLAIN = Template(name="plain", system="", roles=("", ""), sep="\n", sep2=None)
V1 = Template(name="v1", system=V1_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>")

TEMPLATES: dict[str, Template] = {"plain": PLAIN, "v1": V1}


def get_template(template: str | Template) -> Template:
    """Accept a template or its name; unknown names are a config error, not a KeyError."""
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ConfigError(
            f"unknown conversation template {template!r}: expected one of {sorted(TEMPLATES)}"
        ) from None


def build_prompt(template: str | Template, question: str, with_image: bool = True) -> str:
    """The inference prompt MobileVLM feeds, ending where the assistant's answer starts.

    v1:    "{system} USER: <image>\\n{question} ASSISTANT:" (as MobileVLM's inference.py and
           model_vqa_loader.py build it; the question is not stripped or otherwise altered)
    plain: "<image>{question}" (pretraining format; the model continues with a caption).
    The question itself must not contain "<image>": the template places the image token.
    """
    t = get_template(template)
    if IMAGE_TOKEN in question:
        raise DataError(f"question contains {IMAGE_TOKEN!r}; the template inserts the image token itself")
    if t.name == "plain":
        return (IMAGE_TOKEN if with_image else "") + question
    return turn_prompt(t, f"{IMAGE_TOKEN}\n{question}" if with_image else question, first=True)


def turn_prompt(template: str | Template, user_text: str, first: bool) -> str:
    """One user turn of a chat template up to where the answer starts, the user text as given:
    v1 "{system} USER: {text} ASSISTANT:", the system prompt only in front of the first turn."""
    t = get_template(template)
    head = f"{t.system}{t.sep}" if first else ""
    return f"{head}{t.roles[0]}: {user_text}{t.sep}{t.roles[1]}:"


# LLaVA-1.5 / MobileVLM's instruction for one-word answers (easy-vqa, GQA, POPE, MME, TextVQA evaluation)
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


def short_answer(question: str) -> str:
    """LLaVA-1.5's short-answer question: the question, a newline, the instruction."""
    return f"{question}\n{SHORT_ANSWER_PROMPT}"
