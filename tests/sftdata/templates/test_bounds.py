"""A hostile chat template is stopped by counted bounds (sftdata.templates.bounds) in bounded
time and memory, with a refusal naming the record; ordinary templates are unaffected (the real
templates are checked with the bound lowered in test_render_templates)."""

from __future__ import annotations

import time

import pytest

from sftdata.conversation import Conversation, Message, Source
from sftdata.errors import TemplateError
from sftdata.render import Renderer
from sftdata.templates import JinjaTemplate, bounds
from sftdata.tokenizer_cache import load_snapshot

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
BIG = "'x' * 30000000"  # just under the character bound

HOSTILE = {
    "string-times": "{% set s = 'x' * 3000000000 %}{{ s|length }}",
    "list-times": "{{ ([1] * 100000000)|length }}",
    "power": "{{ 10 ** 100000000000 }}",
    "plus-doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "tilde-doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "nested-range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested-string-loops": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}"
    "{% endfor %}{% endfor %}",
    "macro-fan-out": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}"
    "{{ f(40) }}",
    "center-filter": "{{ 'x'|center(3000000000) }}",
    "indent-filter": "{{ 'x\ny'|indent(3000000000) }}",
    "ljust-method": "{{ 'x'.ljust(3000000000) }}",
    "percent-format": "{{ '%3000000000d' % 1 }}",
    "str-format": "{{ '{:>3000000000}'.format(1) }}",
    "replace": "{% set s = " + BIG + " %}{{ s.replace('x', 'yy') }}",
    # widened by C-level work no single argument shows: counted from what goes in
    "expandtabs": "{{ ('\t' * 30000000).expandtabs(8)|length }}",
    "format-one-argument-many-times": "{% set s = 'x' * 1000000 %}{{ ('{0}' * 100).format(s)|length }}",
    "percent-tuple": "{% set s = 'x' * 1000000 %}{{ (('%s' * 100) % ((s,) * 100))|length }}",
    "int-squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}"
    "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 0 }}",
    "tojson-shared-list": "{% set ns = namespace(l=[1]) %}{% for i in range(8) %}"
    "{% set ns.l = [ns.l] * 100 %}{% endfor %}{{ (ns.l|tojson)|length }}",
    "string-shared-list": "{% set ns = namespace(l=[1]) %}{% for i in range(8) %}"
    "{% set ns.l = [ns.l] * 100 %}{% endfor %}{{ (ns.l|string)|length }}",
    "tilde-shared-list": "{% set ns = namespace(l=[1]) %}{% for i in range(8) %}"
    "{% set ns.l = [ns.l] * 100 %}{% endfor %}{{ ('' ~ ns.l)|length }}",
    "strftime-wide": "{{ strftime_now('%900000000Y')|length }}",
    "join": "{% set s = " + BIG + " %}{{ [s, s, s]|join }}",
    "list-filter": "{% set s = " + BIG + " %}{{ (s|list)|length }}",
    "output": "{% set s = " + BIG + " %}{% for i in range(10) %}{{ s }}{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_stopped_quickly(name: str) -> None:
    t = JinjaTemplate(HOSTILE[name], where="evil.jinja", specials=SPECIALS)
    t0 = time.perf_counter()
    with pytest.raises((bounds.TemplateBoundError, RecursionError)):
        t.render(MSGS, None, False)
    # one render's bound is counted work, a few seconds at most on a slow machine
    assert time.perf_counter() - t0 < 20


TRUSTED_BOUNDS = ["nested-range", "nested-string-loops", "tilde-doubling", "output"]


@pytest.mark.parametrize("name", TRUSTED_BOUNDS)
def test_built_in_templates_keep_loop_concat_and_output_bounds(name: str) -> None:
    # our own files compile without the sandbox (speed), but with the same loop, '~', range()
    # and output bounds: a record's data cannot make them loop or grow without end either
    t = JinjaTemplate(HOSTILE[name], where="ours.jinja", specials=SPECIALS, trusted=True)
    with pytest.raises(bounds.TemplateBoundError):
        t.render(MSGS, None, False)


