"""Template packs: categories, shots, strict sandboxed templates, and the shipped packs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from skufleet.producer import sandbox as sandbox_module
from skufleet.producer.catalogue import Catalogue, Record
from skufleet.producer.sandbox import (
    MAX_PROMPT_CHARS,
    MAX_RANGE,
    MAX_TEMPLATE_STEPS,
    MAX_VALUE_CHARS,
)
from skufleet.producer.template import MAX_PACK_BYTES, TemplatePack
from skufleet.producer.tokens import count_tokens
from skufleet.schemas import gate
from skufleet.schemas.errors import ConfigError, ItemError
from skufleet.schemas.params import aspect_size, layer
from tests.fleet import EXAMPLES

SHIPPED = [
    ("ecommerce", "catalogue.csv"),
    ("education", "education.csv"),
    ("medical", "medical.csv"),
]


def pack(tmp_path: Path, text: str) -> TemplatePack:
    path = tmp_path / "pack.toml"
    path.write_text(text)
    return TemplatePack.load(path)


@pytest.mark.parametrize(("name", "catalogue"), SHIPPED)
def test_each_shipped_pack_renders_its_example_catalogue(name: str, catalogue: str) -> None:
    """Every row gets its own category (never the fallback), every shot a prompt that fits
    CLIP's 77 tokens, and nothing is rejected."""
    template = TemplatePack.load(name)
    with Catalogue(EXAMPLES / catalogue, columns=template.columns) as rows:
        records = list(rows)
    assert records and all(isinstance(r, Record) for r in records)
    prompts = []
    for record in records:
        assert isinstance(record, Record)
        assert template.category_for(record.fields).name != "default"
        shots = list(template.render(record.fields))
        assert len(shots) >= 2 and len({s.shot for s in shots}) == len(shots)
        prompts += [text for s in shots for text in (s.prompt, s.negative)]
    assert all(text and "{{" not in text for text in prompts)
    assert max(count.tokens for count in count_tokens(prompts)) <= 77


def test_shipped_packs_are_in_examples() -> None:
    """examples/packs holds the three shipped packs."""
    assert sorted(p.stem for p in (EXAMPLES / "packs").glob("*.toml")) == [
        "ecommerce",
        "education",
        "medical",
    ]


def test_categories_match_by_name_synonym_or_fall_back(tmp_path: Path) -> None:
    """Matching ignores case, spaces and hyphens; unknown values use the default category."""
    template = pack(
        tmp_path,
        """
name = "t"
[categories.footwear]
match = ["Running Shoes"]
[categories.footwear.shots.side]
prompt = "{{ subject }} side"
[categories.default.shots.front]
prompt = "{{ subject }} front"
""",
    )
    assert template.category_for({"category": "FOOTWEAR"}).name == "footwear"
    assert template.category_for({"category": "running-shoes"}).name == "footwear"
    assert template.category_for({"category": "hats"}).name == "default"
    assert [r.prompt for r in template.render({"title": "Boot", "category": "shoes"})] == [
        "Boot front"
    ]


def test_a_missing_field_is_an_error_naming_it(tmp_path: Path) -> None:
    """Strict templates: a column the row lacks is an error, never an empty string."""
    template = pack(
        tmp_path,
        """
name = "t"
[categories.default.shots.front]
prompt = "{{ title }} in {{ colour }}"
""",
    )
    with pytest.raises(ItemError, match="'colour' is undefined"):
        list(template.render({"title": "Mug"}))


def test_catalogue_text_is_data_not_code(tmp_path: Path) -> None:
    """Template syntax inside a field is printed as text; the sandbox blocks attribute tricks."""
    template = pack(
        tmp_path,
        """
name = "t"
[categories.default.shots.front]
prompt = "{{ title }}"
""",
    )
    (rendered,) = template.render({"title": "{{ 7 * 7 }} {% raw %}"})
    assert rendered.prompt == "{{ 7 * 7 }} {% raw %}"
    evil = pack(
        tmp_path,
        """
name = "t"
[categories.default.shots.front]
prompt = "{{ title.__class__.__mro__[1].__subclasses__() }}"
""",
    )
    with pytest.raises(ItemError):
        list(evil.render({"title": "x"}))


