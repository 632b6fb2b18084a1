"""The node pack as ComfyUI sees it: it loads the way ComfyUI loads a custom_nodes/ folder, its pyproject.toml
parses with ComfyUI's own registry-config parser, and every example workflow (one per supported family, ComfyUI's
API format) passes ComfyUI's own prompt validation (`execution.validate_prompt`: node classes exist, required
inputs present, links of the right type, values in range and in their combo lists) with our nodes loaded, and
names no input a node does not declare."""

import asyncio
import copy
import json

import pytest
import torch

from tests.comfyui import harness

WORKFLOWS = harness.NODE_PACK / "example_workflows"
FAMILY_WORKFLOWS = {"flux": "fastdiff_flux.json", "sd15": "fastdiff_sd15.json", "sd3": "fastdiff_sd3.json",
                    "wan": "fastdiff_wan.json"}
# more workflows of a family: the resolution-bottleneck SAMPLER through SamplerCustomAdvanced (family, file)
SAMPLER_WORKFLOWS = {"flux": "fastdiff_flux_bottleneck.json"}
ALL_WORKFLOWS = [*FAMILY_WORKFLOWS.values(), *SAMPLER_WORKFLOWS.values()]
# the model-file inputs of the loaders the workflows use -> ComfyUI's model folder they list
MODEL_FILES = {"UNETLoader": {"unet_name": "diffusion_models"}, "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
               "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
               "CLIPLoader": {"clip_name": "text_encoders"}, "VAELoader": {"vae_name": "vae"}}


def _workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


@pytest.fixture(scope="module")
def registry(comfy, node_pack, tmp_path_factory):
    """ComfyUI's node registry with its core extras and our pack loaded, and ComfyUI's model folders listing the
    files the workflows load (empty placeholders: validation only lists names)."""
    harness.load_comfy_extras()
    import folder_paths

    root = tmp_path_factory.mktemp("comfy_models")
    added = []
    for name in ALL_WORKFLOWS:
        for node in _workflow(name).values():
            for key, folder in MODEL_FILES.get(node["class_type"], {}).items():
                (root / folder).mkdir(exist_ok=True)
                (root / folder / node["inputs"][key]).touch()
                if (folder, str(root / folder)) not in added:
                    folder_paths.add_model_folder_path(folder, str(root / folder))
                    added.append((folder, str(root / folder)))
    yield comfy.nodes.NODE_CLASS_MAPPINGS
    for folder, path in added:
        folder_paths.folder_names_and_paths[folder][0].remove(path)
    folder_paths.filename_list_cache.clear()


def _problems(comfy, mappings, workflow: dict) -> list[str]:
    """Everything wrong with `workflow` by ComfyUI's validation, plus inputs its nodes do not declare."""
    problems = []
    for node_id, node in workflow.items():
        cls = mappings.get(node["class_type"])
        if cls is None:
            problems.append(f"#{node_id}: no node class {node['class_type']}")
            continue
        declared = {k for part in cls.INPUT_TYPES().values() for k in part}
        problems += [f"#{node_id} {node['class_type']}: no input {k!r}" for k in sorted(set(node["inputs"]) - declared)]
    ok, error, good, node_errors = asyncio.run(comfy.execution.validate_prompt("test", workflow, None))
    outputs = {i for i, n in workflow.items() if getattr(mappings.get(n["class_type"]), "OUTPUT_NODE", False)}
    if not ok:
        problems.append(f"{error['message']}: {error['details']}")
    if set(good) != outputs:
        problems.append(f"outputs that failed validation: {sorted(outputs - set(good))}")
    for node_id, info in node_errors.items():
        problems += [f"#{node_id} {info['class_type']}: {e['message']}: {e['details']}" for e in info["errors"]]
    return problems


def test_pack_loads_as_a_custom_node(comfy, node_pack):
    ours = [name for name, cls in comfy.nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", "") == "custom_nodes.comfyui_fastdiff"]
    assert set(ours) == {node.id for node in node_pack.NODES}  # every node of the pack, through comfy_entrypoint
    assert all(comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name) for name in ours)


def test_pyproject_parses_as_comfy_registry_config(comfy):
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(harness.NODE_PACK))
    assert config is not None
    assert config.project.name == "fastdiff-nodes" and config.project.version
    assert any(dep.split(">")[0].split("=")[0].strip() == "fastdiff" for dep in config.project.dependencies)
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name
    assert config.project.supported_comfyui_version == ">=0.3.75"


def test_every_family_has_a_workflow():
    assert set(FAMILY_WORKFLOWS) == set(harness.FAMILIES)
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == sorted(ALL_WORKFLOWS)


@pytest.mark.parametrize("family", sorted(FAMILY_WORKFLOWS))
def test_workflow_is_valid(comfy, registry, family):
    workflow = _workflow(FAMILY_WORKFLOWS[family])
    assert _problems(comfy, registry, workflow) == []
    # the sampler samples a model that went through our nodes, and the report reads that same model
    sampler = next(n for n in workflow.values() if n["class_type"] == "KSampler")
    report = next(n for n in workflow.values() if n["class_type"] == "FastDiffReport")
    assert workflow[sampler["inputs"]["model"][0]]["class_type"].startswith("FastDiff")
    assert report["inputs"]["model"] == sampler["inputs"]["model"]