def test_built_in_template_loops_spend_the_budget(monkeypatch) -> None:
    from sftdata.templates import load_template

    _, _, t = load_template("chatml", None, specials=SPECIALS)
    many = MSGS * 20
    assert t.render(many, None, False).count("<|im_start|>") == 40
    monkeypatch.setattr(bounds, "MAX_STEPS", 10)
    with pytest.raises(bounds.TemplateBoundError, match="more than 10 loop iterations"):
        t.render(many, None, False)


def test_ordinary_templates_are_unaffected() -> None:
    src = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role }}: "
        "{{ m.content.strip()|center(6) }}{% for i in range(3) %}.{% endfor %}"
        "{% if loop.last %}!{% endif %}{{ '%5s|' % 'a' }}{{ '{:>3}'.format(1) }}\n{% endfor %}"
        "{{ [1, 2] * 2 }}{{ 'ab' * 2 }}{{ 2 ** 10 }}{{ ['a', 'b']|join(',') }}"
    )
    out = JinjaTemplate(src, where="t.jinja", specials=SPECIALS).render(MSGS, None, False)
    assert out == (
        "1/2 user:   hi  ...    a|  1\n2/2 assistant:   yo  ...!    a|  1\n[1, 2, 1, 2]abab1024a,b"
    )


def test_budget_is_per_render() -> None:
    # 3 renders of 0.6 budget each: none is refused (the budget is not shared between renders)
    n = int(bounds.MAX_STEPS * 0.6)
    t = JinjaTemplate(
        "{% for i in range(" + str(n) + ") %}{% endfor %}ok", where="t.jinja", specials=SPECIALS
    )
    assert [t.render(MSGS, None, False) for _ in range(3)] == ["ok"] * 3


def test_hostile_template_refuses_the_record_naming_it(tmp_path) -> None:
    # a template that is fine on the probes but runs away on a long reply: the record is refused
    # (counted with --skip-invalid), the others are packed
    evil = tmp_path / "evil.jinja"
    evil.write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
        "{% if m.content|length > 50 %}{% for a in m.content %}{% for b in m.content %}"
        "{% endfor %}{% endfor %}{% endif %}{% endfor %}",
        encoding="utf-8",
    )
    r = Renderer(load_snapshot("tiny"), template=str(evil))
    long = "y" * 2000
    convs = [
        Conversation(
            f"r{i}",
            [Message("user", "q"), Message("assistant", a)],
            Source("d.jsonl", line=i + 1),
        )
        for i, a in enumerate(["ok", long, "fine"])
    ]
    encs = r.encode_batch(convs, skip_invalid=True)
    assert [e.render.refusal is None for e in encs] == [True, False, True]
    msg = encs[1].render.refusal
    assert msg.startswith("d.jsonl:2: template evil.jinja: record 'r1': ") and "loop" in msg
    with pytest.raises(TemplateError, match=r"d\.jsonl:2: .*record 'r1'.*loop iterations"):
        r.encode_batch(convs)


UNCOUNTED = "{% for i in range(200000) %}{{ ('a' * 200000).count('b') }}{% endfor %}"  # every count within its bound, each step a C-level scan the counts do not see