def test_shot_parameters_layer_over_pack_and_category(tmp_path: Path) -> None:
    """Pack params < category params < shot keys; aspect ratios keep the model's short side."""
    template = pack(
        tmp_path,
        """
name = "t"
[params]
steps = 20
[categories.default.params]
guidance_scale = 5.0
[categories.default.shots.square]
prompt = "a"
[categories.default.shots.tall]
prompt = "b"
steps = 40
aspect = "2:3"
""",
    )
    square, tall = template.render({"title": "x"})
    assert template.params == {"steps": 20}
    assert square.params == {"guidance_scale": 5.0}
    assert tall.params == {"guidance_scale": 5.0, "steps": 40, "aspect": "2:3"}
    assert aspect_size("2:3", 512, 512) == (512, 768)
    assert aspect_size("16:9", 64, 64) == (112, 64)


def test_layers_resolve_model_pack_shot_then_flags_and_split_the_output_keys() -> None:
    """Model defaults < pack < shot < command line; an aspect keeps the model's short side
    unless the shot or a flag sets the size; output keys go to the spec, not the drawing."""
    layered = layer(
        "tiny",
        pack={"steps": 20, "format": "webp"},
        shot={"steps": 40, "aspect": "2:3", "labels": "points"},
        flags={"guidance_scale": 3.0},
    )
    assert layered.params.model_dump() == {
        "width": 64,
        "height": 96,
        "steps": 40,
        "guidance_scale": 3.0,
        "scheduler": "default",
    }
    assert layered.output == {"format": "webp", "labels": "points"}
    assert layered.spec(("a",)).labels == ("a",) and layered.spec().format == "webp"
    sized = layer("tiny", shot={"aspect": "2:3"}, flags={"width": 128})
    assert (sized.params.width, sized.params.height) == (128, 64)
    context = "pack.toml: shot 'x' gives invalid parameters"
    with pytest.raises(ConfigError, match=rf"^{context}: (?s:.*)multiple of 8"):
        layer("tiny", flags={"width": 100}, context=context)
    with pytest.raises(ConfigError, match="invalid generation parameters: quality"):
        layer("tiny", flags={"quality": 0})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "t"\n[categories.default.shots.a]\npromt = "x"', "promt"),
        ('name = "t"\n[categories.default.shots.a]\nprompt = "{{ x"', "invalid template"),
        ('name = "t"\n[categories.default.shots.a]\nprompt = "x"\nwidth = 500', "multiple of 8"),
        ('name = "t"\n[categories.Bad.shots.a]\nprompt = "x"', "lower-case"),
        (
            'name = "t"\n[categories.a]\nmatch = ["b"]\n[categories.a.shots.s]\nprompt = "x"\n'
            '[categories.b.shots.s]\nprompt = "x"',
            "already selects category 'a'",
        ),
        ('name = "t"\n[categories.default]\nsubject = "x"', "shots"),
    ],
)
def test_a_broken_pack_is_refused_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    """Typos, bad templates and impossible parameters stop before any catalogue is read."""
    with pytest.raises(ConfigError, match=message):
        pack(tmp_path, text)


def test_an_unknown_pack_lists_the_shipped_ones() -> None:
    """--template with a typo says which packs exist."""
    with pytest.raises(ConfigError, match="ecommerce, education, medical"):
        TemplatePack.load("ecomerce")


def shot_pack(tmp_path: Path, prompt: str) -> TemplatePack:
    """A pack with one category and one shot whose prompt is ``prompt``."""
    path = tmp_path / "pack.toml"
    path.write_text(
        f'name = "t"\n[categories.default.shots.front]\nprompt = {json.dumps(prompt)}\n'
    )
    return TemplatePack.load(path)


