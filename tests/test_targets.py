import pytest
from torch import nn

from lightning_compress.targets import select_modules, select_parameters


def transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    return nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoder(layer, num_layers=2), nn.Linear(8, 3))


def test_default_selection_includes_attention_raw_parameters() -> None:
    names = [t.name for t in select_parameters(transformer())]
    assert "1.layers.0.self_attn.in_proj_weight" in names
    assert "1.layers.0.self_attn.out_proj.weight" in names
    assert "1.layers.1.linear2.weight" in names
    assert not any(n.endswith("bias") or "norm" in n for n in names)


def test_select_by_parameter_name_and_regex() -> None:
    model = transformer()
    only = select_parameters(model, include=["*.in_proj_weight"])
    assert [t.name for t in only] == ["1.layers.0.self_attn.in_proj_weight", "1.layers.1.self_attn.in_proj_weight"]
    regex = select_parameters(model, include=[r"re:1\.layers\.1\..*"], exclude=["*.out_proj"])
    assert {t.name for t in regex} == {
        "1.layers.1.self_attn.in_proj_weight",
        "1.layers.1.linear1.weight",
        "1.layers.1.linear2.weight",
    }


def test_types_filter_and_subclasses() -> None:
    # out_proj is NonDynamicallyQuantizableLinear, a Linear subclass: "Linear" must match it.
    mods = select_modules(transformer(), types=["Linear"])
    assert "1.layers.0.self_attn.out_proj" in [n for n, _ in mods]


def test_pattern_matching_nothing_lists_what_exists() -> None:
    with pytest.raises(ValueError, match=r"include pattern 'decoder\.\*' matches no module.*1\.layers\.0"):
        select_parameters(transformer(), include=["decoder.*"])
    with pytest.raises(ValueError, match="exclude pattern 'nope'"):
        select_modules(transformer(), exclude=["nope"])


def test_nothing_selected_names_present_types() -> None:
    with pytest.raises(ValueError, match="No module was selected.*Linear"):
        select_parameters(nn.Sequential(nn.Linear(2, 2)), types=["Conv2d"])


def test_string_instead_of_list_is_refused() -> None:
    from lightning_compress.targets import validate_patterns

    with pytest.raises(TypeError, match=r"HINT: write \['head'\]"):
        validate_patterns("exclude", "head")
    with pytest.raises(ValueError, match="invalid regular expression"):
        validate_patterns("include", ["re:("])


def test_patterns_match_whole_names_not_prefixes() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])  # modules "0" ... "10"
    assert [t.name for t in select_parameters(model, include=["re:1"])] == ["1.weight"]
    assert [t.name for t in select_parameters(model, include=["1"])] == ["1.weight"]
    assert len(select_parameters(model, exclude=["re:1"])) == 10  # "10" stays selected
