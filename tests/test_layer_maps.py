"""Layer maps between models of different depth, projectors, and hooked module features."""

import pytest
import torch

from conftest import bert, llama
from hf_kd.architecture import num_layers
from hf_kd.capture import FeatureSpec, capture_features
from hf_kd.layer_maps import resolve_layer_map
from hf_kd.projectors import build_projector


@pytest.mark.parametrize(
    "spec, m, n, expected",
    [
        ("uniform", 4, 12, {1: 3, 2: 6, 3: 9, 4: 12}),  # TinyBERT g(m) = 3m
        ("uniform", 4, 6, {1: 1, 2: 3, 3: 4, 4: 6}),
        ("skip", 6, 12, {1: 2, 2: 4, 3: 6, 4: 8, 5: 10}),  # PKD-Skip
        ("last", 6, 12, {1: 7, 2: 8, 3: 9, 4: 10, 5: 11}),  # PKD-Last
        ({"1": 2, "2": 6}, 2, 6, {1: 2, 2: 6}),  # keys as YAML/JSON give them
    ],
)
def test_layer_map_strategies(spec, m, n, expected):
    assert resolve_layer_map(spec, m, n) == expected


def test_last_k_and_embeddings():
    assert resolve_layer_map("last_k", 4, 12, last_k=2) == {3: 11, 4: 12}
    assert resolve_layer_map("uniform", 2, 4, include_embeddings=True) == {0: 0, 1: 2, 2: 4}
    with pytest.raises(ValueError, match="`last_k` must lie in 1..4"):
        resolve_layer_map("last_k", 4, 12, last_k=5)


def test_out_of_range_names_both_depths():
    with pytest.raises(ValueError, match=r"3 -> 7 is out of range: the student has 2 layers .* teacher has 6"):
        resolve_layer_map({3: 7}, 2, 6)
    with pytest.raises(ValueError, match="Unknown `layer_map` 'every_other'"):
        resolve_layer_map("every_other", 2, 6)


def test_depth_from_configs():
    assert num_layers(bert(layers=3)) == 3 and num_layers(llama(layers=2)) == 2


def test_projectors():
    assert isinstance(build_projector(8, 8), torch.nn.Identity)
    linear = build_projector(8, 16)
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (16, 8)
    assert build_projector(8, 16, "mlp")(torch.zeros(3, 8)).shape == (3, 16)
    with pytest.raises(ValueError, match="differ and `projector='none'`"):
        build_projector(8, 16, "none")


def test_captured_features_equal_module_outputs_and_hooks_are_removed():
    model = bert(layers=2).eval()
    ids = torch.randint(3, 90, (2, 6))
    specs = [FeatureSpec("bert.encoder.layer.1.output"), FeatureSpec("bert.encoder.layer.1", "input")]
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # transformers installs its own recording hooks lazily
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with torch.no_grad(), capture_features(model, specs) as features:
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(features[specs[0]], out.hidden_states[2])
    torch.testing.assert_close(features[specs[1]], out.hidden_states[1])
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks_before
    with pytest.raises(ValueError, match="has no submodule 'bert.encoder.layer.9.output'"):
        with capture_features(model, [FeatureSpec("bert.encoder.layer.9.output")]):
            pass