@pytest.mark.parametrize(
    ("prompt", "fields", "error"),
    [
        ("{{ 100 // (stock|int) }} in stock", {"stock": "0"}, "ZeroDivisionError"),
        ("{{ title + 1 }}", {"title": "Mug"}, "TypeError"),
        ("{{ (stock|float) ** 1000 }}", {"stock": "10"}, "OverflowError"),
        (
            "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(title) }}",
            {"title": "M"},
            "RecursionError",
        ),
        ("{{ title.index('z') }}", {"title": "mug"}, "ValueError"),
    ],
)
def test_any_error_in_a_rows_template_rejects_that_row_only(
    tmp_path: Path,
    prompt: str,
    fields: dict[str, str],
    error: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever Python raises while a row renders becomes an ItemError (a `template` reject)
    naming the category, the text and the error; the next row renders as usual."""
    # on a loaded machine deep recursion can outlast the wall-clock bound, which is another
    # (tested) reason to reject: give this test the time to see the error itself
    monkeypatch.setattr(sandbox_module, "ROW_SECONDS", 30.0)
    template = shot_pack(tmp_path, "{% if ok is defined %}fine{% else %}" + prompt + "{% endif %}")
    with pytest.raises(ItemError, match=f"category 'default', shot 'front' prompt: {error}"):
        list(template.render({"title": "x", **fields}))
    assert [r.prompt for r in template.render({"title": "x", **fields, "ok": "y"})] == ["fine"]


def test_runaway_output_stops_at_the_prompt_cap(tmp_path: Path) -> None:
    """A loop that writes megabytes is cut off once the text passes MAX_PROMPT_CHARS,
    before the rest is built."""
    template = shot_pack(
        tmp_path,
        "{% for i in range(n|int) %}{% for j in range(n|int) %}xxxxxxxx{% endfor %}{% endfor %}",
    )
    tracemalloc.start()
    with pytest.raises(ItemError, match=f"over {MAX_PROMPT_CHARS:,} characters"):
        list(template.render({"title": "x", "n": "1000"}))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000  # 8 MB of x's were asked for


def test_range_gives_at_most_a_thousand_numbers(tmp_path: Path) -> None:
    """range() in a template is capped at MAX_RANGE (Jinja's sandbox allows 100,000)."""
    template = shot_pack(tmp_path, "{% for i in range(n|int) %}{% endfor %}{{ title }}")
    assert [r.prompt for r in template.render({"title": "ok", "n": str(MAX_RANGE)})] == ["ok"]
    with pytest.raises(
        ItemError, match=f"range\\(\\) of 5,000 numbers is over the limit of {MAX_RANGE:,}"
    ):
        list(template.render({"title": "x", "n": "5000"}))


@pytest.mark.parametrize(
    "prompt",
    [
        "{% for i in range(n|int) %}{% for j in range(n|int) %}{% for k in range(n|int) %}"
        "{% endfor %}{% endfor %}{% endfor %}",
        "{% for a in title %}{% for b in title %}{% for c in title %}{% endfor %}{% endfor %}"
        "{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f((n|int) // 50) }}",
    ],
    ids=["nested-ranges", "loops-over-a-string", "macro-calling-itself-twice"],
)
def test_work_without_output_ends_within_the_step_budget_in_any_thread(
    tmp_path: Path, prompt: str
) -> None:
    """Loops and calls that print nothing stop after MAX_TEMPLATE_STEPS, deterministically:
    in a worker thread too, where there is no SIGALRM deadline."""
    template = shot_pack(tmp_path, prompt)
    fields = {"title": "x" * 1000, "n": "1000"}
    errors: list[BaseException] = []

    def render() -> None:
        try:
            list(template.render(fields))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=render)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    (error,) = errors
    assert isinstance(error, ItemError)
    assert f"ran over {MAX_TEMPLATE_STEPS:,} loop iterations and calls" in str(error)


def test_the_main_thread_gives_a_row_a_wall_clock_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the step budget out of the way, a slow row in the main thread is stopped by its
    SIGALRM deadline; someone else's alarm timer and handler are kept and still fire."""
    monkeypatch.setattr(sandbox_module, "MAX_TEMPLATE_STEPS", 10**12)
    monkeypatch.setattr(sandbox_module, "ROW_SECONDS", 0.2)
    template = shot_pack(
        tmp_path,
        "{% for i in range(n|int) %}{% for j in range(n|int) %}{% for k in range(n|int) %}"
        "{% endfor %}{% endfor %}{% endfor %}{{ title }}",
    )
    fired: list[int] = []
    previous_handler = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    previous_timer = signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        with pytest.raises(ItemError, match=r"took over 0\.2 s"):
            list(template.render({"title": "x", "n": "1000"}))
        assert [r.prompt for r in template.render({"title": "quick", "n": "1"})] == ["quick"]
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25 < left <= 30  # the other timer runs on, with the time it had left
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        time.sleep(0.2)
        assert fired == [signal.SIGALRM]  # and its alarm reached its own handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, *previous_timer)
        signal.signal(signal.SIGALRM, previous_handler)


@pytest.mark.parametrize(
    ("prompt", "fields"),
    [
        ("{{ title * (n|int) }}", {"n": "1000000000"}),
        ("{{ (n|int) ** (n|int) }}", {"n": "1000000"}),
        ("{{ ('%' ~ n ~ 'd') % 1 }}", {"n": "999999999"}),
        ("{{ ('%' ~ n ~ 'd')|format(1) }}", {"n": "999999999"}),
        ("{{ '%*d' % (n|int, 1) }}", {"n": "999999999"}),
        ("{{ '{:{}}'.format(1, n|int) }}", {"n": "999999999"}),
        ("{{ title.center(n|int) }}", {"n": "999999999"}),
        ("{{ title|center(n|int) }}", {"n": "999999999"}),
        ("{{ (title * 20000).replace('', title * 20000) }}", {}),
        ("{{ range(1000)|map('string')|join(title * 100000) }}", {}),
        ("{{ ([title] * 1000)|batch(n|int, 'x')|list|length }}", {"n": "999999999"}),
        ("{{ ((title ~ '\n') * 1000)|indent(20000) }}", {}),
    ],
)
def test_operations_that_would_build_a_huge_value_are_refused_before_they_run(
    tmp_path: Path, prompt: str, fields: dict[str, str]
) -> None:
    """``*``, ``**``, ``%``, format widths, padding, ``replace`` and ``join`` check the size
    of what they would build first: a gigabyte is refused, not allocated."""
    template = shot_pack(tmp_path, prompt)
    tracemalloc.start()
    with pytest.raises(ItemError, match="would build"):
        list(template.render({"title": "x", **fields}))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000


@pytest.mark.parametrize(
    "step",
    [
        "{% set ns.x = ns.x ~ ns.x %}",
        "{% set ns.x = ns.x + ns.x %}",
        "{% set ns.x = twice(ns.x) %}",
        "{% set ns.x = [ns.x, ns.x]|join %}",
    ],
    ids=["tilde", "plus", "macro", "join"],
)
def test_a_value_doubled_in_a_loop_stops_at_the_value_cap(tmp_path: Path, step: str) -> None:
    """Doubling a string 60 times would need an exabyte: it is refused once it would pass
    MAX_VALUE_CHARS, whichever way it is doubled."""
    template = shot_pack(
        tmp_path,
        "{% macro twice(v) %}{{ v }}{{ v }}{% endmacro %}{% set ns = namespace(x=title) %}"
        "{% for i in range(n|int) %}" + step + "{% endfor %}{{ ns.x|length }}",
    )
    assert [r.prompt for r in template.render({"title": "ab", "n": "3"})] == ["16"]
    with pytest.raises(ItemError, match=f"the limit is {MAX_VALUE_CHARS:,}"):
        list(template.render({"title": "ab", "n": "60"}))


def test_templates_cannot_modify_the_values_they_are_given(tmp_path: Path) -> None:
    """The sandbox is immutable: ``list.append`` and ``dict.update`` are refused."""
    template = shot_pack(tmp_path, "{% set l = [title] %}{{ l.append(title) }}{{ l|length }}")
    with pytest.raises(ItemError, match="'append' of 'list' object is unsafe"):
        list(template.render({"title": "x"}))


def test_ordinary_templates_render_as_before(tmp_path: Path) -> None:
    """The bounds leave everyday templates alone: loops, filters, formats, joins."""
    template = shot_pack(
        tmp_path,
        "{% for w in title.split() %}{{ loop.index }}={{ w|upper }} {% endfor %}"
        "{{ '%05d'|format(stock|int) }} {{ '{:>6}|'.format(sku) }} {{ title.replace('o', '0') }}"
        " {{ [sku, title]|join(', ') }} {{ (title ~ '!') * 2 }} {{ description|truncate(12) }}"
        " {{ missing|default('n/a') }} {{ 2 ** 10 }} {{ range(3)|map('string')|join('-') }}",
    )
    fields = {"sku": "A-1", "title": "blue mug", "stock": "42", "description": "d" * 4000}
    (rendered,) = template.render(fields)
    assert rendered.prompt == (
        "1=BLUE 2=MUG 00042 A-1| blue mug A-1, blue mug blue mug!blue mug! ddddddddd..."
        " n/a 1024 0-1-2"
    )


def test_a_constant_template_gets_the_same_bounds_when_the_pack_loads(tmp_path: Path) -> None:
    """A template with no variables is rendered when the pack loads: a runaway one is a
    ConfigError naming it, not a hang."""
    with pytest.raises(ConfigError, match=r"categories\.default\.shots\.front\.prompt: the "):
        shot_pack(
            tmp_path,
            "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
        )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d, "is a directory, not a TOML file"),
        (lambda d: Path("/dev/zero"), "is a character device, not a TOML file"),
        (lambda d: (os.mkfifo(d / "fifo"), d / "fifo")[1], "is a FIFO, not a TOML file"),
        (
            lambda d: (d / "big.toml").write_bytes(b"# padding\n" * 200_000) and d / "big.toml",
            f"is over {MAX_PACK_BYTES:,} bytes",
        ),
        (
            lambda d: (d / "latin.toml").write_bytes(b'name = "caf\xe9"') and d / "latin.toml",
            "is not UTF-8 text: byte 11 is 0xe9",
        ),
    ],
    ids=["directory", "dev-zero", "fifo", "too-big", "not-utf8"],
)
def test_a_pack_file_must_be_a_small_regular_utf8_file(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    """A directory, a device, a FIFO, a huge or a non-UTF-8 file is one ConfigError line
    naming the path and the problem, read no further than MAX_PACK_BYTES."""
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        TemplatePack.load(path)
    assert str(caught.value).startswith(f"template pack {path} ")
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "table", ['[categories."shoes\\n".shots.a]', '[categories.shoes.shots."a\\n"]']
)
def test_category_and_shot_names_must_match_in_full(tmp_path: Path, table: str) -> None:
    """A trailing newline does not sneak a name past its pattern."""
    with pytest.raises(ConfigError, match="names are"):
        pack(tmp_path, f'name = "t"\n{table}\nprompt = "x"\n')