def test_validation_catches_broken_workflows(comfy, registry):
    """The check above can fail: a misnamed input, a link of the wrong type, a value out of range, a missing class."""
    good = _workflow(FAMILY_WORKFLOWS["flux"])
    cache = next(i for i, n in good.items() if n["class_type"] == "FastDiffCache")
    sampler = next(i for i, n in good.items() if n["class_type"] == "KSampler")
    broken = []
    w = copy.deepcopy(good)
    w[cache]["inputs"]["thresh"] = w[cache]["inputs"].pop("threshold")
    broken.append(w)
    w = copy.deepcopy(good)
    w[sampler]["inputs"]["model"] = w[sampler]["inputs"]["latent_image"]  # a LATENT into a MODEL input
    broken.append(w)
    w = copy.deepcopy(good)
    w[cache]["inputs"]["start_percent"] = 1.5
    broken.append(w)
    w = copy.deepcopy(good)
    w[cache]["class_type"] = "FastDiffNoSuchNode"
    broken.append(w)
    for w in broken:
        assert _problems(comfy, registry, w) != []


def test_workflows_are_plain_api_format():
    for name in ALL_WORKFLOWS:
        for node_id, node in _workflow(name).items():
            assert node_id.isdigit() and set(node) <= {"class_type", "inputs", "_meta"}
            for value in node["inputs"].values():
                if isinstance(value, list):  # a link: [source node id, output index]
                    assert len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)



def _model_chain(workflow: dict, node_id: str) -> list[str]:
    """The nodes a MODEL passes through on its way into `node_id`, loader first."""
    chain = []
    link = workflow[node_id]["inputs"]["model"]
    while True:
        chain.insert(0, link[0])
        upstream = workflow[link[0]]["inputs"].get("model")
        if not isinstance(upstream, list):
            return chain
        link = upstream


@pytest.mark.parametrize("family", sorted(FAMILY_WORKFLOWS))
def test_workflow_runs_on_the_tiny_model(comfy, registry, family):
    """The workflow's model chain (ModelSamplingSD3, our nodes, with the workflow's own settings) and its KSampler
    settings run on the family's tiny ComfyUI model in place of the loaded one, and the report node reads the run."""
    from fastdiff.eval.bench_comfyui import run_node

    workflow = _workflow(FAMILY_WORKFLOWS[family])
    sampler_id = next(i for i, n in workflow.items() if n["class_type"] == "KSampler")
    ks = workflow[sampler_id]["inputs"]
    model = harness.build_model(family)
    for node_id in _model_chain(workflow, sampler_id)[1:]:  # the loader's MODEL is the tiny model
        node = workflow[node_id]
        inputs = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        model = run_node(harness, node["class_type"], model=model, **inputs)[0]
    out = harness.sample(model, family, seed=ks["seed"], steps=ks["steps"], cfg=ks["cfg"], sampler=ks["sampler_name"],
                         scheduler=ks["scheduler"])
    assert torch.isfinite(out).all()
    report, latent = run_node(harness, "FastDiffReport", model=model, latent={"samples": out})
    assert latent["samples"] is out
    assert f"{ks['steps']} steps" in report


@pytest.mark.parametrize("family", sorted(SAMPLER_WORKFLOWS))
def test_sampler_workflow_is_valid_and_runs_on_the_tiny_model(comfy, registry, family):
    """The bottleneck sampler's workflow passes ComfyUI's validation, its SAMPLER goes into SamplerCustomAdvanced with
    a model from our nodes, and its settings sample the family's tiny model at full size with the stages it names."""
    from fastdiff.eval.bench_comfyui import run_node

    workflow = _workflow(SAMPLER_WORKFLOWS[family])
    assert _problems(comfy, registry, workflow) == []
    custom_id = next(i for i, n in workflow.items() if n["class_type"] == "SamplerCustomAdvanced")
    custom = workflow[custom_id]["inputs"]
    sampler = workflow[custom["sampler"][0]]
    assert sampler["class_type"] == "FastDiffBottleneckSampler"
    guider = workflow[custom["guider"][0]]
    assert workflow[guider["inputs"]["model"][0]]["class_type"].startswith("FastDiff")
    model = harness.build_model(family)
    for node_id in _model_chain(workflow, custom["guider"][0])[1:]:
        node = workflow[node_id]
        model = run_node(harness, node["class_type"], model=model,
                         **{k: v for k, v in node["inputs"].items() if not isinstance(v, list)})[0]
    (ksampler,) = run_node(harness, "FastDiffBottleneckSampler", **sampler["inputs"])
    steps = workflow[custom["sigmas"][0]]["inputs"]["steps"]
    sigmas = run_node(harness, "BasicScheduler", model=model, scheduler="simple", steps=min(steps, 6), denoise=1.0)[0]
    plain = harness.sample(model, family, seed=0, steps=min(steps, 6), scheduler="simple")
    out = harness.sample_with(model, ksampler, sigmas, family, seed=0)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    from fastdiff.integrations import comfyui as host

    summary = host.plan_of(model).last  # the cache node's run: one run of the sampler's two stages
    assert summary.stages == 2 and len(summary.per_step) == min(steps, 6)
    report, _ = run_node(harness, "FastDiffReport", model=model, latent={"samples": out})
    assert f"{min(steps, 6)} steps, 2 stages" in report and "tokens 4+8 / 16+8 per sample" in report  # 4x4, 8x8 latents

