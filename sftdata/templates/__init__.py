"""Chat templates: the built-in Jinja files in this folder, FastChat templates, user files.

``load_template`` resolves a ``--template`` value to a compiled renderer with one method,
``render(messages, tools, generation_prompt) -> str``, and the exact template text (hashed into
the shard index so a changed template invalidates packed data). The built-ins are:

- ``chatml.jinja``: ``<|im_start|>ROLE\nCONTENT<|im_end|>\n`` per turn (end of turn ``<|im_end|>``).
- ``llama2.jinja``: Meta's Llama-2-chat format as HF renders it,
  ``<s>[INST] <<SYS>>\nSYSTEM\n<</SYS>>\n\nUSER [/INST] ASSISTANT </s>`` (end of turn ``</s>``).
- ``alpaca.jinja``: the Stanford Alpaca prompt (``### Instruction:`` / ``### Input:`` /
  ``### Response:``), EOS after each response, blocks repeated for multi-turn records.
- one file per model family (``qwen2.5``, ``qwen3``, ``llama3``, ``mistral``, ``gemma``,
  ``gemma3``, ``phi3``, ``phi4``, ``deepseek3``, ``glm4``, ``gpt-oss``, ``cohere``), written here
  and tested (tests/invariants/test_c2_named_templates.py) to render like the family's official template, for
  tokenizers that ship none. Each file's header says what the layout does.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from sftdata.errors import TemplateError
from sftdata.templates import bounds
from sftdata.templates.environment import MARKS, jinja_env

TEMPLATES_DIR = Path(__file__).resolve().parent
BUILTIN_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja")))
"""Every Jinja file in this folder, by file stem (``--template qwen2.5`` is ``qwen2.5.jinja``)."""

LLAMAFACTORY_NAMES = {
    "qwen": "qwen2.5",
    "qwen2_5": "qwen2.5",
    "qwen3": "qwen3",
    "qwen3_nothink": "qwen3",
    "llama3": "llama3",
    "mistral": "mistral",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma3",
    "phi": "phi3",
    "phi_small": "phi3",
    "phi4": "phi4",
    "deepseek3": "deepseek3",
    "deepseekr1": "deepseek3",
    "glm4_moe": "glm4",
    "glm4": "glm4",
    "gpt": "gpt-oss",
    "cohere": "cohere",
    "llama2": "llama2",
    "alpaca": "alpaca",
    "vicuna": "fastchat:vicuna_v1.1",
}
"""LLaMA-Factory ``template:`` names (its ``template.py`` registry) and the template they select
here, so a LLaMA-Factory YAML's ``template: qwen`` means the same layout as ``--template qwen``."""

OPTIONS = (
    f"auto, {', '.join(BUILTIN_TEMPLATES)}, a LLaMA-Factory template name, "
    "fastchat:NAME (e.g. fastchat:vicuna_v1.1) or FILE.jinja"
)


DEFAULT_TEMPLATE_DATE = "2024-01-01"
"""What ``strftime_now`` and ``date_string`` see unless ``--template-date`` says otherwise, so the
same inputs pack to the same bytes on any day (Llama 3.1/3.2 and gpt-oss print today's date)."""


def parse_template_date(text: str) -> datetime:
    """``--template-date`` (``YYYY-MM-DD``) as a datetime at midnight.

    Raises:
        TemplateError: naming the value when it is not such a date.
    """
    try:
        return datetime.strptime(text, "%Y-%m-%d")
    except (TypeError, ValueError):
        raise TemplateError(
            f"--template-date {text!r} is not a date of the form YYYY-MM-DD"
        ) from None