def test_a_packs_quality_table_sets_the_gate_and_flags_win_over_it(tmp_path: Path) -> None:
    """`[quality]` gives checks, thresholds, max_rolls and candidates; a pack without one
    sets nothing (the defaults apply); the flags win key by key, thresholds check by check.
    The shipped packs say what they check."""
    template = pack(
        tmp_path,
        'name = "t"\n[quality]\nchecks = ["safety", "dark"]\nthresholds = { dark = 0.1 }\n'
        'max_rolls = 3\n[categories.default.shots.front]\nprompt = "x"\n',
    )
    assert template.quality == {
        "checks": ["dark", "safety"],
        "thresholds": {"dark": 0.1},
        "max_rolls": 3,
    }
    assert gate.resolve(template.quality, gate.from_flags(candidates=2)) == {
        "checks": ["dark", "safety"],
        "default_checks": False,
        "thresholds": {"dark": 0.1, "safety": 0.5},
        "max_rolls": 3,
        "candidates": 2,
    }
    assert shot_pack(tmp_path, "x").quality == {}
    shipped = {name: TemplatePack.load(name).quality for name, _ in SHIPPED}
    # the shipped packs keep the default checks (so clip joins them where configured)
    assert all(gate.resolve(q)["default_checks"] for q in shipped.values())
    assert shipped["education"]["thresholds"] == {"flat": 6.0}
    assert shipped["medical"]["max_rolls"] == 3


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('checks = ["dark", "glare"]', "quality.checks: unknown check 'glare'; known: dark, "),
        ("max_rolls = 12", "quality.max_rolls = 12: must be 0-8"),
        ("thresholds = { dark = 3 }", "quality.thresholds.dark = 3: dark's threshold must be 0-1"),
        ("retries = 1", "quality: unknown key 'retries'"),
    ],
)
def test_a_bad_quality_table_is_refused_naming_the_pack_and_key(
    tmp_path: Path, table: str, message: str
) -> None:
    text = f'name = "t"\n[quality]\n{table}\n[categories.default.shots.front]\nprompt = "x"\n'
    with pytest.raises(ConfigError) as caught:
        pack(tmp_path, text)
    assert str(caught.value).startswith(f"template pack {tmp_path / 'pack.toml'}: {message}")
