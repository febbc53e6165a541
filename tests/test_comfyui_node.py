"""The "Token Merging" ComfyUI node (comfyui/tomesd_nodes) inside ComfyUI's sampler (comfy.sample.sample) on
tiny SD 1.5-, SDXL- and Flux-shaped models: it merges exactly as apply_patch on the bare diffusion model,
leaves every other clone bit-identical, and leaves nothing patched after sampling, a failed sampling or
unloading; its inputs are checked when the node runs; the shipped workflow matches the node."""
import json
import os

import pytest
import torch

import tomesd
from tomesd.tools import comfyui

KEY = "TomesdTokenMerging"


def _node(nodes, model, ratio=0.5, preset="default", match_window=0, prop_attn="auto", mode="auto", seed=7):
    return nodes.NODE_CLASS_MAPPINGS[KEY]().patch(model, ratio, preset, match_window, prop_attn, mode, seed)[0]


def _case(kind):
    positive, negative = comfyui.conditioning(kind)
    return comfyui.patcher(kind), positive, negative, comfyui.latent(kind, 16)


@pytest.mark.parametrize("kind, settings, node_inputs", [
    ("sd15", dict(ratio=0.5, seed=7), {}),
    ("sd15", dict(ratio=0.9, sx=4, sy=4, prop_attn=True, match_window=3, seed=7),
     dict(ratio=0.9, preset="high resolution", match_window=3)),
    ("sdxl", dict(ratio=0.6, mode="kv", seed=7), dict(ratio=0.6, mode="kv")),
    ("flux", dict(ratio=0.5, prop_attn=False, seed=7), dict(prop_attn="off")),
])
def test_node_in_comfyui_sampler_equals_apply_patch_and_other_clones_stay_identical(comfy, comfy_nodes, kind, settings,
                                                                                    node_inputs):
    model, positive, negative, latent = _case(kind)
    diffusion_model = model.model.diffusion_model
    plain = comfyui.sample(model, positive, negative, latent)
    patched = _node(comfy_nodes, model, **node_inputs)
    assert not tomesd.is_patched(diffusion_model)  # the node only attaches while its clone samples
    merged = comfyui.sample(patched, positive, negative, latent)
    assert not tomesd.is_patched(diffusion_model)
    assert torch.equal(comfyui.sample(model, positive, negative, latent), plain)
    assert torch.equal(comfyui.sample(model.clone(), positive, negative, latent), plain)
    tomesd.apply_patch(diffusion_model, **settings)
    try:
        direct = comfyui.sample(model, positive, negative, latent)
    finally:
        tomesd.remove_patch(diffusion_model)
    assert torch.equal(merged, direct) and not torch.allclose(merged, plain, rtol=1e-3, atol=1e-3)
    assert torch.equal(comfyui.sample(patched, positive, negative, latent), merged)