class JinjaTemplate:
    """A compiled Jinja chat template (reused for every record)."""

    def __init__(
        self,
        source: str,
        *,
        where: str,
        specials: dict[str, str],
        trusted: bool = False,
        date: str = DEFAULT_TEMPLATE_DATE,
    ) -> None:
        import jinja2

        try:
            self._template = jinja_env(sandboxed=not trusted).from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{where}:{e.lineno}: template syntax error: {e.message}") from None
        # Globals and special tokens merged once: Template.render re-merges its ChainMap of
        # globals into every record's context, a large share of render time (profiled on the
        # pack benchmark), for the same output.
        # The date is pinned (and recorded in the shard index) so renders are reproducible.
        day = parse_template_date(date)
        # Only our own files' blocks are trusted for masks (see render_blocks).
        self.exact_blocks = trusted and _has_generation_block(source)
        self._base_vars = {
            **self._template.globals,
            "strftime_now": day.strftime,
            "date_string": day.strftime("%d %b %Y"),
            **specials,
        }

    def _variables(
        self, messages: list[dict[str, Any]], tools: list[Any] | None, generation_prompt: bool
    ) -> dict[str, Any]:
        return {
            **self._base_vars,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": generation_prompt,
        }

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        generation_prompt: bool,
    ) -> str:
        """``messages`` rendered as one string (ending in the generation prompt when asked)."""
        template = self._template
        variables = self._variables(messages, tools, generation_prompt)
        bounds.reset()
        parts: list[str] = []
        size = 0
        try:
            with bounds.cpu_floor():
                for chunk in template.root_render_func(
                    template.new_context(variables, shared=True)
                ):
                    size += len(chunk)
                    if size > bounds.MAX_CHARS:
                        bounds.check_chars(size, "the render")
                    parts.append(chunk)
            return "".join(parts)
        except Exception:
            template.environment.handle_exception()  # re-raises, as Template.render does
            raise

    def render_blocks(
        self, messages: list[dict[str, Any]], tools: list[Any] | None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The render without a generation prompt and the (start, end) of each ``{% generation
        %}`` block's output in it, in order.

        The built-in templates that have blocks (``exact_blocks``) place one around exactly what
        C2 trains of every assistant turn: from the end of the generation prompt through the
        stop token. They are the templates whose turns render the same in history as when last
        (nothing depends on later messages), so one render gives every turn's span; the tests
        check these spans against the prefix-render oracle. Third-party blocks are not used
        (README "Templates and masks").
        """
        template = self._template
        variables = self._variables(messages, tools, False)
        # A mark is noted while the generator runs towards its next chunk, so every mark noted
        # before a chunk is yielded stands at the text length before that chunk.
        marks: list[None] = []
        variables[MARKS] = marks
        parts: list[str] = []
        edges: list[int] = []
        pos = 0
        bounds.reset()
        try:
            with bounds.cpu_floor():
                for chunk in template.root_render_func(
                    template.new_context(variables, shared=True)
                ):
                    if len(marks) > len(edges):
                        edges += [pos] * (len(marks) - len(edges))
                    parts.append(chunk)
                    pos += len(chunk)
                    if pos > bounds.MAX_CHARS:
                        bounds.check_chars(pos, "the render")
        except Exception:
            template.environment.handle_exception()
            raise
        edges += [pos] * (len(marks) - len(edges))
        return "".join(parts), list(zip(edges[::2], edges[1::2], strict=False))


def _has_generation_block(source: str) -> bool:
    import re

    code = re.sub(r"{#.*?#}", "", source, flags=re.S)  # a comment may name the tag
    return re.search(r"{%-?\s*generation\b", code) is not None


class FastChatTemplate:
    """A FastChat ``Conversation`` template (``fastchat.conversation.get_conv_template``).

    FastChat's training code tokenizes ``conv.get_prompt()`` with the tokenizer's BOS added; we
    render the BOS token into the text instead (we tokenize with ``add_special_tokens=False``).
    The first system message becomes the conversation's system message; tool results and later
    system messages are user turns.
    """

    def __init__(self, name: str, *, bos: str) -> None:
        from sftdata.extras import missing

        if missing("fastchat"):
            raise TemplateError(
                f"fastchat:{name}: FastChat templates need the 'fastchat' extra (fschat missing): "
                "pip install 'sftpipe[fastchat]'"
            )
        from fastchat.conversation import get_conv_template

        try:
            self._base = get_conv_template(name)
        except KeyError:
            raise TemplateError(
                f"fastchat:{name}: not a FastChat conversation template (e.g. vicuna_v1.1, "
                "llama-2, chatml, one_shot)"
            ) from None
        self._bos = bos
        self.exact_blocks = False
        fields = {f.name: getattr(self._base, f.name) for f in dataclasses.fields(self._base)}
        fields.pop("messages", None)
        self.text = json.dumps(
            {"fastchat": name, "bos": bos, "conversation": fields},
            sort_keys=True,
            ensure_ascii=False,
            default=str,
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        generation_prompt: bool,
    ) -> str:
        """``messages`` rendered as one string (ending in the generation prompt when asked)."""
        conv = self._base.copy()
        rest = messages
        if messages and messages[0]["role"] == "system":
            conv.set_system_message(messages[0]["content"])
            rest = messages[1:]
        user, assistant = conv.roles[0], conv.roles[1]
        for m in rest:
            conv.append_message(assistant if m["role"] == "assistant" else user, m["content"])
        if generation_prompt:
            conv.append_message(assistant, None)
        return self._bos + conv.get_prompt()


def template_problem(spec: str) -> str | None:
    """Why ``spec`` names no template, checked without a tokenizer (``auto`` is then the
    tokenizer's business), or None; the words :func:`load_template` would raise."""
    if spec == "auto" or spec in BUILTIN_TEMPLATES or spec in LLAMAFACTORY_NAMES:
        return None
    if spec.startswith("fastchat:"):
        return None
    if spec.endswith(".jinja") or Path(spec).is_file():
        return None if Path(spec).is_file() else f"{spec}: template file does not exist"
    return f"template {spec!r} is not known; choose one of {OPTIONS}"


def load_template(
    spec: str, tokenizer: Any, *, specials: dict[str, str], date: str = DEFAULT_TEMPLATE_DATE
) -> tuple[str, str, JinjaTemplate | FastChatTemplate]:
    """Resolve ``--template`` to (name, exact template text, compiled renderer).

    Raises:
        TemplateError: unknown name, ``auto`` without a chat_template, missing/unreadable file,
            Jinja syntax error (``file:line``), unknown FastChat template.
    """
    if spec == "auto":
        text = tokenizer.chat_template
        if isinstance(text, dict):
            text = text.get("default")
        if not isinstance(text, str) or not text.strip():
            where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise TemplateError(
                f"{where}: the tokenizer has no chat_template, so --template auto cannot be "
                f"used; choose one of {OPTIONS}"
            )
        return (
            "auto",
            text,
            JinjaTemplate(text, where="chat_template", specials=specials, date=date),
        )
    if spec not in BUILTIN_TEMPLATES and spec in LLAMAFACTORY_NAMES:
        spec = LLAMAFACTORY_NAMES[spec]
    if spec in BUILTIN_TEMPLATES:
        path = TEMPLATES_DIR / f"{spec}.jinja"
        text = path.read_text(encoding="utf-8")
        backend = JinjaTemplate(text, where=str(path), specials=specials, trusted=True, date=date)
        return spec, text, backend
    if spec.startswith("fastchat:"):
        backend = FastChatTemplate(spec.split(":", 1)[1], bos=specials["bos_token"])
        return spec, backend.text, backend
    path = Path(spec)
    if spec.endswith(".jinja") or path.is_file():
        if not path.is_file():
            gone = "does not exist" if not path.exists() else "is not a regular file"
            raise TemplateError(f"{spec}: template file {gone}")
        from sftdata.inputs import read_small

        text = read_small(path, error=TemplateError, what="template file")
        return path.name, text, JinjaTemplate(text, where=spec, specials=specials, date=date)
    raise TemplateError(f"template {spec!r} is not known; choose one of {OPTIONS}")
