from pathlib import Path

import pytest

from edgec.errors import BadInputError
from edgec.passes import options_for
from edgec.recipe import load_recipe


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_resolves_defaults_overrides_and_pass_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "backend: onnx\npasses:\n  - name: quantize-weights-int8\n    options: {group_size: 32}\n"
        "    overrides:\n      - match: lm_head\n        options: {enabled: false}\n",
    )
    recipe = load_recipe(path, ["quantize-weights-int8.group_size=16", "parity.rtol=1e-4"], options_for)
    assert (recipe.backend, recipe.target, recipe.parity.rtol) == ("onnx", "cpu", 1e-4)
    assert recipe.passes[0].options == {"enabled": True, "group_size": 16, "embeddings": True}
    assert recipe.passes[0].overrides[0].options == {"enabled": False}


def test_unknown_key_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "target: cpu\n\nbackend: tvm\ncalibration:\n  sampels: 4\n")
    with pytest.raises(BadInputError, match=r"recipe.yaml:5: unknown key 'calibration.sampels'"):
        load_recipe(path, [], options_for)


def test_wrong_type_is_named_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "passes:\n  - name: quantize-weights-int8\n    options:\n      group_size: many\n")
    with pytest.raises(BadInputError, match=r"recipe.yaml:4: bad value for 'passes.0.options.group_size'"):
        load_recipe(path, [], options_for)


def test_unknown_pass_and_bad_backend_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"recipe.yaml:2: unknown pass 'quantise'"):
        load_recipe(write(tmp_path, "passes:\n  - name: quantise\n"), [], options_for)
    with pytest.raises(BadInputError, match=r"bad value for 'backend'"):
        load_recipe(None, ["backend=tensorrt"], options_for)


def test_set_needs_key_value_and_a_known_pass() -> None:
    with pytest.raises(BadInputError, match="expected key=value"):
        load_recipe(None, ["backend"], options_for)
    with pytest.raises(BadInputError, match="neither a recipe key"):
        load_recipe(None, ["luc.policy=uniform"], options_for)
    recipe = load_recipe(None, ["passes=quantize-weights-int8", "quantize-weights-int8.embeddings=false"], options_for)
    assert recipe.passes[0].options["embeddings"] is False


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"recipe.yaml:3: not valid YAML"):
        load_recipe(write(tmp_path, "target: cpu\nbackend: [tvm\n"), [], options_for)


def test_shipped_recipes_load() -> None:
    recipes = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))
    assert recipes, "recipes/ ships ready-made recipes"
    for path in recipes:
        load_recipe(path, [], options_for)


def test_an_n_m_pattern_stays_a_pattern_in_files_and_in_set(tmp_path: Path) -> None:
    """YAML 1.1 would read 2:4 as the base-60 integer 124."""
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - name: luc\n    options: {pattern: 2:4, sparsity: 0.5, group_size: 16}\n")
    from_file = load_recipe(path, [], options_for)
    from_set = load_recipe(None, ["passes=luc", "luc.pattern=2:4", "luc.group_size=0x10"], options_for)
    for recipe in (from_file, from_set):
        options = recipe.passes[0].options
        assert options["pattern"] == "2:4" and options["group_size"] == 16


def test_a_bad_set_value_is_blamed_on_the_set_not_on_the_recipe_line(tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "luc-w4-s30.yaml"
    with pytest.raises(BadInputError, match=r"^--set luc\.bits=abc: bad value for 'passes\.0\.options\.bits'"):
        load_recipe(recipe, ["luc.bits=abc"], options_for)
    with pytest.raises(BadInputError, match=r"^--set calibration\.samples=-3: bad value for 'calibration\.samples'"):
        load_recipe(recipe, ["calibration.samples=-3"], options_for)
    # A bad value the file holds is still named by its line, whatever else --set changed.
    path = write(tmp_path, "passes:\n  - name: quantize-weights-int8\n    options:\n      group_size: many\n")
    with pytest.raises(BadInputError, match=r"recipe.yaml:4: bad value for 'passes.0.options.group_size'"):
        load_recipe(path, ["backend=onnx", "parity.rtol=0.01"], options_for)