def test_unloading_and_a_failed_sampling_leave_nothing_patched(comfy, comfy_nodes):
    model, positive, negative, latent = _case("sd15")
    plain = comfyui.sample(model, positive, negative, latent)
    patched = _node(comfy_nodes, model)
    merged = comfyui.sample(patched, positive, negative, latent)
    comfy.model_management.unload_all_models()
    assert not tomesd.is_patched(model.model.diffusion_model)
    assert torch.equal(comfyui.sample(model, positive, negative, latent), plain)

    def interrupt(step, x0, x, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        comfyui.sample(patched, positive, negative, latent, callback=interrupt)
    assert not tomesd.is_patched(model.model.diffusion_model)
    assert torch.equal(comfyui.sample(model, positive, negative, latent), plain)
    assert torch.equal(comfyui.sample(patched, positive, negative, latent), merged)


def test_a_second_node_replaces_the_first_and_other_patches_compose(comfy, comfy_nodes):
    model, positive, negative, latent = _case("sd15")
    once = comfyui.sample(_node(comfy_nodes, model, ratio=0.3), positive, negative, latent)
    chained = _node(comfy_nodes, _node(comfy_nodes, model, ratio=0.7), ratio=0.3)
    assert torch.equal(comfyui.sample(chained, positive, negative, latent), once)
    both = _node(comfy_nodes, model, ratio=0.3)
    both.set_model_attn1_patch(lambda n, context, value, extra: (n, context, value))
    assert torch.equal(comfyui.sample(both, positive, negative, latent), once)


@pytest.mark.parametrize("inputs, error, match", [
    (dict(ratio=0.8), ValueError, r"ratio .*0\.75"),
    (dict(ratio=0.95, preset="high resolution"), ValueError, r"ratio .*0\.9375"),
    (dict(match_window=2), ValueError, "match_window must be None .* or an odd int"),
    (dict(preset="huge"), ValueError, "preset must be one of"),
    (dict(prop_attn="yes"), ValueError, "prop_attn must be one of"),
    (dict(mode="q"), ValueError, "mode must be one of"),
])
def test_bad_inputs_fail_when_the_node_runs(comfy, comfy_nodes, inputs, error, match):
    model = comfyui.patcher("sd15")
    with pytest.raises(error, match=match):
        _node(comfy_nodes, model, **inputs)
    assert not tomesd.is_patched(model.model.diffusion_model)


def test_what_the_model_refuses_fails_when_the_node_runs(comfy, comfy_nodes):
    model = comfyui.patcher("flux")
    with pytest.raises(ValueError, match="mode='tokens' cannot merge the attention of Flux"):
        _node(comfy_nodes, model, mode="tokens")
    assert not tomesd.is_patched(model.model.diffusion_model)


def test_a_diffusion_model_patched_outside_the_node_is_refused_when_sampling(comfy, comfy_nodes):
    model, positive, negative, latent = _case("sd15")
    patched = _node(comfy_nodes, model)
    tomesd.apply_patch(model.model.diffusion_model, ratio=0.3)
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            comfyui.sample(patched, positive, negative, latent)
        assert tomesd.is_patched(model.model.diffusion_model)  # the outside patch is left as it was
    finally:
        tomesd.remove_patch(model.model.diffusion_model)


def test_the_node_follows_comfyui_conventions(comfy_nodes):
    node = comfy_nodes.NODE_CLASS_MAPPINGS[KEY]
    assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS[KEY] == "Token Merging (tomesd)"
    assert node.RETURN_TYPES == ("MODEL",) and callable(getattr(node(), node.FUNCTION))
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["model", "ratio", "preset", "match_window", "prop_attn", "mode", "seed"]


def test_the_shipped_workflow_uses_the_node_as_it_is(comfy, comfy_nodes):
    """workflow.json (ComfyUI's workflow format): links join existing slots of matching types, and the Token
    Merging node's widget values are the node's inputs, which it accepts."""
    with open(os.path.join(os.path.dirname(comfy_nodes.__file__), "workflow.json")) as f:
        workflow = json.load(f)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link, source, out_slot, target, in_slot, kind in workflow["links"]:
        assert nodes[source]["outputs"][out_slot]["type"] == kind and link in nodes[source]["outputs"][out_slot]["links"]
        assert nodes[target]["inputs"][in_slot]["type"] == kind and nodes[target]["inputs"][in_slot]["link"] == link
    (ours,) = [node for node in nodes.values() if node["type"] == KEY]
    widgets = [name for name, spec in comfy_nodes.NODE_CLASS_MAPPINGS[KEY].INPUT_TYPES()["required"].items()
               if spec[0] != "MODEL"]
    values = dict(zip(widgets, ours["widgets_values"]))  # the seed's "control after generate" comes last
    assert len(ours["widgets_values"]) == len(widgets) + 1
    assert values["preset"] == "high resolution" and values["ratio"] == 0.9
    _node(comfy_nodes, comfyui.patcher("sd15"), **values)
    sampler = [node for node in nodes.values() if node["type"] == "KSampler"][0]
    assert nodes[workflow_source(workflow, sampler, "model")]["type"] == KEY


def workflow_source(workflow, node, name):
    """The id of the node feeding input `name` of `node`."""
    (link,) = [slot["link"] for slot in node["inputs"] if slot["name"] == name]
    return next(source for lid, source, *_ in workflow["links"] if lid == link)