def test_a_render_that_escapes_the_counts_meets_the_cpu_floor(monkeypatch, tmp_path) -> None:
    """The floor under the counted bounds: a render no count stops is stopped by the CPU-time
    bound (lowered here from its default so the test is quick) and refuses the record like any
    other bound; the next render starts with the timer reset."""
    monkeypatch.setattr(bounds, "MAX_RENDER_CPU_S", 0.5)
    t = JinjaTemplate(UNCOUNTED, where="slow.jinja", specials=SPECIALS)
    t0 = time.process_time()
    with pytest.raises(bounds.TemplateBoundError, match=r"more than 0\.5 CPU seconds"):
        t.render(MSGS, None, False)
    assert time.process_time() - t0 < 5
    ok = JinjaTemplate("{{ messages|length }}", where="ok.jinja", specials=SPECIALS)
    assert ok.render(MSGS, None, False) == "2"
    import signal

    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)  # off between renders
    evil = tmp_path / "slow.jinja"
    evil.write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% if m.content == 'slow' %}"
        + UNCOUNTED
        + "{% endif %}{% endfor %}",
        encoding="utf-8",
    )
    r = Renderer(load_snapshot("tiny"), template=str(evil))
    convs = [
        Conversation(f"r{i}", [Message("user", q), Message("assistant", "a")],
                     Source("d.jsonl", line=i + 1))
        for i, q in enumerate(["q", "slow"])
    ]  # fmt: skip
    with pytest.raises(TemplateError, match=r"d\.jsonl:2: .*record 'r1'.*CPU seconds"):
        r.encode_batch(convs)


PREFIX_RENDERED = (  # a file template without generation blocks: spans come from prefix renders
    "{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_one_cpu_floor_covers_all_the_renders_of_a_record(monkeypatch, tmp_path) -> None:
    """The floor is armed once per record, however many prefix renders its turns take (arming
    it costs a third of a short render), and is off between records."""
    import signal

    path = tmp_path / "prefix.jinja"
    path.write_text(PREFIX_RENDERED, encoding="utf-8")
    r = Renderer(load_snapshot("tiny"), template=str(path))
    turns = [Message(role, f"{role} {k}") for k in range(3) for role in ("user", "assistant")]
    conv = Conversation("r0", turns, Source("d.jsonl", line=1))
    renders, arms = [], []
    real_render, real_setitimer = JinjaTemplate.render, signal.setitimer

    def render(self, *a, **k):
        renders.append(1)
        return real_render(self, *a, **k)

    def setitimer(which, seconds, *rest):
        arms.append(seconds)
        return real_setitimer(which, seconds, *rest)

    monkeypatch.setattr(JinjaTemplate, "render", render)
    monkeypatch.setattr(signal, "setitimer", setitimer)
    (enc,) = r.encode_batch([conv])
    assert enc.render.refusal is None and len(renders) >= 5  # the record, 3 prompts, 2 turns
    assert arms == [bounds.render_cpu_s(), 0]
    assert real_setitimer(signal.ITIMER_PROF, 0) == (0.0, 0.0)  # off after the record


def test_the_floor_going_off_between_two_renders_refuses_the_record(monkeypatch) -> None:
    """SIGPROF can land in the renderer's own code between two renders of a record: the record
    is refused naming it, like a bound met inside a render, and the next record renders."""
    import sftdata.render.renderer as renderer_module

    real = renderer_module.insert_stops
    calls = []

    def insert_stops(*a, **k):  # runs between the record's renders and its coverage check
        calls.append(1)
        if len(calls) == 2:
            raise bounds.TemplateBoundError("the template took more than 20 CPU seconds")
        return real(*a, **k)

    monkeypatch.setattr(renderer_module, "insert_stops", insert_stops)
    r = Renderer(load_snapshot("tiny"), template="llama2")
    convs = [
        Conversation(f"r{i}", [Message("user", "q"), Message("assistant", "a")],
                     Source("d.jsonl", line=i + 1))
        for i in range(3)
    ]  # fmt: skip
    encs = r.encode_batch(convs, skip_invalid=True)
    assert [e.render.refusal is None for e in encs] == [True, False, True]
    assert encs[1].render.refusal == (
        "d.jsonl:2: template llama2: record 'r1': TemplateBoundError: the template took more "
        "than 20 CPU seconds"
    )
    with pytest.raises(TemplateError, match=r"d\.jsonl:2: .*record 'r1'.*CPU seconds"):
        calls.clear()
        r.encode_batch(convs)
