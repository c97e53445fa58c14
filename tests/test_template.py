"""Template packs: categories, shots, strict sandboxed templates, and the shipped packs."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.catalogue import Catalogue, Record
from producer.enqueue import aspect_size
from producer.template import TemplatePack
from producer.tokens import count_tokens
from schemas.errors import ConfigError, ItemError
from tests.conftest import EXAMPLES

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
