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
from functools import lru_cache
from pathlib import Path
from typing import Any

from sftdata.errors import TemplateError
from sftdata.templates import bounds

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


MARKS = "__sftpipe_generation_marks__"
"""Context variable holding the list :meth:`JinjaTemplate.render_blocks` collects block edges in."""


class _GenerationTag:
    """Factory of a Jinja extension accepting HF's ``{% generation %}`` tag: its body is
    rendered as is, between two statements that note the block's edges (when
    :meth:`JinjaTemplate.render_blocks` asks for them; a plain render ignores them)."""

    @staticmethod
    def make() -> type:
        from jinja2 import nodes
        from jinja2.ext import Extension

        class GenerationTag(Extension):
            tags = frozenset({"generation"})

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                ctx = [nodes.ContextReference()]
                # Statements, not a {% call %} block: a CallBlock builds a macro per use, which
                # cost a third of rendering a tool-calling record (profiled).
                return [
                    nodes.ExprStmt(self.call_method("_mark", ctx)).set_lineno(lineno),
                    *body,
                    nodes.ExprStmt(self.call_method("_mark", ctx)).set_lineno(lineno),
                ]

            def _mark(self, context: Any) -> None:
                marks = context.get(MARKS)
                if marks is not None:
                    marks.append(None)

        return GenerationTag


_DICT_ATTRS = frozenset(dir(dict))


@lru_cache(maxsize=1)
def _direct_calls() -> type:
    """A Jinja code generator whose compiled calls are plain Python calls, for our own templates.

    Jinja compiles ``x.strip()`` to ``context.call(x.strip)``, which inspects the callable for
    ``pass_context``/``pass_environment`` markers on every call (profiled: a quarter of rendering
    an Alpaca record with the llama2 template). Our templates call only str/list/dict methods,
    macros, ``raise_exception``, ``strftime_now`` and Jinja's default globals, none of which
    carry such a marker (checked in :func:`_jinja_env`), so the plain call does the same. Calls
    that forward ``caller`` (``{% call %}`` blocks) keep Jinja's path. Loop items still spend
    the step budget and ``~`` is still checked (bounds.py), as in the sandbox.
    """

    from jinja2 import nodes

    class DirectCalls(bounds.sandbox_generator()):  # loops and '~' still bounded
        def visit_Call(self, node: Any, frame: Any, forward_caller: bool = False) -> None:
            if forward_caller or self.environment.is_async:
                return super().visit_Call(node, frame, forward_caller)
            self.visit(node.node, frame)
            # ``signature`` writes ", arg" for every argument: ``f(*(), a, k=v)`` is ``f(a, k=v)``
            self.write("(*()")
            self.signature(node, frame)
            self.write(")")
            return None

        def visit_Output(self, node: Any, frame: Any) -> None:
            # Jinja yields every piece of ``<|im_start|>{{ m.role }}\n{{ m.content }}`` as its
            # own chunk (profiled: ~40 chunks a tool-calling record, each a generator resume
            # and a turn of render_blocks' loop). One statement's pieces are joined into one
            # chunk: the same text. Kept apart where a piece calls something (a macro could
            # note a {% generation %} mark between pieces, which must land between chunks).
            if (
                frame.buffer is not None
                or frame.require_output_check
                or frame.eval_ctx.volatile
                or frame.eval_ctx.autoescape
                or len(node.nodes) < 2
                or any(child.find(nodes.Call) is not None for child in node.nodes)
            ):
                return super().visit_Output(node, frame)
            finalize = self._make_finalize()
            self.writeline("yield ''.join((")
            self.indent()
            for child in node.nodes:
                if isinstance(child, nodes.TemplateData):
                    const = self._output_child_to_const(child, frame, finalize)
                    self.writeline(self._output_const_repr([const]) + ",")
                else:
                    self.newline(child)
                    self._output_child_pre(child, frame, finalize)
                    self.visit(child, frame)
                    self._output_child_post(child, frame, finalize)
                    self.write(",")
            self.outdent()
            self.writeline("))")
            return None

    return DirectCalls


@lru_cache(maxsize=2)
def _jinja_env(*, sandboxed: bool = True) -> Any:
    # The same options (and, for templates we did not write, the same sandbox) transformers'
    # apply_chat_template uses, so that "auto" renders exactly what the model's authors intended.
    # Our own built-in templates skip the sandbox: its attribute checks cost ~1/3 of render time.
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    base = ImmutableSandboxedEnvironment if sandboxed else jinja2.Environment

    class env_class(base):  # type: ignore[misc, valid-type]
        checked_concat = staticmethod(bounds.checked_concat)
        counted_iter = staticmethod(bounds.counted_iter)
        if not sandboxed:
            code_generator_class = _direct_calls()
        else:
            # bounds.py: operators, calls and '~' that could build unbounded strings or loop
            code_generator_class = bounds.sandbox_generator()
            intercepted_binops = frozenset({"*", "**", "+", "%"})

            def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
                bounds.check_binop(operator, left, right)
                return super().call_binop(context, operator, left, right)

            def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
                bounds.check_call(obj, args, kwargs)
                return super().call(context, obj, *args, **kwargs)

        # ``message.role`` on a dict: Jinja tries getattr first, which raises AttributeError
        # for every key before it falls back to ``obj[key]`` (profiled: the largest single cost
        # of rendering tool-calling records). A name that is not an attribute of dict always
        # ends in ``obj[key]`` there, so looking it up first gives the same value, sandboxed or
        # not; names dict does have (``items``, ``get``, ...) still go the usual way.
        def getattr(self, obj: Any, attribute: str) -> Any:
            if type(obj) is dict and attribute not in _DICT_ATTRS:
                try:
                    return obj[attribute]
                except KeyError:
                    pass
            elif not sandboxed:  # Environment.getattr's first step, one call less
                try:
                    return getattr(obj, attribute)
                except AttributeError:
                    pass
            return super().getattr(obj, attribute)

    env = env_class(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag.make(), "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = bounds.BoundedRange
    del env.globals["lipsum"]  # lorem ipsum of any length; no chat template uses it
    if sandboxed:
        env.filters = {k: bounds.bounded_filter(k, f) for k, f in env.filters.items()}
    if not sandboxed:
        from jinja2.utils import _PassArg

        # what makes _direct_calls() exact (strftime_now and the specials are added per template)
        assert all(_PassArg.from_obj(v) is None for v in env.globals.values()), env.globals
    return env


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
            self._template = _jinja_env(sandboxed=not trusted).from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{where}:{e.lineno}: template syntax error: {e.message}") from None
        # Globals and special tokens merged once: Template.render re-merges its ChainMap of
        # globals into every record's context, ~45% of render time (measured: 0.72 s vs 0.40 s
        # for the llama2 template on 49,950 Alpaca records), for the same output.
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
            for chunk in template.root_render_func(template.new_context(variables, shared=True)):
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
            for chunk in template.root_render_func(template.new_context(variables, shared=True)):
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
        try:
            from fastchat.conversation import get_conv_template
        except ImportError:
            raise TemplateError(
                f"fastchat:{name}: FastChat templates need the 'fschat' package (pip install fschat)"
            ) from None
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
            raise TemplateError(f"{spec}: template file does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TemplateError(f"{spec}: cannot read the template file ({e})") from None
        return path.name, text, JinjaTemplate(text, where=spec, specials=specials, date=date)
    raise TemplateError(f"template {spec!r} is not known; choose one of {OPTIONS}")
